"""The trainer: losses against hand computations, exact resume, NaN stop, interruption, and a
2-process gloo DDP run matching one process."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_cuda

from cmkernels import train
from cmkernels.checkpoint import load_file, save_atomic
from cmkernels.losses import (
    ConsistencyLoss,
    ct_num_scales,
    ct_target_ema,
    ict_index_probs,
    ict_num_scales,
    l2_distance,
    pseudo_huber_distance,
)

TINY = ["--model-channels", "32", "--batch-size", "4", "--eval-samples", "0", "--sample-every",
        "1000", "--no-progress", "--warmup", "2"]  # fmt: skip


def _cfg(tmp_path, *args):
    return train.parse_args(["--out", str(tmp_path), *TINY, *(str(a) for a in args)])


def _no_samples(trainer):
    """Skip the sample grids (most of a tiny run's time) where a test is not about them."""
    trainer.write_samples = lambda tag: None
    return trainer


def _tiny_teacher(tmp_path) -> Path:
    """A randomly initialised EDM checkpoint for the 1x32x32 data (CD needs a teacher)."""
    cfg = _cfg(tmp_path / "teacher", "--mode", "edm", "--steps", "1")
    trainer = train.Trainer(cfg)
    path = tmp_path / "teacher.pt"
    save_atomic(trainer.state(), path)
    return path


def test_cd_target_is_one_hand_computed_heun_step():
    torch.manual_seed(0)
    B = 3
    x = torch.randn(B, 1, 4, 4)
    z = torch.randn_like(x)
    teacher = lambda x, s, y=None: 0.5 * x / (1 + s.view(-1, 1, 1, 1))  # any smooth denoiser
    seen = {}

    def target(x, s, y=None):
        seen["x_hat"], seen["t2"] = x.clone(), s.clone()
        return torch.tanh(x)

    model = lambda x, s, y=None: torch.sin(x)
    loss = ConsistencyLoss(distance="l2")
    draws = loss.draw(B, torch.Generator().manual_seed(1), 18)
    per_sample, _ = loss(model, target, x, z, draws, teacher=teacher)
    t, t2 = draws["t"].view(-1, 1, 1, 1), draws["t2"].view(-1, 1, 1, 1)
    # The Heun step, written out.
    x_t = x + t * z
    d = (x_t - teacher(x_t, t.flatten())) / t
    x_e = x_t + (t2 - t) * d
    d2 = (x_e - teacher(x_e, t2.flatten())) / t2
    x_hat = x_t + (t2 - t) * (d + d2) / 2
    torch.testing.assert_close(seen["x_hat"], x_hat, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["t2"], draws["t2"])
    torch.testing.assert_close(per_sample, l2_distance(torch.sin(x_t), torch.tanh(x_hat)))
    assert (draws["t"] > draws["t2"]).all()


def test_ct_target_uses_the_same_noise():
    x = torch.randn(2, 1, 4, 4)
    z = torch.randn_like(x)
    seen = {}
    loss = ConsistencyLoss()
    draws = loss.draw(2, torch.Generator().manual_seed(3), 10)
    loss(lambda a, s, y=None: a, lambda a, s, y=None: seen.setdefault("x", a), x, z, draws)
    torch.testing.assert_close(seen["x"], x + draws["t2"].view(-1, 1, 1, 1) * z)


def test_schedules_and_distances():
    assert ct_num_scales(0, 100, 2, 150) == 2
    assert ct_num_scales(100, 100, 2, 150) == 151
    assert abs(ct_target_ema(2, 2, 0.9) - 0.9) < 1e-12
    assert ict_num_scales(0, 1000) == 11 and ict_num_scales(999, 1000) == 1281
    probs = ict_index_probs(torch.linspace(80, 0.002, 50))
    assert probs.shape == (49,) and abs(probs.sum().item() - 1) < 1e-5
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    c = 0.00054 * (48**0.5)
    torch.testing.assert_close(
        pseudo_huber_distance(a, b), torch.full((2,), (48 + c * c) ** 0.5 - c)
    )


def _stop_after(trainer, n):
    """Make the trainer behave as if Ctrl-C came after step n."""
    step = trainer.train_step

    def stepping():
        out = step()
        if trainer.step == n:
            trainer.request_stop()  # what Ctrl-C does
        return out

    trainer.train_step = stepping
    return trainer


def test_resume_is_bit_identical(tmp_path):
    full = train.Trainer(_cfg(tmp_path / "full", "--mode", "ct", "--steps", "4"))
    full.run()
    half = _stop_after(train.Trainer(_cfg(tmp_path / "half", "--mode", "ct", "--steps", "4")), 2)
    assert half.run()["interrupted"]
    resumed = train.Trainer(_cfg(tmp_path / "half", "--mode", "ct", "--steps", "4", "--resume"))
    resumed.run()
    a = load_file(tmp_path / "full" / "last.pt")
    b = load_file(tmp_path / "half" / "last.pt")
    assert a["step"] == b["step"] == 4
    for key in ("model", "target"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    for rate in a["emas"]:
        for name in a["emas"][rate]:
            assert torch.equal(a["emas"][rate][name], b["emas"][rate][name])


def test_cd_runs_and_writes_artifacts(tmp_path):
    teacher = _tiny_teacher(tmp_path)
    cfg = _cfg(tmp_path / "cd", "--mode", "cd", "--steps", "3", "--teacher", str(teacher),
               "--sample-every", "2", "--eval-samples", "32")  # fmt: skip
    metrics = train.Trainer(cfg).run()
    out = tmp_path / "cd"
    assert (out / "last.pt").exists() and (out / "config.json").exists()
    assert (out / "samples_one-step_final.png").exists()
    assert (out / "samples_two-step_final.png").exists()
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("loss" in rec for rec in lines)
    assert set(metrics["frechet"]) == {"one", "two"}
    ckpt = load_file(out / "last.pt")
    assert ckpt["format"] == "cmkernels" and ckpt["denoiser"]["parameterization"] == "cm"


def test_zero_intervals_write_only_at_the_end(tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(out, "--mode", "ct", "--steps", "2", "--log-every", "0", "--sample-every", "0",
               "--ckpt-every", "0")  # fmt: skip
    train.Trainer(cfg).run()
    assert (out / "last.pt").exists() and (out / "samples_one-step_final.png").exists()
    assert not list(out.glob("samples_*0000*.png"))
    lines = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if '"loss"' in x] == [2]
    with pytest.raises(SystemExit):  # the command line refuses it
        _cfg(out, "--mode", "ct", "--ckpt-every", "-1")
    with pytest.raises(train.TrainingError, match="--ckpt-every must be >= 0"):
        train.Trainer(train.TrainConfig(mode="ct", ckpt_every=-1, out=str(out)))


@pytest.mark.parametrize("extra", [[], ["--continuous", "--adaptive-weight"],
                                   ["--continuous", "--trigflow", "--tangent-norm", "0.1"]],
                         ids=["discrete", "continuous", "trigflow"])  # fmt: skip
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, extra):
    trainer = train.Trainer(
        _cfg(tmp_path, "--mode", "ct", "--steps", "5", "--ckpt-every", "1", *extra)
    )
    real = trainer.loss_fn

    class Poisoned:
        def draw(self, *a, **k):
            return real.draw(*a, **k)

        def __call__(self, *a, **k):
            per_sample, aux = real(*a, **k)
            if trainer.step >= 2:
                per_sample = per_sample * float("nan")
            return per_sample, aux

    trainer.loss_fn = Poisoned()
    with pytest.raises(train.TrainingError, match="nan at step 2"):
        trainer.run()
    assert load_file(tmp_path / "last.pt")["step"] == 2


def test_interrupt_saves_a_resumable_checkpoint(tmp_path):
    trainer = _stop_after(train.Trainer(_cfg(tmp_path, "--mode", "ct", "--steps", "50")), 2)
    result = trainer.run()
    assert result == {"interrupted": True, "step": 2}
    assert load_file(tmp_path / "last.pt")["step"] == 2


def _main_error(capsys, *argv) -> str:
    """The one line train.main prints for bad input (it must exit with status 2)."""
    with pytest.raises(SystemExit) as exit:
        train.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("python -m cmkernels.train: error: "), err
    return err


def test_cli_errors_are_clear(tmp_path, capsys):
    err = _main_error(capsys, "--mode", "cd", "--data", "twemoji", "--out", tmp_path, *TINY)
    assert "--teacher" in err
    with pytest.raises(SystemExit):
        train.parse_args(["--mode", "xyz"])
    with pytest.raises(SystemExit):
        train.parse_args(["--mode", "cd", "--ict"])


def _write_png(path, size):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), 128).save(path)


@pytest.mark.parametrize("case", ["preset", "lr_nan", "lr_negative", "batch_negative",
                                  "batch_zero", "ema_rates", "data_missing", "data_empty",
                                  "data_mixed", "data_corrupt", "resume_missing",
                                  "resume_corrupt", "teacher_missing", "teacher_empty",
                                  "init_from_missing"])  # fmt: skip
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, case):
    out = ["--out", tmp_path / "run"]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    folder = tmp_path / "images"
    folder.mkdir()
    expected, argv = {
        "preset": ("invalid choice", ["--preset", "gray64"]),
        "lr_nan": ("--lr must be a positive number", ["--lr", "nan"]),
        "lr_negative": ("--lr must be a positive number", ["--lr", "-1"]),
        "batch_negative": ("--batch-size must be a positive", ["--batch-size", "-4"]),
        "batch_zero": ("--batch-size must be a positive", ["--batch-size", "0"]),
        "ema_rates": ("--ema-rates must lie in [0, 1)", ["--ema-rates", "1.5"]),
        "data_missing": ("--data", ["--data", tmp_path / "nope"]),
        "data_empty": ("no images found", ["--data", folder]),
        "data_mixed": ("different sizes", ["--data", folder]),
        "data_corrupt": ("corrupt or unreadable image", ["--data", folder]),
        "resume_missing": ("--resume: no checkpoint", ["--resume", "--mode", "ct"]),
        "resume_corrupt": ("cannot read checkpoint", ["--resume", "--mode", "ct"]),
        "teacher_missing": ("not found", ["--teacher", tmp_path / "nope.pt"]),
        "teacher_empty": ("empty (0 bytes)", ["--teacher", tmp_path / "empty.pt"]),
        "init_from_missing": ("--init-from: checkpoint not found",
                              ["--mode", "ct", "--init-from", tmp_path / "nope.pt"]),
    }[case]  # fmt: skip
    if case == "data_mixed":
        _write_png(folder / "a.png", 32)
        _write_png(folder / "b.png", 28)
    if case == "data_corrupt":
        (folder / "a.png").write_bytes(b"not a png")
    if case == "resume_corrupt":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "last.pt").write_bytes(b"\x00" * 100)
    if case == "teacher_empty":
        (tmp_path / "empty.pt").write_bytes(b"")
    err = _main_error(capsys, *TINY, *out, *argv)
    assert expected in err


def test_every_flag_has_help_with_its_default():
    parser = train.build_parser()
    for action in parser._actions:
        if action.dest in ("help", "debug", "ci"):
            continue
        assert action.help and "default" in action.help, action.dest
    helps = {a.dest: a.help for a in parser._actions}
    assert "{edm,cd,ct}" in parser.format_usage() and "--mode edm: 0.001" in helps["lr"]
    assert train.TrainConfig().ckpt_every == 60  # the default run leaves periodic checkpoints


def test_fresh_run_does_not_replace_another_runs_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train.Trainer, "write_samples", lambda self, tag: None)
    run = ["--mode", "ct", "--steps", "1", "--out", str(tmp_path), *TINY]
    assert train.main(run) == 0
    capsys.readouterr()
    (tmp_path / "samples_one-step_000001.png").write_bytes(b"old")  # an old run's grid
    err = _main_error(capsys, "--mode", "ct", "--steps", "1", "--out", tmp_path, *TINY)
    assert "already holds a run: a checkpoint of step 1 of 1" in err
    assert "--resume" in err and "--overwrite" in err
    assert load_file(tmp_path / "last.pt")["config"]["steps"] == 1
    # --overwrite starts afresh: nothing of the old run is left to mix with the new one.
    assert train.main(["--mode", "ct", "--steps", "1", "--out", str(tmp_path), "--overwrite",
                       "--seed", "5", *TINY]) == 0  # fmt: skip
    assert load_file(tmp_path / "last.pt")["config"]["seed"] == 5
    steps = [json.loads(x).get("step") for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1]
    assert not (tmp_path / "samples_one-step_000001.png").exists()


def test_a_second_process_in_the_same_directory_stops_at_once(tmp_path):
    first = _no_samples(train.Trainer(_cfg(tmp_path, "--mode", "ct", "--steps", "1")))
    first.run_dir.lock()  # as a running trainer holds it
    try:
        second = _no_samples(train.Trainer(_cfg(tmp_path, "--mode", "ct", "--steps", "1")))
        with pytest.raises(train.TrainingError, match=r"in use by another training run \(pid"):
            second.run()
        assert not (tmp_path / "last.pt").exists()
    finally:
        first.run_dir.release()
    second.run()  # the lock ends with its owner
    assert load_file(tmp_path / "last.pt")["step"] == 1


def test_resume_names_each_changed_setting(tmp_path):
    _no_samples(train.Trainer(_cfg(tmp_path, "--mode", "ct", "--steps", "1"))).run()
    changed = _cfg(tmp_path, "--mode", "ct", "--steps", "2", "--resume", "--batch-size", "8",
                   "--lr", "3e-4")  # fmt: skip
    with pytest.raises(train.TrainingError) as err:
        train.Trainer(changed).run()
    msg = str(err.value)
    assert "--batch-size 8 (checkpoint: 4)" in msg and "--lr 0.0003 (checkpoint: 0.0002)" in msg
    assert "--steps" not in msg  # may be raised to train on
    with pytest.raises(train.TrainingError, match=r"--mode edm \(checkpoint: ct\)"):
        train.Trainer(_cfg(tmp_path, "--mode", "edm", "--resume")).run()
    wider = _cfg(tmp_path, "--mode", "ct", "--resume", "--model-channels", "64")
    with pytest.raises(train.TrainingError, match=r"^[^\n]*--model-channels 64 \(checkpoint: 32\)"):
        train.Trainer(wider).run()


def test_init_from_another_architecture_is_one_sentence(tmp_path):
    rgb = train.Trainer(_cfg(tmp_path / "rgb", "--mode", "ct", "--steps", "1", "--data",
                             _rgb_npz(tmp_path)))  # fmt: skip
    save_atomic(rgb.state(), tmp_path / "rgb.pt")
    with pytest.raises(train.TrainingError) as err:
        train.Trainer(_cfg(tmp_path / "gray", "--mode", "ct", "--init-from", tmp_path / "rgb.pt"))
    msg = str(err.value)
    assert "\n" not in msg and "in_channels 1 (checkpoint: 3)" in msg and len(msg) < 400


def _rgb_npz(tmp_path) -> Path:
    import numpy as np

    path = tmp_path / "rgb.npz"
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    return path


def test_class_conditional_run_samples_and_resumes(tmp_path):
    # The evaluation samples of the first run, the grids of the resumed one.
    cfg = _cfg(tmp_path, "--mode", "ct", "--steps", "1", "--class-cond", "--eval-samples", "16")
    assert "frechet" in _no_samples(train.Trainer(cfg)).run()
    resumed = _cfg(tmp_path, "--mode", "ct", "--steps", "2", "--class-cond", "--resume",
                   "--eval-samples", "0")  # fmt: skip
    assert train.Trainer(resumed).run()["step"] == 2
    assert (tmp_path / "samples_one-step_final.png").exists()


def test_corrupt_checkpoint_is_refused_and_old_ones_resume(tmp_path):
    _no_samples(train.Trainer(_cfg(tmp_path, "--mode", "ct", "--steps", "1"))).run()
    last = tmp_path / "last.pt"
    state = load_file(last)
    tensor = state["model"]["input_blocks.0.0.bias"]  # 32 random values
    raw = bytearray(last.read_bytes())
    at = raw.find(tensor.numpy().tobytes())  # the tensor's bytes inside the zip
    assert at > 0
    raw[at + 32:at + 96] = bytes(64)  # 64 bytes overwritten in the middle of the file
    last.write_bytes(bytes(raw))
    with pytest.raises(train.TrainingError, match="is corrupt: its contents do not match"):
        train.Trainer(_cfg(tmp_path, "--mode", "ct", "--steps", "2", "--resume")).run()
    # A checkpoint written before checksums existed still resumes.
    assert "checksum" not in state  # (load_file verifies and removes it)
    torch.save(state, last)
    resumed = _no_samples(train.Trainer(_cfg(tmp_path, "--mode", "ct", "--steps", "2", "--resume")))
    assert resumed.run()["step"] == 2


def test_ctrl_c_during_the_save_cannot_lose_the_checkpoint(tmp_path, capsys, monkeypatch):
    import signal

    from cmkernels import checkpoint

    real_save = torch.save

    def interrupted_save(obj, f):  # two real Ctrl-C while the file is written
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        real_save(obj, f)

    trainer = _stop_after(train.Trainer(_cfg(tmp_path, "--mode", "ct", "--steps", "50")), 1)
    monkeypatch.setattr(checkpoint.torch, "save", interrupted_save)
    assert trainer.run() == {"interrupted": True, "step": 1}
    assert load_file(tmp_path / "last.pt")["step"] == 1
    err = capsys.readouterr().err
    assert "Ctrl-C: finishing step 2, then saving a checkpoint" in err
    assert "stopping once it is on disk" in err
    assert not list(tmp_path.glob(".last.pt.*"))  # no temporary file left


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from cmkernels import checkpoint

    trainer = _no_samples(
        train.Trainer(_cfg(tmp_path, "--mode", "ct", "--steps", "2", "--ckpt-every", "1"))
    )
    real_save = torch.save

    def full_disk(obj, f):
        if trainer.step >= 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(train.TrainingError, match="No space left on device.*previous checkpoint"):
        trainer.run()
    assert load_file(tmp_path / "last.pt")["step"] == 1
    assert not list(tmp_path.glob(".last.pt.*"))


def test_dtype_flag_is_the_bf16_setting():
    assert train.parse_args(["--dtype", "bf16"]).bf16 is True
    assert train.parse_args(["--dtype", "fp32"]).bf16 is False
    assert train.parse_args(["--bf16"]).bf16 is True and train.parse_args([]).bf16 is None
    assert train.parse_args(["--dtype", "bf16", "--bf16"]).bf16 is True
    with pytest.raises(SystemExit):
        train.parse_args(["--dtype", "fp32", "--bf16"])


def test_schedules_follow_the_mode():
    cd = train.loop.build_schedule(train.parse_args(["--mode", "cd", "--num-scales", "12"]))
    assert cd.scales_at(0) == cd.scales_at(10**6) == 12 and cd.target_rate(12) == 0.95
    ct = train.loop.build_schedule(train.parse_args(["--mode", "ct", "--steps", "100"]))
    assert ct.scales_at(0) == ct_num_scales(0, 100, 2, 150) == 2
    assert ct.scales_at(100) == 151
    assert ct.target_rate(2) == pytest.approx(ct_target_ema(2, 2, 0.9), rel=1e-15)
    ict = train.loop.build_schedule(train.parse_args(["--mode", "ct", "--ict", "--steps", "999"]))
    assert ict.scales_at(998) == ict_num_scales(998, 999) and ict.target_rate(11) == 0.0


def test_ddp_ranks_agree_on_the_stop(monkeypatch):
    # Another rank got the Ctrl-C: this one must stop after the same step.
    trainer = object.__new__(train.Trainer)
    trainer.dist, trainer.device, trainer.stop_requested = train.Dist(0, 2, 0), "cpu", False
    seen = {}

    def all_reduce(tensor, op):
        seen["op"] = op
        tensor.fill_(1.0)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    assert trainer.stop_agreed() is True and seen["op"] == torch.distributed.ReduceOp.MAX
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, op: None)
    assert trainer.stop_agreed() is False


@pytest.mark.parametrize("extra", [[], ["--continuous", "--adaptive-weight"]],
                         ids=["discrete", "continuous"])
def test_ddp_gloo_two_processes_match_one(tmp_path, extra):
    args = ["--mode", "ct", "--steps", "2", "--dropout", "0", "--batch-size", "4",
            "--model-channels", "32", "--eval-samples", "0", "--sample-every", "1000",
            "--no-progress", "--warmup", "1", *extra]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "cmkernels.train", *args, "--out", str(tmp_path / "one")]
    one = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", "29533", "-m", "cmkernels.train", *args,
         "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    # Continuous time: the per-rank JVPs sum in another order, and Adam's first steps divide each
    # element's gradient by its own size, so elements whose gradient is near rounding level
    # (zero-initialised layers) move by a fraction of lr (2e-4) differently: atol 5e-5, a quarter
    # of one step (a wrong split of the batch moves them by whole steps).
    atol = 5e-5 if extra else 1e-6
    for key in ("model", "weighting") if extra else ("model",):
        a = load_file(tmp_path / "one" / "last.pt")[key]
        b = load_file(tmp_path / "two" / "last.pt")[key]
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=atol, msg=name)


@requires_cuda
@pytest.mark.parametrize("extra", [[], ["--continuous"],
                                   ["--continuous", "--trigflow", "--tangent-norm", "0.1",
                                    "--adaptive-weight", "--tangent-warmup", "2"]],
                         ids=["discrete", "continuous", "trigflow"])  # fmt: skip
def test_gpu_cd_run_on_the_fused_kernels(tmp_path, extra):
    # The trainer's CUDA defaults (bf16 autocast, channels_last, the fused ops; in continuous
    # time the fused JVP kernels) for a few CD steps on random 32x32 images (an .npz: no dataset
    # package needed), then a checkpoint that the sampler's loader reads.
    import numpy as np

    data = tmp_path / "images.npz"
    np.savez(data, images=np.random.default_rng(0).integers(0, 256, (16, 32, 32), dtype=np.uint8))
    teacher_trainer = train.Trainer(
        _cfg(tmp_path / "teacher", "--mode", "edm", "--steps", "2", "--data", str(data))
    )
    assert teacher_trainer.device.type == "cuda"
    teacher_trainer.run()
    cfg = _cfg(tmp_path / "cd", "--mode", "cd", "--steps", "3", "--data", str(data),
               "--teacher", str(tmp_path / "teacher" / "last.pt"), *extra)  # fmt: skip
    trainer = train.Trainer(cfg)
    assert trainer.bf16
    trainer.run()
    losses = [json.loads(line).get("loss") for line in (tmp_path / "cd" / "log.jsonl").open()]
    assert any(v is not None for v in losses)
    assert all(math.isfinite(v) for v in losses if v is not None)
    ckpt = load_file(tmp_path / "cd" / "last.pt")
    want = "trigflow" if "--trigflow" in extra else "cm"
    assert ckpt["denoiser"]["parameterization"] == want
    assert ckpt["config"]["continuous"] == ("--continuous" in extra)
