"""Exponential moving averages of a whole model at several rates, in one fused in-place op.

For K rates r_1..r_K and every parameter p:  ema_k <- r_k ema_k + (1 - r_k) p,  with fp32 copies
for fp32 / bf16 / fp16 parameters. One pass reads each parameter once for all K copies: 4 + 8K
bytes an fp32 element (28 for K = 3) against 12K for K ``lerp`` passes and 20K for a
``mul_`` + ``add_`` loop. On CUDA it is one launch for the whole model (a multi-tensor apply with
its tensor table cached in device memory, so CUDA graphs can capture it); on the CPU one parallel
pass over all tensors.

Pieces:
- ``ema_update_ref_``: the pure-PyTorch reference (in place, in the copies' dtype).
- ``check_inputs``: the argument rules, shared by the fake kernel and the fallback; the C++
  kernels (``ema_check`` in csrc/ema_cpu.cpp) enforce the same ones with the same error types and
  texts.
- ``ema_update_fallback_``: the kernel in PyTorch, used when the compiled extension is missing.
- ``torch.ops.cmkernels.ema_update_``: schema in csrc/ops.cpp, kernels in csrc/ema_cpu.cpp and
  csrc/ema_cuda.cu, fake kernel here.
- ``ema_update_``: the public entry point; ``EMA``: the helper the trainers hold.

Layout: each copy must be dense (contiguous or a permutation of it, e.g. channels_last), all K
copies of a parameter with the same strides; a parameter laid out differently from its copies is
copied to their layout first (one extra pass over that tensor). ``EMA`` creates its copies with
the parameters' own layout, so that never happens there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from cmkernels.ops.common import dtype_str, is_dense, shape_str
from cmkernels.ops.registry import define_op

SCHEMA = "(Tensor[] params, Tensor(a!)[] emas, float[] rates) -> ()"

MAX_RATES = 8  # kMaxEmaRates in csrc/ema.h
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------
# Reference.


@torch.no_grad()
def ema_update_ref_(
    params: Sequence[Tensor], emas: Sequence[Sequence[Tensor]], rates: Sequence[float]
):
    """emas[k][i] <- rates[k] emas[k][i] + (1 - rates[k]) params[i], in place, in emas' dtype."""
    for copies, r in zip(emas, rates, strict=True):
        for p, e in zip(params, copies, strict=True):
            e.mul_(r).add_(p.to(e.dtype), alpha=1.0 - r)


# ------------------------------------------------------------------------------------------------
# Checks: the rules of ema_check in C++ (csrc/ema_cpu.cpp), in the same order, with the same error
# types and texts.


def check_inputs(params: Sequence[Tensor], emas: Sequence[Tensor], rates: Sequence[float]) -> None:
    """params: P tensors (float32 / bfloat16 / float16) on one device; emas: K * P float32 tensors,
    rate-major (emas[k * P + i] is copy k of params[i]), each dense with its parameter's shape, all
    K copies of a parameter with the same strides; rates: 1..MAX_RATES values in [0, 1]."""
    P, K = len(params), len(rates)
    if K < 1:
        raise ValueError("ema_update_: rates must not be empty")
    if K > MAX_RATES:
        raise ValueError(f"ema_update_: at most {MAX_RATES} rates per call, got {K}")
    if len(emas) != K * P:
        raise ValueError(
            f"ema_update_: expected {K} x {P} = {K * P} EMA tensors (one copy per rate and "
            f"parameter, rate-major), got {len(emas)}"
        )
    for k, r in enumerate(rates):
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"ema_update_: rates must lie in [0, 1], got rates[{k}] = {r:g}")
    if P == 0:
        return
    device = params[0].device
    for i, p in enumerate(params):
        if p.dtype not in _PARAM_DTYPES:
            raise TypeError(
                f"ema_update_: params[{i}] must be float32, bfloat16 or float16, "
                f"got {dtype_str(p.dtype)}"
            )
        if p.device != device:
            raise ValueError(
                f"ema_update_: params[{i}] is on {p.device} but params[0] is on {device}"
            )
        first = emas[i]
        for k in range(K):
            e = emas[k * P + i]
            if e.dtype != torch.float32:
                raise TypeError(
                    f"ema_update_: EMA copies must be float32, but copy {k} of params[{i}] is "
                    f"{dtype_str(e.dtype)}"
                )
            if e.device != device:
                raise ValueError(
                    f"ema_update_: copy {k} of params[{i}] is on {e.device} but the params are "
                    f"on {device}"
                )
            if e.shape != p.shape:
                raise ValueError(
                    f"ema_update_: copy {k} of params[{i}] has shape {shape_str(e)} but the "
                    f"parameter has shape {shape_str(p)}"
                )
            if not is_dense(e):
                raise ValueError(
                    f"ema_update_: copy {k} of params[{i}] must be a dense tensor (contiguous or "
                    f"a permutation of it), got strides {list(e.stride())}"
                )
            if e.stride() != first.stride():
                raise ValueError(
                    f"ema_update_: the copies of params[{i}] must share one memory layout, got "
                    f"strides {list(first.stride())} and {list(e.stride())}"
                )


# ------------------------------------------------------------------------------------------------
# Registration.


def ema_update_fallback_(params, emas, rates):
    """The op in PyTorch (the reference on the flat, rate-major list of copies)."""
    check_inputs(params, emas, rates)
    P = len(params)
    ema_update_ref_(params, [emas[k * P : (k + 1) * P] for k in range(len(rates))], rates)


_op = define_op("ema_update_", SCHEMA, ema_update_fallback_, ("cpu", "cuda"))


@torch.library.register_fake("cmkernels::ema_update_")
def _fake(params, emas, rates):
    check_inputs(params, emas, rates)


def ema_update_(
    params: Sequence[Tensor], emas: Sequence[Sequence[Tensor]], rates: Sequence[float]
) -> None:
    """In place, for every k and i: emas[k][i] <- rates[k] emas[k][i] + (1 - rates[k]) params[i].

    params: P tensors (fp32 / bf16 / fp16) on one device, e.g. ``list(model.parameters())``.
    emas:   K lists of P fp32 tensors: emas[k] is the copy of the model at rates[k].
    rates:  K decay rates in [0, 1] (K <= 8); 0 copies the parameters, 1 leaves a copy as is.
    One fused op (one launch on CUDA) for all K copies of all P parameters; no autograd.
    """
    params = list(params)
    if len(emas) != len(rates):
        raise ValueError(f"ema_update_: {len(emas)} lists of copies for {len(rates)} rates")
    for k, copies in enumerate(emas):
        if len(copies) != len(params):
            raise ValueError(
                f"ema_update_: emas[{k}] has {len(copies)} tensors for {len(params)} params"
            )
    if not params:
        return
    with torch.no_grad():
        _op(params, [e for copies in emas for e in copies], [float(r) for r in rates])


# ------------------------------------------------------------------------------------------------
# The helper trainers hold.


def _fp32_copy(p: Tensor) -> Tensor:
    # empty_like keeps a dense parameter's strides (channels_last weights stay channels_last), so
    # the kernels read parameter and copies as flat arrays without a layout copy.
    return torch.empty_like(p, dtype=torch.float32).copy_(p.detach())


class EMA:
    """fp32 exponential moving averages of a model's parameters at several rates.

        ema = EMA(model, rates=(0.999, 0.9999))
        ...  # after each optimizer step:
        ema.update()                                   # one fused op for all rates and tensors
        ema.copy_to(eval_model, k=1)                   # load the 0.9999 average into a model
        torch.save(ema.state_dict(), path)             # {"rates", "names", "copies"}

    model_or_params: an nn.Module (its named parameters) or an iterable of parameter tensors.
    rates:           decay rates in [0, 1], at most 8.
    """

    def __init__(self, model_or_params: nn.Module | Iterable[Tensor], rates: Sequence[float]):
        if isinstance(model_or_params, nn.Module):
            named = list(model_or_params.named_parameters())
        else:
            named = [(str(i), p) for i, p in enumerate(model_or_params)]
        self.rates = [float(r) for r in rates]
        check_inputs([], [], self.rates)
        self.names = [n for n, _ in named]  # keys of the copies' state dicts
        self.params = [p for _, p in named]  # the live parameters update() reads by default
        with torch.no_grad():
            self.copies = [[_fp32_copy(p) for p in self.params] for _ in self.rates]

    def update(
        self, params: Iterable[Tensor] | None = None, rates: Sequence[float] | None = None
    ) -> None:
        """One EMA step of every copy: from ``params`` (default: the tracked parameters), at
        ``rates`` (default: the EMA's own; pass others for a warm-up schedule)."""
        params = self.params if params is None else list(params)
        ema_update_(params, self.copies, self.rates if rates is None else rates)

    def averaged_state_dict(self, k: int) -> dict[str, Tensor]:
        """The k-th average as {parameter name: fp32 tensor} (references, not copies), ready for
        ``model.load_state_dict(..., strict=False)`` (parameters only, no buffers)."""
        return dict(zip(self.names, self.copies[k], strict=True))

    @torch.no_grad()
    def copy_to(self, model_or_params: nn.Module | Iterable[Tensor], k: int) -> None:
        """Write the k-th average into a model (by parameter name) or a parameter list (by
        position), cast to each parameter's dtype."""
        if isinstance(model_or_params, nn.Module):
            targets = dict(model_or_params.named_parameters())
            missing = [n for n in self.names if n not in targets]
            if missing or len(targets) != len(self.names):
                raise ValueError(
                    f"EMA.copy_to: parameter names differ from the EMA's: {missing[:5]}"
                )
            params = [targets[n] for n in self.names]
        else:
            params = list(model_or_params)
            if len(params) != len(self.names):
                raise ValueError(f"EMA.copy_to: {len(params)} params for {len(self.names)} copies")
        for p, e in zip(params, self.copies[k], strict=True):
            p.copy_(e)

    def state_dict(self) -> dict:
        return {"rates": list(self.rates), "names": list(self.names), "copies": self.copies}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if [float(r) for r in state["rates"]] != self.rates:
            raise ValueError(f"EMA.load_state_dict: rates {state['rates']} != {self.rates}")
        if list(state["names"]) != self.names:
            raise ValueError("EMA.load_state_dict: the parameter names differ")
        for mine, theirs in zip(self.copies, state["copies"], strict=True):
            for name, e, src in zip(self.names, mine, theirs, strict=True):
                if src.shape != e.shape:
                    raise ValueError(
                        f"EMA.load_state_dict: {name} has shape {tuple(src.shape)}, "
                        f"expected {tuple(e.shape)}"
                    )
                e.copy_(src)
