"""Image files in and out: the package's one image decoder (cmkernels.data reads dataset folders
with it too), reference images and masks for editing, PNG grids and .npz sample files.

Tensors are float [N, C, H, W] in [-1, 1]; files are PNG/JPEG/... read with Pillow.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image
from torch import Tensor

_MODES = {1: "L", 3: "RGB"}


def _read(path) -> Image.Image:
    """The file's pixels as Pillow decodes them, or one clear error."""
    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: corrupt or unreadable image ({exc})") from None
    return image


def decode_image(path) -> Image.Image:
    """Decode an image file -> Pillow image of mode "L" (gray) or "RGB", at its own size.

    Transparency (an alpha band, a palette or a tRNS colour) is composited on white; 16-bit
    grayscale is scaled to 8 bits (not clipped). The one decoder of the package: reference images
    (load_image) and dataset folders (cmkernels.data) both read their files through it.
    """
    image = _read(path)
    if image.mode.startswith("I"):  # 16-bit grayscale: scale, do not clip.
        return Image.fromarray(np.rint(np.asarray(image) / 257).clip(0, 255).astype(np.uint8))
    if image.mode in ("L", "1", "F"):
        return image.convert("L")
    if image.mode == "P" or "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("L" if image.mode == "LA" else "RGB")
    return image.convert("RGB")


def resize_square(image: Image.Image, size: int | None,
                  resample: Image.Resampling) -> Image.Image:
    """The image resized to size x size with the filter `resample` (unchanged when it already has
    that size, or when size is None). The aspect ratio is not kept: crop first if it matters."""
    if size is None or image.size == (size, size):
        return image
    return image.resize((size, size), resample)


def load_image(path, channels: int, size: int) -> Tensor:
    """Read an image file -> float32 [1, channels, size, size] in [-1, 1].

    channels: 1 (gray) or 3 (RGB); transparent pixels are composited on white. A non-square
    image is center-cropped to a square; the square is resized to size x size (bicubic).
    """
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    image = decode_image(path).convert(_MODES[channels])
    w, h = image.size
    s = min(w, h)
    if (w, h) != (s, s):
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s))
    # Bicubic after a center crop, as the loaders of guided-diffusion and the consistency-model
    # code end (center_crop_arr); kept so that editing results do not move.
    image = resize_square(image, size, Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32).reshape(size, size, channels)  # (H, W, C)
    x = torch.from_numpy(array.copy()).permute(2, 0, 1)[None]  # (1, C, H, W)
    return x / 127.5 - 1


def load_mask(path, size: int) -> Tensor:
    """Read an inpainting mask -> float32 [1, 1, size, size] with values in {0, 1}.

    WHITE (gray level >= 128) marks the region to GENERATE (1); black marks the pixels kept from
    the reference image (0). The mask must already be size x size pixels (it is not resized).
    """
    image = _read(path).convert("L")  # no compositing: alpha is not a mask value
    if image.size != (size, size):
        w, h = image.size
        raise ValueError(f"mask {path} is {w}x{h} pixels; the model needs {size}x{size}")
    array = np.asarray(image) >= 128  # (H, W)
    return torch.from_numpy(array).to(torch.float32)[None, None]


def to_uint8(images: Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C]: round((x + 1) * 127.5), clamped to [0, 255].

    Rounding (the official sampler truncates) makes load_image -> to_uint8 the identity on
    8-bit images; truncation would move 63 of the 256 levels down by one.
    """
    x = ((images.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: Tensor | np.ndarray, path, ncols: int | None = None) -> None:
    """Save images (float [N, C, H, W] in [-1, 1], or uint8 [N, H, W, C]) as one PNG grid with
    ncols columns (default: ceil(sqrt(N))), atomically."""
    array = to_uint8(images) if isinstance(images, Tensor) else np.asarray(images, np.uint8)
    n, h, w, c = array.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * h, ncols * w, c), dtype=np.uint8)  # (rows*H, cols*W, C)
    for i, image in enumerate(array):
        r, col = divmod(i, ncols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    _write_atomic(path, lambda f: picture.save(f, format=_format_of(path)))


def save_npz(path, images: np.ndarray, labels: np.ndarray | Tensor | None = None) -> None:
    """Save uint8 images [N, H, W, C] under key "images" (plus int64 "labels" [N] when given),
    atomically."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    arrays = {"images": images}
    if labels is not None:
        labels = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
        arrays["labels"] = labels.astype(np.int64)
    _write_atomic(path, lambda f: np.savez(f, **arrays))


def _format_of(path) -> str:
    """Pillow's format name for a file name's extension (PNG when it has none)."""
    ext = os.path.splitext(str(path))[1].lower()
    return Image.registered_extensions().get(ext, "PNG")


def _write_atomic(path, write) -> None:
    from cmkernels.checkpoint import write_atomic  # imported here: it pulls in the UNet

    write_atomic(path, write)
