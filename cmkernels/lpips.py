"""LPIPS (Zhang et al., 2018; VGG variant) as a consistency-training distance, from local weights.

LPIPS compares deep features: both images go through VGG-16, the activations after relu1_2,
relu2_2, relu3_3, relu4_3 and relu5_3 are normalised to unit length over channels, their squared
differences are weighted per channel by a learned non-negative 1x1 layer, averaged over space and
summed over the five layers. The consistency-model paper trains its best models with it (on images
upsampled bilinearly to 224x224 first).

Nothing is downloaded. The user points us at two local files:
- `vgg`: the ImageNet VGG-16 weights as a torchvision state_dict (keys ``features.<i>.weight``,
  ``features.<i>.bias``; ``classifier.*`` is ignored), e.g. torchvision's ``vgg16-397923af.pth``;
- `lin`: the LPIPS linear-layer weights (keys ``lin<k>.model.1.weight``, shapes [1, C, 1, 1]),
  the ``weights/v0.1/vgg.pth`` file of the `lpips` package.
Both load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# VGG-16 "D": conv widths, "M" = 2x2 max-pool. torchvision numbers conv/relu/pool modules in one
# Sequential, so a conv's index in `features` follows from this list.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # features indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_WIDTHS = (64, 128, 256, 512, 512)
# LPIPS' input scaling of [-1, 1] images (per RGB channel).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class LPIPSError(ValueError):
    """LPIPS weight files that are missing or do not have the expected layout."""


def _vgg_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
            c = v
    return nn.Sequential(*layers[: _TAPS[-1] + 1])  # up to relu5_3; the last pool is not used


class LPIPS(nn.Module):
    """d(a, b) -> [B] for images in [-1, 1] (1 or 3 channels; grayscale is repeated to RGB)."""

    def __init__(self, resize: int | None = 224):
        super().__init__()
        self.features = _vgg_features()
        self.lins = nn.ParameterList([nn.Parameter(torch.ones(1, c, 1, 1)) for c in _WIDTHS])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.resize = resize
        self.requires_grad_(False)

    @classmethod
    def from_files(cls, vgg: str | os.PathLike, lin: str | os.PathLike, **kw) -> LPIPS:
        model = cls(**kw)
        model.load_weights(_load(vgg, "VGG-16"), _load(lin, "LPIPS linear"))
        return model.eval()

    def load_weights(self, vgg: dict, lin: dict) -> None:
        vgg = {k[len("features.") :]: v for k, v in vgg.items() if k.startswith("features.")}
        expected = self.features.state_dict()
        missing = sorted(set(expected) - set(vgg), key=_natural)
        if missing:
            raise LPIPSError(
                "the VGG-16 file is not a torchvision vgg16 state_dict: missing "
                + ", ".join(f"features.{k}" for k in missing[:6])
            )
        for k, v in expected.items():
            if vgg[k].shape != v.shape:
                raise LPIPSError(f"VGG-16 features.{k}: shape {tuple(vgg[k].shape)}, "
                                 f"expected {tuple(v.shape)} (is it VGG-16?)")  # fmt: skip
        self.features.load_state_dict({k: vgg[k] for k in expected})
        for i, (p, c) in enumerate(zip(self.lins, _WIDTHS)):
            key = f"lin{i}.model.1.weight"
            if key not in lin:
                raise LPIPSError(f"the LPIPS linear file has no {key} (keys: {sorted(lin)[:6]})")
            if lin[key].shape != (1, c, 1, 1):
                raise LPIPSError(f"{key}: shape {tuple(lin[key].shape)}, expected (1, {c}, 1, 1)")
            p.data.copy_(lin[key])

    def _taps(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x)
        return out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape != b.shape or a.dim() != 4 or a.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS takes two [B, 1|3, H, W] batches, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")  # fmt: skip
        n = a.shape[0]
        x = torch.cat([a, b]).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize and x.shape[-1] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear",
                              align_corners=False)  # fmt: skip
        x = (x - self.shift) / self.scale
        total = x.new_zeros(n)
        for feat, w in zip(self._taps(x), self.lins):
            unit = feat / (feat.square().sum(1, keepdim=True).sqrt() + 1e-10)
            diff = (unit[:n] - unit[n:]).square()
            total = total + (diff * w).sum(1).mean((1, 2))
        return total


def _natural(key: str):
    head, _, tail = key.partition(".")
    return (int(head) if head.isdigit() else 0, tail)


def _load(path, what: str) -> dict:
    if path is None or not os.path.exists(path):
        raise LPIPSError(f"{what} weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        raise LPIPSError(f"cannot read the {what} weights {path}: {exc}") from None
    if not isinstance(state, dict):
        raise LPIPSError(f"{path}: expected a state_dict, got {type(state).__name__}")
    return state
