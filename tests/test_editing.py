import math

import pytest
import torch
import torch.nn.functional as F
from cm_standins import ConvCM, GaussianCM

from cmkernels.editing import (
    LUMINANCE,
    STROKE_SIGMAS,
    colorize,
    denoise,
    edit,
    inpaint,
    interpolate,
    luminance_basis,
    patch_basis,
    slerp,
    stroke_guided,
    superresolve,
)
from cmkernels.noise_schedule import ts_to_sigmas
from cmkernels.sampling import (
    PerSampleNoise,
    randn_per_sample,
    sample_multistep,
    sample_onestep,
)

SIGMAS = ts_to_sigmas([0, 10, 22, 39], 40)  # Three evaluations.


def reference(b=2, c=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, size, size, generator=g) * 2 - 1  # (B, C, H, W) in [-1, 1]


def luminance(x):
    return torch.einsum("bchw,c->bhw", x.double(), torch.tensor(LUMINANCE, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Bases.


def test_luminance_basis_orthogonal_first_column_luminance():
    q = luminance_basis()
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-14)
    l = torch.tensor(LUMINANCE, dtype=torch.float64)
    torch.testing.assert_close(q[:, 0], l / l.norm(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
def test_patch_basis_orthogonal_first_column_mean(p):
    q = patch_basis(p)
    assert q.shape == (p * p, p * p)
    torch.testing.assert_close(q.T @ q, torch.eye(p * p, dtype=torch.float64), rtol=0, atol=1e-13)
    torch.testing.assert_close(q[:, 0], torch.full((p * p,), 1 / p, dtype=torch.float64),
                               rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# Algorithm 4 tasks.


@pytest.mark.parametrize("per_channel", [False, True])
def test_inpainting_keeps_known_pixels_exactly(per_channel):
    net = ConvCM()
    y = reference()
    g = torch.Generator().manual_seed(1)
    shape = (2, 3, 16, 16) if per_channel else (1, 1, 16, 16)
    mask = (torch.rand(shape, generator=g) > 0.6).float()  # 1 = missing
    with torch.no_grad():
        out = inpaint(net, y, mask, SIGMAS, PerSampleNoise([0, 1], y.shape[1:]))
    known = (mask == 0).expand_as(y)
    assert torch.equal(out[known], y[known])
    assert not torch.allclose(out[~known], y[~known])
    assert len(net.calls) == 3


def test_inpainting_mask_of_ones_is_plain_multistep_sampling():
    a, b = GaussianCM(), GaussianCM()
    y = reference(b=1)
    out = inpaint(a, y, torch.ones(1, 1, 16, 16), SIGMAS, PerSampleNoise([4], y.shape[1:]))
    # y is dropped entirely (A y * (1 - Omega) = 0): the run starts from pure noise.
    noise = PerSampleNoise([4], y.shape[1:])
    ref = sample_multistep(b, noise(), SIGMAS, noise)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_colorization_preserves_luminance():
    net = ConvCM()
    y = reference()
    with torch.no_grad():
        out = colorize(net, y, SIGMAS, PerSampleNoise([0, 1], y.shape[1:]))
    torch.testing.assert_close(luminance(out), luminance(y), rtol=0, atol=1e-5)
    gray = luminance(y)[:, None] / sum(LUMINANCE)
    assert (out - gray).abs().max() > 0.05  # The chroma was generated, not left gray.


def test_colorization_rejects_gray_images():
    with pytest.raises(ValueError, match="RGB"):
        colorize(GaussianCM(), reference(c=1), SIGMAS, lambda: None)


@pytest.mark.parametrize("p", [2, 4])
def test_superresolution_preserves_patch_means(p):
    net = ConvCM()
    y_low = reference(size=16 // p)
    with torch.no_grad():
        out = superresolve(net, y_low, p, SIGMAS, PerSampleNoise([0, 1], (3, 16, 16)))
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(F.avg_pool2d(out, p), y_low, rtol=0, atol=1e-5)
    upsampled = F.interpolate(y_low, scale_factor=p, mode="nearest")
    assert (out - upsampled).abs().max() > 0.05  # Detail was generated inside the patches.


def test_denoise_is_one_step_from_sigma_noise():
    cm = GaussianCM()
    y = reference().double()
    out = denoise(cm, y, 0.3, clamp=False)
    assert len(cm.calls) == 1 and torch.all(cm.calls[0] == 0.3)
    torch.testing.assert_close(out, cm.ode_solution(y, 0.3, 0.002))


def test_stroke_guided_starts_from_the_noised_strokes():
    inputs = []

    def recorder(x, sigma, class_labels=None):
        inputs.append((x.clone(), sigma.clone()))
        return x.clamp(-1, 1)

    strokes = reference(b=1).double()
    out = stroke_guided(recorder, strokes, STROKE_SIGMAS, PerSampleNoise([3], strokes.shape[1:],
                                                                          dtype=torch.float64))
    assert [s.item() for _, s in inputs] == [5.38, 2.24]
    noise = PerSampleNoise([3], strokes.shape[1:], dtype=torch.float64)
    x1 = strokes + 5.38 * noise()
    torch.testing.assert_close(inputs[0][0], x1, rtol=1e-12, atol=1e-12)
    x2 = x1.clamp(-1, 1) + math.sqrt(2.24**2 - 0.002**2) * noise()
    torch.testing.assert_close(inputs[1][0], x2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, x2.clamp(-1, 1))


def test_edit_with_identity_transform_and_explicit_omega():
    net = ConvCM()
    y = reference(b=1)
    omega = torch.zeros_like(y, dtype=torch.bool)
    omega[..., :8] = True  # Generate the left half.
    with torch.no_grad():
        out = edit(net, y, SIGMAS, PerSampleNoise([0], y.shape[1:]), omega)
    assert torch.equal(out[..., 8:], y[..., 8:])


def test_slerp_endpoints_and_norm():
    z0, z1 = randn_per_sample([0, 1], (3, 8, 8)), randn_per_sample([2, 3], (3, 8, 8))
    torch.testing.assert_close(slerp(z0, z1, torch.zeros(2)), z0)
    torch.testing.assert_close(slerp(z0, z1, torch.ones(2)), z1)
    mid = slerp(z0, z1, torch.full((2,), 0.5))
    # Nearly orthogonal Gaussian vectors: the midpoint keeps the norm (a lerp would shrink it).
    norms = mid.flatten(1).norm(dim=1) / z0.flatten(1).norm(dim=1)
    assert torch.all((norms - 1).abs() < 0.1)
    same = slerp(z0, z0, torch.full((2,), 0.3))  # Parallel inputs: no division by sin(0).
    torch.testing.assert_close(same, z0)


def test_interpolation_endpoints_are_one_step_samples():
    net = ConvCM()
    z0, z1 = randn_per_sample([0, 0, 0], (3, 8, 8)), randn_per_sample([1, 1, 1], (3, 8, 8))
    with torch.no_grad():
        frames = interpolate(net, z0, z1, torch.tensor([0.0, 0.5, 1.0]))
        torch.testing.assert_close(frames[0], sample_onestep(net, z0[:1])[0])
        torch.testing.assert_close(frames[2], sample_onestep(net, z1[:1])[0])
    assert not torch.allclose(frames[1], frames[0])
