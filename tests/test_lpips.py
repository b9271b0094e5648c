"""LPIPS from local weight files: the layer taps, the formula and the loading checks."""

import pytest
import torch
import torch.nn.functional as F

from cmkernels.losses import ConsistencyLoss
from cmkernels.lpips import LPIPS, LPIPSError
from cmkernels.train import parse_args

# VGG-16 convs as (index in torchvision's `features`, in, out); pools follow 3, 8, 15, 22.
CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
         (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
         (26, 512, 512), (28, 512, 512)]  # fmt: skip
TAP_AFTER = {2: 0, 7: 1, 14: 2, 21: 3, 28: 4}  # conv index whose ReLU output LPIPS reads -> layer


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    vgg = {}
    for i, cin, cout in CONVS:
        vgg[f"features.{i}.weight"] = (
            torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        )
        vgg[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.1
    vgg["classifier.0.weight"] = torch.randn(4, 4, generator=g)  # ignored, as in torchvision files
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
           for k, c in enumerate((64, 128, 256, 512, 512))}  # fmt: skip
    return vgg, lin


def _files(tmp_path, vgg, lin):
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "lin.pth")
    return tmp_path / "vgg16.pth", tmp_path / "lin.pth"


def _reference(vgg, lin, a, b, size):
    """LPIPS written out layer by layer in float64 with F.conv2d on the raw state_dicts."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    out = torch.zeros(a.shape[0], dtype=torch.float64)
    feats = []
    for img in (a, b):
        x = img.double().repeat(1, 3 // img.shape[1], 1, 1)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = (x - shift) / scale
        taps = []
        for i, _, _ in CONVS:
            if i in (5, 10, 17, 24):
                x = F.max_pool2d(x, 2)
            w, bias = vgg[f"features.{i}.weight"].double(), vgg[f"features.{i}.bias"].double()
            x = F.relu(F.conv2d(x, w, bias, padding=1))
            if i in TAP_AFTER:
                taps.append(x)
        feats.append(taps)
    for k, (fa, fb) in enumerate(zip(*feats)):
        na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = lin[f"lin{k}.model.1.weight"].double()
        out += F.conv2d((na - nb) ** 2, w).mean((1, 2, 3))
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_matches_layer_by_layer_reference(tmp_path, channels):
    vgg, lin = _weights()
    model = LPIPS.from_files(*_files(tmp_path, vgg, lin), resize=48)
    a = torch.rand(3, channels, 20, 20) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1)
    got = model(a, b)
    want = _reference(vgg, lin, a, b, 48)
    assert got.shape == (3,) and torch.all(want > 0)
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=1e-7)
    assert torch.allclose(model(a, a), torch.zeros(3), atol=1e-7)
    torch.testing.assert_close(model(b, a), got, rtol=1e-5, atol=1e-8)


def test_gradient_reaches_the_online_image(tmp_path):
    vgg, lin = _weights(1)
    model = LPIPS.from_files(*_files(tmp_path, vgg, lin), resize=32)
    a = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    b = torch.rand(2, 3, 32, 32) * 2 - 1
    model(a, b).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # the metric itself stays frozen


def test_consistency_loss_takes_lpips_as_distance(tmp_path):
    vgg, lin = _weights(2)
    dist = LPIPS.from_files(*_files(tmp_path, vgg, lin), resize=32)
    loss = ConsistencyLoss(distance=dist)
    net = lambda x, t, labels=None: torch.tanh(x) * 0.9  # noqa: E731
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    draws = loss.draw(2, torch.Generator().manual_seed(0), 18)
    per_sample, _ = loss(net, net, x, torch.randn_like(x), draws)
    assert per_sample.shape == (2,) and torch.all(per_sample > 0)


def test_bad_weight_files(tmp_path):
    vgg, lin = _weights()
    with pytest.raises(LPIPSError, match="not found"):
        LPIPS.from_files(tmp_path / "nope.pth", tmp_path / "nope2.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    v, l_ = _files(tmp_path, vgg, lin)
    with pytest.raises(LPIPSError, match="cannot read"):
        LPIPS.from_files(bad, l_)
    del vgg["features.28.bias"]
    torch.save(vgg, tmp_path / "short.pth")
    with pytest.raises(LPIPSError, match="features.28.bias"):
        LPIPS.from_files(tmp_path / "short.pth", l_)
    lin["lin2.model.1.weight"] = torch.rand(1, 128, 1, 1)
    torch.save(lin, tmp_path / "lin_bad.pth")
    with pytest.raises(LPIPSError, match="lin2"):
        LPIPS.from_files(v, tmp_path / "lin_bad.pth")


def test_cli_needs_both_weight_files():
    with pytest.raises(SystemExit):
        parse_args(["--mode", "cd", "--distance", "lpips", "--lpips-vgg", "v.pth"])
    cfg = parse_args(["--mode", "cd", "--distance", "lpips", "--lpips-vgg", "v.pth",
                      "--lpips-lin", "l.pth"])  # fmt: skip
    assert cfg.distance == "lpips" and cfg.lpips_lin == "l.pth"
