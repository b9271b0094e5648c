"""The names of the diffusers layout (files, classes, the written version) and its error type.

diffusers holds the official consistency models as a `ConsistencyModelPipeline`: a `UNet2DModel`
(`unet/config.json` + `unet/diffusion_pytorch_model.safetensors`) and a
`CMStochasticIterativeScheduler` (`scheduler/scheduler_config.json`).
"""

from __future__ import annotations

from cmkernels.checkpoint import CheckpointError

WRITTEN_VERSION = "0.42.1"  # the diffusers version whose loaders the written files were tested with
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"  # sharded weights
WEIGHTS_BIN_NAME = "diffusion_pytorch_model.bin"  # older directories (read with weights_only)
CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
PIPELINE_INDEX_NAME = "model_index.json"
UNET_CLASS = "UNet2DModel"
SCHEDULER_CLASS = "CMStochasticIterativeScheduler"
PIPELINE_CLASS = "ConsistencyModelPipeline"


class DiffusersFormatError(CheckpointError):
    """A diffusers directory or file that is not a UNet2DModel of the consistency-model family,
    or a network that the diffusers layout cannot express. The message is one line."""
