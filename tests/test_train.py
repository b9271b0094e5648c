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
    return train.parse_args(["--out", str(tmp_path), *TINY, *args])


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
            trainer._on_sigint(None, None)  # what Ctrl-C does
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
    with pytest.raises(train.TrainingError, match="--ckpt-every must be >= 0"):
        train.Trainer(_cfg(out, "--mode", "ct", "--ckpt-every", "-1"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = train.Trainer(_cfg(tmp_path, "--mode", "ct", "--steps", "5", "--ckpt-every", "1"))
    real = trainer.loss_fn

    class Poisoned:
        def draw(self, *a):
            return real.draw(*a)

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


def test_cli_errors_are_clear(tmp_path, capsys):
    assert train.main(["--mode", "cd", "--data", "twemoji", "--out", str(tmp_path), *TINY]) == 2
    assert "--teacher" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--mode", "xyz"])
    with pytest.raises(SystemExit):
        train.parse_args(["--mode", "cd", "--ict"])


def test_ddp_gloo_two_processes_match_one(tmp_path):
    args = ["--mode", "ct", "--steps", "2", "--dropout", "0", "--batch-size", "4",
            "--model-channels", "32", "--eval-samples", "0", "--sample-every", "1000",
            "--no-progress", "--warmup", "1"]  # fmt: skip
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
    a = load_file(tmp_path / "one" / "last.pt")["model"]
    b = load_file(tmp_path / "two" / "last.pt")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


@requires_cuda
def test_gpu_cd_run_on_the_fused_kernels(tmp_path):
    # The trainer's CUDA defaults (bf16 autocast, channels_last, the fused ops) for a few CD
    # steps on random 32x32 images (an .npz: no dataset package needed), then a checkpoint that
    # the sampler's loader reads.
    import numpy as np

    data = tmp_path / "images.npz"
    np.savez(data, images=np.random.default_rng(0).integers(0, 256, (16, 32, 32), dtype=np.uint8))
    teacher_trainer = train.Trainer(
        _cfg(tmp_path / "teacher", "--mode", "edm", "--steps", "2", "--data", str(data))
    )
    assert teacher_trainer.device.type == "cuda"
    teacher_trainer.run()
    cfg = _cfg(tmp_path / "cd", "--mode", "cd", "--steps", "3", "--data", str(data),
               "--teacher", str(tmp_path / "teacher" / "last.pt"))  # fmt: skip
    trainer = train.Trainer(cfg)
    assert trainer.bf16
    trainer.run()
    losses = [json.loads(line).get("loss") for line in (tmp_path / "cd" / "log.jsonl").open()]
    assert any(v is not None for v in losses)
    assert all(math.isfinite(v) for v in losses if v is not None)
    ckpt = load_file(tmp_path / "cd" / "last.pt")
    assert ckpt["denoiser"]["parameterization"] == "cm"
