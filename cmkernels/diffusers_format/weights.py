"""Tensor names and shapes: our UNet state_dict <-> UNet2DModel's, both ways, from one table.

- `module_pairs(config)`: our module names <-> diffusers module names, with the module kind;
- `TENSOR_RULES`: per module kind, our tensor <-> diffusers tensor(s) and the reshape between them.

Every tensor maps one to one, except that the packed qkv 1x1 convolution of an attention block is
three linears (to_q, to_k, to_v) there. `tensor_rules(config)` expands the two tables into one
rule per tensor; `to_diffusers_state_dict` (writing) and `from_diffusers_state_dict` (reading)
both apply those rules, through `to_theirs` and its inverse `to_ours`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from cmkernels.checkpoint import build_unet_meta
from cmkernels.diffusers_format.config import attention_levels
from cmkernels.diffusers_format.layout import UNET_CLASS, DiffusersFormatError
from cmkernels.unet import UNetConfig

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
            pairs.append(_resampler(cfg, f"input_blocks.{k}.0", down, conv="op"))
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
                pairs.append(_resampler(cfg, f"output_blocks.{k}.{slot}", up, conv="conv"))
            k += 1
    pairs += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return pairs


def _resampler(cfg: UNetConfig, ours: str, theirs: str, conv: str) -> tuple[str, str, str]:
    """The pair of a down/upsampler: a ResBlock (resblock_updown) or a conv, which is `ours.conv`
    ("op" down, "conv" up) in our UNet and `theirs.conv` in diffusers."""
    if cfg.resblock_updown:
        return (ours, theirs, "res")
    return (f"{ours}.{conv}", f"{theirs}.conv", "plain")


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


def to_theirs(rule: TensorRule, t: Tensor) -> list[Tensor]:
    """Our tensor -> its diffusers tensor(s), in the order of rule.theirs (views of t)."""
    parts = t.chunk(len(rule.theirs), dim=0)  # split3: queries, keys, values
    if rule.how == "copy":
        return list(parts)
    return [p.flatten(1) if p.dim() > 2 else p for p in parts]  # 1x1 conv [O, I, 1, 1] -> [O, I]


def to_ours(rule: TensorRule, parts: list[Tensor], our_shape: tuple[int, ...]) -> Tensor:
    """The inverse of to_theirs: the diffusers tensor(s) of `rule` -> our tensor of our_shape."""
    return torch.cat(parts, dim=0).reshape(our_shape)


def their_shapes(rule: TensorRule, our_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shapes of the diffusers tensor(s) of `rule` for our tensor of our_shape."""
    return [tuple(p.shape) for p in to_theirs(rule, torch.empty(our_shape, device="meta"))]


def to_diffusers_state_dict(state: dict[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """Our UNet state_dict -> UNet2DModel state_dict (contiguous tensors, no shared storage)."""
    out = {}
    for rule in tensor_rules(cfg):
        for name, p in zip(rule.theirs, to_theirs(rule, state[rule.ours])):
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
        for name, want in zip(rule.theirs, their_shapes(rule, our_shape)):
            if name not in state:
                missing.append(name)
                continue
            used.add(name)
            got = tuple(state[name].shape)
            if got != want:
                mismatched.append(f"{name} {list(got)} (expected {list(want)})")
                continue
            parts.append(state[name])
        if len(parts) == len(rule.theirs):
            out[rule.ours] = to_ours(rule, parts, our_shape)
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
