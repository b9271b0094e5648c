"""Writing diffusers directories: save_diffusers (a ConsistencyModelPipeline or a bare
UNet2DModel directory), the check that diffusers computes what a denoiser does, and the dtypes
the command lines name.

Weights are written with safetensors, configs with json, each through a temporary file that is
renamed into place. diffusers itself is not needed to write these files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cmkernels.diffusers_format import layout as names  # the file and class names
from cmkernels.diffusers_format.config import diffusers_config_from_unet
from cmkernels.diffusers_format.layout import DiffusersFormatError
from cmkernels.diffusers_format.scheduler import SchedulerSettings, scheduler_settings_of
from cmkernels.diffusers_format.weights import to_diffusers_state_dict
from cmkernels.diffusion import Denoiser

# The dtypes a command line names (sample --dtype: autocast; export --dtype: written weights).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_exportable(denoiser: Denoiser) -> None:
    """DiffusersFormatError unless ConsistencyModelPipeline computes what `denoiser` does: the
    boundary-condition scalings and the official time input 250 ln(sigma)."""
    if denoiser.c_noise_convention != "official":
        raise DiffusersFormatError(
            f"the network takes the {denoiser.c_noise_convention!r} time input; diffusers' "
            "consistency-model scheduler feeds 250 ln(sigma) (the 'official' convention)"
        )
    if denoiser.parameterization != "cm":
        raise DiffusersFormatError(
            f"a {denoiser.parameterization!r} denoiser: ConsistencyModelPipeline applies the "
            "consistency-model scalings (pass parameterization 'cm' to export the weights as a "
            "consistency model anyway)"
        )


def save_diffusers(
    denoiser: Denoiser,
    out_dir: str | os.PathLike,
    *,
    scheduler: SchedulerSettings | None = None,
    layout: str = "pipeline",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `denoiser` as a diffusers directory; returns the UNet's directory.

    layout "pipeline": OUT/model_index.json, OUT/unet/{config.json, weights},
                       OUT/scheduler/scheduler_config.json: for
                       ConsistencyModelPipeline.from_pretrained(OUT) and
                       UNet2DModel.from_pretrained(OUT, subfolder="unet");
    layout "unet":     OUT/{config.json, weights, scheduler_config.json}: for
                       UNet2DModel.from_pretrained(OUT).
    """
    from safetensors.torch import save_file

    if layout not in ("pipeline", "unet"):
        raise ValueError(f"layout must be 'pipeline' or 'unet', got {layout!r}")
    check_exportable(denoiser)
    net = denoiser.net
    config = diffusers_config_from_unet(net.config)
    state = {k: v.detach().to("cpu", dtype) for k, v in net.state_dict().items()}
    tensors = to_diffusers_state_dict(state, net.config)
    settings = scheduler or scheduler_settings_of(denoiser)
    out = Path(out_dir)
    unet_dir = out / "unet" if layout == "pipeline" else out
    sched_dir = out / "scheduler" if layout == "pipeline" else out
    unet_dir.mkdir(parents=True, exist_ok=True)
    sched_dir.mkdir(parents=True, exist_ok=True)
    tmp = unet_dir / f".{names.WEIGHTS_NAME}.tmp"  # written beside, renamed: never torn
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, unet_dir / names.WEIGHTS_NAME)
    _write_json(unet_dir / names.CONFIG_NAME, config)
    _write_json(sched_dir / names.SCHEDULER_CONFIG_NAME, settings.to_config())
    if layout == "pipeline":
        _write_json(out / names.PIPELINE_INDEX_NAME, {
            "_class_name": names.PIPELINE_CLASS,
            "_diffusers_version": names.WRITTEN_VERSION,
            "scheduler": ["diffusers", names.SCHEDULER_CLASS],
            "unet": ["diffusers", names.UNET_CLASS],
        })  # fmt: skip
    return unet_dir


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
