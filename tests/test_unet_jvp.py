"""The UNet's written-out forward-mode pass (UNet.forward_with_tangent) and the Denoiser paths
built on it (Denoiser.jvp without grad, Denoiser.forward(tangent=)): against torch.func.jvp of
the pure-PyTorch model in float64, in every layout and mode the trainer uses, and the fallbacks
where the written-out pass cannot serve (torch.func transforms, dual tensors, other networks)."""

import copy
import importlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import TRITON_DEVICE, needs_triton, requires_cuda
from test_continuous import REFERENCE, needs_data, rel_l2
from torch import nn

from cmkernels.diffusion import Denoiser
from cmkernels.losses import ContinuousConsistencyLoss
from cmkernels.unet import UNet, UNetConfig


def _net(ops="reference", seed=0, num_classes=None, dropout=0.0, **overrides) -> UNet:
    """A small UNet (two levels, attention at 4x4, one level resampling by ResBlocks) with every
    weight random: the zero-initialised output convolutions would hide most of it."""
    torch.manual_seed(seed)
    kw = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, num_res_blocks=1,
              channel_mult=(1, 2), attention_resolutions=(4,), num_heads=2, num_head_channels=-1,
              num_classes=num_classes, dropout=dropout, ops=ops)  # fmt: skip
    cfg = UNetConfig(**{**kw, **overrides})
    net = UNet(cfg)
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)
    return net


def _inputs(B=3, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 8, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(B, 3, 8, 8, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.05, 1.3, 30.0, 7.0, 0.4][:B], dtype=torch.float64)
    return x.to(dtype), v.to(dtype), sigma.to(dtype)


def _want(den: Denoiser, x, sigma, v, labels=None):
    """torch.func.jvp of the whole consistency function (the float64 ground truth)."""
    return torch.func.jvp(
        lambda x_, s_: den(x_, s_, labels), (x, sigma), (v, torch.ones_like(sigma))
    )


# ------------------------------------------------------------------------------------------------
# The official networks.


@needs_data
@pytest.mark.parametrize("name", ["imagenet64_mini", "lsun256_mini"])
def test_written_out_tangent_equals_torch_func_jvp_on_the_official_networks(name):
    """On the reference ops in float64 the written-out pass is torch.func.jvp (to 1e-12); with the
    fused kernels or the eager ops in float32 it is within float32 rounding of it."""
    e = torch.load(REFERENCE, weights_only=True)[name]
    sig = e["sigmas"].double()
    gen = torch.Generator().manual_seed(2)
    x64 = e["x"].double() * sig.view(-1, 1, 1, 1)
    v64 = torch.randn(x64.shape, generator=gen, dtype=torch.float64)

    def denoiser(ops, dtype):
        net = UNet(UNetConfig.from_official(e["config"], ops=ops))
        net.load_state_dict(e["state_dict"], strict=True)
        return Denoiser(net, "cm").to(dtype).eval()

    ref = denoiser("reference", torch.float64)
    with torch.no_grad():
        f_want, g_want = _want(ref, x64, sig, v64, e["y"])
        assert ref._explicit_tangent(x64, v64)
        f, g = ref.jvp(x64, sig, v64, e["y"])
    assert g_want.abs().max() > 0
    assert rel_l2(f, f_want) < 1e-12 and rel_l2(g, g_want) < 1e-12, (
        rel_l2(f, f_want),
        rel_l2(g, g_want),
    )
    for ops in ("kernels", "eager"):
        den = denoiser(ops, torch.float32)
        with torch.no_grad():
            f, g = den.jvp(x64.float(), sig.float(), v64.float(), e["y"])
        assert rel_l2(f, f_want) < 1e-5, (ops, rel_l2(f, f_want))
        assert rel_l2(g, g_want) < 1e-4, (ops, rel_l2(g, g_want))


# ------------------------------------------------------------------------------------------------
# Layouts, dtypes and modes.


PLAIN_BLOCKS = dict(use_scale_shift_norm=False, resblock_updown=False, num_head_channels=16)


@pytest.mark.parametrize("ops", ["kernels", "eager", "reference"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "plain-blocks"])
def test_unet_forward_with_tangent_against_float64(ops, layout):
    """Class-conditional, scale-shift norm, resampling ResBlocks, attention (or additive
    timestep embedding, strided-conv and nearest+conv resampling: "plain-blocks"); x and tx
    contiguous, channels_last or non-contiguous views; a c_noise per sample and its tangent."""
    arch = PLAIN_BLOCKS if layout == "plain-blocks" else {}
    want_net = _net("reference", num_classes=5, **arch).double()
    net = _net(ops, num_classes=5, **arch).float()
    x, v, sigma = _inputs(B=4)
    labels = torch.tensor([0, 3, 4, 1])
    noise = torch.log(sigma) * 0.25
    tnoise = torch.randn(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    f_want, g_want = torch.func.jvp(
        lambda x_, c_: want_net(x_, c_, labels), (x, noise), (v, tnoise)
    )
    xf, vf = x.float(), v.float()
    if layout == "channels_last":
        xf, vf = (t.contiguous(memory_format=torch.channels_last) for t in (xf, vf))
    elif layout == "strided":
        xf = torch.randn(4, 3, 8, 16)[..., ::2].copy_(xf)
        vf = torch.randn(4, 3, 16, 8).transpose(2, 3)[:, :, :, ::2].transpose(2, 3).copy_(vf)
        assert not xf.is_contiguous() and not vf.is_contiguous()
    with torch.no_grad():
        f, g = net.forward_with_tangent(xf, vf, noise.float(), tnoise.float(), labels)
    assert rel_l2(f, f_want) < 1e-5, rel_l2(f, f_want)
    assert rel_l2(g, g_want) < 1e-4, rel_l2(g, g_want)


@pytest.mark.parametrize("ops", ["kernels", "reference"])
def test_bf16_autocast_tangent_is_as_accurate_as_pytorchs_own(ops):
    """Under bf16 autocast the tangent is within 2x (plus slack for this small sample) of the
    error torch.func.jvp of the pure-PyTorch model makes under the same autocast."""
    den64 = Denoiser(_net("reference")).double()
    den = Denoiser(_net(ops))
    ref = Denoiser(_net("reference"))
    x, v, sigma = _inputs()
    with torch.no_grad():
        _, g_want = _want(den64, x, sigma, v)
        with torch.autocast("cpu", torch.bfloat16):
            _, g = den.jvp(x.float(), sigma.float(), v.float())
            _, g_torch = _want(ref, x.float(), sigma.float(), v.float())
    ours, theirs = rel_l2(g.float(), g_want), rel_l2(g_torch.float(), g_want)
    assert theirs > 1e-4  # bf16 rounding is really in play
    assert ours <= 2 * theirs + 5e-3, (ours, theirs)


def test_train_mode_dropout_draws_one_mask_for_value_and_tangent():
    """With dropout in training mode the value is forward()'s for the same RNG state, and the
    tangent is torch.func.jvp of that same realisation (same masks)."""
    net = _net("reference", dropout=0.3).double().train()
    x, v, sigma = _inputs()
    noise, tnoise = torch.log(sigma) * 0.25, torch.full_like(sigma, 0.7)
    torch.manual_seed(11)
    f_want, g_want = torch.func.jvp(lambda x_, c_: net(x_, c_), (x, noise), (v, tnoise))
    torch.manual_seed(11)
    with torch.no_grad():
        f, g = net.forward_with_tangent(x, v, noise, tnoise)
    after = torch.rand(1)
    torch.manual_seed(11)
    plain = net(x, noise)
    torch.testing.assert_close(torch.rand(1), after)  # the same number of random draws
    torch.testing.assert_close(f, plain, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(f, f_want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_want, rtol=1e-10, atol=1e-10)
    torch.manual_seed(12)
    assert rel_l2(net.forward_with_tangent(x, v, noise, tnoise)[1].detach(), g) > 1e-3


@pytest.mark.parametrize("ops", ["kernels", "reference"])
def test_forward_with_tangent_records_the_value_and_not_the_tangent(ops):
    """Denoiser.forward(x, sigma, tangent=v) in grad mode: D is the plain forward's value with the
    plain forward's parameter gradients, dD is the JVP and carries no graph."""
    den = Denoiser(_net(ops))
    x, v, sigma = (t.float() for t in _inputs())
    D, dD = den(x, sigma, tangent=v)
    assert D.requires_grad and not dD.requires_grad
    params = list(den.parameters())
    w = torch.randn_like(D)
    grads = torch.autograd.grad((D * w).sum(), params)
    plain = den(x, sigma)
    torch.testing.assert_close(D, plain, rtol=0, atol=0)
    for a, b in zip(grads, torch.autograd.grad((plain * w).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(dD, den.jvp(x, sigma, v)[1], rtol=1e-5, atol=1e-5)
    _, dD_half = den(x, sigma, tangent=v, network_tangent=0.5)
    _, dD_none = den(x, sigma, tangent=v, network_tangent=0.0)
    torch.testing.assert_close(dD_half, (dD + dD_none) / 2, rtol=1e-5, atol=1e-5)


def test_forward_with_tangent_compiles_fullgraph():
    """No dual tensors and no torch.func: the written-out pass traces as one graph, without grad
    (the fused value+tangent kernels) and, through Denoiser.forward(tangent=), in grad mode as the
    trainer calls it (the value with its backward, the tangent a constant)."""
    net = _net("kernels").eval()
    x, v, sigma = (t.float() for t in _inputs())
    noise, tnoise = torch.log(sigma) * 0.25, 1 / (4 * sigma)
    compiled = torch.compile(net.forward_with_tangent, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got, want = compiled(x, v, noise, tnoise), net.forward_with_tangent(x, v, noise, tnoise)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    den = Denoiser(net)
    D, dD = torch.compile(den, fullgraph=True, backend="aot_eager")(x, sigma, tangent=v)
    D_want, dD_want = den(x, sigma, tangent=v)
    assert D.requires_grad and not dD.requires_grad
    torch.testing.assert_close(D, D_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dD, dD_want, rtol=1e-5, atol=1e-5)
    params = list(den.parameters())
    for a, b in zip(
        torch.autograd.grad(D.sum(), params), torch.autograd.grad(D_want.sum(), params)
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@requires_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_forward_with_tangent_on_the_gpu(precision):
    """The Triton value+tangent kernels inside the whole model, channels_last, against float64
    torch.func.jvp on the CPU; bf16 autocast within 2x (plus slack) of torch.func.jvp of the
    pure-PyTorch model under the same autocast."""
    den64 = Denoiser(_net("reference", num_classes=5)).double()
    den = Denoiser(_net("kernels", num_classes=5)).cuda().to(memory_format=torch.channels_last)
    x, v, sigma = _inputs(B=4)
    labels = torch.tensor([0, 3, 4, 1])
    with torch.no_grad():
        f_want, g_want = _want(den64, x, sigma, v, labels)
        xc, vc = (t.float().cuda().contiguous(memory_format=torch.channels_last) for t in (x, v))
        bf16 = precision == "bf16"
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            f, g = den.jvp(xc, sigma.float().cuda(), vc, labels.cuda())
            if bf16:
                ref = Denoiser(_net("reference", num_classes=5)).cuda()
                _, g_torch = _want(ref, xc, sigma.float().cuda(), vc, labels.cuda())
    f, g = f.double().cpu(), g.double().cpu()
    if not bf16:
        assert rel_l2(f, f_want) < 1e-5 and rel_l2(g, g_want) < 1e-4, (
            rel_l2(f, f_want),
            rel_l2(g, g_want),
        )
    else:
        theirs = rel_l2(g_torch.double().cpu(), g_want)
        assert rel_l2(g, g_want) <= 2 * theirs + 5e-3, (rel_l2(g, g_want), theirs)


# The op handles the tangent pass calls in each op package (grad mode: the JVP launch's value and
# statistics feed the fused backward), each with the suffix of the Triton launcher behind it on
# CUDA (launch.<package><suffix>_triton).
_TRITON_PACKAGES = ("groupnorm_silu", "attention")
_TRITON_HANDLES = {"_forward_op": "", "_backward_op": "_backward", "_jvp_op": "_jvp"}


@pytest.fixture
def triton_route(monkeypatch):
    """The ops' CUDA route, with a call count per op handle: on a GPU the registered ops; without
    one, CPU tensors served by the same Triton launchers under the interpreter in place of the
    CPU kernels, and attention's CPU grad-mode shortcut (value and backward from SDPA) off. The
    handles are swapped in the op packages (torch 2.11 refuses to override a kernel registered
    from Python), so the dispatcher is bypassed on the CPU only."""
    calls = {}

    def counted(key, fn):
        def op(*args):
            calls[key] += 1
            return fn(*args)

        return op

    for pkg_name in _TRITON_PACKAGES:
        # (the package's name is shadowed by the function of that name in cmkernels.ops)
        package = importlib.import_module(f"cmkernels.ops.{pkg_name}")
        launch = importlib.import_module(f"cmkernels.ops.{pkg_name}.launch")
        for handle, suffix in _TRITON_HANDLES.items():
            key = pkg_name + suffix
            calls[key] = 0
            if TRITON_DEVICE == "cuda":
                fn = getattr(package, handle)
            else:
                fn = getattr(launch, f"{key}_triton")
            monkeypatch.setattr(package, handle, counted(key, fn))
        if pkg_name == "attention" and TRITON_DEVICE == "cpu":
            monkeypatch.setattr(package, "_value_from_sdpa", lambda x: False)
    return TRITON_DEVICE, calls


@needs_triton
def test_the_training_pass_on_the_triton_route(triton_route):
    """The trainer's continuous-time pass as it runs on CUDA: Denoiser.forward(tangent=) in grad
    mode (one JVP launch per op, its value differentiable through the fused backward) and
    Denoiser.jvp without grad, channels_last, against float64 torch.func.jvp and autograd of the
    pure-PyTorch model. Without a GPU this is the only test of that route through the whole
    network (eight GroupNorm groups keep the interpreter's program count down)."""
    device, calls = triton_route

    def net(ops):
        n = _net(ops, num_classes=5)
        for m in n.modules():
            if isinstance(m, nn.GroupNorm):
                m.num_groups = 8
        return Denoiser(n)

    den64 = net("reference").double()
    den = net("kernels").to(device, memory_format=torch.channels_last)
    x, v, sigma = _inputs(B=2)
    labels = torch.tensor([3, 1])
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    D_want, dD_want = _want(den64, x, sigma, v, labels)
    x64 = x.clone().requires_grad_(True)
    grads_want = torch.autograd.grad(
        (den64(x64, sigma, labels) * g).sum(), [x64, *den64.parameters()]
    )

    def dev(t):
        return t.float().to(device).contiguous(memory_format=torch.channels_last)

    xd = dev(x).requires_grad_(True)
    D, dD = den(xd, sigma.float().to(device), labels.to(device), tangent=dev(v))
    assert D.requires_grad and not dD.requires_grad
    grads = torch.autograd.grad((D * dev(g)).sum(), [xd, *den.parameters()])
    # every op site ran its one JVP launch, and its backward (no plain forward launches)
    assert all(calls[k] > 0 for k in calls if k.endswith(("_jvp", "_backward"))), calls
    assert calls["groupnorm_silu"] == calls["attention"] == 0, calls
    flat = torch.cat([t.double().cpu().flatten() for t in grads[1:]])
    flat_want = torch.cat([t.flatten() for t in grads_want[1:]])
    errors = {
        "D": rel_l2(D.detach().double().cpu(), D_want),
        "dD": rel_l2(dD.double().cpu(), dD_want),
        "x grad": rel_l2(grads[0].double().cpu(), grads_want[0]),
        "param grads": rel_l2(flat, flat_want),
    }
    with torch.no_grad():
        D_ng, dD_ng = den.jvp(dev(x), sigma.float().to(device), dev(v), labels.to(device))
    errors["no-grad D"] = rel_l2(D_ng.double().cpu(), D_want)
    errors["no-grad dD"] = rel_l2(dD_ng.double().cpu(), dD_want)
    limits = {"D": 1e-5, "dD": 1e-4, "x grad": 1e-4, "param grads": 1e-4, "no-grad D": 1e-5,
              "no-grad dD": 1e-4}  # fmt: skip
    assert all(errors[k] < limits[k] for k in limits), errors
    assert grads_want[0].abs().max() > 0 and flat_want.abs().max() > 0


# ------------------------------------------------------------------------------------------------
# The continuous-time loss with target = stopgrad(theta): one pass instead of forward + JVP.


@pytest.mark.parametrize("teacher", [False, True], ids=["ct", "cd"])
def test_loss_from_one_pass_equals_the_two_pass_loss(teacher):
    model = Denoiser(_net("reference", seed=0)).double()
    target = copy.deepcopy(model).requires_grad_(False)
    teach = Denoiser(_net("reference", seed=1), "edm").double() if teacher else None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 8, generator=gen, dtype=torch.float64) * 0.5
    z = torch.randn(3, 3, 8, 8, generator=gen, dtype=torch.float64)
    params = list(model.parameters())
    results = []
    for shared in (False, True):
        loss = ContinuousConsistencyLoss(tangent_norm=0.1, target_is_model=shared)
        draws = loss.draw(3, torch.Generator().manual_seed(4))
        draws["r"] = torch.full((3,), 0.6)
        per_sample, aux = loss(model, target, x, z, draws, teach)
        grads = torch.autograd.grad(per_sample.sum(), params)
        results.append(
            (per_sample.detach(), aux["tangent_rms"], torch.cat([g.flatten() for g in grads]))
        )
    (a, ra, ga), (b, rb, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-10, atol=0)
    torch.testing.assert_close(ra, rb, rtol=1e-10, atol=0)
    assert rel_l2(gb, ga) < 1e-10 and ga.abs().max() > 0


# ------------------------------------------------------------------------------------------------
# Where the written-out pass cannot serve, the torch.func route does, and bad input.


def test_fallback_under_torch_func_and_dual_tensors():
    """Inside a torch.func transform, or on dual tensors, the written-out pass would drop the
    outer tangent (it records none): Denoiser.jvp then takes the torch.func.jvp route. Under vmap
    that gives the per-sample results; a second-order tangent is right where PyTorch has the
    second derivatives (a tanh backbone; F.silu has none), and on dual tensors PyTorch refuses
    the nested forward AD with its own error instead of a tangent that lost the outer one."""
    den = Denoiser(_net("reference")).double()
    x, v, sigma = _inputs()
    with torch.no_grad():
        assert den._explicit_tangent(x, v)
        seen = []
        torch.func.vmap(lambda xb: seen.append(den._explicit_tangent(xb, v)) or xb)(x[None])
        assert seen == [False]
        got = torch.func.vmap(lambda xb: den.jvp(xb, sigma, v)[1])(torch.stack([x, 0.5 * x]))
        torch.testing.assert_close(got[1], den.jvp(0.5 * x, sigma, v)[1])
        with fwAD.dual_level():
            dual = fwAD.make_dual(x, torch.randn_like(x))
            assert not den._explicit_tangent(dual, v)
            with pytest.raises(RuntimeError, match="Nested forward mode AD"):
                den.jvp(dual, sigma, v)

    plain = Denoiser(_Plain()).double().eval()
    w = torch.randn_like(x)

    def g_of(x_):
        return plain.jvp(x_, sigma, v)[1]

    with torch.no_grad():
        _, h = torch.func.jvp(g_of, (x,), (w,))
        eps = 1e-5
        fd = (g_of(x + eps * w) - g_of(x - eps * w)) / (2 * eps)
        assert rel_l2(h, fd) < 1e-6, rel_l2(h, fd)


class _Plain(nn.Module):
    """A backbone without forward_with_tangent (with dropout, to check the masks are shared)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, c_noise, labels=None):
        return self.drop(torch.tanh(self.conv(x)) * c_noise.view(-1, 1, 1, 1))


def test_other_networks_take_the_torch_func_route_with_the_same_dropout_masks():
    den = Denoiser(_Plain()).double().train()
    x, v, sigma = _inputs()
    assert not den._explicit_tangent(x, v)
    torch.manual_seed(5)
    D, dD = den(x, sigma, tangent=v)
    torch.manual_seed(5)
    f_want, g_want = _want(den, x, sigma, v)
    torch.testing.assert_close(D.detach(), f_want)
    torch.testing.assert_close(dD, g_want)


def test_bad_tangents_are_refused():
    net = _net("kernels")
    den = Denoiser(net)
    x, v, sigma = (t.float() for t in _inputs())
    with pytest.raises(ValueError, match="tx has shape"):
        net.forward_with_tangent(x, v[:, :2], sigma, sigma)
    with pytest.raises(ValueError, match="tangent has shape"):
        den(x, sigma, tangent=v[:2])
    with pytest.raises(ValueError, match=r"x must be \[B, 3, H, W\]"):
        net.forward_with_tangent(x[:, :1], v[:, :1], sigma, sigma)


# ------------------------------------------------------------------------------------------------
# The CPU patch-matrix convolution of the tangent pass.


@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("k, stride, pad", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (3, 1, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, "bf16-autocast"])
def test_patch_matrix_convolution_matches_conv2d(weight_layout, k, stride, pad, dtype):
    from cmkernels.unet import _conv_gemm

    torch.manual_seed(0)
    conv = nn.Conv2d(40, 64, k, stride=stride, padding=pad)  # 64 channels >= 2 x 5 x 6 pixels
    autocast = dtype == "bf16-autocast"
    dt = torch.float32 if autocast else dtype
    conv = conv.to(dt)
    mf = torch.channels_last if weight_layout == "channels_last" else torch.contiguous_format
    conv.weight.data = conv.weight.data.contiguous(memory_format=mf)
    x = torch.randn(2, 40, 5, 7, dtype=dt)[:, :, :, 1:]  # odd, non-contiguous: 5 x 6
    x = x.contiguous(memory_format=mf) if weight_layout == "channels_last" else x
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        got = _conv_gemm(conv, x, conv.bias)
        want = conv(x)
    assert got is not None and got.dtype == want.dtype and got.shape == want.shape
    want64 = nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride, pad)
    tol = {torch.float32: 1e-6, torch.float64: 1e-13}.get(dtype, 1e-2)
    assert rel_l2(got, want64) < tol, rel_l2(got, want64)
    assert rel_l2(want, want64) < 10 * tol + 1e-2 * autocast


def test_patch_matrix_convolution_declines_where_it_does_not_pay():
    from cmkernels.unet import _conv_gemm, _conv_with_tangent

    conv = nn.Conv2d(8, 16, 3, padding=1)
    assert _conv_gemm(conv, torch.randn(1, 8, 8, 8), None) is None  # 64 pixels > 16 channels
    assert _conv_gemm(conv, torch.randn(1, 8, 4, 4), None) is not None
    grouped = nn.Conv2d(8, 16, 3, padding=1, groups=2)
    assert _conv_gemm(grouped, torch.randn(1, 8, 2, 2), None) is None
    assert _conv_gemm(conv.double(), torch.randn(1, 8, 2, 2), None) is None  # dtype mismatch
    reflect = nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect")
    assert _conv_gemm(reflect, torch.randn(1, 8, 2, 2), None) is None
    x, tx = torch.randn(1, 8, 3, 3), torch.randn(1, 8, 3, 3)
    y, ty = _conv_with_tangent(reflect, x, tx)  # through the module's own padding
    torch.testing.assert_close(y, reflect(x))
    torch.testing.assert_close(ty, reflect(tx) - reflect.bias.view(-1, 1, 1))


def test_patch_matrix_convolution_takes_wide_channels_last_weights():
    """A channels_last weight larger than the padded input plus one patch band goes through the
    banded product even with more pixels than output channels (oneDNN would copy the weight)."""
    from cmkernels.unet import _PATCH_ELEMENTS, _conv_gemm

    torch.manual_seed(0)
    conv = nn.Conv2d(512, 320, 3, padding=1)  # 1.5M weight elements; 20 x 20 = 400 pixels > 320
    assert conv.weight.numel() > 512 * 22 * 22 + _PATCH_ELEMENTS
    x = torch.randn(1, 512, 20, 20).contiguous(memory_format=torch.channels_last)
    assert _conv_gemm(conv, x, conv.bias) is None  # a contiguous weight: oneDNN
    conv = conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        got = _conv_gemm(conv, x, conv.bias)
    assert got is not None
    want64 = nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert rel_l2(got, want64) < 1e-6
    small = nn.Conv2d(8, 16, 3, padding=1).to(memory_format=torch.channels_last)
    assert _conv_gemm(small, torch.randn(1, 8, 8, 8), None) is None  # small weight: oneDNN


@pytest.mark.parametrize("grad", [False, True])
def test_forward_with_tangent_leaves_its_inputs_alone(grad):
    """The memory-saving hand-over and in-place residual sums of the tangent pass never write
    into the caller's tensors, with or without autograd recording."""
    torch.manual_seed(0)
    cfg = UNetConfig(image_size=32, in_channels=1, out_channels=1, model_channels=32,
                     num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(2,),
                     num_heads=2, num_head_channels=-1, num_classes=None, dropout=0.0,
                     ops="kernels")  # fmt: skip  (32 x 32: past the stacked-convolution sizes)
    net = UNet(cfg).to(memory_format=torch.channels_last)
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 1, 32, 32, requires_grad=grad)
    v = torch.randn(2, 1, 32, 32)
    noise, tnoise = torch.tensor([0.3, 1.2]), torch.tensor([1.0, 0.5])
    copies = [t.detach().clone() for t in (x, v, noise, tnoise)]
    with torch.set_grad_enabled(grad):
        f1, g1 = net.forward_with_tangent(x, v, noise, tnoise)
        f2, g2 = net.forward_with_tangent(x, v, noise, tnoise)
    for t, c in zip((x, v, noise, tnoise), copies):
        assert torch.equal(t.detach(), c)
    assert torch.equal(f1, f2) and torch.equal(g1, g2)
    torch.testing.assert_close(f1, net(x, noise))
    with torch.no_grad():
        _, want = torch.func.jvp(net, (x.detach(), noise), (v, tnoise))
    assert rel_l2(g1.detach(), want) < 1e-5
