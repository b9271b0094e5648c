"""Consistency-model checkpoints in the diffusers layout, both ways.

diffusers holds the official consistency models as a `ConsistencyModelPipeline`: a `UNet2DModel`
and a `CMStochasticIterativeScheduler`. The UNet2DModel of the consistency-model family is the
same ADM network as ours; every tensor maps one to one (the packed qkv convolution of attention
is three linears there). Everything is table-driven, and reading and writing use the same tables:

- layout.py:    the file and class names of the layout, and DiffusersFormatError;
- config.py:    UNet2DModel config.json <-> our UNetConfig (FIXED_UNET_SETTINGS, DOWN/UP_BLOCKS);
- weights.py:   tensor names and shapes, our state_dict <-> UNet2DModel's (module_pairs,
                TENSOR_RULES);
- scheduler.py: scheduler_config.json as SchedulerSettings; official ts <-> diffusers timesteps;
- load.py:      locating and reading directories: load_diffusers, and load_any (a diffusers
                directory or our / the official checkpoints) for the command lines;
- save.py:      writing directories: save_diffusers; DTYPES, the dtype names of the command lines.

Import from here: `from cmkernels import diffusers_format as dfm; dfm.load_diffusers(path)`.
"""

from cmkernels.diffusers_format.config import (
    DOWN_BLOCKS,
    FIXED_UNET_SETTINGS,
    LEGACY_BLOCKS,
    SCALE_SHIFT,
    UNET2D_DEFAULTS,
    UP_BLOCKS,
    attention_levels,
    diffusers_config_from_unet,
    unet_config_from_diffusers,
)
from cmkernels.diffusers_format.layout import (
    CONFIG_NAME,
    PIPELINE_CLASS,
    PIPELINE_INDEX_NAME,
    SCHEDULER_CLASS,
    SCHEDULER_CONFIG_NAME,
    UNET_CLASS,
    WEIGHTS_BIN_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    WRITTEN_VERSION,
    DiffusersFormatError,
)
from cmkernels.diffusers_format.load import (
    DiffusersCheckpoint,
    is_diffusers_source,
    load_any,
    load_diffusers,
    read_weights,
)
from cmkernels.diffusers_format.save import DTYPES, check_exportable, save_diffusers
from cmkernels.diffusers_format.scheduler import (
    SchedulerSettings,
    diffusers_timesteps_to_ts,
    num_inference_steps_timesteps,
    scheduler_settings_of,
    ts_to_diffusers_timesteps,
)
from cmkernels.diffusers_format.weights import (
    TENSOR_RULES,
    TensorRule,
    from_diffusers_state_dict,
    module_pairs,
    tensor_rules,
    their_shapes,
    to_diffusers_state_dict,
    to_ours,
    to_theirs,
)

__all__ = [
    "CONFIG_NAME",
    "DOWN_BLOCKS",
    "DTYPES",
    "DiffusersCheckpoint",
    "DiffusersFormatError",
    "FIXED_UNET_SETTINGS",
    "LEGACY_BLOCKS",
    "PIPELINE_CLASS",
    "PIPELINE_INDEX_NAME",
    "SCALE_SHIFT",
    "SCHEDULER_CLASS",
    "SCHEDULER_CONFIG_NAME",
    "SchedulerSettings",
    "TENSOR_RULES",
    "TensorRule",
    "UNET2D_DEFAULTS",
    "UNET_CLASS",
    "UP_BLOCKS",
    "WEIGHTS_BIN_NAME",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "WRITTEN_VERSION",
    "attention_levels",
    "check_exportable",
    "diffusers_config_from_unet",
    "diffusers_timesteps_to_ts",
    "from_diffusers_state_dict",
    "is_diffusers_source",
    "load_any",
    "load_diffusers",
    "module_pairs",
    "num_inference_steps_timesteps",
    "read_weights",
    "save_diffusers",
    "scheduler_settings_of",
    "tensor_rules",
    "their_shapes",
    "to_diffusers_state_dict",
    "to_ours",
    "to_theirs",
    "ts_to_diffusers_timesteps",
    "unet_config_from_diffusers",
]
