"""The ADM UNet of the official consistency-model checkpoints, written for fused kernels.

Module names and tensor shapes equal the official ones (guided-diffusion's UNetModel), so a released
state_dict loads with `load_state_dict(strict=True)`. The GroupNorm(+scale/shift)+SiLU sites call
`groupnorm_silu` and attention calls one entry point on the packed qkv tensor; `config.ops` picks,
with the same weights:

- "kernels":   the fused ops (cmkernels.ops);
- "reference": their pure-PyTorch references, which compute as the official code does (GroupNorm in
               float32, T x T einsum attention with a float32 softmax);
- "eager":     what a user writes in plain PyTorch today (`groupnorm_silu_eager`,
               `attention_eager`): F.group_norm + scale/shift + F.silu in the input dtype, and
               F.scaled_dot_product_attention on views of the packed qkv. The benchmarks' eager
               and torch.compile baselines.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmkernels import ops as _ops
from cmkernels.ops.common import records_graph

GROUPS = 32  # GroupNorm groups of every norm layer
NORM_EPS = 1e-5
OPS_KINDS = ("kernels", "reference", "eager")  # the OpSets of OP_SETS below


@dataclass
class UNetConfig:
    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 192  # width C of the first level
    out_channels: int = 3
    num_res_blocks: int = 3  # ResBlocks per level (the decoder has one more)
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)  # width of each level, in units of C
    attention_resolutions: tuple[int, ...] = (32, 16, 8)  # resolutions (pixels) with attention
    num_heads: int = 4
    num_head_channels: int = 64  # -1: use num_heads
    use_scale_shift_norm: bool = True  # timestep modulation as GN(h) (1 + scale) + shift
    resblock_updown: bool = True  # resample with ResBlocks instead of (strided) convs
    num_classes: int | None = 1000  # class-conditional when set
    dropout: float = 0.0
    ops: str = "kernels"  # "kernels" | "reference" | "eager" (see the module docstring)

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        if self.ops not in OPS_KINDS:
            raise ValueError(f"ops must be one of {OPS_KINDS}, got {self.ops!r}")
        for m in self.channel_mult:
            if (m * self.model_channels) % GROUPS:
                raise ValueError(
                    f"level width {m} x {self.model_channels} is not divisible by the {GROUPS} "
                    "GroupNorm groups"
                )

    @classmethod
    def from_official(cls, cfg: dict, **overrides) -> UNetConfig:
        """From the official configuration keys (image_size, num_channels, channel_mult as text,
        attention_resolutions as text, class_cond, ...)."""
        size = int(cfg["image_size"])
        mult = cfg.get("channel_mult", "")
        if not mult:
            mult = {64: "1,2,3,4", 128: "1,1,2,3,4", 256: "1,1,2,2,4,4", 512: "0.5,1,1,2,2,4,4"}[
                size
            ]
        mult = tuple(int(m) for m in str(mult).split(","))
        attn = tuple(int(r) for r in str(cfg.get("attention_resolutions", "32,16,8")).split(","))
        values = dict(
            image_size=size,
            in_channels=3,
            out_channels=3,
            model_channels=int(cfg["num_channels"]),
            num_res_blocks=int(cfg["num_res_blocks"]),
            channel_mult=mult,
            attention_resolutions=attn,
            num_heads=int(cfg.get("num_heads", 4)),
            num_head_channels=int(cfg.get("num_head_channels", -1)),
            use_scale_shift_norm=bool(cfg.get("use_scale_shift_norm", True)),
            resblock_updown=bool(cfg.get("resblock_updown", True)),
            num_classes=1000 if cfg.get("class_cond", False) else None,
            dropout=float(cfg.get("dropout", 0.0)),
        )
        values.update(overrides)
        return cls(**values)


# The small grayscale networks (MNIST-sized; attention at the 8x8 / 7x7 level).
_SMALL_GRAY = UNetConfig(
    image_size=32,
    in_channels=1,
    out_channels=1,
    model_channels=32,
    num_res_blocks=1,
    channel_mult=(1, 2, 2),
    attention_resolutions=(8,),
    num_heads=2,
    num_head_channels=-1,
    num_classes=None,
    dropout=0.1,
)

PRESETS: dict[str, UNetConfig] = {
    # The official configurations (openai/consistency_models).
    "imagenet64": UNetConfig(),
    "lsun256": UNetConfig(
        image_size=256,
        model_channels=256,
        num_res_blocks=2,
        channel_mult=(1, 1, 2, 2, 4, 4),
        use_scale_shift_norm=False,
        num_classes=None,
    ),  # fmt: skip
    # Small networks that train on a CPU in minutes.
    "gray28": dataclasses.replace(_SMALL_GRAY, image_size=28, attention_resolutions=(7,)),
    "gray32": _SMALL_GRAY,
    "rgb32": UNetConfig(
        image_size=32,
        in_channels=3,
        out_channels=3,
        model_channels=64,
        num_res_blocks=2,
        channel_mult=(1, 2, 2),
        attention_resolutions=(16, 8),
        num_heads=4,
        num_head_channels=-1,
        num_classes=None,
        dropout=0.1,
    ),  # fmt: skip
}


def get_preset(name: str, **overrides) -> UNetConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def _embedding_args(t: Tensor, dim: int, max_period: float) -> tuple[Tensor, Tensor]:
    """(t [B, 1] * freqs [1, dim // 2], freqs) of the sinusoidal embedding, in float32 (float64
    for a float64 t)."""
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half
    )
    return t.to(dtype)[:, None] * freqs[None], freqs


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos, sin] of the network's time input t [B] -> [B, dim]."""
    args, _ = _embedding_args(t, dim, max_period)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def timestep_embedding_with_tangent(
    t: Tensor, tt: Tensor, dim: int, max_period: float = 10000.0
) -> tuple[Tensor, Tensor]:
    """(timestep_embedding(t), its tangent along tt [B]): d/dt [cos(t f), sin(t f)] =
    [-sin(t f) f, cos(t f) f]."""
    args, freqs = _embedding_args(t, dim, max_period)
    cos, sin = torch.cos(args), torch.sin(args)
    rate = tt.to(args.dtype)[:, None] * freqs[None]
    emb, temb = torch.cat([cos, sin], dim=-1), torch.cat([-sin * rate, cos * rate], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        temb = torch.cat([temb, torch.zeros_like(temb[:, :1])], dim=-1)
    return emb, temb


def groupnorm_silu_eager(
    x: Tensor,  # (N, C, *spatial)
    weight: Tensor,  # (C,)
    bias: Tensor,  # (C,)
    scale: Tensor | None = None,  # (N, C)
    shift: Tensor | None = None,  # (N, C)
    *,
    groups: int = GROUPS,
    eps: float = NORM_EPS,
    activation: bool = True,
) -> Tensor:
    """silu(GN(x) * (1 + scale) + shift) as plain PyTorch, in x's dtype (no float32 upcast)."""
    h = F.group_norm(x, groups, weight, bias, eps)
    bcast = x.shape[:2] + (1,) * (x.dim() - 2)
    if scale is not None:
        h = h * (1 + scale.reshape(bcast))
    if shift is not None:
        h = h + shift.reshape(bcast)
    return F.silu(h) if activation else h


def attention_eager(qkv: Tensor, num_heads: int) -> Tensor:
    """Self-attention on the packed qkv [B, 3*H*d, T] (three, heads, head_dim) through
    F.scaled_dot_product_attention on strided (B, H, T, d) views; returns [B, H*d, T]."""
    B, C3, T = qkv.shape
    d = C3 // (3 * num_heads)
    q, k, v = qkv.reshape(B, 3, num_heads, d, T).transpose(-1, -2).unbind(1)  # (B, H, T, d)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, d)
    return out.transpose(-1, -2).reshape(B, num_heads * d, T)


@dataclass(frozen=True)
class OpSet:
    """The two op sites of the network: GroupNorm(+scale/shift)(+SiLU) and packed attention."""

    groupnorm_silu: object
    attention: object


OP_SETS = {
    "kernels": OpSet(_ops.groupnorm_silu, _ops.attention),
    "reference": OpSet(_ops.groupnorm_silu_ref, _ops.attention_ref),
    "eager": OpSet(groupnorm_silu_eager, attention_eager),
}


class _Ops:
    """The op sites of one UNet; `config.ops` picks the OpSet at each call, so set_ops() switches
    every block of a built network."""

    def __init__(self, config: UNetConfig):
        self.config = config

    def gn(self, x, norm: nn.GroupNorm, scale=None, shift=None, activation=True):
        fn = OP_SETS[self.config.ops].groupnorm_silu
        return fn(x, norm.weight, norm.bias, scale, shift, groups=norm.num_groups, eps=norm.eps,
                  activation=activation)  # fmt: skip

    def attention(self, qkv, num_heads):
        return OP_SETS[self.config.ops].attention(qkv, num_heads)

    # The tangent-propagating forms: (value, tangent) pairs; see UNet.forward_with_tangent.

    def gn_with_tangent(self, x, tx, norm: nn.GroupNorm, scale=None, shift=None, tscale=None,
                        tshift=None, activation=True):  # fmt: skip
        kw = dict(groups=norm.num_groups, eps=norm.eps, activation=activation)
        if self.config.ops == "kernels":  # one launch: the value (recorded in grad mode, with
            return _ops.groupnorm_silu_with_tangent(  # the fused backward) and its tangent
                x, tx, norm.weight, norm.bias, scale, shift, tscale=tscale, tshift=tshift, **kw
            )
        fn = OP_SETS[self.config.ops].groupnorm_silu
        y = self.gn(x, norm, scale, shift, activation)
        with torch.no_grad():
            ty = _tangent_of(
                lambda x_, s_, h_: fn(x_, norm.weight, norm.bias, s_, h_, **kw),
                (x, scale, shift), (tx, tscale, tshift),
            )  # fmt: skip
        return y, ty

    def attention_with_tangent(self, qkv, tqkv, num_heads):
        if self.config.ops == "kernels":  # one launch, as gn_with_tangent
            return _ops.attention_with_tangent(qkv, tqkv, num_heads)
        y = self.attention(qkv, num_heads)  # "eager" is SDPA: no forward AD, so the reference's
        with torch.no_grad():  # math attention gives its tangent
            ty = _tangent_of(lambda q: _ops.attention_ref(q, num_heads), (qkv,), (tqkv,))
        return y, ty.to(y.dtype)


def _like(t: Tensor | None, p: Tensor) -> Tensor:
    """t (zeros for None), contiguous, in p's dtype."""
    if t is None:
        return torch.zeros(p.shape, dtype=p.dtype, device=p.device)
    return t.to(p.dtype).contiguous()


def _tangent_of(fn, primals, tangents) -> Tensor:
    """The tangent of fn(*primals) along tangents by torch.func.jvp; None primals are passed
    through as None, a None tangent of a given primal is zero. Primals and tangents go in
    contiguous (torch 2.11's forward AD of F.group_norm fails on channels_last inputs: "view size
    is not compatible with input tensor's size and stride")."""
    given = [i for i, p in enumerate(primals) if p is not None]

    def call(*args):
        full = list(primals)
        for i, a in zip(given, args):
            full[i] = a
        return fn(*full)

    ps = tuple(primals[i].detach().contiguous() for i in given)
    ts = tuple(_like(tangents[i], primals[i]) for i in given)
    return torch.func.jvp(call, ps, ts)[1]


# Up to this many pixels, value and tangent go through one convolution of the batch [x; tx]
# (without grad): small images leave the GEMM underfilled, so doubling its rows is nearly free.
_STACKED_CONV_PIXELS = 256


_PATCH_ELEMENTS = 1 << 20  # the patch matrix of a channels_last weight is built in bands this big


def _conv_gemm(conv: nn.Conv2d, x: Tensor, bias: Tensor | None) -> Tensor | None:
    """conv(x) as matrix products over an explicit patch matrix (built in bands of output rows
    for channels_last weights), for zero-padded CPU convolutions with fewer output pixels
    (B H' W') than output channels; None where it does not apply.

    At such shapes (the UNet's 8x8 and 16x16 levels at small batch) oneDNN copies the weight into
    its blocked layout on every call: a weight-sized buffer (40 MB for imagenet64's 1536 -> 768
    3x3 convolution) and a time to match, where the patch matrix is smaller than the weight.
    A channels_last weight also takes this route at more pixels when it is larger than what the
    route allocates (the zero-padded input and one band): imagenet64's wide 3x3 convolutions at
    32x32 and batch 1, where the weight copy set the JVP's peak memory.
    The patch columns follow the weight's memory order (O, kh, kw, I for channels_last weights,
    O, I, kh, kw otherwise), so the weight enters the product as a view."""
    w = conv.weight
    if (x.device.type != "cpu" or conv.groups != 1 or isinstance(conv.padding, str)
            or conv.padding_mode != "zeros" or conv.dilation != (1, 1)
            or x.dim() != 4):  # fmt: skip
        return None
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    (sh, sw), (ph, pw) = conv.stride, conv.padding
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    banded = w.is_contiguous(memory_format=torch.channels_last)
    padded = B * (H + 2 * ph) * (W + 2 * pw) * C
    if B * Ho * Wo > O and not (banded and w.numel() > padded + _PATCH_ELEMENTS):
        return None
    dtype = x.dtype
    if torch.is_autocast_enabled("cpu") and dtype == torch.float32:
        dtype = torch.get_autocast_dtype("cpu")  # what autocast runs F.conv2d in
    elif w.dtype != dtype:
        return None  # F.conv2d gives its own error
    if w.is_contiguous():
        cols = F.unfold(x.to(dtype), (kh, kw), padding=(ph, pw), stride=(sh, sw))
        y = torch.matmul(w.to(dtype).reshape(O, -1), cols).view(B, O, Ho, Wo)
    elif w.is_contiguous(memory_format=torch.channels_last):
        xp = x.new_zeros((B, H + 2 * ph, W + 2 * pw, C), dtype=dtype)
        xp[:, ph : ph + H, pw : pw + W] = x.permute(0, 2, 3, 1)
        w2 = w.to(dtype).permute(0, 2, 3, 1).reshape(O, -1)  # a view
        y = torch.empty((B, Ho, Wo, O), dtype=dtype, device=x.device)
        # The patch matrix in bands of output rows of at most _PATCH_ELEMENTS elements.
        band = max(1, min(Ho, _PATCH_ELEMENTS // max(1, B * Wo * w2.shape[1])))
        for r0 in range(0, Ho, band):
            r1 = min(Ho, r0 + band)
            taps = [
                xp[:, i + sh * r0 : i + sh * (r1 - 1) + 1 : sh, j : j + sw * (Wo - 1) + 1 : sw]
                for i in range(kh)
                for j in range(kw)
            ]
            cols = taps[0] if len(taps) == 1 else torch.cat(taps, dim=-1)
            y[:, r0:r1] = torch.matmul(cols.reshape(-1, cols.shape[-1]), w2.t()).view(
                B, r1 - r0, Wo, O
            )
        y = y.permute(0, 3, 1, 2)  # channels_last, as oneDNN gives it
    else:
        return None
    return y if bias is None else y + bias.to(dtype).view(-1, 1, 1)


def _conv_nograd(conv: nn.Conv2d, x: Tensor, bias: Tensor | None) -> Tensor:
    """conv(x) with `bias`, not recorded by autograd."""
    with torch.no_grad():
        y = _conv_gemm(conv, x, bias)
        if y is None:
            y = conv._conv_forward(x, conv.weight, bias)  # (honours padding_mode)
    return y


def _conv_with_tangent(conv: nn.Conv2d, x, tx):
    """(conv(x), W * tx): the weights carry no tangent, so the tangent is one bias-free
    convolution. (torch.func.jvp's rule for convolution also convolves x with a materialised
    zero weight tangent: a third convolution, and a weight-sized buffer.)"""
    if records_graph(x, conv.weight):
        return conv(x), _conv_nograd(conv, tx, None)
    if x.shape[-2] * x.shape[-1] > _STACKED_CONV_PIXELS:
        return _conv_nograd(conv, x, conv.bias), _conv_nograd(conv, tx, None)
    B = x.shape[0]
    both = _conv_nograd(conv, torch.cat([x, tx.to(x.dtype)]), None)
    y, ty = both[:B], both[B:]
    if conv.bias is not None:
        y = y + conv.bias.to(y.dtype).view(-1, 1, 1)
    return y, ty


def _conv_pair(conv: nn.Conv2d, pair: list):
    """_conv_with_tangent of a handed-over pair (see _take). Where the value and the tangent
    convolve one after the other outside autograd, the value's input is freed before the
    tangent's convolution runs."""
    x, tx = _take(pair)
    if records_graph(x, conv.weight) or x.shape[-2] * x.shape[-1] <= _STACKED_CONV_PIXELS:
        return _conv_with_tangent(conv, x, tx)
    y = _conv_nograd(conv, x, conv.bias)
    del x
    return y, _conv_nograd(conv, tx, None)


def _residual(x: Tensor, h: Tensor) -> Tensor:
    """x + h; into h (a block's fresh output) where autograd records neither and the sum keeps
    h's dtype, so the block's output does not need a third buffer of its size."""
    if records_graph(x, h) or torch.promote_types(x.dtype, h.dtype) != h.dtype:
        return x + h
    return h.add_(x)


def _linear_with_tangent(linear: nn.Linear, x, tx):
    with torch.no_grad():
        ty = F.linear(tx, linear.weight)
    return linear(x), ty


def _silu_with_tangent(x, tx):
    """(silu(x), silu'(x) tx) with silu'(x) = s (1 + x (1 - s)), s = sigmoid(x)."""
    with torch.no_grad():
        s = torch.sigmoid(x)
        ty = tx * (s * (1 + x * (1 - s)))
    return F.silu(x), ty


def _dropout_with_tangent(drop: nn.Dropout, h, th):
    """Dropout of the value and its tangent with one mask (drawn as nn.Dropout draws it: the
    same random numbers for the same shape)."""
    if not drop.training or drop.p == 0:
        return h, th
    mask = F.dropout(torch.ones_like(h), drop.p, training=True)
    return h * mask, th * mask


def _take(pair: list) -> tuple[Tensor, Tensor]:
    """The (value, tangent) pair a caller handed over in a list, which is emptied: the callee's
    locals then hold the only references and can drop the tensors once they are consumed. (The
    decoder's concatenated inputs are the largest activations of the JVP; an argument the caller
    still names would stay alive through the whole block.)"""
    x, tx = pair
    pair.clear()
    return x, tx


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, ch, eps=NORM_EPS)


class ResBlock(nn.Module):
    def __init__(self, ops: _Ops, ch: int, emb_ch: int, dropout: float, out_ch: int | None = None,
                 scale_shift: bool = True, up: bool = False, down: bool = False):  # fmt: skip
        super().__init__()
        out_ch = out_ch or ch
        self.ops, self.scale_shift, self.up, self.down = ops, scale_shift, up, down
        self.in_layers = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch)
        )
        self.out_layers = nn.Sequential(
            _norm(out_ch), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        )
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def _resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.ops.gn(x, self.in_layers[0])  # GN + SiLU
        h = self.in_layers[2](self._resample(h))  # (B, out, H', W')
        x = self._resample(x)
        e = self.emb_layers(emb).to(h.dtype)  # (B, out or 2*out)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.ops.gn(h, self.out_layers[0], scale, shift)
        else:
            h = self.ops.gn(h + e[:, :, None, None], self.out_layers[0])
        h = self.out_layers[3](self.out_layers[2](h))
        return self.skip_connection(x) + h

    def forward_with_tangent(self, pair: list, emb, temb):
        """(value, tangent) of forward() for the pair handed over in `pair` (see _take). The ops
        are forward()'s, in an order that frees the wide input early: a 1x1 skip convolution
        runs right after the first GroupNorm, so only its narrower output is kept."""
        x, tx = _take(pair)
        h, th = self.ops.gn_with_tangent(x, tx, self.in_layers[0])
        skip_conv = isinstance(self.skip_connection, nn.Conv2d)
        if skip_conv:
            pair = [self._resample(x), self._resample(tx)]
            del x, tx
            x, tx = _conv_pair(self.skip_connection, pair)
        h, th = self._resample(h), self._resample(th)
        h, th = _conv_with_tangent(self.in_layers[2], h, th)
        e, te = _linear_with_tangent(self.emb_layers[1], *_silu_with_tangent(emb, temb))
        e, te = e.to(h.dtype), te.to(h.dtype)
        if self.scale_shift:
            (scale, shift), (tscale, tshift) = e.chunk(2, dim=1), te.chunk(2, dim=1)
            h, th = self.ops.gn_with_tangent(h, th, self.out_layers[0], scale, shift, tscale,
                                             tshift)  # fmt: skip
        else:
            h, th = self.ops.gn_with_tangent(
                h + e[:, :, None, None], th + te[:, :, None, None], self.out_layers[0]
            )
        h, th = _dropout_with_tangent(self.out_layers[2], h, th)
        h, th = _conv_with_tangent(self.out_layers[3], h, th)
        if not skip_conv:  # (an upsampling block's input is resampled last: it grows 4x)
            x, tx = self._resample(x), self._resample(tx)
        return _residual(x, h), _residual(tx, th)


class AttentionBlock(nn.Module):
    def __init__(self, ops: _Ops, ch: int, num_heads: int, num_head_channels: int):
        super().__init__()
        self.ops = ops
        self.num_heads = num_heads if num_head_channels == -1 else ch // num_head_channels
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)  # 1x1 convs, as in the official checkpoints
        self.proj_out = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.ops.gn(x, self.norm, activation=False))  # (B, 3C, H, W)
        h = self.ops.attention(qkv.reshape(B, 3 * C, H * W), self.num_heads)  # (B, C, T)
        return x + self.proj_out(h.reshape(B, C, H, W))

    def forward_with_tangent(self, pair: list, emb=None, temb=None):
        x, tx = _take(pair)
        B, C, H, W = x.shape
        qkv, tqkv = _conv_with_tangent(
            self.qkv, *self.ops.gn_with_tangent(x, tx, self.norm, activation=False)
        )
        h, th = self.ops.attention_with_tangent(
            qkv.reshape(B, 3 * C, H * W), tqkv.reshape(B, 3 * C, H * W), self.num_heads
        )
        del qkv, tqkv  # (3C channels: not kept through the projection)
        h, th = _conv_with_tangent(self.proj_out, h.reshape(B, C, H, W), th.reshape(B, C, H, W))
        return _residual(x, h), _residual(tx, th)


class Downsample(nn.Module):
    def __init__(self, ch: int, out_ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, out_ch, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.op(x)

    def forward_with_tangent(self, pair: list, emb=None, temb=None):
        return _conv_with_tangent(self.op, *_take(pair))


class Upsample(nn.Module):
    def __init__(self, ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, out_ch, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))

    def forward_with_tangent(self, pair: list, emb=None, temb=None):
        x, tx = _take(pair)
        x, tx = (F.interpolate(t, scale_factor=2, mode="nearest") for t in (x, tx))
        return _conv_with_tangent(self.conv, x, tx)


class Block(nn.Sequential):
    """A sequence of layers that take (h, emb)."""

    def forward(self, h, emb):
        for layer in self:
            h = layer(h, emb) if not isinstance(layer, nn.Conv2d) else layer(h)
        return h

    def forward_with_tangent(self, pair: list, emb, temb):
        """Each layer's (value, tangent) on the pair handed over in `pair` (see _take)."""
        for layer in self:
            if isinstance(layer, nn.Conv2d):
                h, th = _conv_with_tangent(layer, *_take(pair))
            else:
                h, th = layer.forward_with_tangent(pair, emb, temb)
            pair = [h, th]
            del h, th  # the next layer owns them
        return _take(pair)


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        ops = _Ops(config)
        self.ops = ops
        emb_ch = 4 * c.model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(c.model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)
        )
        if c.num_classes is not None:
            self.label_emb = nn.Embedding(c.num_classes, emb_ch)
        attn_ds = {c.image_size // r for r in c.attention_resolutions}

        def res(ch_in, ch_out, **kw):
            return ResBlock(ops, ch_in, emb_ch, c.dropout, ch_out, c.use_scale_shift_norm, **kw)

        def attn(ch):
            return AttentionBlock(ops, ch, c.num_heads, c.num_head_channels)

        ch = c.channel_mult[0] * c.model_channels
        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(c.in_channels, ch, 3, padding=1))])
        skips, ds = [ch], 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [res(ch, mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in attn_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(Block(*layers))
                skips.append(ch)
            if level != len(c.channel_mult) - 1:
                down = res(ch, ch, down=True) if c.resblock_updown else Downsample(ch, ch)
                self.input_blocks.append(Block(down))
                skips.append(ch)
                ds *= 2
        self.middle_block = Block(res(ch, ch), attn(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skips.pop(), mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in attn_ds:
                    layers.append(attn(ch))
                if level and i == c.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if c.resblock_updown else Upsample(ch, ch))
                    ds //= 2
                self.output_blocks.append(Block(*layers))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, c.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def set_ops(self, which: str) -> UNet:
        if which not in OPS_KINDS:
            raise ValueError(f"ops must be one of {OPS_KINDS}, got {which!r}")
        self.config.ops = which
        return self

    def _check(self, x: Tensor, class_labels: Tensor | None) -> None:
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be [B, {c.in_channels}, H, W], got {tuple(x.shape)}")
        if c.num_classes is not None and class_labels is None:
            raise ValueError("this UNet is class-conditional: pass class_labels")
        if c.num_classes is None and class_labels is not None:
            raise ValueError("this UNet is unconditional: class_labels must be None")

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        self._check(x, class_labels)
        c = self.config
        emb = self.time_embed(
            timestep_embedding(c_noise.reshape(-1).expand(x.shape[0]), c.model_channels)
        )
        if c.num_classes is not None:
            emb = emb + self.label_emb(class_labels)
        h, hs = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        h = self.ops.gn(h, self.out[0])
        return self.out[2](h)

    def forward_with_tangent(self, x: Tensor, tx: Tensor, c_noise: Tensor, t_c_noise: Tensor,
                             class_labels: Tensor | None = None):  # fmt: skip
        """(F(x, c_noise), its tangent along (tx, t_c_noise)): forward-mode AD written out, each
        layer passing a (value, tangent) pair on, with the fused ops' one-launch value+tangent
        kernels. The weights carry no tangent, and no dual tensors are made, so it compiles under
        torch.compile(fullgraph=True) and captures in CUDA graphs.

        The value is computed as forward() computes it (recorded by autograd when grad mode is on
        and the weights require grad); the tangent is never recorded (a constant for the
        backward, as the continuous-time objective's stopgrad wants). With the fused ops each
        GroupNorm+SiLU and attention is one launch for value and tangent in either mode (in grad
        mode the launch also saves the statistics of the fused backward; CPU attention takes its
        value from SDPA, see ops.attention). Dropout layers in training mode apply one mask to
        both. tx: like x; t_c_noise: like c_noise."""
        self._check(x, class_labels)
        if tx.shape != x.shape:
            raise ValueError(f"tx has shape {tuple(tx.shape)}; x has {tuple(x.shape)}")
        c = self.config
        B = x.shape[0]
        emb, temb = timestep_embedding_with_tangent(
            c_noise.reshape(-1).expand(B), t_c_noise.reshape(-1).expand(B), c.model_channels
        )
        emb, temb = _linear_with_tangent(self.time_embed[0], emb, temb)
        emb, temb = _linear_with_tangent(self.time_embed[2], *_silu_with_tangent(emb, temb))
        if c.num_classes is not None:
            emb = emb + self.label_emb(class_labels)  # no tangent: labels are constants
        h, th, hs = x, tx.to(x.dtype), []
        for block in self.input_blocks:
            h, th = block.forward_with_tangent([h, th], emb, temb)
            hs.append((h, th))
        h, th = self.middle_block.forward_with_tangent([h, th], emb, temb)
        for block in self.output_blocks:
            s, ts = hs.pop()
            pair = [torch.cat([h, s], dim=1), torch.cat([th, ts], dim=1)]
            del h, th, s, ts  # the block owns its input (the skip is freed with it)
            h, th = block.forward_with_tangent(pair, emb, temb)
        h, th = self.ops.gn_with_tangent(h, th, self.out[0])
        return _conv_with_tangent(self.out[2], h, th)
