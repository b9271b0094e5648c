"""Reading diffusers directories: locating their files, load_diffusers, and load_any (a diffusers
directory or one of our / the official checkpoints: the one loader of the command lines).

Nothing is unpickled: weights are read with safetensors (`.bin` files with
torch.load(weights_only=True)), configs with json. diffusers itself is not needed to read these
files (only to run them in diffusers).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cmkernels.diffusers_format.config import unet_config_from_diffusers
from cmkernels.diffusers_format.layout import (
    CONFIG_NAME,
    PIPELINE_CLASS,
    PIPELINE_INDEX_NAME,
    SCHEDULER_CONFIG_NAME,
    UNET_CLASS,
    WEIGHTS_BIN_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    DiffusersFormatError,
)
from cmkernels.diffusers_format.scheduler import SchedulerSettings, scheduler_settings_of
from cmkernels.diffusers_format.weights import from_diffusers_state_dict
from cmkernels.diffusion import Denoiser
from cmkernels.unet import UNet


@dataclass
class DiffusersCheckpoint:
    """What `load_diffusers` returns: the denoiser (eval mode), the scheduler's settings (the
    defaults when the directory has no scheduler config) and where they came from."""

    denoiser: Denoiser
    scheduler: SchedulerSettings
    unet_dir: Path | None
    scheduler_config: Path | None  # None: none found, defaults used


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DiffusersFormatError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise DiffusersFormatError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def is_diffusers_source(path: str | os.PathLike) -> bool:
    """A directory, or a .safetensors file with diffusers tensor names (conv_in.weight)."""
    path = Path(path)
    if path.is_dir():
        return True
    if path.suffix == ".safetensors" and path.is_file():
        try:
            return "conv_in.weight" in _safetensors_keys(path)
        except Exception:  # not readable: let the plain loader report it
            return False
    return False


def _locate(path: Path) -> tuple[Path, Path | None, Path | None]:
    """(UNet config.json, weights file or None, scheduler config or None) of a directory: a
    ConsistencyModelPipeline directory (model_index.json, unet/, scheduler/), a UNet2DModel
    directory (config.json; scheduler_config.json beside it or in ../scheduler/), or a weights
    file with config.json beside it."""
    if path.is_file():
        config = path.parent / CONFIG_NAME
        if not config.is_file():
            raise DiffusersFormatError(
                f"{path} has diffusers tensor names but no {CONFIG_NAME} beside it: pass the "
                "directory, or the config (load_diffusers(..., config=...))"
            )
        return config, path, _scheduler_beside(path.parent)
    if not path.exists():
        raise DiffusersFormatError(f"checkpoint not found: {path}")
    if (path / PIPELINE_INDEX_NAME).is_file() or (path / "unet" / CONFIG_NAME).is_file():
        index = path / PIPELINE_INDEX_NAME
        if index.is_file():
            pipe = _read_json(index).get("_class_name", PIPELINE_CLASS)
            if pipe != PIPELINE_CLASS:
                raise DiffusersFormatError(f"{index} describes a {pipe}, not a {PIPELINE_CLASS}")
        unet = path / "unet"
        if not (unet / CONFIG_NAME).is_file():
            raise DiffusersFormatError(f"{path} is a pipeline directory without unet/{CONFIG_NAME}")
        sched = path / "scheduler" / SCHEDULER_CONFIG_NAME
        return unet / CONFIG_NAME, None, sched if sched.is_file() else None
    if (path / CONFIG_NAME).is_file():
        return path / CONFIG_NAME, None, _scheduler_beside(path)
    raise DiffusersFormatError(
        f"{path} is a directory without {CONFIG_NAME} or {PIPELINE_INDEX_NAME} (not a diffusers "
        f"{UNET_CLASS} or {PIPELINE_CLASS} directory)"
    )


def _scheduler_beside(unet_dir: Path) -> Path | None:
    for cand in (
        unet_dir / SCHEDULER_CONFIG_NAME,
        unet_dir.parent / "scheduler" / SCHEDULER_CONFIG_NAME,
    ):
        if cand.is_file():
            return cand
    return None


def _weights_in(unet_dir: Path) -> Path:
    for name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_BIN_NAME):
        if (unet_dir / name).is_file():
            return unet_dir / name
    variants = sorted(unet_dir.glob("diffusion_pytorch_model.*.safetensors"))
    if len(variants) == 1:  # e.g. diffusion_pytorch_model.fp16.safetensors
        return variants[0]
    found = f" (variants: {', '.join(v.name for v in variants)}; pass one file)" if variants else ""
    raise DiffusersFormatError(f"no {WEIGHTS_NAME} in {unet_dir}{found}")


def read_weights(path: Path) -> dict[str, Tensor]:
    """A UNet2DModel's tensors from a .safetensors file, a sharded index (.index.json) or a
    .bin file (torch.load weights_only=True)."""
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise DiffusersFormatError(
            "reading diffusers weights needs `pip install safetensors`"
        ) from e
    try:
        if path.name.endswith(".index.json"):
            shards = sorted(set(_read_json(path).get("weight_map", {}).values()))
            if not shards:
                raise DiffusersFormatError(f"{path} lists no weight files")
            state = {}
            for shard in shards:
                state.update(load_file(str(path.parent / shard)))
            return state
        if path.suffix == ".bin":
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise DiffusersFormatError(f"{path} holds a {type(state).__name__}, not tensors")
            return state
        return load_file(str(path))
    except DiffusersFormatError:
        raise
    except Exception as e:  # safetensors / unpickler errors come in several types
        first = str(e).splitlines()[0] if str(e) else ""
        raise DiffusersFormatError(f"cannot read {path}: {type(e).__name__}: {first}") from None


def load_diffusers(
    path: str | os.PathLike,
    *,
    config: str | os.PathLike | dict | None = None,
    scheduler: str | os.PathLike | dict | None = None,
    parameterization: str | None = None,
    device: str | torch.device = "cpu",
) -> DiffusersCheckpoint:
    """A consistency model from a diffusers directory or weights file, every tensor mapped.

    path:      ConsistencyModelPipeline directory, UNet2DModel directory, or its weights file
    config:    the UNet2DModel config (path or dict) when `path` is a file without one beside it
    scheduler: CMStochasticIterativeScheduler config (path or dict); default: the directory's
    parameterization: "cm" (default: what ConsistencyModelPipeline computes) or "edm"
    """
    path = Path(path)
    sched_path = None
    if config is not None:
        if not path.is_file():
            raise DiffusersFormatError(f"config= goes with a weights file; {path} is not a file")
        unet_cfg = config if isinstance(config, dict) else _read_json(Path(config))
        source, weights = str(config) if not isinstance(config, dict) else "the config", path
        unet_dir = None
    else:
        config_path, weights, sched_path = _locate(path)
        unet_cfg, source, unet_dir = _read_json(config_path), str(config_path), config_path.parent
        if "_class_name" not in unet_cfg:  # diffusers always writes it
            hint = " (a training run? pass its last.pt)" if (unet_dir / "last.pt").is_file() else ""
            raise DiffusersFormatError(
                f"{source} has no _class_name: not the config of a diffusers model{hint}"
            )
        weights = weights or _weights_in(unet_dir)
    if scheduler is not None:
        sched_path = None if isinstance(scheduler, dict) else Path(scheduler)
        sched_cfg = scheduler if isinstance(scheduler, dict) else _read_json(sched_path)
        settings = SchedulerSettings.from_config(sched_cfg, str(sched_path or "the scheduler"))
    elif sched_path is not None:
        settings = SchedulerSettings.from_config(_read_json(sched_path), str(sched_path))
    else:
        settings = SchedulerSettings()
    cfg = unet_config_from_diffusers(unet_cfg, source)
    state = from_diffusers_state_dict(read_weights(weights), cfg, str(weights))
    net = UNet(cfg)
    net.load_state_dict(state, strict=True)
    den = Denoiser(net, parameterization or "cm", settings.sigma_data, settings.sigma_min,
                   settings.sigma_max, c_noise="official")  # fmt: skip
    return DiffusersCheckpoint(den.to(device).eval(), settings, unet_dir, sched_path)



def load_any(
    path: str | os.PathLike,
    *,
    preset: str | None = None,
    parameterization: str | None = None,
    weights: str = "ema",
    device: str | torch.device = "cpu",
) -> tuple[Denoiser, SchedulerSettings]:
    """(denoiser in eval mode, the sampler's scheduler settings) of any checkpoint: a diffusers
    directory or weights file (its scheduler_config.json, else the defaults), or one of our
    checkpoints / an official state_dict (checkpoint.load_denoiser; the settings that reproduce
    its constants).

    preset: official state_dicts only; weights: our checkpoints only ("ema", "model", a rate).
    """
    if is_diffusers_source(path):
        if preset is not None:
            raise DiffusersFormatError(
                f"{path} is in the diffusers layout, whose {CONFIG_NAME} gives the "
                "architecture: drop the preset (--preset is for official .pt files)"
            )
        loaded = load_diffusers(path, parameterization=parameterization, device=device)
        return loaded.denoiser, loaded.scheduler
    from cmkernels.checkpoint import load_denoiser

    denoiser = load_denoiser(path, preset=preset, parameterization=parameterization,
                             weights=weights, device=device)  # fmt: skip
    return denoiser, scheduler_settings_of(denoiser)

