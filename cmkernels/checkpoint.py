"""Checkpoints: atomic writes, safe loads, and building a denoiser from our files or the official
state_dicts.

Our format (written by the trainer) is a dict of tensors and plain values:
  format "cmkernels", version 1, unet_config (UNetConfig as a dict), denoiser (parameterization,
  sigma_data, sigma_min, sigma_max, c_noise), model (state_dict), emas {rate: state_dict}, plus
  trainer state (target, optimizer, step, config, rng) that sampling ignores.
Official files (cd_imagenet64_l2.pt, edm_bedroom256_ema.pt, ...) are plain UNet state_dicts.
diffusers directories (UNet2DModel / ConsistencyModelPipeline) load through diffusers_format.
Everything loads with torch.load(weights_only=True) (or safetensors): no arbitrary unpickling.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import torch

from cmkernels.diffusion import Denoiser
from cmkernels.unet import PRESETS, UNet, UNetConfig


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file beside `path`, fsync, then rename over it: a crash leaves
    either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_file(path: str | os.PathLike) -> dict:
    """Load a checkpoint safely (weights_only / safetensors) onto the CPU."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file as load_st
        except ImportError as exc:
            raise CheckpointError(
                f"{path}: reading .safetensors needs `pip install safetensors`"
            ) from exc
        return load_st(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0]} "
            "(corrupt, truncated, or not a weights-only torch file)"
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state_dict or checkpoint"
        )
    return obj


def build_unet_meta(preset: str | UNetConfig) -> UNet:
    """The UNet of a preset on the meta device (names and shapes, no memory)."""
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    with torch.device("meta"):
        return UNet(dataclasses.replace(cfg))


def _layout_distance(state: dict, preset: str) -> int:
    ref = {n: tuple(t.shape) for n, t in build_unet_meta(preset).state_dict().items()}
    got = {n: tuple(t.shape) for n, t in state.items()}
    return len(set(ref) ^ set(got)) + sum(ref[n] != got[n] for n in set(ref) & set(got))


def suggest_preset(state: dict) -> str:
    """The presets whose tensor layout matches `state` best, as text ("gray28 or gray32")."""
    scores = {p: _layout_distance(state, p) for p in PRESETS}
    best = min(scores.values())
    return " or ".join(sorted(p for p, s in scores.items() if s == best))


def _load_strict(net: UNet, state: dict, source: str, preset: str | None):
    ref = net.state_dict()
    missing = [k for k in ref if k not in state]
    unexpected = [k for k in state if k not in ref]
    mismatched = [k for k in ref if k in state and tuple(ref[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:

        def show(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

        lines = [f"{source} does not fit the {preset or 'configured'} UNet:"]
        if missing:
            lines.append(f"  missing keys: {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {show(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches: {show(mismatched)}")
        hint = suggest_preset(state)
        lines.append(f"  its layout matches the preset {hint} best: try --preset {hint.split()[0]}")
        raise CheckpointError("\n".join(lines))
    net.load_state_dict(state, strict=True)


def load_denoiser(
    path: str | os.PathLike,
    preset: str | None = None,
    parameterization: str | None = None,
    weights: str = "ema",
    device: str | torch.device = "cpu",
) -> Denoiser:
    """A Denoiser from our checkpoint (EMA weights by default) or an official state_dict.

    preset:           for official files: "imagenet64" | "lsun256" (required for them)
    parameterization: override "cm"/"edm" (official edm_*.pt files are EDM teachers)
    weights:          "ema" (the first evaluation EMA, if any) or "model"

    A diffusers directory (ConsistencyModelPipeline or UNet2DModel) or diffusers .safetensors
    file loads through cmkernels.diffusers_format.load_diffusers (no preset needed).
    """
    from cmkernels import diffusers_format  # imported here: it imports this module

    if diffusers_format.is_diffusers_source(path):
        if preset is not None:
            raise diffusers_format.DiffusersFormatError(
                f"{path} is in the diffusers layout: its config.json gives the architecture "
                "(no preset)"
            )
        return diffusers_format.load_diffusers(
            path, parameterization=parameterization, device=device
        ).denoiser
    state = load_file(path)
    if state.get("format") == "cmkernels":
        cfg = UNetConfig(**state["unet_config"])
        meta = dict(state["denoiser"])
        if weights == "ema" and state.get("emas"):
            weights_sd = next(iter(state["emas"].values()))
        elif weights in ("ema", "model"):
            weights_sd = state["model"]
        else:
            raise CheckpointError(f"weights must be 'ema' or 'model', got {weights!r}")
        net = UNet(cfg)
        _load_strict(net, weights_sd, str(path), None)
        if parameterization:
            meta["parameterization"] = parameterization
        den = Denoiser(net, meta["parameterization"], meta["sigma_data"], meta["sigma_min"],
                       meta["sigma_max"], meta["c_noise"])  # fmt: skip
    else:
        if preset is None:
            hint = suggest_preset(state)
            raise CheckpointError(
                f"{path} is a plain state_dict (an official checkpoint?): pass its preset, "
                f"e.g. --preset {hint}"
            )
        if preset not in PRESETS:
            raise CheckpointError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        net = UNet(dataclasses.replace(PRESETS[preset]))
        _load_strict(net, state, str(path), preset)
        kind = parameterization or ("edm" if Path(path).name.startswith("edm") else "cm")
        den = Denoiser(net, kind, c_noise="official")
    return den.to(device).eval()


def export_weights(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    weights: str = "ema",
    dtype: torch.dtype = torch.float16,
    record: dict | None = None,
) -> Path:
    """Write a slim inference checkpoint of our format: one set of weights (the first EMA or the
    model) in `dtype`, no trainer state. `record` (e.g. the training command and metrics) is kept
    under "record". Loads with load_denoiser like any of our checkpoints."""
    state = load_file(src)
    if state.get("format") != "cmkernels":
        raise CheckpointError(f"{src} is not a cmkernels checkpoint")
    if weights == "ema" and state.get("emas"):
        chosen = next(iter(state["emas"].values()))
    else:
        chosen = state["model"]
    slim = {
        "format": "cmkernels",
        "version": 1,
        "unet_config": state["unet_config"],
        "denoiser": state["denoiser"],
        "model": {k: v.to(dtype) if v.is_floating_point() else v for k, v in chosen.items()},
        "emas": {},
        "record": record or {},
    }  # fmt: skip
    return save_atomic(slim, dst)
