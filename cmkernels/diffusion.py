"""Preconditioning and the denoisers (EDM and consistency-model parameterisations); the noise
levels themselves (constants, Karras grid, tau(u)) are cmkernels.noise_schedule.

D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)), with the EDM
scalings for the teacher and the boundary-condition scalings for consistency models
(c_skip(sigma_min) = 1, c_out(sigma_min) = 0, so f(x, sigma_min) = x exactly).
"""

from __future__ import annotations

import torch
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


class Denoiser(nn.Module):
    """Preconditioned denoiser around a backbone `net(x, c_noise, class_labels)`.

    net:             the backbone (a UNet)
    parameterization: "cm" (consistency model, boundary condition) or "edm" (diffusion teacher)
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
        if parameterization not in ("cm", "edm"):
            raise ValueError(f"parameterization must be 'cm' or 'edm', got {parameterization!r}")
        self.net = net
        self.parameterization = parameterization
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max
        self.c_noise_convention = c_noise

    def scalings(self, sigma: Tensor):
        if self.parameterization == "cm":
            return cm_scalings(sigma, self.sigma_data, self.sigma_min)
        return edm_scalings(sigma, self.sigma_data)

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
        return (c_skip * x.float() + c_out * F_x.float()).to(x.dtype), F_x

    def forward(self, x: Tensor, sigma, class_labels: Tensor | None = None) -> Tensor:
        return self._parts(x, self._sigmas(x, sigma), class_labels)[0]

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
