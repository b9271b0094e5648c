"""UNet2DModel config (config.json) <-> our UNetConfig, both ways, from the tables here.

The UNet2DModel is the same ADM network as ours when its config has the settings of
`FIXED_UNET_SETTINGS` and its blocks are the ones of `DOWN_BLOCKS` / `UP_BLOCKS`:

- `FIXED_UNET_SETTINGS`: UNet2DModel settings the ADM UNet has, and `UNET2D_DEFAULTS` (what
  diffusers assumes for a key missing from config.json);
- `DOWN_BLOCKS` / `UP_BLOCKS`: block type <-> (attention at this level, resampling kind);
- `SCALE_SHIFT`: resnet_time_scale_shift <-> our use_scale_shift_norm.

Reading (`unet_config_from_diffusers`) and writing (`diffusers_config_from_unet`) both use these
tables; writing inverts them.
"""

from __future__ import annotations

from cmkernels.diffusers_format.layout import (
    CONFIG_NAME,
    UNET_CLASS,
    WRITTEN_VERSION,
    DiffusersFormatError,
)
from cmkernels.unet import GROUPS, NORM_EPS, UNetConfig

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


def attention_levels(cfg: UNetConfig) -> list[bool]:
    """Whether each level has attention (the UNet's rule: downsample factor 2^L listed)."""
    factors = {cfg.image_size // r for r in cfg.attention_resolutions}
    return [2**level in factors for level in range(len(cfg.channel_mult))]


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
    down = [_block_type(DOWN_BLOCKS, a, kind) for a in attn]
    up = [_block_type(UP_BLOCKS, a, kind) for a in reversed(attn)]
    scale_shift = {ours: theirs for theirs, ours in SCALE_SHIFT.items()}
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
        "resnet_time_scale_shift": scale_shift[cfg.use_scale_shift_norm],
        "num_class_embeds": cfg.num_classes,
        "num_train_timesteps": None,
    }


def _block_type(table: dict[str, tuple[bool, str | None]], attention: bool, kind: str) -> str:
    """The block type of DOWN_BLOCKS / UP_BLOCKS with this attention flag and resampling kind
    (the table read backwards; an attention block takes its kind from down/upsample_type)."""
    return next(name for name, (attn, resample) in table.items()
                if attn == attention and resample in (None, kind))  # fmt: skip
