"""Training objectives: EDM denoising, consistency distillation (CD) and consistency training (CT,
with the iCT options), in discrete and in continuous time (CD-infinity, CT-infinity), as small
callables that return one loss per sample; the trainer reduces.

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
from torch import Tensor, nn

from cmkernels.noise_schedule import (
    RHO,
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    karras_sigmas,
    tau,
    tau_derivative,
)
from cmkernels.ops import heun_step1, heun_step2

# ------------------------------------------------------------------------------------------------
# Distances d(a, b) -> [B].


def _flat(a: Tensor, b: Tensor) -> Tensor:
    """a - b per sample, [B, dim], in float32 (float64 when either is float64)."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return (a.to(dtype) - b.to(dtype)).flatten(1)


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

    kind: "cd" (fixed N and mu), "ct" (the CT paper's N(k), mu(k)), "ict" (doubling N(k),
    mu = 0: the target is stopgrad(theta)) or "continuous" (no grid: N = 0; the fixed mu of
    target_ema).
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
        if self.kind == "continuous":
            return 0
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
        self, B: int, gen: torch.Generator, num_scales: int | None = None, step: int = 0
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

    def draw(
        self, B: int, gen: torch.Generator, num_scales: int, step: int = 0
    ) -> dict[str, Tensor]:
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


# ------------------------------------------------------------------------------------------------
# Continuous time (CD-infinity, CT-infinity; spec section 11). u ~ U[0, 1], t = tau(u),
# x_t = x + t z; g = d/dt f^-(x_t, t) = df^-/dt + (df^-/dx) v, one JVP of the target network with
# tangents (v, 1) and no gradient. The per-sample objective is written in the sCM form
#     || f_theta(x_t, t) - stopgrad(f_theta(x_t, t) - w g) ||^2 / dim,   w = lambda(t) tau'(u),
# whose gradient 2 w g . grad f_theta / dim is the N -> infinity limit of the discrete l2 CD / CT
# gradient divided by Delta u (with f^- = stopgrad(f_theta)), and whose value w^2 ||g||^2 / dim
# is the size of the consistency error per unit u (what the log shows).


class AdaptiveWeight(nn.Module):
    """sCM's learned log-variance w_phi(t): a linear layer on the sinusoidal embedding of the
    network's time input c_noise(t). The loss becomes exp(-w) d + w per sample; w starts at 0."""

    def __init__(self, dim: int = 128, c_noise_convention: str = "official"):
        super().__init__()
        self.dim, self.c_noise_convention = dim, c_noise_convention
        self.linear = nn.Linear(dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:  # t [B] -> w [B]
        from cmkernels.diffusion import c_noise
        from cmkernels.unet import timestep_embedding

        dtype = self.linear.weight.dtype  # float32 in training; float64 in the exactness checks
        emb = timestep_embedding(c_noise(t.to(dtype), self.c_noise_convention), self.dim)
        return self.linear(emb.to(dtype)).squeeze(-1)


TANGENT_NORMS = ("l2", "rms")  # what c is added to in g / (scale + c): ||g|| or ||g|| / sqrt(dim)
# sCM's log-normal proposal of sigma for TrigFlow (its CIFAR-10 setting, Appendix G.2).
TRIGFLOW_P_MEAN, TRIGFLOW_P_STD = -1.0, 1.4


@dataclass
class ContinuousConsistencyLoss:
    """CD-infinity (teacher velocity v = (x_t - D_phi(x_t, t)) / t) or CT-infinity (v = z).

    tangent_norm:    c > 0: the weighted tangent w g is replaced by w g / (||w g|| + c) per sample
                     (sCM's tangent normalisation, c = 0.1 there); 0: off (the paper's objective).
    tangent_norm_scale: "l2" (||.|| the sample's L2 norm, as sCM writes it) or "rms" (the norm
                     over sqrt(dim), per element, as public sCM reproductions compute it: c then
                     matters at any image size).
    tangent_warmup:  steps over which the network's share of the tangent ramps 0 -> 1 (sCM's
                     tangent warm-up, carried over to the EDM parameterisation: see Denoiser.jvp);
                     0: off.
    adaptive:        an AdaptiveWeight module (sCM's learned weighting), or None.
    target_is_model: the target is stopgrad(theta) (target EMA rate 0): its value and tangent come
                     from the online network's own pass, `model(x_t, t, tangent=v)` (one forward
                     with the fused value+tangent kernels, instead of a forward and a separate
                     JVP of the target copy). The `target` argument is then not evaluated.
    trigflow:        sCM's TrigFlow objective (for a "trigflow" Denoiser; see trigflow_tangent):
                     sigma = exp(p_mean + p_std n) instead of tau(u), the loss on the network
                     output F_T, the warm-up and the normalisation applied to sCM's
                     g = cos(s) df/ds.
    """

    tangent_norm: float = 0.0
    tangent_norm_scale: str = "l2"
    tangent_warmup: int = 0
    adaptive: nn.Module | None = None
    target_is_model: bool = False
    trigflow: bool = False
    p_mean: float = TRIGFLOW_P_MEAN
    p_std: float = TRIGFLOW_P_STD
    sigma_data: float = SIGMA_DATA
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = RHO

    def __post_init__(self):
        if self.tangent_norm_scale not in TANGENT_NORMS:
            raise ValueError(f"tangent_norm_scale must be one of {', '.join(TANGENT_NORMS)}, "
                             f"got {self.tangent_norm_scale!r}")  # fmt: skip

    def draw(self, B: int, gen: torch.Generator, num_scales: int | None = None,
             step: int = 0) -> dict[str, Tensor]:  # fmt: skip
        """Per-sample noise levels of a (global) batch, t = tau(u) with u ~ U[0, 1] and
        w = tau'(u) (TrigFlow: t log-normal, clamped to [sigma_min, sigma_max], and w = 1), and
        the tangent warm-up factor r of this step."""
        if self.trigflow:
            n = torch.randn(B, generator=gen, dtype=torch.float64)
            t = (self.p_mean + self.p_std * n).exp().clamp(self.sigma_min, self.sigma_max)
            w = torch.ones_like(t)
        else:
            u = torch.rand(B, generator=gen, dtype=torch.float64)
            t = tau(u, self.sigma_min, self.sigma_max, self.rho)
            w = tau_derivative(u, self.sigma_min, self.sigma_max, self.rho)
        r = min(1.0, step / self.tangent_warmup) if self.tangent_warmup > 0 else 1.0
        return {"t": t.float(), "w": w.float(), "r": torch.full((B,), r)}

    def velocity(self, x: Tensor, noise: Tensor, x_t: Tensor, t: Tensor, teacher, labels):
        """dx_t/dt of the probability-flow ODE at (x_t, t): the teacher's (CD) or z (CT)."""
        if teacher is None:
            return noise
        bc = (-1,) + (1,) * (x.dim() - 1)
        acc = torch.promote_types(x_t.dtype, torch.float32)
        return ((x_t.to(acc) - teacher(x_t, t, labels).to(acc)) / t.view(bc)).to(x_t.dtype)

    def tangent(self, target, x_t: Tensor, t: Tensor, v: Tensor, r: float, labels) -> Tensor:
        """g = d/dt f^-(x_t, t) along (v, 1), in float32 (float64 for float64), no gradient."""
        with torch.no_grad():
            _, g = target.jvp(x_t, t, v, labels, network_tangent=r)
        return g.to(torch.promote_types(g.dtype, torch.float32))

    def trigflow_tangent(self, x_t: Tensor, t: Tensor, g: Tensor, r: float) -> Tensor:
        """sCM's g = cos(s) df/ds (Algorithm 1, before normalisation) from the sigma-space
        tangent g = dD/dsigma of a trigflow denoiser, computed with network_tangent = r.

        With s = arctan(sigma / sigma_data), ds/dsigma = cos^2(s) / sigma_data, so the exact
        cos(s) df/ds = (sigma_data / cos s) dD/dsigma. sCM's warm-up scales the whole term
        sin(s) (x_s + sigma_data dF_T/ds) by r; network_tangent = r scales only the network's
        share of it, so the x_s share, (1 - r) sin(s) x_s with x_s = cos(s) x_t, is added back
        (times cos s)."""
        bc = (-1,) + (1,) * (x_t.dim() - 1)
        s = torch.atan(t.to(g.dtype) / self.sigma_data).view(bc)
        cos, sin = s.cos(), s.sin()
        out = (self.sigma_data / cos) * g
        if r != 1.0:
            out = out + (1.0 - r) * sin * cos.square() * x_t.to(g.dtype)
        return out

    def _normalise(self, delta: Tensor) -> Tensor:
        bc = (-1,) + (1,) * (delta.dim() - 1)
        scale = delta.flatten(1).norm(dim=1).view(bc)
        if self.tangent_norm_scale == "rms":
            scale = scale / math.sqrt(delta[0].numel())
        return delta / (scale + self.tangent_norm)

    def __call__(self, model, target, x: Tensor, noise: Tensor, draws: dict, teacher=None,
                 labels=None):  # fmt: skip
        t, w = draws["t"].to(x.device), draws["w"].to(x.device)
        r = float(draws["r"][0]) if len(draws["r"]) else 1.0
        bc = (-1,) + (1,) * (x.dim() - 1)
        x_t = x + t.view(bc) * noise
        with torch.no_grad():
            v = self.velocity(x, noise, x_t, t, teacher, labels)
        if self.target_is_model:
            online, g = model(x_t, t, labels, tangent=v, network_tangent=r)
            g = g.to(torch.promote_types(g.dtype, torch.float32))
        else:
            rng = _rng_state(x.device)
            online = model(x_t, t, labels)
            g = _same_dropout(lambda: self.tangent(target, x_t, t, v, r, labels), rng, x.device)
        if self.trigflow:
            # sCM's loss on F_T: F_T - F_T^- = -(D - D^-) / (sigma_data sin s) (D = f, c_out =
            # sigma_data sin s, F_T = -F); its value is ||g_T||^2 / dim, its gradient
            # 2 g_T . grad F_T / dim.
            delta = self.trigflow_tangent(x_t, t, g, r)
            if self.tangent_norm > 0:
                delta = self._normalise(delta)
            sin = torch.atan(t.to(delta.dtype) / self.sigma_data).sin().view(bc)
            online = online.to(delta.dtype)
            step = -(online - online.detach()) / (self.sigma_data * sin)
            per_sample = l2_distance(step, delta)
        else:
            delta = w.view(bc) * g  # lambda(t) = 1
            if self.tangent_norm > 0:
                delta = self._normalise(delta)
            per_sample = l2_distance(online, (online.to(delta.dtype) - delta).detach())
        rms = delta.flatten(1).square().mean(1).sqrt().mean()
        aux = {"sigma_mean": t.mean(), "tangent_rms": rms}
        if self.adaptive is not None:
            logvar = self.adaptive(t)
            per_sample = torch.exp(-logvar) * per_sample + logvar
        return per_sample, aux
