"""The flash-attention test rule: a kernel's error against a float64 reference may be at most
twice the error of plain PyTorch computing the same thing in the same dtype, plus a small atol."""

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close_rule(out, ref64, eager, atol, name="output"):
    err = max_err(out, ref64)
    bound = 2 * max_err(eager, ref64) + atol
    assert err <= bound, f"{name}: error {err:.3g} > 2 * eager error + atol = {bound:.3g}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)
