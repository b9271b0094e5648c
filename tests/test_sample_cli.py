"""End-to-end tests of `python -m cmkernels.sample` on a tiny random UNet saved in our format.

The checkpoint tests need cmkernels.unet / diffusion / checkpoint and are skipped without them;
the argument checks below run everywhere.
"""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from cmkernels import sample

SIZE = 16  # The tiny UNet's resolution (one level, no attention: ~0.05 s per evaluation on CPU).


def run(argv):
    """main(argv); a SystemExit is returned (not raised) so tests can inspect it."""
    try:
        sample.main([str(a) for a in argv])
    except SystemExit as e:
        return e
    return None


# ----------------------------------------------------------------------------------------------
# Argument checks that need no model.


@pytest.mark.parametrize("extra, message", [
    (["--ts", "0,22,39", "--sigmas", "80,1"], "not both"),
    (["--task", "inpaint", "--image", "x.png"], "--mask"),
    (["--task", "colorize"], "needs --image"),
    (["--task", "denoise", "--image", "x.png"], "--noise-sigma"),
    (["--task", "stroke", "--image", "x.png", "--sampler", "heun"], "--sampler applies"),
    (["--sampler", "onestep", "--ts", "0,22,39"], "onestep takes no"),
    (["--image", "x.png"], "does not apply"),
    (["--ts", "0,a"], "comma-separated integers"),
    (["--num-samples", "0"], "positive"),
])
def test_bad_arguments_exit_with_a_message(extra, message, capsys):
    exit = run(["--checkpoint", "missing.pt", *extra])
    assert exit is not None and exit.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# End to end with a tiny UNet.


@pytest.fixture(scope="module")
def core():
    unet = pytest.importorskip("cmkernels.unet")
    checkpoint = pytest.importorskip("cmkernels.checkpoint")
    return unet, checkpoint


def save_tiny(core, path, num_classes=None, parameterization="cm"):
    unet, checkpoint = core
    config = unet.get_preset(
        "gray32", image_size=SIZE, model_channels=32, num_res_blocks=1, channel_mult=(1,),
        attention_resolutions=(), dropout=0.0, num_classes=num_classes,
    )
    torch.manual_seed(0)
    net = unet.UNet(config)
    with torch.no_grad():  # Zero-initialised output layers would make F = 0: perturb everything.
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    checkpoint.save_atomic({
        "format": "cmkernels", "version": 1,
        "unet_config": dataclasses.asdict(config),
        "denoiser": {"parameterization": parameterization, "sigma_data": 0.5,
                     "sigma_min": 0.002, "sigma_max": 80.0, "c_noise": "official"},
        "model": net.state_dict(), "emas": {},
    }, path)
    return path


@pytest.fixture(scope="module")
def ckpt(core, tmp_path_factory):
    return save_tiny(core, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def ckpt_cond(core, tmp_path_factory):
    return save_tiny(core, tmp_path_factory.mktemp("ckpt") / "tiny_cond.pt", num_classes=10)


def load_npz(out):
    with np.load(out / "samples.npz") as f:
        return {k: f[k] for k in f.files}


def test_generate_onestep_writes_png_and_npz(ckpt, tmp_path, capsys):
    assert run(["--checkpoint", ckpt, "--num-samples", 3, "--batch-size", 2, "--out", tmp_path,
                "--device", "cpu"]) is None
    arrays = load_npz(tmp_path)
    assert set(arrays) == {"images"}  # Unconditional: no labels.
    assert arrays["images"].shape == (3, SIZE, SIZE, 1) and arrays["images"].dtype == np.uint8
    assert Image.open(tmp_path / "samples.png").size == (2 * SIZE, 2 * SIZE)  # 2 x 2 grid.
    assert "onestep" in capsys.readouterr().out


def test_a_trigflow_model_samples_in_one_step(core, tmp_path, capsys):
    """A --trigflow run's consistency model (EDM scalings, boundary at 0) is sampled like "cm",
    not with the teacher's Heun ODE solver."""
    path = save_tiny(core, tmp_path / "trigflow.pt", parameterization="trigflow")
    assert run(["--checkpoint", path, "--num-samples", 2, "--out", tmp_path / "out"]) is None
    assert "onestep" in capsys.readouterr().out
    images = load_npz(tmp_path / "out")["images"]
    assert images.shape == (2, SIZE, SIZE, 1) and images.std() > 0


def test_images_do_not_depend_on_batch_size(ckpt, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--checkpoint", ckpt, "--num-samples", 3, "--seed", 7, "--ts", "0,22,39"]
    assert run([*common, "--batch-size", 3, "--out", a]) is None
    assert run([*common, "--batch-size", 1, "--out", b]) is None
    ia, ib = load_npz(a)["images"].astype(int), load_npz(b)["images"].astype(int)
    assert np.abs(ia - ib).max() <= 1  # Equal up to float rounding in batched convolutions.
    assert np.abs(ia[0] - ia[1]).max() > 1


def test_channels_last_gives_the_same_images(ckpt, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--checkpoint", ckpt, "--num-samples", 2, "--seed", 3, "--ts", "0,22,39"]
    assert run([*common, "--out", a]) is None  # channels_last: the default
    assert run([*common, "--no-channels-last", "--out", b]) is None
    ia, ib = load_npz(a)["images"].astype(int), load_npz(b)["images"].astype(int)
    assert np.abs(ia - ib).max() <= 1  # Equal up to float rounding in the convolutions.
    assert np.abs(ia[0] - ia[1]).max() > 1


@pytest.mark.parametrize("extra", [["--sampler", "heun", "--steps", 3],
                                   ["--sampler", "euler", "--sigmas", "80,2"],
                                   ["--sigmas", "80,0.8"],
                                   ["--dtype", "bf16"]])
def test_samplers_run(ckpt, tmp_path, extra):
    assert run(["--checkpoint", ckpt, "--num-samples", 2, "--out", tmp_path, *extra]) is None
    assert load_npz(tmp_path)["images"].shape == (2, SIZE, SIZE, 1)


def test_class_labels(ckpt, ckpt_cond, tmp_path, capsys):
    assert run(["--checkpoint", ckpt_cond, "--num-samples", 4, "--batch-size", 3,
                "--out", tmp_path / "r"]) is None
    labels = load_npz(tmp_path / "r")["labels"]
    assert labels.shape == (4,) and labels.min() >= 0 and labels.max() < 10
    assert run(["--checkpoint", ckpt_cond, "--num-samples", 2, "--class-label", 3,
                "--out", tmp_path / "f"]) is None
    assert load_npz(tmp_path / "f")["labels"].tolist() == [3, 3]
    exit = run(["--checkpoint", ckpt_cond, "--class-label", 10, "--out", tmp_path])
    assert exit.code == 2 and "[0, 10)" in capsys.readouterr().err
    exit = run(["--checkpoint", ckpt, "--class-label", 1, "--out", tmp_path])
    assert exit.code == 2 and "unconditional" in capsys.readouterr().err


def write_png(path, array):
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def test_inpaint_keeps_the_unmasked_pixels(ckpt, tmp_path):
    rng = np.random.default_rng(0)
    image = write_png(tmp_path / "image.png", rng.integers(0, 256, (SIZE, SIZE)))
    mask_array = np.zeros((SIZE, SIZE))
    mask_array[4:12, 4:12] = 255  # White = generate.
    mask = write_png(tmp_path / "mask.png", mask_array)
    out = tmp_path / "out"
    assert run(["--checkpoint", ckpt, "--task", "inpaint", "--image", image, "--mask", mask,
                "--num-samples", 2, "--ts", "0,10,39", "--out", out]) is None
    result = load_npz(out)["images"][..., 0]  # (2, SIZE, SIZE)
    original = np.asarray(Image.open(image))
    keep = mask_array == 0
    assert np.array_equal(result[:, keep], np.stack([original[keep]] * 2))
    assert not np.array_equal(result[:, ~keep], np.stack([original[~keep]] * 2))
    assert (out / "reference.png").exists()


@pytest.mark.parametrize("extra", [["--task", "superres", "--factor", 4, "--steps", 4],
                                   ["--task", "stroke"],
                                   ["--task", "denoise", "--noise-sigma", 0.2, "--add-noise"]])
def test_editing_tasks_run(ckpt, tmp_path, extra):
    image = write_png(tmp_path / "image.png", np.full((40, 48), 100))  # Cropped and resized.
    assert run(["--checkpoint", ckpt, "--image", image, "--num-samples", 2,
                "--out", tmp_path / "out", *extra]) is None
    assert load_npz(tmp_path / "out")["images"].shape == (2, SIZE, SIZE, 1)


def test_interpolate(ckpt, tmp_path):
    assert run(["--checkpoint", ckpt, "--task", "interpolate", "--num-samples", 3,
                "--batch-size", 2, "--out", tmp_path]) is None
    frames = load_npz(tmp_path)["images"]
    assert frames.shape == (3, SIZE, SIZE, 1)


def one_line_error(capsys, exit) -> str:
    err = capsys.readouterr().err.strip()
    assert exit is not None and exit.code == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("python -m cmkernels.sample: error: "), err
    return err


def test_user_mistakes_give_messages_not_tracebacks(ckpt, tmp_path, capsys):
    exit = run(["--checkpoint", tmp_path / "nope.pt", "--out", tmp_path])
    assert "nope.pt" in one_line_error(capsys, exit)
    exit = run(["--checkpoint", ckpt, "--task", "stroke", "--image", tmp_path / "nope.png",
                "--out", tmp_path])
    assert "nope.png" in one_line_error(capsys, exit)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    exit = run(["--checkpoint", ckpt, "--task", "stroke", "--image", tmp_path / "bad.png",
                "--out", tmp_path])
    assert "bad.png" in one_line_error(capsys, exit)
    small = write_png(tmp_path / "small.png", np.zeros((SIZE // 2, SIZE // 2)))
    exit = run(["--checkpoint", ckpt, "--task", "inpaint", "--image", small, "--mask", small,
                "--out", tmp_path])
    err = one_line_error(capsys, exit)
    assert "small.png" in err and f"{SIZE}x{SIZE}" in err
    exit = run(["--checkpoint", ckpt, "--task", "colorize", "--image", small, "--out", tmp_path])
    assert exit.code == 2 and "RGB model" in capsys.readouterr().err
    exit = run(["--checkpoint", ckpt, "--ts", "0,50", "--out", tmp_path])
    assert exit.code == 2 and "ts must lie" in capsys.readouterr().err
    exit = run(["--checkpoint", ckpt, "--task", "superres", "--factor", 3, "--image", small,
                "--out", tmp_path])
    assert exit.code == 2 and "does not divide" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Dead ends of issue 13: each gives one line and exit status 2, before any image is computed.


@pytest.mark.parametrize("extra, message", [
    (["--ts", ","], "comma-separated integers"),
    (["--ts", "-1,22"], "--flag=VALUE"),
    (["--ts=-1,22"], "ts must lie"),
    (["--sigmas", "nan,1"], "finite"),
    (["--sigmas", "inf,1"], "finite"),
    (["--steps", "40"], "--steps does nothing here"),
    (["--sigmas", "80,1", "--steps", "40"], "--steps does nothing here"),
    (["--weights", "0.5"], "no such weights"),
    (["--preset", "gray99"], "invalid choice"),
])
def test_dead_ends_are_one_line(ckpt, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(sample, "run_batch", _never)
    exit = run(["--checkpoint", ckpt, "--out", tmp_path / "out", *extra])
    assert message in one_line_error(capsys, exit)


def _never(*args, **kwargs):
    raise AssertionError("the sampler ran though the command was refused")


def test_weights_takes_an_ema_rate(core, tmp_path, capsys):
    unet, checkpoint = core
    path = save_tiny(core, tmp_path / "ema.pt")
    state = checkpoint.load_file(path)
    shifted = {k: v + 0.5 if v.is_floating_point() else v for k, v in state["model"].items()}
    state["emas"] = {"0.9999": shifted}
    checkpoint.save_checkpoint(state, path)
    for weights, out in [("model", "m"), ("ema", "e"), ("0.9999", "r")]:
        assert run(["--checkpoint", path, "--weights", weights, "--num-samples", 1,
                    "--out", tmp_path / out]) is None
    m, e, r = (load_npz(tmp_path / o)["images"] for o in "mer")
    assert np.array_equal(e, r) and not np.array_equal(m, r)
    capsys.readouterr()
    exit = run(["--checkpoint", path, "--weights", "0.999", "--out", tmp_path])
    assert "'0.9999'" in one_line_error(capsys, exit)


def test_plain_state_dict_names_a_preset_that_sample_accepts(core, ckpt, tmp_path, capsys):
    _, checkpoint = core
    plain = checkpoint.save_atomic(checkpoint.load_file(ckpt)["model"], tmp_path / "plain.pt")
    exit = run(["--checkpoint", plain, "--out", tmp_path])
    err = one_line_error(capsys, exit)
    preset = err.split("--preset ")[-1].split()[0].strip(",;)")
    exit = run(["--checkpoint", plain, "--preset", preset, "--out", tmp_path])
    err = one_line_error(capsys, exit)  # a layout error now, not an "invalid choice"
    assert "invalid choice" not in err and "does not fit" in err


def test_unwritable_out_fails_before_sampling(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "run_batch", _never)
    (tmp_path / "file").write_text("")
    exit = run(["--checkpoint", ckpt, "--out", tmp_path / "file" / "out"])
    assert "--out" in one_line_error(capsys, exit)


def test_out_is_created_only_when_images_are_written(ckpt, tmp_path, capsys):
    out = tmp_path / "new" / "out"
    exit = run(["--checkpoint", tmp_path / "nope.pt", "--out", out])
    assert "nope.pt" in one_line_error(capsys, exit)
    assert not (tmp_path / "new").exists()
    assert run(["--checkpoint", ckpt, "--num-samples", 1, "--out", out]) is None
    assert (out / "samples.npz").exists()


def test_outputs_are_written_atomically(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run(["--checkpoint", ckpt, "--num-samples", 2, "--out", out]) is None
    before = (out / "samples.npz").read_bytes()

    def torn(file, **arrays):
        file.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", torn)
    exit = run(["--checkpoint", ckpt, "--num-samples", 3, "--out", out])
    assert exit.code == 2
    assert (out / "samples.npz").read_bytes() == before  # the old file, whole
    assert sorted(p.name for p in out.iterdir()) == ["samples.npz", "samples.png"]
