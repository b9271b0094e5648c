"""Frechet distance and KID of generated images against a reference set, and LeNet training.

    python -m cmkernels.evaluate --generated SAMPLES.npz --reference mnist|twemoji|PATH \\
        [--split train|test|all] [--features lenet|efflite0|inception] [--inception-weights PATH] \\
        [--kid-subset-size N] [--json OUT]
    python -m cmkernels.evaluate train-lenet --out cmkernels/assets/lenet_mnist.pt

The metric is named after its feature space: "FD-LeNet" (1-channel default), "FD-EffLite0"
(3-channel default) and "FID" only with the Inception network. Values in different feature
spaces are not comparable with each other nor with published FIDs.

The distances themselves are torchmetrics' FrechetInceptionDistance and KernelInceptionDistance.
Each image set goes through the feature network once (batched, with a progress bar); the two
metrics then receive the features through a pass-through `feature` module, so FD and KID share
that single forward pass.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm import tqdm

from cmkernels import cli
from cmkernels.checkpoint import check_writable, save_atomic, write_text_atomic
from cmkernels.data import load_dataset
from cmkernels.features import METRIC_NAMES, get_feature_extractor, train_lenet

BUILTINS = ("mnist", "twemoji")
PROG = "python -m cmkernels.evaluate"


def default_features(num_channels: int) -> str:
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


def distances_from_features(features_a: torch.Tensor, features_b: torch.Tensor, kid: bool = True,
                            kid_subset_size: int | None = None, kid_subsets: int = 100,
                            seed: int = 0) -> dict:
    """FD (and KID) between two feature sets [N, D]. KID subsets are drawn with `seed`."""
    num_a, num_b, dim = len(features_a), len(features_b), features_a.shape[1]
    if min(num_a, num_b) < 2:
        raise ValueError(f"need at least 2 images per set, got {num_a} and {num_b}")
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


# ----------------------------------------------------------------------------------------------
# Command line.


def _evaluate_main(argv: list[str]) -> dict:
    p = cli.ArgumentParser(prog=PROG,
                                description="FD/KID of generated samples against reference images "
                                "(subcommand `train-lenet` trains the digit feature network).")
    p.add_argument("--generated", required=True, help=".npz of uint8 images (key 'images', NHWC)")
    p.add_argument("--reference", required=True, help="mnist | twemoji | folder | .npz | CIFAR dir")
    p.add_argument("--split", default="train", choices=["train", "test", "all"],
                   help="reference split (default train, the set models are trained on)")
    p.add_argument("--features", choices=sorted(METRIC_NAMES),
                   help="default: lenet for 1-channel images, efflite0 for 3-channel")
    p.add_argument("--inception-weights", help="local torch-fidelity Inception-v3 weights (FID)")
    p.add_argument("--kid-subset-size", type=int, help="default min(1000, set sizes)")
    p.add_argument("--kid-subsets", type=int, default=100, help="default 100")
    p.add_argument("--batch-size", type=int, default=250, help="default 250")
    p.add_argument("--device", help="default cuda if available, else cpu")
    p.add_argument("--json", help="also write the result to this JSON file")
    args = p.parse_args(argv)
    for name in ("kid_subset_size", "kid_subsets", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.features == "inception" and not args.inception_weights:
        p.error("--features inception needs --inception-weights PATH (a local torch-fidelity "
                "Inception-v3 file; nothing is downloaded)")
    if args.json:  # fail before the work, not after it
        check_writable(Path(args.json).parent, "--json")

    generated = load_dataset(args.generated, split="all")
    size = generated.resolution if str(args.reference).lower() in BUILTINS else None
    reference = load_dataset(args.reference, split=args.split, image_size=size)
    result = frechet_distance(generated.images, reference.images, args.features,
                              args.batch_size, kid=True, kid_subset_size=args.kid_subset_size,
                              kid_subsets=args.kid_subsets, device=args.device,
                              weights_path=args.inception_weights
                              if args.features == "inception" else None, progress=True)
    result.update(generated=str(args.generated), reference=str(args.reference),
                  reference_split=args.split)
    print(f"{result['metric']}: {result['fd']:.4f}")
    print(f"KID ({result['features']} features): {result['kid_mean']:.6f} ± {result['kid_std']:.6f}"
          f" ({result['kid_subsets']} subsets of {result['kid_subset_size']})")
    print(f"generated: {result['num_a']} images from {args.generated}; reference: "
          f"{result['num_b']} images of {args.reference} ({args.split})")
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return result


def _train_lenet_main(argv: list[str]) -> dict:
    p = cli.ArgumentParser(prog=PROG + " train-lenet",
                                description="Train the LeNet digit feature network on mnist "
                                "'train' (CPU, deterministic) and write weights + a JSON record.")
    p.add_argument("--out", required=True, help="weights .pt (the record goes beside it, .json)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--max-shift", type=int, default=1, help="random-shift augmentation, pixels")
    args = p.parse_args(argv)
    check_writable(Path(args.out).parent, "--out")

    model, record = train_lenet(epochs=args.epochs, seed=args.seed, batch_size=args.batch_size,
                                lr=args.lr, max_shift=args.max_shift, progress=True)
    out = Path(args.out)
    save_atomic(model.state_dict(), out)
    record = {"command": "python -m cmkernels.evaluate train-lenet " + shlex.join(argv),
              **record, "weights": out.name,
              "weights_sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
    write_text_atomic(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    print(f"LeNet test accuracy {record['test_accuracy']:.4f} "
          f"(train {record['train_accuracy']:.4f}); wrote {out} and {out.with_suffix('.json')}")
    return record


def main(argv: list[str] | None = None) -> dict:
    """The command line; returns the result. Errors end it with one line and SystemExit(2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-lenet"]:
        return cli.run(PROG + " train-lenet", lambda: _train_lenet_main(argv[1:]), argv)
    return cli.run(PROG, lambda: _evaluate_main(argv), argv)


if __name__ == "__main__":
    main()

