"""The UNet against the official network's stored outputs and layouts; denoisers; checkpoints."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TRITON_DEVICE, needs_triton, requires_cuda

from cmkernels.checkpoint import CheckpointError, load_denoiser, load_file, save_atomic
from cmkernels.diffusion import Denoiser, c_noise, cm_scalings, edm_scalings
from cmkernels.noise_schedule import SIGMA_MIN, karras_sigmas
from cmkernels.unet import PRESETS, UNet, UNetConfig, get_preset

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.exists():  # a checkout with shared/ inside it
    DATA = Path(__file__).resolve().parents[1] / "shared" / "data"
REFERENCE = DATA / "official_unet_reference.pt"
LAYOUTS = DATA / "official_unet_layouts.json"
needs_data = pytest.mark.skipif(not REFERENCE.exists(), reason=f"no official reference at {DATA}")


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE, weights_only=True)


@needs_data
@pytest.mark.parametrize("name", ["imagenet64_mini", "lsun256_mini"])
@pytest.mark.parametrize("ops", ["reference", "kernels"])
def test_matches_official_outputs(reference, name, ops):
    e = reference[name]
    net = UNet(UNetConfig.from_official(e["config"], ops=ops))
    net.load_state_dict(e["state_dict"], strict=True)
    net.eval()
    x, sig, y = e["x"], e["sigmas"], e["y"]
    x_t = x * sig.view(-1, 1, 1, 1)  # the stored denoiser outputs are for x_t = x * sigma
    with torch.no_grad():
        assert rel_l2(net(x, e["rescaled_t"], y), e["F"]) < 1e-5
        assert rel_l2(Denoiser(net, "cm")(x_t, sig, y), e["denoised_cm"]) < 1e-5
        assert rel_l2(Denoiser(net, "edm")(x_t, sig, y), e["denoised_edm"]) < 1e-5


@needs_data
@needs_triton
def test_kernels_path_matches_on_the_triton_kernels(reference):
    """The UNet with its GN and attention sites on the Triton launchers (on the GPU, or run by the
    interpreter on CPU tensors)."""
    from cmkernels import ops
    from cmkernels.ops.attention import attention_triton
    from cmkernels.ops.groupnorm_silu import groupnorm_silu_triton

    e = reference["lsun256_mini"]
    net = UNet(UNetConfig.from_official(e["config"]))
    net.load_state_dict(e["state_dict"], strict=True)
    net.to(TRITON_DEVICE)

    def via_triton(x, w, b, scale=None, shift=None, *, groups=32, eps=1e-5, activation=True):
        return groupnorm_silu_triton(x, w, b, scale, shift, groups, eps, activation)[0]

    original = ops.groupnorm_silu, ops.attention
    ops.groupnorm_silu = via_triton
    ops.attention = lambda qkv, heads: attention_triton(qkv, heads)[0]
    try:
        with torch.no_grad():
            out = net(e["x"][:1].to(TRITON_DEVICE), e["rescaled_t"][:1].to(TRITON_DEVICE), None)
    finally:
        ops.groupnorm_silu, ops.attention = original
    # On a GPU the convolutions may use TF32 (cuDNN's default): a looser bound there.
    assert rel_l2(out.cpu(), e["F"][:1]) < (1e-5 if TRITON_DEVICE == "cpu" else 2e-3)


@needs_data
@requires_cuda
@pytest.mark.parametrize("name", ["imagenet64_mini", "lsun256_mini"])
def test_gpu_unet_kernels_match_reference_ops(reference, name):
    """On CUDA: the UNet on the fused kernels against the same UNet on the reference ops (same
    convolutions, so the difference is the kernels'), in fp32 and under bf16 autocast, and both
    against the official outputs."""
    e = reference[name]
    nets = {}
    for ops_kind in ("reference", "kernels"):
        net = UNet(UNetConfig.from_official(e["config"], ops=ops_kind))
        net.load_state_dict(e["state_dict"], strict=True)
        nets[ops_kind] = net.cuda().eval()
    x, t, y = (v.cuda() if v is not None else None for v in (e["x"], e["rescaled_t"], e["y"]))
    with torch.no_grad():
        ref, ker = (nets[k](x, t, y) for k in ("reference", "kernels"))
        assert rel_l2(ker, ref) < 1e-4
        assert rel_l2(ker.cpu(), e["F"]) < 2e-3
        with torch.autocast("cuda", torch.bfloat16):
            ker16 = nets["kernels"](x.to(memory_format=torch.channels_last), t, y)
    assert rel_l2(ker16.float(), ref) < 5e-2


@needs_data
@pytest.mark.parametrize("preset", ["imagenet64", "lsun256"])
def test_full_layouts_match_official(preset):
    layout = json.loads(LAYOUTS.read_text())[preset]
    with torch.device("meta"):
        net = UNet(PRESETS[preset])
    ours = {n: list(t.shape) for n, t in net.state_dict().items()}
    assert ours == layout["tensors"]
    assert sum(p.numel() for p in net.parameters()) == layout["num_params"]
    assert UNetConfig.from_official(layout["config"]) == PRESETS[preset]


def test_small_presets_run_and_channels_last():
    for name in ("gray28", "gray32", "rgb32"):
        cfg = get_preset(name)
        net = UNet(cfg).eval()
        x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
        with torch.no_grad():
            a = net(x, torch.randn(2))
            b = net.to(memory_format=torch.channels_last)(
                x.to(memory_format=torch.channels_last), torch.randn(2).zero_() + 0
            )
        assert a.shape == x.shape and b.shape == x.shape


def test_ops_switch_gives_same_outputs_with_same_weights():
    cfg = get_preset("gray32", dropout=0.0)
    net = UNet(cfg)
    for p in net.parameters():  # the zero-initialised output convs would hide differences
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 1, 32, 32), torch.randn(2)
    with torch.no_grad():
        a = net.set_ops("kernels")(x, t)
        b = net.set_ops("reference")(x, t)
    assert rel_l2(a, b) < 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_three_ops_kinds_agree_forward_and_backward(channels_last):
    """kernels, reference (the official computation) and eager (SDPA, F.group_norm + F.silu) are
    the same network: outputs and the gradients of input and weights agree in fp32."""
    cfg = get_preset("rgb32", dropout=0.0)  # two attention resolutions, 4 heads, scale/shift
    net = UNet(cfg)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    x0 = torch.randn(2, 3, 32, 32).to(memory_format=fmt)
    t = torch.randn(2)
    results = {}
    for kind in ("reference", "kernels", "eager"):
        x = x0.clone().requires_grad_()
        out = net.set_ops(kind)(x, t)
        grads = torch.autograd.grad(out.square().sum(), [x, *net.parameters()])
        results[kind] = (out.detach(), grads)
    ref_out, ref_grads = results["reference"]
    for kind in ("kernels", "eager"):
        out, grads = results[kind]
        assert rel_l2(out, ref_out) < 1e-5, kind
        assert rel_l2(grads[0], ref_grads[0]) < 1e-4, kind  # input gradient
        worst = max(rel_l2(g, r) for g, r in zip(grads[1:], ref_grads[1:]) if r.norm() > 0)
        assert worst < 1e-4, kind


def test_unknown_ops_kind():
    with pytest.raises(ValueError, match="ops must be one of"):
        get_preset("gray32", ops="fast")
    with pytest.raises(ValueError, match="ops must be one of"):
        UNet(get_preset("gray32")).set_ops("triton")


def test_bad_inputs():
    net = UNet(get_preset("gray32"))
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.randn(1, 1, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        net(torch.randn(1, 3, 32, 32), torch.zeros(1))
    with pytest.raises(ValueError, match="unknown UNet preset"):
        get_preset("imagenet128")
    with pytest.raises(ValueError, match="GroupNorm"):
        get_preset("gray32", model_channels=24)


def test_karras_grid_and_scalings():
    s = karras_sigmas(40)
    assert s[0].item() == pytest.approx(80.0) and s[-1].item() == pytest.approx(0.002)
    assert (s[:-1] > s[1:]).all()
    sig = torch.tensor([0.002, 0.5, 80.0])
    c_skip, c_out, c_in = cm_scalings(sig)
    assert c_skip[0] == 1 and c_out[0] == 0
    torch.testing.assert_close(c_in, 1 / (sig**2 + 0.25).sqrt())
    e_skip, e_out, _ = edm_scalings(sig)
    torch.testing.assert_close(e_skip, 0.25 / (sig**2 + 0.25))
    torch.testing.assert_close(e_out, sig * 0.5 / (sig**2 + 0.25).sqrt())
    torch.testing.assert_close(c_noise(sig, "official"), 250 * torch.log(sig))
    torch.testing.assert_close(c_noise(sig, "edm"), torch.log(sig) / 4)


def test_boundary_condition_holds_exactly():
    net = UNet(get_preset("gray32"))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    den = Denoiser(net, "cm")
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(den(x, SIGMA_MIN), x)


def _ours(tmp_path, preset="gray32"):
    net = UNet(get_preset(preset))
    state = {
        "format": "cmkernels", "version": 1,
        "unet_config": __import__("dataclasses").asdict(net.config),
        "denoiser": dict(parameterization="cm", sigma_data=0.5, sigma_min=0.002, sigma_max=80.0,
                         c_noise="official"),
        "model": net.state_dict(), "emas": {"0.999": net.state_dict()},
    }  # fmt: skip
    path = save_atomic(state, tmp_path / "ckpt.pt")
    return net, path


def test_checkpoint_round_trip(tmp_path):
    net, path = _ours(tmp_path)
    den = load_denoiser(path)
    assert den.parameterization == "cm" and den.net.config == net.config
    for a, b in zip(den.net.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_file(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_file(bad)
    net, path = _ours(tmp_path)
    plain = save_atomic(net.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="preset"):
        load_denoiser(plain)
    with pytest.raises(CheckpointError) as err:
        load_denoiser(plain, preset="rgb32")
    msg = str(err.value)
    assert "missing keys" in msg or "shape mismatches" in msg
    assert "gray28 or gray32" in msg and "--preset gray28" in msg


@pytest.mark.parametrize("mode", ["func", "dual"])
def test_jvp_through_the_network_kernels_equal_reference(mode):
    """The continuous-time CM's tangent: a JVP through the whole network in x and c_noise (tangents
    v and 1) is the same with the fused ops (their forward-AD route) as with the reference ops."""
    from conftest import forward_ad_jvp

    net = UNet(get_preset("gray32", dropout=0.0))
    for p in net.parameters():  # the zero-initialised output convs would hide differences
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 1, 32, 32), torch.randn(2)
    v, dt = torch.randn_like(x), torch.ones_like(t)
    results = {}
    for kind in ("kernels", "reference"):
        net.set_ops(kind)
        with torch.no_grad():
            results[kind] = forward_ad_jvp(net, [x, t], [v, dt], mode)
    (out, tan), (ref_out, ref_tan) = results["kernels"], results["reference"]
    assert rel_l2(out, ref_out) < 1e-5
    assert tan.abs().max() > 0 and rel_l2(tan, ref_tan) < 1e-5, rel_l2(tan, ref_tan)


def test_denoiser_jvp_is_the_total_derivative_along_the_ode():
    """Denoiser.jvp gives dD/dsigma + (dD/dx) v through the scalings, c_noise, the time embedding
    and the network: against a central difference of the float64 reference model (the tangent of
    sigma matters: without it the answer is far off), and the fused ops against the reference."""
    torch.manual_seed(0)
    net = UNet(get_preset("gray32", ops="reference", dropout=0.0))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    den = Denoiser(net).double()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    sigma = torch.tensor([3.0, 0.4], dtype=torch.float64)
    v = torch.randn_like(x)
    with torch.no_grad():
        out, tan = den.jvp(x, sigma, v)
        eps = 1e-4  # (c_noise = 250 ln(sigma) makes D vary fast in sigma)
        central = (den(x + eps * v, sigma + eps) - den(x - eps * v, sigma - eps)) / (2 * eps)
        x_only = (den(x + eps * v, sigma) - den(x - eps * v, sigma)) / (2 * eps)
    assert out.dtype == tan.dtype == torch.float64
    assert rel_l2(tan, central) < 1e-3, rel_l2(tan, central)
    assert rel_l2(x_only, central) > 0.1  # the sigma part is not negligible here
    fused = Denoiser(UNet(get_preset("gray32", dropout=0.0)))
    fused.net.load_state_dict(net.state_dict())
    with torch.no_grad():
        f_out, f_tan = fused.jvp(x.float(), sigma.float(), v.float())
    assert rel_l2(f_out, out) < 1e-5 and rel_l2(f_tan, tan) < 1e-5, rel_l2(f_tan, tan)
    with pytest.raises(ValueError, match="v has shape"):
        den.jvp(x, sigma, v[:1])
