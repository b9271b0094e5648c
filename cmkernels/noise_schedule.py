"""The noise schedule: the constants of the paper, the Karras map tau(u) and its grids.

Math: spec/consistency-models.md sections 2 (Karras grid), 8 (official time points) and 11
(t = tau(u) in continuous time). Everything that needs a noise level of the schedule (the losses,
the samplers, the denoisers, the trainer) takes it from here; this module needs only torch.

    tau(u) = (sigma_min^(1/rho) + u (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho,   u in [0, 1]

The discrete grid of N points is tau at u = 1 - i / (N - 1), i = 0..N-1: DESCENDING, index 0 is
sigma_max (the paper's sigma_0 > sigma_1 > ... > sigma_{N-1} = sigma_min).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise

import torch
from torch import Tensor

SIGMA_MIN = 0.002  # eps: the boundary time, f(x, sigma_min) = x
SIGMA_MAX = 80.0  # T
SIGMA_DATA = 0.5
RHO = 7.0


def _from_top(frac: Tensor, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """The Karras map measured from the sigma_max end: frac 0 -> sigma_max, frac 1 -> sigma_min.
    (The grid's points are computed in this form, as the official code does, so grid points are
    the same floating-point numbers as its.)"""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + frac * (lo - hi)) ** rho


def tau(
    u: Tensor, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> Tensor:
    """Continuous noise level t = tau(u) for u in [0, 1] (u = 0: sigma_min, u = 1: sigma_max),
    elementwise, in u's dtype."""
    return _from_top(1 - u, sigma_min, sigma_max, rho)


def tau_derivative(
    u: Tensor, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> Tensor:
    """d tau / du = rho (sigma_max^(1/rho) - sigma_min^(1/rho)) tau(u)^((rho - 1) / rho)."""
    span = sigma_max ** (1 / rho) - sigma_min ** (1 / rho)
    return rho * span * tau(u, sigma_min, sigma_max, rho) ** ((rho - 1) / rho)


def karras_sigmas(
    n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
    device=None,
) -> Tensor:  # fmt: skip
    """The Karras grid of n points, DESCENDING (index 0 = sigma_max), float64, no final 0."""
    if n < 2:
        raise ValueError(f"a Karras grid needs at least 2 points, got {n}")
    i = torch.arange(n, dtype=torch.float64, device=device)
    sigmas = _from_top(i / (n - 1), sigma_min, sigma_max, rho)
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact endpoints (the power can be 1 ulp off)
    return sigmas


def ts_to_sigmas(
    ts: Iterable[int],
    steps: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> Tensor:
    """Official integer time points -> noise levels, float64 [len(ts)].

    Entry i is point ts[i] of the Karras grid of `steps` points (index 0 = sigma_max, index
    steps - 1 = sigma_min). The official two-step sampler of ImageNet-64 CD is ts = (0, 22, 39)
    with steps = 40: it evaluates the model at the first two points; the last one (sigma_min)
    only ends the loop (see cmkernels.sampling.sample_multistep).
    """
    ts = [int(t) for t in ts]
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    if not ts:
        raise ValueError("ts is empty")
    if any(t < 0 or t > steps - 1 for t in ts):
        raise ValueError(f"ts must lie in [0, {steps - 1}] for steps={steps}, got {ts}")
    if any(a >= b for a, b in pairwise(ts)):
        raise ValueError(f"ts must be strictly increasing, got {ts}")
    return karras_sigmas(steps, sigma_min, sigma_max, rho)[ts].clamp(sigma_min, sigma_max)
