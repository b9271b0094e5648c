import math

import pytest
import torch
from cm_standins import ConvCM, GaussianCM, GaussianEDM

from cmkernels.noise_schedule import karras_sigmas, tau, tau_derivative, ts_to_sigmas
from cmkernels.ops import heun_step1, heun_step2
from cmkernels.sampling import (
    PerSampleNoise,
    check_sigmas,
    randn_per_sample,
    sample_euler,
    sample_heun,
    sample_multistep,
    sample_onestep,
)

SHAPE = (3, 8, 8)


def karras(i, n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Spec section 2, written out for one index."""
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + i / (n - 1) * (lo - hi)) ** rho


# ----------------------------------------------------------------------------------------------
# Per-sample noise.


def test_noise_row_depends_only_on_its_seed():
    together = randn_per_sample([3, 5, 7], SHAPE)
    assert together.shape == (3, *SHAPE) and together.dtype == torch.float32
    assert torch.equal(together[1], randn_per_sample([5], SHAPE)[0])
    assert torch.equal(together, randn_per_sample([3, 5, 7], SHAPE))
    assert not torch.equal(together[0], together[2])


def test_per_sample_noise_successive_draws():
    a, b = PerSampleNoise([1, 2], SHAPE), PerSampleNoise([2], SHAPE)
    first_a, second_a = a(), a()
    b()
    second_b = b()
    assert not torch.equal(first_a, second_a)
    assert torch.equal(first_a[0], randn_per_sample([1], SHAPE)[0])
    assert torch.equal(second_a[1], second_b[0])  # Later draws are per sample too.
    labels = PerSampleNoise([4, 9], SHAPE).randint(1000)
    assert labels.dtype == torch.long and labels.shape == (2,)
    assert labels[1] == PerSampleNoise([9], SHAPE).randint(1000)[0]


def test_per_sample_noise_dtype_does_not_change_values():
    z32 = randn_per_sample([11], SHAPE)
    z64 = randn_per_sample([11], SHAPE, dtype=torch.float64)
    assert z64.dtype == torch.float64 and torch.equal(z64.float(), z32)


# ----------------------------------------------------------------------------------------------
# Noise levels.


def test_ts_to_sigmas_official_two_step():
    sigmas = ts_to_sigmas([0, 22, 39], 40)
    assert sigmas.dtype == torch.float64
    assert sigmas[0].item() == 80.0 and sigmas[2].item() == 0.002  # Exact endpoints.
    assert sigmas[1].item() == pytest.approx(karras(22, 40), rel=1e-12)
    grid = ts_to_sigmas(range(18), 18)
    expected = torch.tensor([karras(i, 18) for i in range(18)], dtype=torch.float64)
    torch.testing.assert_close(grid[1:-1], expected[1:-1], rtol=1e-12, atol=0)


def test_tau_is_the_spec_map_and_the_grid_lies_on_it():
    u = torch.rand(257, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    torch.testing.assert_close(tau(u), (lo + u * (hi - lo)) ** 7, rtol=1e-12, atol=0)
    assert tau(torch.tensor(0.0, dtype=torch.float64)).item() == pytest.approx(0.002, rel=1e-12)
    assert tau(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(80.0, rel=1e-12)
    # tau'(u) against autograd of tau.
    v = u.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(tau(v).sum(), v)
    torch.testing.assert_close(tau_derivative(u), grad, rtol=1e-10, atol=0)
    # The discrete grid is tau at u = 1 - i / (N - 1), descending.
    n = 18
    i = torch.arange(n, dtype=torch.float64)
    torch.testing.assert_close(karras_sigmas(n), tau(1 - i / (n - 1)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("ts, steps", [([0, 40], 40), ([-1, 3], 40), ([0, 22, 22], 40),
                                       ([22, 0], 40), ([], 40), ([0], 1)])
def test_ts_to_sigmas_rejects_bad_input(ts, steps):
    with pytest.raises(ValueError):
        ts_to_sigmas(ts, steps)


@pytest.mark.parametrize("sigmas", [[], [80, 80], [1, 2], [5, -1]])
def test_check_sigmas_rejects_bad_input(sigmas):
    with pytest.raises(ValueError):
        check_sigmas(sigmas)


@pytest.mark.parametrize("sigmas", [[80, math.nan], [math.nan, 1], [math.inf, 1],
                                    torch.tensor([80.0, math.nan])])  # fmt: skip
def test_check_sigmas_rejects_non_finite_levels(sigmas):
    with pytest.raises(ValueError, match="finite"):
        check_sigmas(sigmas)
    with pytest.raises(ValueError, match="finite"):
        sample_multistep(ConvCM(), torch.randn(1, *SHAPE), sigmas, lambda: torch.randn(1, *SHAPE))


# ----------------------------------------------------------------------------------------------
# Consistency-model samplers.


def test_onestep_deterministic_per_seed_and_batch_independent():
    net = ConvCM()
    seeds = list(range(100, 106))
    with torch.no_grad():
        whole = sample_onestep(net, randn_per_sample(seeds, SHAPE))
        again = sample_onestep(net, randn_per_sample(seeds, SHAPE))
        parts = [sample_onestep(net, randn_per_sample(s, SHAPE)) for s in (seeds[:2], seeds[2:])]
    assert torch.equal(whole, again)
    torch.testing.assert_close(whole, torch.cat(parts), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(whole[0], whole[1])
    assert whole.abs().max() <= 1  # Clamped like the official sampler.
    assert all(torch.equal(c, torch.full_like(c, 80.0)) for c in net.calls)


def test_onestep_is_f_at_sigma_max():
    cm = GaussianCM()
    z = randn_per_sample([0, 1], SHAPE, dtype=torch.float64)
    out = sample_onestep(cm, z, clamp=False)
    torch.testing.assert_close(out, cm.ode_solution(80 * z, 80.0, 0.002), rtol=1e-12, atol=1e-12)


def test_multistep_official_ts_sigmas_and_nfe():
    cm = GaussianCM()
    seeds = [0, 1, 2]
    noise = PerSampleNoise(seeds, SHAPE, dtype=torch.float64)
    z = noise()
    out = sample_multistep(cm, z, ts_to_sigmas([0, 22, 39], 40), noise, clamp=False)
    assert len(cm.calls) == 2  # NFE = len(ts) - 1.
    assert torch.all(cm.calls[0] == 80.0)
    torch.testing.assert_close(cm.calls[1], torch.full((3,), karras(22, 40), dtype=torch.float64))

    # Algorithm 1 by hand with the same noise draws.
    ref = PerSampleNoise(seeds, SHAPE, dtype=torch.float64)
    x = cm.ode_solution(80 * ref(), 80.0, 0.002)
    tau = karras(22, 40)
    x = x + math.sqrt(tau**2 - 0.002**2) * ref()
    x = cm.ode_solution(x, tau, 0.002)
    torch.testing.assert_close(out, x, rtol=1e-10, atol=1e-10)


def test_multistep_explicit_sigmas_are_clipped():
    cm = GaussianCM()
    z = randn_per_sample([5], SHAPE)
    noise = PerSampleNoise([6], SHAPE)
    sample_multistep(cm, z, [100.0, 1.5, 0.001], noise)
    # 100 -> sigma_max; 0.001 -> sigma_min, where f is the identity: not evaluated.
    assert [c.item() for c in cm.calls] == [80.0, 1.5]


def test_multistep_clamps_each_step():
    calls = []

    def loud(x, sigma, class_labels=None):  # Returns values far outside [-1, 1].
        calls.append(x.clone())
        return 5 * torch.ones_like(x)

    noise = lambda: torch.zeros(1, *SHAPE)
    out = sample_multistep(loud, torch.zeros(1, *SHAPE), [80.0, 2.0], noise)
    assert torch.all(out == 1) and torch.all(calls[1] == 1)  # Step 2 starts from the clamped 1.
    out = sample_multistep(loud, torch.zeros(1, *SHAPE), [80.0, 2.0], noise, clamp=False)
    assert torch.all(out == 5)


def test_multistep_passes_class_labels():
    net = ConvCM(num_classes=10)
    z = randn_per_sample([0, 1], SHAPE)
    noise = PerSampleNoise([2, 3], SHAPE)
    with torch.no_grad():
        a = sample_multistep(net, z, [80.0, 1.0], noise, torch.tensor([1, 2]))
        b = sample_multistep(net, z, [80.0, 1.0], PerSampleNoise([2, 3], SHAPE),
                             torch.tensor([7, 2]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


# ----------------------------------------------------------------------------------------------
# EDM samplers.


def test_heun_stages_match_the_spec():
    g = torch.Generator().manual_seed(0)
    x, D, D1 = (torch.randn(2, *SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([3.0, 0.7], dtype=torch.float64)
    tn = torch.tensor([1.5, 0.2], dtype=torch.float64)
    x1, d = heun_step1(x, D, t, tn)
    for i in range(2):
        di = (x[i] - D[i]) / t[i]
        torch.testing.assert_close(d[i], di)
        torch.testing.assert_close(x1[i], x[i] + (tn[i] - t[i]) * di)
    x_next = heun_step2(x, d, x1, D1, t, tn)
    for i in range(2):
        d1 = (x1[i] - D1[i]) / tn[i]
        torch.testing.assert_close(x_next[i], x[i] + (tn[i] - t[i]) * (d[i] + d1) / 2)


def hand_heun(D, x, sigmas):
    """EDM Heun sampler written out from spec section 4 (float64)."""
    sigmas = list(sigmas) + [0.0]
    for t, tn in zip(sigmas[:-1], sigmas[1:], strict=True):
        tt = torch.full((x.shape[0],), t, dtype=x.dtype)
        d = (x - D(x, tt)) / t
        x_new = x + (tn - t) * d
        if tn > 0:
            d_new = (x_new - D(x_new, torch.full((x.shape[0],), tn, dtype=x.dtype))) / tn
            x_new = x + (tn - t) * (d + d_new) / 2
        x = x_new
    return x


@pytest.mark.parametrize("n", [1, 2, 5, 18])
def test_heun_nfe_and_hand_written_loop(n):
    edm = GaussianEDM()
    sigmas = ts_to_sigmas(range(n), n) if n > 1 else torch.tensor([80.0], dtype=torch.float64)
    z = randn_per_sample([0, 1], SHAPE, dtype=torch.float64)
    out = sample_heun(edm, z, sigmas)
    assert len(edm.calls) == 2 * n - 1
    ref = hand_heun(GaussianEDM(), 80 * z, sigmas.tolist())
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    euler = GaussianEDM()
    sample_euler(euler, z, sigmas)
    assert len(euler.calls) == n


def test_heun_and_euler_converge_to_the_ode_solution_at_their_order():
    edm = GaussianEDM()
    z = randn_per_sample([0], SHAPE, dtype=torch.float64)
    exact = edm.ode_solution(80 * z, 80.0, 0.0)

    def error(sampler, n):
        return (sampler(edm, z, ts_to_sigmas(range(n), n)) - exact).abs().max().item()

    heun = [error(sample_heun, n) for n in (40, 80)]
    euler = [error(sample_euler, n) for n in (40, 80)]
    assert heun[1] < 0.3 * heun[0]  # Second order: doubling the steps divides the error by ~4,
    assert 0.4 < euler[1] / euler[0] < 0.6  # first order by ~2.
    assert heun[0] < euler[0] / 5


def test_heun_keeps_an_explicit_final_zero():
    a, b = GaussianEDM(), GaussianEDM()
    z = randn_per_sample([0], SHAPE)
    torch.testing.assert_close(sample_heun(a, z, [80.0, 1.0, 0.0]), sample_heun(b, z, [80.0, 1.0]))
    assert len(a.calls) == len(b.calls) == 3
