"""Zero-shot editing with a consistency model (Algorithm 4 of Song et al. 2023).

Math: spec/consistency-models.md section 9. Given a reference image y, an invertible linear map
A and a mask Omega (1 = coefficient of A x to generate, 0 = coefficient of A y to keep):

    y <- A^-1[(A y) * (1 - Omega)]                    (drop what is to be generated)
    x <- y + tau_1 * z
    for each time point tau:  (noise x up to tau unless tau = tau_1)
        x <- f(x, tau);  x <- A^-1[(A y) * (1 - Omega) + (A x) * Omega]

Every function takes a denoiser `f(x, sigma, class_labels)`, the reference images [B, C, H, W]
in [-1, 1], the time points and a noise source (a callable returning fresh unit noise shaped
like the images, e.g. `cmkernels.sampling.PerSampleNoise`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cmkernels.noise_schedule import SIGMA_MAX, SIGMA_MIN
from cmkernels.sampling import (
    NoiseSource,
    consistency_time_points,
    sample_multistep,
    sample_onestep,
)

LUMINANCE = (0.2989, 0.5870, 0.1140)   # ITU-R BT.601 luma weights of (R, G, B).
STROKE_SIGMAS = (5.38, 2.24)           # SDEdit-like time points of the paper's stroke guidance.

Transform = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------------------------
# Orthogonal bases.


def orthogonal_basis(first_column) -> Tensor:
    """Orthogonal Q [n, n] (float64) whose first column is first_column / ||first_column||.

    QR of the identity with its first column replaced; the signs are fixed so that R has a
    positive diagonal, which makes Q[:, 0] point along first_column (not against it).
    """
    v = torch.as_tensor(first_column, dtype=torch.float64).flatten()  # (n,)
    if v[0] == 0:
        raise ValueError("the first entry of first_column must be nonzero")
    m = torch.eye(v.numel(), dtype=torch.float64)  # (n, n)
    m[:, 0] = v
    q, r = torch.linalg.qr(m)
    return q * torch.sign(torch.diagonal(r))  # Flip columns so that diag(R) > 0.


def luminance_basis() -> Tensor:
    """Q [3, 3] for colorization: first column the normalised luminance vector."""
    return orthogonal_basis(LUMINANCE)


def patch_basis(factor: int) -> Tensor:
    """Q [p*p, p*p] for super-resolution by p: first column 1/p, i.e. p * (the patch mean)."""
    return orthogonal_basis([1.0] * (factor * factor))


# ----------------------------------------------------------------------------------------------
# Algorithm 4.


def edit(
    denoiser,
    y: Tensor,
    sigmas,
    noise: NoiseSource,
    omega: Tensor | None = None,
    transform: Transform | None = None,
    inverse: Transform | None = None,
    class_labels: Tensor | None = None,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    clamp: bool = True,
    *,
    progress: bool = False,
) -> Tensor:
    """Algorithm 4 for any invertible linear map A (`transform`, `inverse`; default identity).

    y [B, C, H, W] reference; omega bool, broadcastable to A y, True where A x is generated
    (None: nothing kept, an SDEdit-like run). sigmas: the time points tau_1 > tau_2 > ...
    (clipped into [sigma_min, sigma_max], as in `sample_multistep`).
    """
    transform = transform or (lambda v: v)
    inverse = inverse or (lambda v: v)
    replace = None
    if omega is not None:
        y_a = transform(y).masked_fill(omega, 0)  # A y with the part to generate set to 0
        y = inverse(y_a)

        def replace(x: Tensor) -> Tensor:
            return inverse(torch.where(omega, transform(x), y_a))

    tau_1 = consistency_time_points(sigmas, sigma_min, sigma_max)[0]
    z = noise() + y / tau_1  # The sampler starts at tau_1 * z = y + tau_1 * noise.
    return sample_multistep(
        denoiser, z, sigmas, noise, class_labels, sigma_min, sigma_max, clamp,
        replace=replace, progress=progress,
    )


def inpaint(
    denoiser, y: Tensor, mask: Tensor, sigmas, noise: NoiseSource,
    class_labels: Tensor | None = None, **kwargs,
) -> Tensor:
    """Inpainting (A = I). mask [B or 1, 1 or C, H, W], 1 (True) where pixels are missing and
    generated; the other pixels of the result equal y exactly."""
    omega = (mask.to(y.device, torch.float32) > 0.5).expand_as(y)
    return edit(denoiser, y, sigmas, noise, omega, class_labels=class_labels, **kwargs)


def colorize(
    denoiser, y: Tensor, sigmas, noise: NoiseSource,
    class_labels: Tensor | None = None, **kwargs,
) -> Tensor:
    """Colorization of RGB y [B, 3, H, W] (a gray image given in RGB): the luminance
    0.2989 R + 0.5870 G + 0.1140 B of y is kept, the two other coordinates are generated."""
    if y.shape[1] != 3:
        raise ValueError(f"colorization needs RGB images, got {y.shape[1]} channels")
    q = luminance_basis().to(device=y.device, dtype=y.dtype)  # (3, 3)
    transform = lambda v: torch.einsum("bchw,cd->bdhw", v, q)  # Coordinates in the basis Q.
    inverse = lambda a: torch.einsum("bdhw,cd->bchw", a, q)
    omega = torch.ones(1, 3, 1, 1, dtype=torch.bool, device=y.device)
    omega[:, 0] = False  # Keep the luminance coordinate.
    return edit(denoiser, y, sigmas, noise, omega, transform, inverse, class_labels, **kwargs)


def superresolve(
    denoiser, y_low: Tensor, factor: int, sigmas, noise: NoiseSource,
    class_labels: Tensor | None = None, **kwargs,
) -> Tensor:
    """Super-resolution by `factor` p: y_low [B, C, H/p, W/p] -> [B, C, H, W] whose p x p patch
    means equal y_low. Each patch is expressed in the orthogonal basis `patch_basis(p)`; its
    first coordinate (p * the patch mean) is kept, the others are generated."""
    p = int(factor)
    if p < 1:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    q = patch_basis(p).to(device=y_low.device, dtype=y_low.dtype)  # (p*p, p*p)

    def transform(v: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H/p, W/p, p*p)
        B, C, H, W = v.shape
        patches = v.reshape(B, C, H // p, p, W // p, p).permute(0, 1, 2, 4, 3, 5)
        return patches.reshape(B, C, H // p, W // p, p * p) @ q

    def inverse(a: Tensor) -> Tensor:  # (B, C, H/p, W/p, p*p) -> (B, C, H, W)
        B, C, h, w, _ = a.shape
        patches = (a @ q.T).reshape(B, C, h, w, p, p).permute(0, 1, 2, 4, 3, 5)
        return patches.reshape(B, C, h * p, w * p)

    y = F.interpolate(y_low, scale_factor=p, mode="nearest")  # (B, C, H, W), same patch means
    omega = torch.ones(p * p, dtype=torch.bool, device=y.device)
    omega[0] = False  # Keep the patch means.
    return edit(denoiser, y, sigmas, noise, omega, transform, inverse, class_labels, **kwargs)


def denoise(
    denoiser, y_noisy: Tensor, sigma_noise: float,
    class_labels: Tensor | None = None, clamp: bool = True,
) -> Tensor:
    """Denoising in one step: x = f(y_noisy, sigma_noise), for y_noisy = y + sigma_noise * z."""
    sigma = torch.full((y_noisy.shape[0],), float(sigma_noise), device=y_noisy.device)  # (B,)
    x = denoiser(y_noisy, sigma, class_labels)
    return x.clamp(-1, 1) if clamp else x


def stroke_guided(
    denoiser, strokes: Tensor, sigmas, noise: NoiseSource,
    class_labels: Tensor | None = None, **kwargs,
) -> Tensor:
    """Stroke-guided generation (SDEdit-like): start from the stroke painting noised to tau_1,
    then continue as multistep sampling; nothing is kept. The paper uses STROKE_SIGMAS."""
    return edit(denoiser, strokes, sigmas, noise, None, class_labels=class_labels, **kwargs)


def slerp(z0: Tensor, z1: Tensor, weight: Tensor) -> Tensor:
    """Spherical interpolation of z0, z1 [B, ...] with per-sample weights [B] (0 -> z0, 1 -> z1)."""
    a, b = z0.flatten(1).double(), z1.flatten(1).double()  # (B, n)
    w = weight.to(a).reshape(-1, 1)  # (B, 1)
    cos = (a * b).sum(1, keepdim=True) / (a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True))
    theta = torch.arccos(cos.clamp(-1, 1))  # (B, 1)
    sin = torch.sin(theta)
    safe = sin > 1e-6  # Nearly parallel: fall back to linear interpolation.
    c0 = torch.where(safe, torch.sin((1 - w) * theta) / sin.clamp_min(1e-6), 1 - w)
    c1 = torch.where(safe, torch.sin(w * theta) / sin.clamp_min(1e-6), w)
    return (c0 * a + c1 * b).reshape(z0.shape).to(z0.dtype)


def interpolate(
    denoiser, z0: Tensor, z1: Tensor, weights: Tensor, sigma_max: float = SIGMA_MAX,
    class_labels: Tensor | None = None, clamp: bool = True,
) -> Tensor:
    """Interpolation: slerp between two unit noises z0, z1 [B, C, H, W] by weights [B], then one
    consistency step from sigma_max."""
    return sample_onestep(denoiser, slerp(z0, z1, weights), sigma_max, class_labels, clamp=clamp)

