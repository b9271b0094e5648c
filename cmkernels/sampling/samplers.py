"""The sampling algorithms: EDM Euler/Heun (teachers), one-step and multistep consistency
sampling, the per-sample noise they draw and the checks of their noise levels.

Math: spec/consistency-models.md sections 2 (Karras grid), 4 (Heun step) and 8 (sampling).
Every sampler is a pure function of (denoiser, unit noise z, noise levels, class labels, noise
source); `denoiser(x, sigma, class_labels)` takes sigma as a per-sample Tensor [B].
`sample_multistep` is the one implementation of Algorithm 1: the CUDA-graph sampler
(cuda_graph.py) captures it rather than writing it again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise

import torch
from torch import Tensor

from cmkernels import ops
from cmkernels.noise_schedule import SIGMA_MAX, SIGMA_MIN

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are optional (a bare GPU machine may lack tqdm)
    tqdm = None

NoiseSource = Callable[[], Tensor]  # Returns a fresh unit-Gaussian draw shaped like the samples.


# ----------------------------------------------------------------------------------------------
# Per-sample noise.


class PerSampleNoise:
    """Unit Gaussian noise with one generator per sample: row i of every draw depends only on
    seeds[i], so an image does not depend on the batch it is generated in.

    Each call returns the next draw [B, *shape_per_sample]. Draws are made in float32 on the CPU
    and then moved, so a seed gives the same noise on every device and for every dtype.
    """

    def __init__(
        self,
        seeds: Sequence[int],                   # One seed per sample.
        shape_per_sample: Sequence[int],        # E.g. (C, H, W).
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.shape = tuple(int(s) for s in shape_per_sample)
        self.device = device
        self.dtype = dtype

    def __call__(self) -> Tensor:
        z = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])  # (B, ...)
        return z.to(device=self.device, dtype=self.dtype)

    def randint(self, high: int) -> Tensor:
        """One integer in [0, high) per sample from the same generators (e.g. a class label),
        long [B] on `device`; it advances the generators like a noise draw does."""
        draws = [torch.randint(high, (1,), generator=g) for g in self.generators]
        return torch.cat(draws).to(self.device)


def randn_per_sample(
    seeds: Sequence[int],
    shape_per_sample: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The first draw of `PerSampleNoise(seeds, shape_per_sample)`: [B, *shape_per_sample]."""
    return PerSampleNoise(seeds, shape_per_sample, device, dtype)()


# ----------------------------------------------------------------------------------------------
# Noise levels.


def consistency_time_points(
    sigmas: Iterable[float] | Tensor,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
) -> list[float]:
    """The time points a consistency sampler evaluates: each clipped into [sigma_min, sigma_max];
    points at sigma_min are dropped (f(x, sigma_min) = x and no noise is added there)."""
    points = [min(max(s, sigma_min), sigma_max) for s in check_sigmas(sigmas)]
    points = [s for s in points if s > sigma_min]
    if not points:
        raise ValueError("no time point above sigma_min: nothing to evaluate")
    return points


def check_sigmas(sigmas: Iterable[float] | Tensor) -> list[float]:
    """sigmas as a list of floats; ValueError unless nonempty, finite, strictly decreasing and
    positive (a final 0 allowed)."""
    sigmas = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    if not sigmas:
        raise ValueError("no noise levels given")
    if not all(math.isfinite(s) for s in sigmas):
        raise ValueError(f"noise levels must be finite numbers, got {sigmas}")
    if any(a <= b for a, b in pairwise(sigmas)) or sigmas[-1] < 0:
        raise ValueError(f"noise levels must be positive and strictly decreasing, got {sigmas}")
    return sigmas


def _per_sample(sigma: float, x: Tensor) -> Tensor:
    """sigma as a Tensor [B] (at least float32) for the denoiser and the Heun stages."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.full((x.shape[0],), float(sigma), dtype=dtype, device=x.device)


def _progress(items: list, enabled: bool, desc: str):
    return tqdm(items, desc=desc, leave=False) if enabled and tqdm is not None else items


# ----------------------------------------------------------------------------------------------
# EDM samplers (teachers): dx/dsigma = (x - D(x, sigma)) / sigma. Each Heun step is the two
# fused elementwise passes ops.heun_step1 (Euler predictor) and ops.heun_step2 (corrector).


def _with_final_zero(sigmas) -> list[float]:
    sigmas = check_sigmas(sigmas)
    return sigmas if sigmas[-1] == 0 else sigmas + [0.0]


def sample_heun(
    denoiser, z: Tensor, sigmas, class_labels: Tensor | None = None, *, progress: bool = False
) -> Tensor:
    """EDM's deterministic 2nd-order sampler (Karras et al. 2022, Algorithm 1 without churn).

    z [B, C, H, W] unit noise; sigmas descending (a final 0 is appended when absent).
    N steps cost 2N - 1 denoiser evaluations: the step to 0 has no correction.
    """
    sigmas = _with_final_zero(sigmas)
    x = z.to(torch.promote_types(z.dtype, torch.float32)) * sigmas[0]  # x_0 ~ N(0, t_0^2 I)
    steps = list(pairwise(sigmas))
    for t_cur, t_next in _progress(steps, progress, "heun"):
        t, tn = _per_sample(t_cur, x), _per_sample(t_next, x)  # (B,)
        # Euler step.
        denoised = denoiser(x, t, class_labels)
        x_next, d = ops.heun_step1(x, denoised, t, tn)
        # Apply 2nd order correction.
        if t_next > 0:
            denoised = denoiser(x_next, tn, class_labels)
            x_next = ops.heun_step2(x, d, x_next, denoised, t, tn)
        x = x_next
    return x


def sample_euler(
    denoiser, z: Tensor, sigmas, class_labels: Tensor | None = None, *, progress: bool = False
) -> Tensor:
    """Euler sampler of the same ODE: N steps cost N denoiser evaluations."""
    sigmas = _with_final_zero(sigmas)
    x = z.to(torch.promote_types(z.dtype, torch.float32)) * sigmas[0]  # x_0 ~ N(0, t_0^2 I)
    steps = list(pairwise(sigmas))
    for t_cur, t_next in _progress(steps, progress, "euler"):
        t, tn = _per_sample(t_cur, x), _per_sample(t_next, x)  # (B,)
        # Euler step.
        x, _ = ops.heun_step1(x, denoiser(x, t, class_labels), t, tn)
    return x


# ----------------------------------------------------------------------------------------------
# Consistency-model samplers.


def sample_multistep(
    denoiser,
    z: Tensor,
    sigmas,
    noise: NoiseSource | None,
    class_labels: Tensor | None = None,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    clamp: bool = True,
    *,
    replace: Callable[[Tensor], Tensor] | None = None,
    progress: bool = False,
) -> Tensor:
    """Multistep consistency sampling (Algorithm 1 of Song et al. 2023).

    z [B, C, H, W] unit noise; sigmas: the time points tau_1 > tau_2 > ... (tau_1 is normally
    sigma_max), each clipped into [sigma_min, sigma_max]; points at sigma_min are skipped, so
    `ts_to_sigmas((0, 22, 39), 40)` costs 2 evaluations as in the official sampler.
    noise() gives the fresh unit noise of steps 2, 3, ... (unused for a single time point).
    clamp: clip each f output to [-1, 1] (official). replace: applied to each (clamped) f
    output; `cmkernels.editing` uses it for Algorithm 4's projection onto the known part.
    """
    taus = consistency_time_points(sigmas, sigma_min, sigma_max)
    x = z.to(torch.promote_types(z.dtype, torch.float32)) * taus[0]  # x_T ~ N(0, tau_1^2 I)
    for i, tau in enumerate(_progress(taus, progress, "multistep")):
        if i > 0:
            # Sample x_tau ~ N(x, (tau^2 - sigma_min^2) I).
            x = x + math.sqrt(tau**2 - sigma_min**2) * noise()
        # x <- f(x_tau, tau).
        x = denoiser(x, _per_sample(tau, x), class_labels)
        if clamp:
            x = x.clamp(-1, 1)
        if replace is not None:
            x = replace(x)
    return x


def sample_multistep_given_noises(
    denoiser,
    z: Tensor,                              # (B, C, H, W) unit noise
    noises: Sequence[Tensor],               # the fresh unit noise of steps 2, 3, ..., like z
    sigmas,                                 # time points, as for sample_multistep
    sigma_min: float = SIGMA_MIN,
    class_labels: Tensor | None = None,
    clamp: bool = True,
    sigma_max: float = SIGMA_MAX,
) -> Tensor:
    """sample_multistep with all its randomness given up front: noises[i] is what noise() would
    return at its (i + 1)-th call. One tensor per evaluated time point after the first."""
    taus = consistency_time_points(sigmas, sigma_min, sigma_max)
    if len(noises) != len(taus) - 1:
        raise ValueError(
            f"{len(taus)} evaluated time points {taus} need {len(taus) - 1} noise tensors, "
            f"got {len(noises)}"
        )
    draws = iter(noises)
    return sample_multistep(
        denoiser, z, taus, lambda: next(draws), class_labels, sigma_min, sigma_max, clamp
    )


def sample_onestep(
    denoiser,
    z: Tensor,
    sigma_max: float = SIGMA_MAX,
    class_labels: Tensor | None = None,
    *,
    clamp: bool = True,
) -> Tensor:
    """One-step consistency sampling: x_T = sigma_max * z; sample = f(x_T, sigma_max)."""
    return sample_multistep(
        denoiser, z, [sigma_max], None, class_labels, sigma_max=sigma_max, clamp=clamp
    )
