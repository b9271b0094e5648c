"""sCM's TrigFlow form (--continuous --trigflow): the "trigflow" denoiser is TrigFlow's consistency
function, our sigma-space tangent converts to sCM's g = cos(s) df/ds (with its tangent warm-up),
the loss has sCM's value and gradient, and it is the sigma-space objective re-weighted. Every
check builds the TrigFlow quantities directly from sCM's formulas in s (float64, reference ops)."""

import pytest
import torch
from test_continuous import TINY, _tiny_net, rel_l2

from cmkernels import train
from cmkernels.checkpoint import load_denoiser, load_file, save_atomic
from cmkernels.diffusers_format import DiffusersFormatError
from cmkernels.diffusers_format.save import check_exportable
from cmkernels.diffusion import Denoiser, c_noise
from cmkernels.losses import AdaptiveWeight, ContinuousConsistencyLoss
from cmkernels.noise_schedule import SIGMA_DATA

SD = SIGMA_DATA
BC = (-1, 1, 1, 1)


def _trig(sigma):
    s = torch.atan(sigma / SD)
    return s.view(BC), s.cos().view(BC), s.sin().view(BC)


def _F_T(net, x_s, s):
    """TrigFlow's network output F_T(x_s / sigma_data, s) of the "trigflow" denoiser around net:
    minus the EDM backbone's output at the time input c_noise(sigma_data tan s)."""
    return -net(x_s / SD, c_noise(SD * torch.tan(s)), None)


def _f_T(net, x_s, s):
    """sCM's consistency function f(x_s, s) = cos(s) x_s - sin(s) sigma_data F_T."""
    sb = s.view(BC)
    return sb.cos() * x_s - sb.sin() * SD * _F_T(net, x_s, s)


def _setup(seed=0):
    den = Denoiser(_tiny_net(seed=seed), "trigflow").double()
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64) * 0.5
    z = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.7, 12.0], dtype=torch.float64)
    return den, x0, z, sigma


def test_the_trigflow_denoiser_is_trigflows_consistency_function():
    """D(x_sigma, sigma) = f(cos(s) x_sigma, s) with s = arctan(sigma / sigma_data), and f = x at
    the boundary s = 0; a trigflow student on the teacher's weights is the teacher."""
    den, x0, z, sigma = _setup()
    x_sigma = x0 + sigma.view(BC) * z
    s, cos, _ = _trig(sigma)
    with torch.no_grad():
        torch.testing.assert_close(den(x_sigma, sigma), _f_T(den.net, cos * x_sigma, s.view(-1)))
        tiny = torch.full((3,), 1e-9, dtype=torch.float64)
        torch.testing.assert_close(den(x_sigma, tiny), x_sigma, rtol=0, atol=1e-7)
        teacher = Denoiser(den.net, "edm")
        assert torch.equal(den(x_sigma, sigma), teacher(x_sigma, sigma))
    with pytest.raises(ValueError, match="cm, edm, trigflow"):
        Denoiser(den.net, "trig")
    with pytest.raises(DiffusersFormatError, match="'trigflow' denoiser"):
        check_exportable(den.float())  # diffusers' scheduler puts the boundary at sigma_min


def _scm_tangent(net, teacher, x0, z, sigma, r):
    """sCM's Algorithm 1, in s: x_s = cos(s) x_0 + sin(s) sigma_data z, dx_s/ds = cos(s)
    sigma_data z - sin(s) x_0 (CT) or sigma_data F_teacher(x_s / sigma_data, s) (CD), and
    g = -cos^2(s) (sigma_data F_T - dx_s/ds) - r cos(s) sin(s) (x_s + sigma_data dF_T/ds)."""
    s, cos, sin = _trig(sigma)
    x_s = cos * x0 + sin * SD * z
    if teacher is None:
        dx = cos * SD * z - sin * x0
    else:
        dx = SD * _F_T(teacher, x_s, s.view(-1))
    F, dF = torch.func.jvp(lambda a, b: _F_T(net, a, b), (x_s, s.view(-1)),
                           (dx, torch.ones_like(sigma)))  # fmt: skip
    return -cos**2 * (SD * F - dx) - r * cos * sin * (x_s + SD * dF), F


@pytest.mark.parametrize("mode", ["ct", "cd"])
@pytest.mark.parametrize("r", [0.0, 0.3, 1.0])
def test_the_sigma_space_tangent_converts_to_scms_g(mode, r):
    """trigflow_tangent of dD/dsigma (network_tangent r) is sCM's g with warm-up factor r, from
    the torch.func JVP and from the network's written-out tangent forward alike."""
    den, x0, z, sigma = _setup()
    teacher = Denoiser(_tiny_net(seed=1), "edm").double() if mode == "cd" else None
    loss = ContinuousConsistencyLoss(trigflow=True)
    x_sigma = x0 + sigma.view(BC) * z
    with torch.no_grad():
        v = loss.velocity(x0, z, x_sigma, sigma, teacher, None)
        _, g_jvp = den.jvp(x_sigma, sigma, v, network_tangent=r)
        _, g_one = den(x_sigma, sigma, tangent=v, network_tangent=r)
    want, _ = _scm_tangent(den.net, teacher and teacher.net, x0, z, sigma, r)
    for g in (g_jvp, g_one):
        got = loss.trigflow_tangent(x_sigma, sigma, g, r)
        assert rel_l2(got, want) < 1e-10
    if r == 0.0:  # the warm-up matters here: the test would not notice a wrong r
        full, _ = _scm_tangent(den.net, teacher and teacher.net, x0, z, sigma, 1.0)
        assert rel_l2(want, full) > 1e-2


def _params_grad(loss, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss.sum(), params)])


@pytest.mark.parametrize("stabilised", [False, True], ids=["plain", "norm-warmup-adaptive"])
def test_the_loss_has_scms_value_and_gradient(stabilised):
    """Per sample, e^-w ||F_T - F_T^- - g||^2 / dim + w with sCM's g (normalised by
    ||g|| + c when asked): its value and its gradient in the parameters."""
    den, x0, z, sigma = _setup()
    r, c = (0.4, 0.1) if stabilised else (1.0, 0.0)
    weight = AdaptiveWeight().double() if stabilised else None
    if weight is not None:
        torch.nn.init.normal_(weight.linear.weight, std=0.3)
    loss = ContinuousConsistencyLoss(trigflow=True, tangent_norm=c, adaptive=weight,
                                     target_is_model=True)  # fmt: skip
    draws = {"t": sigma, "w": torch.ones(3), "r": torch.full((3,), r)}
    params = list(den.parameters())
    ours = loss(den, den, x0, z, draws)[0]
    g, _ = _scm_tangent(den.net, None, x0, z, sigma, r)
    g = g.detach()
    if c:
        g = g / (g.flatten(1).norm(dim=1).view(BC) + c)
    s, cos, sin = _trig(sigma)
    F = _F_T(den.net, cos * x0 + sin * SD * z, s.view(-1))
    want = (F - F.detach() - g).square().flatten(1).mean(1)
    if weight is not None:
        logvar = weight(sigma)
        want = torch.exp(-logvar) * want + logvar
    torch.testing.assert_close(ours, want, rtol=1e-9, atol=0)
    got_grad, want_grad = _params_grad(ours, params), _params_grad(want, params)
    assert rel_l2(got_grad, want_grad) < 1e-8
    assert want_grad.norm() > 0


def test_the_trigflow_gradient_is_the_sigma_space_one_reweighted():
    """Without the stabilisers the TrigFlow gradient is the sigma-space continuous gradient (the
    one the small-Delta-u test ties to discrete CD / CT) with lambda(t) tau'(u) replaced by
    1 / (sin s cos s) = (sigma^2 + sigma_data^2) / (sigma sigma_data)."""
    den, x0, z, sigma = _setup()
    params = list(den.parameters())
    trig = ContinuousConsistencyLoss(trigflow=True)
    draws = {"t": sigma, "w": torch.ones(3), "r": torch.ones(3)}
    want = _params_grad(trig(den, den, x0, z, draws)[0], params)
    weight = (sigma**2 + SD**2) / (sigma * SD)
    plain = ContinuousConsistencyLoss()
    got = _params_grad(plain(den, den, x0, z, dict(draws, w=weight))[0], params)
    assert rel_l2(got, want) < 1e-10


def test_rms_tangent_normalisation():
    """tangent_norm_scale "rms": g / (||g|| / sqrt(dim) + c), so each sample's l2 value is
    (rms / (rms + c))^2 with rms the tangent's per-element size."""
    torch.manual_seed(0)
    model = Denoiser(_tiny_net())
    gen = torch.Generator().manual_seed(0)
    x, z = torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen)
    for trigflow in (False, True):
        plain = ContinuousConsistencyLoss(trigflow=trigflow)
        draws = plain.draw(4, gen)
        rms = plain(model, model, x, z, draws)[0].sqrt()
        rmsed = ContinuousConsistencyLoss(trigflow=trigflow, tangent_norm=0.1,
                                          tangent_norm_scale="rms")  # fmt: skip
        torch.testing.assert_close(rmsed(model, model, x, z, draws)[0], (rms / (rms + 0.1)) ** 2)
    with pytest.raises(ValueError, match="l2, rms"):
        ContinuousConsistencyLoss(tangent_norm_scale="max")


def test_trigflow_draws_are_log_normal():
    loss = ContinuousConsistencyLoss(trigflow=True, p_mean=-0.5, p_std=1.2, tangent_warmup=4)
    d = loss.draw(5000, torch.Generator().manual_seed(3), step=1)
    n = torch.randn(5000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(d["t"], (-0.5 + 1.2 * n).exp().clamp(0.002, 80.0).float())
    assert torch.equal(d["w"], torch.ones(5000)) and d["r"][0] == 0.25
    logs = d["t"].double().log()
    assert abs(logs.mean().item() + 0.5) < 0.05 and abs(logs.std().item() - 1.2) < 0.05


# ------------------------------------------------------------------------------------------------
# Training.


def _cfg(tmp_path, *args):
    return train.parse_args(["--out", str(tmp_path), *TINY, *(str(a) for a in args)])


def test_trigflow_cd_student_starts_as_the_teacher_and_checkpoints_load(tmp_path):
    teacher = train.Trainer(_cfg(tmp_path / "teacher", "--mode", "edm", "--steps", "1"))
    save_atomic(teacher.state(), tmp_path / "teacher.pt")
    cfg = _cfg(tmp_path / "cd", "--mode", "cd", "--continuous", "--trigflow", "--steps", "2",
               "--tangent-warmup", "4", "--teacher", tmp_path / "teacher.pt")  # fmt: skip
    trainer = train.Trainer(cfg)
    trainer.write_samples = lambda tag: None
    assert trainer.model.parameterization == "trigflow"
    x = torch.randn(2, 1, 32, 32)
    sigma = torch.tensor([0.1, 5.0])
    with torch.no_grad():  # the official CD init: the student IS the teacher, here exactly
        assert torch.equal(trainer.model.eval()(x, sigma), trainer.teacher(x, sigma))
    trainer.model.train()
    trainer.run()
    ckpt = load_file(tmp_path / "cd" / "last.pt")
    assert ckpt["config"]["trigflow"] and ckpt["denoiser"]["parameterization"] == "trigflow"
    den = load_denoiser(tmp_path / "cd" / "last.pt")
    assert den.parameterization == "trigflow"
    with torch.no_grad():
        out = den(80.0 * torch.randn(2, 1, 32, 32), 80.0)
    assert torch.isfinite(out).all() and out.abs().max() > 0


@pytest.mark.parametrize("argv, message", [
    (["--mode", "ct", "--trigflow"], "--trigflow applies to --continuous"),
    (["--mode", "ct", "--continuous", "--p-mean", "-1.2"], "--p-mean applies to --trigflow"),
    (["--mode", "ct", "--continuous", "--trigflow", "--p-std", "0"], "--p-std must be a positive"),
    (["--mode", "ct", "--continuous", "--tangent-norm-scale", "rms"],
     "--tangent-norm-scale rms needs --tangent-norm"),
    (["--mode", "ct", "--tangent-norm-scale", "rms", "--tangent-norm", "0.1"],
     "--tangent-norm-scale applies to --continuous"),
])  # fmt: skip
def test_bad_trigflow_settings_are_refused(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err

