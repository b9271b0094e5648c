"""Continuous-time consistency models (spec section 11): the whole consistency function's JVP on
the official reference networks, the small-Delta-u limit of the discrete CD / CT gradients, the
sCM stabilisers, and --continuous training runs (resume, checkpoints the sampler loads)."""

import copy
from pathlib import Path

import pytest
import torch

from cmkernels import train
from cmkernels.checkpoint import load_denoiser, load_file
from cmkernels.diffusion import Denoiser
from cmkernels.losses import AdaptiveWeight, ConsistencyLoss, ContinuousConsistencyLoss
from cmkernels.noise_schedule import tau, tau_derivative
from cmkernels.unet import UNet, UNetConfig

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.exists():  # a checkout with shared/ inside it
    DATA = Path(__file__).resolve().parents[1] / "shared" / "data"
REFERENCE = DATA / "official_unet_reference.pt"
needs_data = pytest.mark.skipif(not REFERENCE.exists(), reason=f"no official reference at {DATA}")

TINY = ["--model-channels", "32", "--batch-size", "4", "--eval-samples", "0", "--sample-every",
        "1000", "--no-progress", "--warmup", "2"]  # fmt: skip


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _tiny_net(ops="reference", seed=0) -> UNet:
    """A small UNet (one level with attention) with every weight random: the zero-initialised
    output convolutions would hide most of the network from the checks."""
    torch.manual_seed(seed)
    cfg = UNetConfig(image_size=8, in_channels=1, out_channels=1, model_channels=32,
                     num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(4,),
                     num_heads=2, num_head_channels=-1, num_classes=None, dropout=0.0,
                     ops=ops)  # fmt: skip
    net = UNet(cfg)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return net


# ------------------------------------------------------------------------------------------------
# The JVP of the whole consistency function.


@needs_data
@pytest.mark.parametrize("name", ["imagenet64_mini", "lsun256_mini"])
def test_consistency_function_jvp_on_the_official_networks(name):
    """(f(x, t), df/dt along (v, 1)) through the boundary-condition scalings, c_noise, the time
    embedding and the official network: the fused ops in float32 against torch.func.jvp of the
    pure-PyTorch model in float64, to float32 rounding."""
    e = torch.load(REFERENCE, weights_only=True)[name]
    results = {}
    for ops, dtype in (("reference", torch.float64), ("kernels", torch.float32)):
        net = UNet(UNetConfig.from_official(e["config"], ops=ops))
        net.load_state_dict(e["state_dict"], strict=True)
        den = Denoiser(net, "cm").to(dtype).eval()
        gen = torch.Generator().manual_seed(1)
        sig = e["sigmas"].double()
        x = (e["x"].double() * sig.view(-1, 1, 1, 1)).to(dtype)
        v = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
        with torch.no_grad():
            results[ops] = den.jvp(x, sig.to(dtype), v, e["y"])
    (f64, g64), (f32, g32) = results["reference"], results["kernels"]
    assert g64.abs().max() > 0
    assert rel_l2(f32, f64) < 1e-5, rel_l2(f32, f64)
    assert rel_l2(g32, g64) < 1e-4, rel_l2(g32, g64)


def test_denoiser_jvp_network_tangent_scales_only_the_network_share():
    """network_tangent r: dD = c_skip' x + c_skip v + c_out' F + r c_out F' (sCM's warm-up)."""
    den = Denoiser(_tiny_net()).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    v = torch.randn_like(x)
    sigma = torch.tensor([0.3, 2.0, 20.0], dtype=torch.float64)
    with torch.no_grad():
        _, full = den.jvp(x, sigma, v)
        _, none = den.jvp(x, sigma, v, network_tangent=0.0)
        _, half = den.jvp(x, sigma, v, network_tangent=0.5)
        F = den._parts(x, sigma, None)[1]
        (c_skip, c_out, _), (dc_skip, dc_out, _) = torch.func.jvp(
            den.scalings, (sigma,), (torch.ones_like(sigma),)
        )
    bc = (-1, 1, 1, 1)
    want = dc_skip.view(bc) * x + c_skip.view(bc) * v + dc_out.view(bc) * F
    torch.testing.assert_close(none, want)
    torch.testing.assert_close(half, (full + none) / 2)
    assert rel_l2(none, full) > 1e-2  # the network's share is not negligible here


# ------------------------------------------------------------------------------------------------
# The objective: for small Delta u the discrete gradient divided by Delta u approaches it.


def _grads(loss, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss.sum(), params)])


@pytest.mark.parametrize("mode", ["ct", "cd"])
def test_discrete_gradient_over_delta_u_approaches_the_continuous_one(mode):
    """With the target f^- = stopgrad(f_theta), the l2 CD / CT gradient between t = tau(u) and
    t2 = tau(u - du), divided by du, tends to the gradient of the continuous objective at t as
    du -> 0, with an error of order du (float64, reference ops)."""
    model = Denoiser(_tiny_net(seed=0)).double()
    target = copy.deepcopy(model).requires_grad_(False)
    teacher = None
    if mode == "cd":
        teacher = Denoiser(_tiny_net(seed=1), "edm").double().requires_grad_(False)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64) * 0.5
    z = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    u = torch.tensor([0.35, 0.6, 0.8], dtype=torch.float64)
    t = tau(u)
    continuous = ContinuousConsistencyLoss()
    draws = {"t": t, "w": tau_derivative(u), "r": torch.ones(3)}
    want = _grads(continuous(model, target, x, z, draws, teacher)[0], params)
    discrete = ConsistencyLoss(distance="l2")
    errors = []
    for du in (1e-4, 1e-5, 1e-6):  # (c_noise = 250 ln t: D turns fast in t)
        pair = {"t": t, "t2": tau(u - du)}
        got = _grads(discrete(model, target, x, z, pair, teacher)[0], params) / du
        errors.append(rel_l2(got, want))
    assert errors[-1] < 2e-3, errors
    assert errors[0] > errors[1] > errors[2], errors  # it converges, it does not just sit close
    assert errors[0] / errors[1] > 5, errors  # at first order


def test_tangent_normalisation_and_adaptive_weighting():
    """tangent_norm c bounds each sample's weighted tangent below norm 1 (so the l2 value below
    1 / dim); the learned log-variance starts at 0 (plain loss) and its gradient is 1 - d."""
    model = Denoiser(_tiny_net())
    gen = torch.Generator().manual_seed(0)
    x, z = torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen)
    plain = ContinuousConsistencyLoss()
    draws = plain.draw(4, gen)
    d_plain, _ = plain(model, model, x, z, draws)
    normed, _ = ContinuousConsistencyLoss(tangent_norm=0.1)(model, model, x, z, draws)
    dim = x[0].numel()
    size = (d_plain * dim).sqrt()  # ||w g|| per sample
    assert size.max() > 1  # large without normalisation (tau' reaches ~400)
    torch.testing.assert_close(normed * dim, (size / (size + 0.1)) ** 2)
    assert (normed < 1.0 / dim).all()
    weight = AdaptiveWeight()
    adaptive, _ = ContinuousConsistencyLoss(adaptive=weight)(model, model, x, z, draws)
    torch.testing.assert_close(adaptive, d_plain)
    adaptive.sum().backward()
    assert weight.linear.bias.grad.item() == pytest.approx((1 - d_plain).sum().item(), rel=1e-5)


def test_draws_follow_tau_and_the_warmup_ramp():
    loss = ContinuousConsistencyLoss(tangent_warmup=10)
    d0 = loss.draw(1000, torch.Generator().manual_seed(0), step=0)
    d5 = loss.draw(8, torch.Generator().manual_seed(0), step=5)
    d20 = loss.draw(8, torch.Generator().manual_seed(0), step=20)
    assert 0.002 <= d0["t"].min() and d0["t"].max() <= 80.0
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(d0["t"], tau(u).float())
    torch.testing.assert_close(d0["w"], tau_derivative(u).float())
    assert d0["r"][0] == 0.0 and d5["r"][0] == 0.5 and d20["r"][0] == 1.0
    assert ContinuousConsistencyLoss().draw(2, torch.Generator())["r"].tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------------------------
# Training.


def _cfg(tmp_path, *args):
    return train.parse_args(["--out", str(tmp_path), *TINY, *(str(a) for a in args)])


def _stop_after(trainer, n):
    step = trainer.train_step

    def stepping():
        out = step()
        if trainer.step == n:
            trainer.request_stop()
        return out

    trainer.train_step = stepping
    return trainer


@pytest.mark.parametrize("extra", [["--mode", "ct"],
                                   ["--mode", "ct", "--tangent-norm", "0.1", "--adaptive-weight",
                                    "--tangent-warmup", "3", "--target-ema", "0.5"],
                                   ["--mode", "ct", "--trigflow", "--tangent-norm", "0.1",
                                    "--tangent-norm-scale", "rms", "--adaptive-weight",
                                    "--tangent-warmup", "3"]],
                         ids=["ct", "ct-stabilised", "ct-trigflow"])  # fmt: skip
def test_continuous_resume_is_bit_identical_and_samples_load(tmp_path, extra):
    args = ["--continuous", "--steps", "4", *extra]
    full = train.Trainer(_cfg(tmp_path / "full", *args))
    full.write_samples = lambda tag: None
    full.run()
    half = _stop_after(train.Trainer(_cfg(tmp_path / "half", *args)), 2)
    half.write_samples = lambda tag: None
    assert half.run()["interrupted"]
    resumed = train.Trainer(_cfg(tmp_path / "half", *args, "--resume"))
    resumed.write_samples = lambda tag: None
    resumed.run()
    a, b = load_file(tmp_path / "full" / "last.pt"), load_file(tmp_path / "half" / "last.pt")
    keys = ("model", "target", "weighting") if "--adaptive-weight" in extra else ("model", "target")
    for key in keys:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    assert a["config"]["continuous"]
    assert a["config"]["target_ema"] == (0.5 if "0.5" in extra else 0.0)
    den = load_denoiser(tmp_path / "full" / "last.pt")
    assert den.parameterization == ("trigflow" if "--trigflow" in extra else "cm")
    with torch.no_grad():
        out = den(torch.randn(2, 1, 32, 32), 80.0)
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_continuous_cd_trains_with_the_teacher(tmp_path):
    from cmkernels.checkpoint import save_atomic

    teacher = train.Trainer(_cfg(tmp_path / "teacher", "--mode", "edm", "--steps", "1"))
    save_atomic(teacher.state(), tmp_path / "teacher.pt")
    cfg = _cfg(tmp_path / "cd", "--mode", "cd", "--continuous", "--steps", "2", "--teacher",
               tmp_path / "teacher.pt")  # fmt: skip
    trainer = train.Trainer(cfg)
    trainer.write_samples = lambda tag: None
    before = [p.detach().clone() for p in trainer.model.parameters()]
    stats = trainer.train_step()
    assert stats["target_ema"] == 0.0 and "num_scales" not in stats
    assert any(not torch.equal(p, q) for p, q in zip(before, trainer.model.parameters()))


@pytest.mark.parametrize("argv, message", [
    (["--mode", "edm", "--continuous"], "--continuous applies to --mode cd and ct"),
    (["--mode", "ct", "--ict", "--continuous"], "--continuous and --ict"),
    (["--mode", "ct", "--continuous", "--distance", "l1"], "l2 distance"),
    (["--mode", "ct", "--tangent-norm", "0.1"], "--tangent-norm applies to --continuous"),
    (["--mode", "ct", "--adaptive-weight"], "--adaptive-weight applies to --continuous"),
    (["--mode", "ct", "--continuous", "--tangent-norm", "-1"], "--tangent-norm must be >= 0"),
])  # fmt: skip
def test_bad_continuous_settings_are_refused(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
