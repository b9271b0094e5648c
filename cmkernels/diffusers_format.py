"""Consistency-model checkpoints in the diffusers layout, both ways.

diffusers holds the official consistency models as a `ConsistencyModelPipeline`: a `UNet2DModel`
(`unet/config.json` + `unet/diffusion_pytorch_model.safetensors`) and a
`CMStochasticIterativeScheduler` (`scheduler/scheduler_config.json`). The UNet2DModel is the same
ADM network as ours when its config has the settings of `FIXED_UNET_SETTINGS` and its blocks are
the ones of `DOWN_BLOCKS` / `UP_BLOCKS`; then every tensor maps one to one, except that the packed
qkv 1x1 convolution of an attention block is three linears (to_q, to_k, to_v) there.

Everything here is table-driven:

- `FIXED_UNET_SETTINGS`: UNet2DModel settings the ADM UNet has, and `UNET2D_DEFAULTS` (what
  diffusers assumes for a key missing from config.json);
- `DOWN_BLOCKS` / `UP_BLOCKS`: block type <-> (attention at this level, resampling kind);
- `module_pairs(config)`: our module names <-> diffusers module names, with the module kind;
- `TENSOR_RULES`: per module kind, our tensor <-> diffusers tensor(s) and the reshape between them.

Nothing is unpickled: weights are read with safetensors (`.bin` files with
torch.load(weights_only=True)), configs with json. diffusers itself is not needed to read or
write these files (only to run them in diffusers).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cmkernels.checkpoint import CheckpointError, build_unet_meta
from cmkernels.diffusion import Denoiser
from cmkernels.unet import GROUPS, NORM_EPS, UNet, UNetConfig

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


# ----------------------------------------------------------------------------------------------
# The tables.

# What UNet2DModel assumes for a key that config.json lacks (its constructor defaults).
UNET2D_DEFAULTS: dict = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

# Settings that must have exactly these values: the ADM UNet's time embedding ([cos, sin] of the
# raw time input, max period 10000), SiLU, GroupNorm(32, eps 1e-5), a plain mid block with
# attention, no input centring, classes through an embedding table.
FIXED_UNET_SETTINGS: dict = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": GROUPS,
    "norm_eps": NORM_EPS,
    "add_attention": True,
    "class_embed_type": None,
}

# Block type -> (attention at that level, resampler kind); None: the kind is downsample_type /
# upsample_type. "resnet" resamples with a ResBlock (resblock_updown=True), "conv" with a strided
# conv (down) or nearest 2x + conv (up).
DOWN_BLOCKS: dict[str, tuple[bool, str | None]] = {
    "DownBlock2D": (False, "conv"),
    "ResnetDownsampleBlock2D": (False, "resnet"),
    "AttnDownBlock2D": (True, None),
}
UP_BLOCKS: dict[str, tuple[bool, str | None]] = {
    "UpBlock2D": (False, "conv"),
    "ResnetUpsampleBlock2D": (False, "resnet"),
    "AttnUpBlock2D": (True, None),
}
# Names the diffusers conversion script writes but diffusers 0.42 no longer has.
LEGACY_BLOCKS = {
    "AttnDownsampleBlock2D": "AttnDownBlock2D with downsample_type 'resnet'",
    "AttnUpsampleBlock2D": "AttnUpBlock2D with upsample_type 'resnet'",
}
SCALE_SHIFT = {"default": False, "scale_shift": True}  # resnet_time_scale_shift -> ours

# Per module kind: (our tensor, diffusers tensor(s), how the tensor changes).
#   copy:    same tensor;
#   squeeze: our 1x1 conv [O, I, 1, 1] <-> their linear [O, I];
#   split3:  our packed qkv 1x1 conv [3C, I, 1, 1] (bias [3C]) <-> to_q, to_k, to_v [C, I] ([C]):
#            channels [0, C) are the queries of all heads, [C, 2C) the keys, [2C, 3C) the values,
#            each ordered (head, head_dim), which is also how diffusers splits to_q/to_k/to_v.
TENSOR_RULES: dict[str, list[tuple[str, tuple[str, ...], str]]] = {
    "plain": [
        ("weight", ("weight",), "copy"),
        ("bias", ("bias",), "copy"),
    ],
    "res": [
        ("in_layers.0.weight", ("norm1.weight",), "copy"),
        ("in_layers.0.bias", ("norm1.bias",), "copy"),
        ("in_layers.2.weight", ("conv1.weight",), "copy"),
        ("in_layers.2.bias", ("conv1.bias",), "copy"),
        ("emb_layers.1.weight", ("time_emb_proj.weight",), "copy"),
        ("emb_layers.1.bias", ("time_emb_proj.bias",), "copy"),
        ("out_layers.0.weight", ("norm2.weight",), "copy"),
        ("out_layers.0.bias", ("norm2.bias",), "copy"),
        ("out_layers.3.weight", ("conv2.weight",), "copy"),
        ("out_layers.3.bias", ("conv2.bias",), "copy"),
        ("skip_connection.weight", ("conv_shortcut.weight",), "copy"),  # when channels change
        ("skip_connection.bias", ("conv_shortcut.bias",), "copy"),
    ],
    "attn": [
        ("norm.weight", ("group_norm.weight",), "copy"),
        ("norm.bias", ("group_norm.bias",), "copy"),
        ("qkv.weight", ("to_q.weight", "to_k.weight", "to_v.weight"), "split3"),
        ("qkv.bias", ("to_q.bias", "to_k.bias", "to_v.bias"), "split3"),
        ("proj_out.weight", ("to_out.0.weight",), "squeeze"),
        ("proj_out.bias", ("to_out.0.bias",), "copy"),
    ],
}


def module_pairs(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """(our module, diffusers module, kind) for every module with weights, in network order.

    Ours follow the official UNet (input_blocks / middle_block / output_blocks, one index per
    skip connection); diffusers groups the same modules per level (down_blocks.L: resnets,
    attentions, downsamplers; up_blocks.i is level n-1-i)."""
    n = len(cfg.channel_mult)
    attn = attention_levels(cfg)
    pairs = [
        ("time_embed.0", "time_embedding.linear_1", "plain"),
        ("time_embed.2", "time_embedding.linear_2", "plain"),
    ]
    if cfg.num_classes is not None:
        pairs.append(("label_emb", "class_embedding", "plain"))
    pairs.append(("input_blocks.0.0", "conv_in", "plain"))
    k = 1
    for level in range(n):
        for j in range(cfg.num_res_blocks):
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", "res"))
            if attn[level]:
                pairs.append((f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", "attn"))
            k += 1
        if level != n - 1:
            down = f"down_blocks.{level}.downsamplers.0"
            if cfg.resblock_updown:
                pairs.append((f"input_blocks.{k}.0", down, "res"))
            else:
                pairs.append((f"input_blocks.{k}.0.op", f"{down}.conv", "plain"))
            k += 1
    pairs += [
        ("middle_block.0", "mid_block.resnets.0", "res"),
        ("middle_block.1", "mid_block.attentions.0", "attn"),
        ("middle_block.2", "mid_block.resnets.1", "res"),
    ]
    k = 0
    for i, level in enumerate(reversed(range(n))):
        for j in range(cfg.num_res_blocks + 1):
            pairs.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", "res"))
            slot = 1
            if attn[level]:
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", "attn"))
                slot = 2
            if level and j == cfg.num_res_blocks:
                up = f"up_blocks.{i}.upsamplers.0"
                if cfg.resblock_updown:
                    pairs.append((f"output_blocks.{k}.{slot}", up, "res"))
                else:
                    pairs.append((f"output_blocks.{k}.{slot}.conv", f"{up}.conv", "plain"))
            k += 1
    pairs += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return pairs


def attention_levels(cfg: UNetConfig) -> list[bool]:
    """Whether each level has attention (the UNet's rule: downsample factor 2^L listed)."""
    factors = {cfg.image_size // r for r in cfg.attention_resolutions}
    return [2**level in factors for level in range(len(cfg.channel_mult))]


@dataclass(frozen=True)
class TensorRule:
    ours: str  # our state_dict key
    theirs: tuple[str, ...]  # diffusers key(s)
    how: str  # "copy" | "squeeze" | "split3"


def tensor_rules(cfg: UNetConfig) -> list[TensorRule]:
    """One rule per tensor of our UNet for `cfg` (exactly its state_dict keys)."""
    ours = build_unet_meta(dataclasses.replace(cfg)).state_dict()
    rules = []
    for our_mod, their_mod, kind in module_pairs(cfg):
        for our_t, their_ts, how in TENSOR_RULES[kind]:
            key = f"{our_mod}.{our_t}"
            if key in ours:  # skip_connection exists only where the channels change
                rules.append(TensorRule(key, tuple(f"{their_mod}.{t}" for t in their_ts), how))
    covered = {r.ours for r in rules}
    if covered != set(ours):  # a bug in the tables, not in the user's file
        raise AssertionError(f"unmapped tensors: {sorted(set(ours) - covered)[:8]}")
    return rules


def _their_shapes(rule: TensorRule, our_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    if rule.how == "copy":
        return [our_shape]
    if rule.how == "squeeze":
        return [our_shape[:2]]
    return [(our_shape[0] // 3, *our_shape[1:2])] * 3  # split3: weight [C, I] or bias [C]


def to_diffusers_state_dict(state: dict[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """Our UNet state_dict -> UNet2DModel state_dict (contiguous tensors, no shared storage)."""
    out = {}
    for rule in tensor_rules(cfg):
        t = state[rule.ours]
        if rule.how == "copy":
            parts = [t]
        elif rule.how == "squeeze":
            parts = [t.reshape(t.shape[:2])]
        else:
            parts = [p.reshape(p.shape[:2]) if p.dim() > 2 else p for p in t.chunk(3, dim=0)]
        for name, p in zip(rule.theirs, parts):
            out[name] = p.contiguous().clone()
    return out


def from_diffusers_state_dict(
    state: dict[str, Tensor], cfg: UNetConfig, source: str = "the weights"
) -> dict[str, Tensor]:
    """UNet2DModel state_dict -> ours, strictly: missing, unexpected and mis-shaped tensors are
    one DiffusersFormatError that names them."""
    ours = build_unet_meta(dataclasses.replace(cfg)).state_dict()
    missing, mismatched, out = [], [], {}
    used = set()
    for rule in tensor_rules(cfg):
        our_shape = tuple(ours[rule.ours].shape)
        parts = []
        for name, want in zip(rule.theirs, _their_shapes(rule, our_shape)):
            if name not in state:
                missing.append(name)
                continue
            used.add(name)
            got = tuple(state[name].shape)
            if got != want:
                mismatched.append(f"{name} {list(got)} (expected {list(want)})")
                continue
            parts.append(state[name])
        if len(parts) != len(rule.theirs):
            continue
        if rule.how == "split3":
            out[rule.ours] = torch.cat(parts, dim=0).reshape(our_shape)
        else:
            out[rule.ours] = parts[0].reshape(our_shape)
    unexpected = [k for k in state if k not in used]
    if missing or unexpected or mismatched:
        raise DiffusersFormatError(
            f"the tensors of {source} do not fit the {UNET_CLASS} of its config: "
            + "; ".join(
                f"{what}: {_show(keys)}"
                for what, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("shape mismatches", mismatched))
                if keys
            )
        )  # fmt: skip
    return out


def _show(items: list[str], limit: int = 6) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# ----------------------------------------------------------------------------------------------
# Configurations.


def unet_config_from_diffusers(config: dict, source: str = CONFIG_NAME) -> UNetConfig:
    """Our UNetConfig for a UNet2DModel config (config.json as a dict); DiffusersFormatError
    naming every setting that the ADM UNet does not have."""
    try:
        return _unet_config(config, source)
    except (TypeError, ValueError, IndexError) as e:
        if isinstance(e, DiffusersFormatError):
            raise
        raise DiffusersFormatError(f"{source}: malformed {UNET_CLASS} config ({e})") from None


def _unet_config(config: dict, source: str) -> UNetConfig:
    cls = config.get("_class_name", UNET_CLASS)
    if cls != UNET_CLASS:
        raise DiffusersFormatError(f"{source} describes a {cls}, not a {UNET_CLASS}")
    cfg = {**UNET2D_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    problems = []
    unknown = sorted(k for k in cfg if k not in UNET2D_DEFAULTS and cfg[k] is not None)
    if unknown:
        problems.append(f"unknown setting(s) {', '.join(unknown)}")
    for key, want in FIXED_UNET_SETTINGS.items():
        if cfg[key] != want:
            problems.append(f"{key}={cfg[key]!r} (needs {want!r})")
    widths = [int(c) for c in cfg["block_out_channels"]]
    base = widths[0] if widths else 0
    if cfg["time_embedding_dim"] not in (None, 4 * base):
        problems.append(f"time_embedding_dim={cfg['time_embedding_dim']!r} (needs {4 * base})")
    shift = cfg["resnet_time_scale_shift"]
    if shift not in SCALE_SHIFT:
        problems.append(f"resnet_time_scale_shift={shift!r} (needs 'default' or 'scale_shift')")
    groups = cfg["attn_norm_num_groups"]
    if shift == "scale_shift" and groups != GROUPS:
        problems.append(
            f"attn_norm_num_groups={groups!r} with resnet_time_scale_shift 'scale_shift' (needs "
            f"{GROUPS}: otherwise the mid-block attention has no GroupNorm)"
        )
    elif groups not in (None, GROUPS):
        problems.append(f"attn_norm_num_groups={groups!r} (needs {GROUPS})")
    size = cfg["sample_size"]
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    if not isinstance(size, int):
        problems.append(f"sample_size={cfg['sample_size']!r} (needs one int)")

    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    n = len(widths)
    if not n or len(down) != n or len(up) != n:
        problems.append(
            f"{len(down)} down blocks, {len(up)} up blocks and {n} block_out_channels "
            "(need the same number)"
        )
    attn, kinds = [], set()
    for side, types, table, type_key in (
        ("down", down, DOWN_BLOCKS, "downsample_type"),
        ("up", up, UP_BLOCKS, "upsample_type"),
    ):
        flags = []
        for i, name in enumerate(types):
            name = name[7:] if name.startswith("UNetRes") else name  # diffusers strips it too
            if name not in table:
                hint = (
                    f" (diffusers calls it {LEGACY_BLOCKS[name]})" if name in LEGACY_BLOCKS else ""
                )
                problems.append(f"{side} block type {name!r}{hint} (needs one of {sorted(table)})")
                flags.append(False)
                continue
            has_attn, kind = table[name]
            flags.append(has_attn)
            if i != len(types) - 1:  # the last block has no resampler
                kinds.add(kind or cfg[type_key] or "conv")
        attn.append(flags)
    if len(attn) == 2 and attn[0] != attn[1][::-1]:
        problems.append("attention in the up blocks does not mirror the down blocks")
    if len(kinds) > 1 or not kinds <= {"conv", "resnet"}:
        problems.append(f"resampling {sorted(kinds)} (needs all 'resnet' or all 'conv')")
    if "conv" in kinds and cfg["downsample_padding"] != 1:
        problems.append(f"downsample_padding={cfg['downsample_padding']!r} (needs 1)")
    if base and any(w % base for w in widths):
        problems.append(f"block_out_channels {widths} (need multiples of the first)")
    head_dim = cfg["attention_head_dim"]
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int)):
        problems.append(f"attention_head_dim={head_dim!r} (needs one int or null)")
        head_dim = None
    sites = [w for w, a in zip(widths, attn[0] if attn else []) if a] + widths[-1:]
    if head_dim is not None and any(w % int(head_dim) for w in sites):
        problems.append(
            f"attention_head_dim={head_dim} does not divide the attention widths {sites}"
        )
    if isinstance(size, int) and n and size % 2 ** (n - 1):
        problems.append(f"sample_size={size} is not divisible by 2^{n - 1}")
    if problems:
        raise DiffusersFormatError(
            f"{source} is not a {UNET_CLASS} of the consistency-model family: {'; '.join(problems)}"
        )
    try:
        return UNetConfig(
            image_size=size,
            in_channels=int(cfg["in_channels"]),
            out_channels=int(cfg["out_channels"]),
            model_channels=base,
            num_res_blocks=int(cfg["layers_per_block"]),
            channel_mult=tuple(w // base for w in widths),
            attention_resolutions=tuple(size // 2**L for L, a in enumerate(attn[0]) if a),
            num_heads=1,
            num_head_channels=-1 if head_dim is None else int(head_dim),
            use_scale_shift_norm=SCALE_SHIFT[shift],
            resblock_updown=kinds != {"conv"},
            num_classes=cfg["num_class_embeds"],
            dropout=float(cfg["dropout"]),
        )
    except (ValueError, TypeError) as e:
        raise DiffusersFormatError(f"{source}: {e}") from None


def diffusers_config_from_unet(cfg: UNetConfig) -> dict:
    """The UNet2DModel config (config.json) of our UNetConfig; DiffusersFormatError where the
    diffusers layout cannot express the network."""
    n = len(cfg.channel_mult)
    attn = attention_levels(cfg)
    widths = [m * cfg.model_channels for m in cfg.channel_mult]
    problems = []
    if cfg.channel_mult[0] != 1:
        problems.append(
            f"channel_mult[0]={cfg.channel_mult[0]} (UNet2DModel's time embedding is as wide as "
            "the first level; ours is model_channels wide)"
        )
    if cfg.image_size % 2 ** (n - 1):
        problems.append(f"image_size={cfg.image_size} is not divisible by 2^{n - 1}")
    sites = [w for w, a in zip(widths, attn) if a] + widths[-1:]  # mid block last
    if cfg.num_head_channels == -1:
        head_dims = {w // cfg.num_heads for w in sites}
        if len(head_dims) != 1 or any(w % cfg.num_heads for w in sites):
            problems.append(
                f"num_heads={cfg.num_heads} over attention widths {sites} (UNet2DModel has one "
                "head width for all attention blocks)"
            )
        head_dim = min(head_dims)
    else:
        head_dim = cfg.num_head_channels
        if any(w % head_dim for w in sites):
            problems.append(f"num_head_channels={head_dim} does not divide the widths {sites}")
    if problems:
        raise DiffusersFormatError(
            f"this UNet cannot be written as a {UNET_CLASS}: {'; '.join(problems)}"
        )
    kind = "resnet" if cfg.resblock_updown else "conv"
    down_names = {v: k for k, v in DOWN_BLOCKS.items() if not v[0]}
    up_names = {v: k for k, v in UP_BLOCKS.items() if not v[0]}
    down = ["AttnDownBlock2D" if a else down_names[(False, kind)] for a in attn]
    up = ["AttnUpBlock2D" if a else up_names[(False, kind)] for a in reversed(attn)]
    return {
        "_class_name": UNET_CLASS,
        "_diffusers_version": WRITTEN_VERSION,
        **FIXED_UNET_SETTINGS,
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "time_embedding_dim": None,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": widths,
        "layers_per_block": cfg.num_res_blocks,
        "downsample_padding": 1,
        "downsample_type": kind,
        "upsample_type": kind,
        "dropout": cfg.dropout,
        "attention_head_dim": head_dim,
        "attn_norm_num_groups": GROUPS,
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
        "num_class_embeds": cfg.num_classes,
        "num_train_timesteps": None,
    }


@dataclass(frozen=True)
class SchedulerSettings:
    """CMStochasticIterativeScheduler's settings (scheduler_config.json), which are the
    sampler's defaults for a checkpoint. The defaults are the official ones."""

    num_train_timesteps: int = 40  # points of the Karras grid that ts / timesteps index (--steps)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    clip_denoised: bool = True  # clamp every consistency-function output to [-1, 1]
    s_noise: float = 1.0  # scale of the noise added between steps (cmkernels: 1 only)

    @classmethod
    def from_config(cls, config: dict, source: str = SCHEDULER_CONFIG_NAME) -> SchedulerSettings:
        name = config.get("_class_name", SCHEDULER_CLASS)
        if name != SCHEDULER_CLASS:
            raise DiffusersFormatError(
                f"{source} configures a {name}; consistency models sample with {SCHEDULER_CLASS}"
            )
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(
            k
            for k, v in config.items()
            if not k.startswith("_") and k not in fields and v is not None
        )
        if unknown:
            raise DiffusersFormatError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        try:
            values = {k: _cast(fields[k], v) for k, v in config.items() if k in fields}
            s = cls(**values)
        except (TypeError, ValueError) as e:
            raise DiffusersFormatError(f"{source}: {e}") from None
        if s.s_noise != 1.0:
            raise DiffusersFormatError(
                f"{source}: s_noise={s.s_noise} (cmkernels' multistep sampler adds unit noise "
                "between steps, as the official one: s_noise must be 1)"
            )
        if not 0 < s.sigma_min < s.sigma_max or s.num_train_timesteps < 2 or s.rho <= 0:
            raise DiffusersFormatError(
                f"{source}: needs 0 < sigma_min < sigma_max, num_train_timesteps >= 2, rho > 0"
            )
        return s

    def to_config(self) -> dict:
        return {
            "_class_name": SCHEDULER_CLASS,
            "_diffusers_version": WRITTEN_VERSION,
            **dataclasses.asdict(self),
        }


def _cast(kind: str, value):
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"expected true/false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or int(value) != value:
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    return float(value)


# ----------------------------------------------------------------------------------------------
# Reading.


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


# ----------------------------------------------------------------------------------------------
# Writing.

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def scheduler_settings_of(denoiser: Denoiser, **overrides) -> SchedulerSettings:
    """The scheduler settings that reproduce `denoiser`'s sampling constants."""
    values = dict(sigma_min=float(denoiser.sigma_min), sigma_max=float(denoiser.sigma_max),
                  sigma_data=float(denoiser.sigma_data))  # fmt: skip
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SchedulerSettings(**values)


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
    tmp = unet_dir / f".{WEIGHTS_NAME}.tmp"  # written beside, then renamed: never a torn file
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, unet_dir / WEIGHTS_NAME)
    _write_json(unet_dir / CONFIG_NAME, config)
    _write_json(sched_dir / SCHEDULER_CONFIG_NAME, settings.to_config())
    if layout == "pipeline":
        _write_json(out / PIPELINE_INDEX_NAME, {
            "_class_name": PIPELINE_CLASS,
            "_diffusers_version": WRITTEN_VERSION,
            "scheduler": ["diffusers", SCHEDULER_CLASS],
            "unet": ["diffusers", UNET_CLASS],
        })  # fmt: skip
    return unet_dir


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Time points: official ts <-> diffusers timesteps.


def ts_to_diffusers_timesteps(ts: list[int], steps: int) -> list[int]:
    """Official `--ts` (increasing indices into a Karras grid of `steps` points) -> the
    `timesteps` of ConsistencyModelPipeline with num_train_timesteps = steps: the evaluated
    points (all but the last, which only sets the noise of the final step) in decreasing
    order. ts = 0,22,39 with steps 40 -> [22, 0]. The last point must be steps - 1 (sigma_min):
    diffusers always ends there."""
    ts = [int(t) for t in ts]
    if len(ts) < 2 or ts[-1] != steps - 1 or any(a >= b for a, b in zip(ts, ts[1:])) or ts[0] < 0:
        raise ValueError(f"ts must increase from >= 0 and end at steps - 1 = {steps - 1}, got {ts}")
    return ts[-2::-1]


def diffusers_timesteps_to_ts(timesteps: list[int], steps: int) -> list[int]:
    """The inverse: pipeline `timesteps` (decreasing) -> official ts ending at steps - 1."""
    timesteps = [int(t) for t in timesteps]
    if not timesteps or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"timesteps must be decreasing, got {timesteps}")
    if timesteps[0] >= steps - 1 or timesteps[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {steps - 2}], got {timesteps}")
    return timesteps[::-1] + [steps - 1]


def num_inference_steps_timesteps(k: int, steps: int) -> list[int]:
    """What ConsistencyModelPipeline(num_inference_steps=k) evaluates with num_train_timesteps =
    steps: indices 0, s, 2s, ... with s = steps // k, in decreasing order (k = 2, steps = 40:
    [20, 0], i.e. sigma 80 then 2.24)."""
    if not 1 <= k <= steps:
        raise ValueError(f"num_inference_steps must be in [1, {steps}], got {k}")
    return [i * (steps // k) for i in range(k)][::-1]


__all__ = [
    "DiffusersCheckpoint",
    "DiffusersFormatError",
    "SchedulerSettings",
    "diffusers_config_from_unet",
    "diffusers_timesteps_to_ts",
    "from_diffusers_state_dict",
    "is_diffusers_source",
    "load_diffusers",
    "module_pairs",
    "num_inference_steps_timesteps",
    "save_diffusers",
    "tensor_rules",
    "to_diffusers_state_dict",
    "ts_to_diffusers_timesteps",
    "unet_config_from_diffusers",
]
