"""Preconditioning and the denoisers (EDM and consistency-model parameterisations); the noise
levels themselves (constants, Karras grid, tau(u)) are cmkernels.noise_schedule.

D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)), with the EDM
scalings for the teacher and the boundary-condition scalings for consistency models
(c_skip(sigma_min) = 1, c_out(sigma_min) = 0, so f(x, sigma_min) = x exactly).

A TrigFlow consistency model (sCM, Lu & Song 2024) is the EDM-scalings denoiser used as the
consistency function: with s = arctan(sigma / sigma_data) and x_s = cos(s) x_sigma,
    f(x_s, s) = cos(s) x_s - sin(s) sigma_data F_T(x_s / sigma_data, s) = D_edm(x_sigma, sigma),
since c_skip = cos^2 s, c_out = sigma_data sin s, c_in = cos(s) / sigma_data and F_T = -F. Its
boundary is sigma = 0 (s = 0); parameterization "trigflow" is that model, sampled like "cm".
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from cmkernels.noise_schedule import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN


def edm_scalings(sigma: Tensor, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in) of EDM."""
    s2 = sigma**2 + sigma_data**2
    return sigma_data**2 / s2, sigma * sigma_data / s2.sqrt(), 1 / s2.sqrt()


def cm_scalings(sigma: Tensor, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN):
    """(c_skip, c_out, c_in) with the consistency-model boundary condition at sigma_min."""
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / s2.sqrt()
    return c_skip, c_out, 1 / s2.sqrt()


def c_noise(sigma: Tensor, convention: str = "official") -> Tensor:
    """The network's time input: "official" (openai/consistency_models) 250 ln(sigma + 1e-44),
    "edm" (NVlabs/edm) ln(sigma) / 4."""
    if convention == "official":
        return 250.0 * torch.log(sigma + 1e-44)
    if convention == "edm":
        return torch.log(sigma) / 4
    raise ValueError(f"unknown c_noise convention {convention!r} (official | edm)")


def c_noise_derivative(sigma: Tensor, convention: str = "official") -> Tensor:
    """d c_noise / d sigma."""
    if convention == "official":
        return 250.0 / (sigma + 1e-44)
    if convention == "edm":
        return 0.25 / sigma
    raise ValueError(f"unknown c_noise convention {convention!r} (official | edm)")


def scalings_derivatives(sigma: Tensor, sigma_data: float, sigma_shift: float):
    """d/dsigma of (c_skip, c_out, c_in) for the scalings with boundary point sigma_shift
    (sigma_min for consistency models, 0 for EDM, whose scalings are the same formulas at 0):
    with a = sigma - sigma_shift, A = a^2 + sigma_data^2 and S = sigma^2 + sigma_data^2,
    c_skip' = -2 sigma_data^2 a / A^2, c_out' = sigma_data (S - a sigma) / S^1.5 and
    c_in' = -sigma / S^1.5."""
    a = sigma - sigma_shift
    A = a**2 + sigma_data**2
    S = sigma**2 + sigma_data**2
    S15 = S * S.sqrt()
    return -2 * sigma_data**2 * a / A**2, sigma_data * (S - a * sigma) / S15, -sigma / S15


PARAMETERIZATIONS = ("cm", "edm", "trigflow")


class Denoiser(nn.Module):
    """Preconditioned denoiser around a backbone `net(x, c_noise, class_labels)`.

    net:             the backbone (a UNet)
    parameterization: "cm" (consistency model, boundary condition at sigma_min), "edm" (diffusion
                     teacher) or "trigflow" (consistency model with the EDM scalings, boundary at
                     sigma = 0: sCM's TrigFlow form, see the module docstring)
    sigma_data, sigma_min, sigma_max: the constants of the scalings and of sampling
    c_noise:         "official" or "edm" time input convention (match the weights)
    """

    def __init__(
        self,
        net: nn.Module,
        parameterization: str = "cm",
        sigma_data: float = SIGMA_DATA,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        c_noise: str = "official",
    ):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {', '.join(PARAMETERIZATIONS)}, "
                             f"got {parameterization!r}")  # fmt: skip
        self.net = net
        self.parameterization = parameterization
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max
        self.c_noise_convention = c_noise

    def scalings(self, sigma: Tensor):
        if self.parameterization == "cm":
            return cm_scalings(sigma, self.sigma_data, self.sigma_min)
        return edm_scalings(sigma, self.sigma_data)  # edm and trigflow

    def _sigmas(self, x: Tensor, sigma) -> Tensor:
        """sigma as a [B] tensor: float32 (float64 for a float64 x: reference and JVP checks in
        float64)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=dtype).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        if sigma.numel() != x.shape[0]:
            raise ValueError(f"sigma has {sigma.numel()} entries for a batch of {x.shape[0]}")
        return sigma

    def _parts(self, x: Tensor, sigma: Tensor, class_labels) -> tuple[Tensor, Tensor]:
        """(D(x, sigma), the network's output F) for sigma [B] from _sigmas."""
        c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in self.scalings(sigma))
        F_x = self.net(
            (c_in * x).to(x.dtype), c_noise(sigma, self.c_noise_convention), class_labels
        )
        acc = torch.promote_types(x.dtype, torch.float32)
        return (c_skip * x.to(acc) + c_out * F_x.to(acc)).to(x.dtype), F_x

    def _explicit_tangent(self, *tensors) -> bool:
        """Whether the network's written-out tangent forward serves: a UNet, and no torch.func
        transform or forward-AD dual tensor around the call (they would need derivatives of the
        tangent, which that forward does not record)."""
        if not hasattr(self.net, "forward_with_tangent"):
            return False
        if torch._C._functorch.maybe_current_level() is not None:
            return False
        return all(fwAD.unpack_dual(t).tangent is None for t in tensors)

    def _with_tangent(self, x: Tensor, sigma: Tensor, v: Tensor, class_labels,
                      network_tangent: float) -> tuple[Tensor, Tensor]:  # fmt: skip
        """(D(x, sigma), dD/dsigma along (v, 1)) through UNet.forward_with_tangent: D as
        forward() computes it (recorded by autograd in grad mode), the tangent never recorded."""
        shift = self.sigma_min if self.parameterization == "cm" else 0.0
        c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in self.scalings(sigma))
        d_skip, d_out, d_in = (
            c.view(-1, 1, 1, 1) for c in scalings_derivatives(sigma, self.sigma_data, shift)
        )
        noise = c_noise(sigma, self.c_noise_convention)
        acc = torch.promote_types(x.dtype, torch.float32)
        with torch.no_grad():
            t_in = (d_in * x.to(acc) + c_in * v.to(acc)).to(x.dtype)
            t_noise = c_noise_derivative(sigma, self.c_noise_convention)
        F_x, t_F = self.net.forward_with_tangent(
            (c_in * x).to(x.dtype), t_in, noise, t_noise, class_labels
        )
        D = (c_skip * x.to(acc) + c_out * F_x.to(acc)).to(x.dtype)
        with torch.no_grad():
            F_acc = F_x.detach().to(acc)
            dD = d_skip * x.to(acc) + c_skip * v.to(acc) + d_out * F_acc
            dD = dD + network_tangent * c_out * t_F.to(acc)
        return D, dD.to(x.dtype)

    def forward(self, x: Tensor, sigma, class_labels: Tensor | None = None, *,
                tangent: Tensor | None = None, network_tangent: float = 1.0):  # fmt: skip
        """D(x, sigma); with `tangent` v, the pair (D, dD/dsigma along (v, 1)) from one pass that
        shares the value: D is recorded by autograd as without a tangent, the tangent is a
        constant (what the continuous-time objective needs of stopgrad(theta): its value and
        its tangent from the online network's single forward). network_tangent as in jvp()."""
        sigma = self._sigmas(x, sigma)
        if tangent is None:
            return self._parts(x, sigma, class_labels)[0]
        if tangent.shape != x.shape:
            raise ValueError(f"tangent has shape {tuple(tangent.shape)}; x has {tuple(x.shape)}")
        v = tangent.to(x.dtype)
        if self._explicit_tangent(x, v):
            return self._with_tangent(x, sigma, v, class_labels, network_tangent)
        from cmkernels.losses import _rng_state, _same_dropout

        state = _rng_state(x.device)  # the tangent pass draws the value's dropout masks again
        D = self._parts(x, sigma, class_labels)[0]
        with torch.no_grad():
            dD = _same_dropout(
                lambda: self.jvp(x, sigma, v, class_labels, network_tangent)[1], state, x.device
            )
        return D, dD

    def jvp(self, x: Tensor, sigma, v: Tensor, class_labels: Tensor | None = None,
            network_tangent: float = 1.0) -> tuple[Tensor, Tensor]:  # fmt: skip
        """(D(x, sigma), dD/dsigma along (v, 1)): one forward-mode JVP of the whole function,
        through the scalings, c_noise, the time embedding and the network, with x moving at
        velocity v as sigma moves (the total derivative of spec section 11:
        dD/dsigma + (dD/dx) v). x, v [B, C, H, W]; sigma [B] (or a scalar).

        network_tangent r in [0, 1] scales the network's own share of the tangent,
        c_out dF/dsigma (sCM's tangent warm-up ramps it 0 -> 1); 1 is the exact derivative.
        No gradient flows when called under torch.no_grad(), which also lets the fused kernels
        compute each op's value and tangent in one launch."""
        if v.shape != x.shape:
            raise ValueError(f"v has shape {tuple(v.shape)}; x has {tuple(x.shape)}")
        sigma = self._sigmas(x, sigma)
        if not torch.is_grad_enabled() and self._explicit_tangent(x, v):
            return self._with_tangent(x, sigma, v.to(x.dtype), class_labels, network_tangent)
        (D, _), (dD, dF) = torch.func.jvp(
            lambda x_, s_: self._parts(x_, s_, class_labels),
            (x, sigma),
            (v.to(x.dtype), torch.ones_like(sigma)),
        )
        if network_tangent != 1.0:
            c_out = self.scalings(sigma)[1].view(-1, 1, 1, 1)
            dD = (dD.float() - (1.0 - network_tangent) * c_out * dF.float()).to(dD.dtype)
        return D, dD

    def extra_repr(self) -> str:
        return (f"parameterization={self.parameterization}, sigma_data={self.sigma_data}, "
                f"sigma_min={self.sigma_min}, c_noise={self.c_noise_convention}")  # fmt: skip
