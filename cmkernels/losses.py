"""Training objectives: EDM denoising, consistency distillation (CD) and consistency training (CT,
with the iCT options), as small callables that return one loss per sample; the trainer reduces.

The training schedules (N(k), mu(k), learning-rate and EMA warm-up) live beside the objectives;
the noise schedule (Karras grid, tau(u)) is cmkernels.noise_schedule.

Notation as in the paper: the Karras grid sigma_0 > sigma_1 > ... > sigma_{N-1} (index 0 is
sigma_max); a training pair is (t, t2) = (sigma_n, sigma_{n+1}); f is the consistency model,
f^- the target network (an EMA of f, or f itself under stop-grad for iCT).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cmkernels.noise_schedule import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, karras_sigmas
from cmkernels.ops import heun_step1, heun_step2

# ------------------------------------------------------------------------------------------------
# Distances d(a, b) -> [B].


def _flat(a: Tensor, b: Tensor) -> Tensor:
    return (a.float() - b.float()).flatten(1)


def l2_distance(a: Tensor, b: Tensor) -> Tensor:
    return _flat(a, b).square().mean(1)


def l1_distance(a: Tensor, b: Tensor) -> Tensor:
    return _flat(a, b).abs().mean(1)


def pseudo_huber_distance(a: Tensor, b: Tensor) -> Tensor:
    """sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(dim) (iCT)."""
    diff = _flat(a, b)
    c = 0.00054 * math.sqrt(diff.shape[1])
    return torch.sqrt(diff.square().sum(1) + c * c) - c


DISTANCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "l2": l2_distance,
    "l1": l1_distance,
    "pseudo_huber": pseudo_huber_distance,
}

# ------------------------------------------------------------------------------------------------
# Schedules: what changes with the training step k (of K). The paper's values are the defaults:
# CT s0 = 2, s1 = 150, mu0 = 0.9 (CIFAR-10; ImageNet-64 uses s1 = 200, mu0 = 0.95); iCT s0 = 10,
# s1 = 1280; CD a fixed grid of N = 18 points with target rate mu = 0.95 (ImageNet-64).

CD_NUM_SCALES, CD_TARGET_EMA = 18, 0.95
CT_S0, CT_S1, CT_MU0 = 2, 150, 0.9
ICT_S0, ICT_S1 = 10, 1280


def ct_num_scales(step: int, total: int, s0: int = CT_S0, s1: int = CT_S1) -> int:
    """N(k) of the CT paper: ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1."""
    frac = step / max(total, 1)
    return int(math.ceil(math.sqrt(frac * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1)) + 1


def ct_target_ema(num_scales: int, s0: int = CT_S0, mu0: float = CT_MU0) -> float:
    """mu(k) = exp(s0 ln(mu0) / N(k)). (The official code divides by N(k) - 1; we follow the
    paper's formula.)"""
    return math.exp(s0 * math.log(mu0) / num_scales)


def ict_num_scales(step: int, total: int, s0: int = ICT_S0, s1: int = ICT_S1) -> int:
    """iCT doubling curriculum: N(k) = min(s0 2^floor(k / K'), s1) + 1,
    K' = floor(K / (log2 floor(s1 / s0) + 1))."""
    k_prime = max(1, math.floor(total / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (step // k_prime), s1) + 1


@dataclass(frozen=True)
class ConsistencySchedule:
    """N(k) grid points and the target network's rate mu(k) of a run.

    kind: "cd" (fixed N and mu), "ct" (the CT paper's N(k), mu(k)) or "ict" (doubling N(k),
    mu = 0: the target is stopgrad(theta)).
    """

    kind: str
    total_steps: int
    num_scales: int = CD_NUM_SCALES  # cd
    target_ema: float = CD_TARGET_EMA  # cd
    s0: int = CT_S0  # ct / ict
    s1: int = CT_S1
    mu0: float = CT_MU0  # ct

    def scales_at(self, step: int) -> int:
        if self.kind == "ict":
            return ict_num_scales(step, self.total_steps, self.s0, self.s1)
        if self.kind == "ct":
            return ct_num_scales(step, self.total_steps, self.s0, self.s1)
        return self.num_scales

    def target_rate(self, num_scales: int) -> float:
        if self.kind == "ict":
            return 0.0
        if self.kind == "ct":
            return ct_target_ema(num_scales, self.s0, self.mu0)
        return self.target_ema


def warmup_lr(lr: float, step: int, warmup: int) -> float:
    """Linear learning-rate warm-up over the first `warmup` steps (step counts from 0)."""
    return lr * min(1.0, (step + 1) / max(warmup, 1))


def ema_warmup_rates(rates, step: int, enabled: bool = True) -> list[float]:
    """Evaluation-EMA rates at step k: min(r, (1 + k) / (10 + k)) while warming up."""
    if not enabled:
        return list(rates)
    return [min(r, (1 + step) / (10 + step)) for r in rates]


def ict_index_probs(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """Discretised lognormal over pairs (sigma_i, sigma_{i+1}) of a DESCENDING grid: [N - 1]."""
    log_s = sigmas.double().log()
    cdf = torch.erf((log_s - p_mean) / (math.sqrt(2) * p_std))
    p = (cdf[:-1] - cdf[1:]).clamp_min(0)  # sigma_i > sigma_{i+1}
    return (p / p.sum()).float()


# ------------------------------------------------------------------------------------------------
# Objectives. Each draws its per-sample randomness for the global batch with draw() (the trainer
# slices it per rank, so data-parallel runs match one process) and returns
# (per-sample loss [B], aux dict of floats).


@dataclass
class EDMLoss:
    """EDM teacher: sigma ~ lognormal(P_mean, P_std), lambda = (sigma^2 + sd^2) / (sigma sd)^2."""

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = SIGMA_DATA

    def draw(
        self, B: int, gen: torch.Generator, num_scales: int | None = None
    ) -> dict[str, Tensor]:
        """Per-sample randomness of a (global) batch of B: the noise levels."""
        n = torch.randn(B, generator=gen)
        return {"sigma": (self.p_mean + self.p_std * n).exp()}

    def __call__(self, denoiser, x: Tensor, noise: Tensor, draws: dict, labels=None):
        sigma = draws["sigma"].to(x.device)  # (B,)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        denoised = denoiser(x + sigma.view(-1, 1, 1, 1) * noise, sigma, labels)
        return weight * (denoised.float() - x.float()).square().flatten(1).mean(1), {}


def _rng_state(device: torch.device):
    """The global RNG state that dropout draws from on `device`."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _same_dropout(fn, state, device: torch.device):
    """Evaluate fn() with the dropout RNG at `state` (so it draws the same masks as the online
    evaluation), restoring the RNG afterwards."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda" if cuda else "cpu"):
        if cuda:
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        return fn()


@dataclass
class ConsistencyLoss:
    """CD (teacher Heun step) or CT (x_hat = x + t2 z) between adjacent grid points.

    distance:  "l2" | "l1" | "pseudo_huber"
    weighting: "uniform" (lambda = 1, the paper) | "ict" (lambda = 1 / (t - t2))
    sampling:  "uniform" n ~ U{0..N-2} | "lognormal" (iCT's discretised lognormal)
    """

    distance: str | Callable[[Tensor, Tensor], Tensor] = "l2"  # a name, or d(a, b) -> [B]
    weighting: str = "uniform"
    sampling: str = "uniform"
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = RHO

    def draw(self, B: int, gen: torch.Generator, num_scales: int) -> dict[str, Tensor]:
        """Per-sample (t, t2) = (sigma_n, sigma_{n+1}) of a (global) batch of B, from a Karras grid
        of num_scales points."""
        sigmas = karras_sigmas(num_scales, self.sigma_min, self.sigma_max, self.rho)
        if self.sampling == "lognormal":
            n = torch.multinomial(ict_index_probs(sigmas), B, replacement=True, generator=gen)
        else:
            n = torch.randint(0, num_scales - 1, (B,), generator=gen)
        return {"t": sigmas[n].float(), "t2": sigmas[n + 1].float()}

    def __call__(
        self,
        model,  # f_theta (with grad)
        target,  # f_theta^- (evaluated under no_grad)
        x: Tensor,  # (B, C, H, W) clean images
        noise: Tensor,  # (B, C, H, W) z
        draws: dict,  # from draw(): t, t2 (B,)
        teacher=None,  # EDM denoiser for CD; None for CT
        labels=None,
    ):
        t, t2 = draws["t"].to(x.device), draws["t2"].to(x.device)
        bc = (-1,) + (1,) * (x.dim() - 1)
        x_t = x + t.view(bc) * noise
        with torch.no_grad():
            if teacher is not None:
                # One Heun step of the teacher's probability-flow ODE from t to t2.
                d_t = teacher(x_t, t, labels)
                x_pred, d = heun_step1(x_t, d_t, t, t2)
                x_hat = heun_step2(x_t, d, x_pred, teacher(x_pred, t2, labels), t, t2)
            else:
                x_hat = x + t2.view(bc) * noise  # the same z: an unbiased one-sample estimate
        rng = _rng_state(x.device)
        online = model(x_t, t, labels)
        with torch.no_grad():
            ref = _same_dropout(lambda: target(x_hat, t2, labels), rng, x.device)
        distance = DISTANCES[self.distance] if isinstance(self.distance, str) else self.distance
        dist = distance(online, ref.detach())
        if self.weighting == "ict":
            dist = dist / (t - t2)
        return dist, {"sigma_mean": t.mean()}  # a tensor: no host sync inside the training step
