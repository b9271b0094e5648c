"""The training loop: one Trainer for every mode (EDM teacher, CD, CT / iCT, and CD / CT in
continuous time).

Trainer(cfg) builds the run (data, model, teacher, optimizer, target network, EMAs, loss);
train_step() is one optimiser step; run() is the loop with logging, checkpoints, samples, the
final evaluation and Ctrl-C handling. Every random draw of step k comes from generators seeded by
(seed, k), and the per-sample draws are made for the global batch and sliced per rank, so a
resumed run repeats an uninterrupted one exactly and a data-parallel run matches one process with
the same global batch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

from cmkernels import ops
from cmkernels.checkpoint import (
    CheckpointError,
    check_training_checkpoint,
    config_differences,
    describe_mismatch,
    load_denoiser,
    load_file,
    make_checkpoint,
    save_checkpoint,
    select_weights,
    write_text_atomic,
)
from cmkernels.data import load_dataset
from cmkernels.diffusion import Denoiser
from cmkernels.losses import (
    AdaptiveWeight,
    ConsistencyLoss,
    ConsistencySchedule,
    ContinuousConsistencyLoss,
    EDMLoss,
    ema_warmup_rates,
    warmup_lr,
)
from cmkernels.train import evaluation
from cmkernels.train.config import TrainConfig, TrainingError, check_config, resume_differences
from cmkernels.train.distributed import local_rank, pick_device, setup_distributed
from cmkernels.train.rundir import RunDirectory
from cmkernels.unet import UNet, get_preset

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_TEACHER = ASSETS / "teacher_mnist_edm.pt"


def default_out(cfg: TrainConfig) -> Path:
    return Path(cfg.out or f"runs/{cfg.mode}-{Path(cfg.data).name}")


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The generator of all per-sample draws of (step, micro-batch), a pure function of both."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 131 + micro)


def build_model(cfg: TrainConfig, channels: int, image_size: int, num_classes: int | None):
    overrides = dict(in_channels=channels, out_channels=channels, image_size=image_size)
    if cfg.model_channels:
        overrides["model_channels"] = cfg.model_channels
    if cfg.dropout is not None:
        overrides["dropout"] = cfg.dropout
    overrides["num_classes"] = num_classes if cfg.class_cond else None
    overrides["ops"] = cfg.ops
    net = UNet(get_preset(cfg.preset, **overrides))
    kind = "edm" if cfg.mode == "edm" else "trigflow" if cfg.continuous and cfg.trigflow else "cm"
    return Denoiser(net, parameterization=kind)


def build_loss(cfg: TrainConfig, device: torch.device, weighting: nn.Module | None = None):
    """The objective of cfg's mode; `weighting` is the learned AdaptiveWeight of
    --adaptive-weight."""
    if cfg.mode == "edm":
        return EDMLoss()
    if cfg.continuous:
        return ContinuousConsistencyLoss(tangent_norm=cfg.tangent_norm,
                                         tangent_norm_scale=cfg.tangent_norm_scale,
                                         tangent_warmup=cfg.tangent_warmup,
                                         adaptive=weighting,
                                         target_is_model=cfg.target_ema == 0,
                                         trigflow=cfg.trigflow, p_mean=cfg.p_mean,
                                         p_std=cfg.p_std)  # fmt: skip
    ict = cfg.mode == "ct" and cfg.ict
    distance = cfg.distance
    if distance == "lpips":
        from cmkernels.lpips import LPIPS, LPIPSError

        try:
            distance = LPIPS.from_files(cfg.lpips_vgg, cfg.lpips_lin).to(device)
        except LPIPSError as exc:
            raise TrainingError(str(exc)) from None
    return ConsistencyLoss(distance=distance, weighting="ict" if ict else "uniform",
                           sampling="lognormal" if ict else "uniform")  # fmt: skip


def build_schedule(cfg: TrainConfig) -> ConsistencySchedule:
    kind = {"ct": "ict" if cfg.ict else "ct"}.get(cfg.mode, "cd")  # (EDM draws no grid points)
    if cfg.continuous:
        kind = "continuous"
    return ConsistencySchedule(kind, cfg.steps, cfg.num_scales, cfg.target_ema, cfg.ct_s0,
                               cfg.ct_s1, cfg.ct_mu0)  # fmt: skip


def _due(step: int, every: int) -> bool:
    """True every `every` steps; never for 0 (the end of the run writes everything anyway)."""
    return every > 0 and step % every == 0


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        check_config(cfg)
        self.device = pick_device(cfg.device, local_rank())
        self.dist = setup_distributed(self.device)
        if cfg.batch_size % (self.dist.world * cfg.accum):
            raise TrainingError(
                f"--batch-size {cfg.batch_size} must be divisible by world size x --accum "
                f"({self.dist.world} x {cfg.accum})"
            )
        self.out = default_out(cfg)
        self.bf16 = self.device.type == "cuda" if cfg.bf16 is None else cfg.bf16
        self.channels_last = True if cfg.channels_last is None else cfg.channels_last

        torch.manual_seed(cfg.seed)
        self._load_data()
        _, C, H, W = self.images.shape
        self.model = build_model(cfg, C, H, self.data.num_classes).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.teacher = self._load_teacher(C, H) if cfg.mode == "cd" else None
        if cfg.init_from:
            self._init_from(cfg.init_from)
        elif self.teacher is not None and cfg.init_from_teacher:
            try:
                self.model.net.load_state_dict(self.teacher.net.state_dict())
            except RuntimeError as exc:
                raise TrainingError(
                    "the student differs from the teacher's architecture, so it cannot start from "
                    "the teacher's weights; use the teacher's preset or --no-init-from-teacher"
                ) from exc
        self.params = list(self.model.parameters())
        # --adaptive-weight: sCM's learned log-variance w(t), trained with the model.
        self.weighting = AdaptiveWeight().to(self.device) if cfg.adaptive_weight else None
        extra = list(self.weighting.parameters()) if self.weighting is not None else []
        self.opt = torch.optim.Adam(self.params + extra, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        # The target network f^- (CD/CT; updated with rate mu(k)) and the fp32 evaluation EMAs.
        self.target = None
        if cfg.mode in ("cd", "ct"):
            self.target = copy.deepcopy(self.model).requires_grad_(False)
        self.ema = ops.EMA(self.model.net, cfg.ema_rates)
        self.schedule = build_schedule(cfg)
        self.loss_fn = build_loss(cfg, self.device, self.weighting)
        self.forward = self.model
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:
            self.forward = torch.compile(self.forward)
        self.step = 0
        self.stop_requested = False  # set by Ctrl-C (on this rank)
        self._saving = False  # a checkpoint is being written: Ctrl-C must not break it
        self.run_dir = RunDirectory(self.out)

    # -- set-up ----------------------------------------------------------------------------------

    def _load_data(self):
        cfg = self.cfg
        try:
            self.data = load_dataset(cfg.data, split="train", image_size=cfg.image_size)
        except (OSError, ValueError, ImportError, RuntimeError) as exc:
            raise TrainingError(f"--data {cfg.data}: {exc}") from exc
        if len(self.data) == 0:
            raise TrainingError(f"--data {cfg.data}: no images")
        if cfg.class_cond and self.data.labels is None:
            raise TrainingError(f"--class-cond: the dataset {cfg.data!r} has no labels")
        images = self.data.images.to(self.device)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.images = images
        self.labels = self.data.labels.to(self.device) if self.data.labels is not None else None

    def _load_teacher(self, channels: int, size: int) -> Denoiser:
        path = self.cfg.teacher
        if path is None:
            if self.cfg.data != "mnist":
                raise TrainingError(
                    "--mode cd needs --teacher PATH (an EDM checkpoint trained on this data, e.g. "
                    f"`python -m cmkernels.train --mode edm --data {self.cfg.data}`); the shipped "
                    "teacher covers only the default mnist data"
                )
            path = DEFAULT_TEACHER
        if not Path(path).exists():
            raise TrainingError(
                f"teacher checkpoint {path} not found; train one with "
                f"`python -m cmkernels.train --mode edm --data {self.cfg.data}`"
            )
        try:
            teacher = load_denoiser(path, weights="ema", device=self.device)
        except (CheckpointError, OSError) as exc:
            raise TrainingError(f"--teacher: {exc}") from exc
        if teacher.parameterization != "edm":
            raise TrainingError(f"the teacher {path} is not an EDM (diffusion) model")
        tc = teacher.net.config
        if (tc.in_channels, tc.image_size) != (channels, size):
            raise TrainingError(
                f"the teacher {path} models {tc.in_channels}x{tc.image_size}x{tc.image_size} "
                f"images but the data are {channels}x{size}x{size}"
            )
        teacher.net.set_ops(self.cfg.ops)
        teacher.requires_grad_(False).eval()
        if self.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        return teacher

    def _init_from(self, path: str):
        try:
            ckpt = load_file(path)
            state = select_weights(ckpt, "ema", path)
        except CheckpointError as exc:
            raise TrainingError(f"--init-from: {exc}") from exc
        self._load_weights(state, ckpt, f"--init-from {path}")

    def _load_weights(self, state: dict, ckpt: dict, what: str):
        """Load a UNet state_dict into the model; a mismatch is one sentence, naming the
        architecture settings that differ when the checkpoint records them."""
        net = self.model.net
        diff = describe_mismatch(net.state_dict(), state)
        if not diff:
            net.load_state_dict(state, strict=True)
            return
        theirs = ckpt.get("unet_config")
        settings = config_differences(dataclasses.asdict(net.config), theirs) if theirs else []
        if settings:
            diff = "this run's UNet has " + ", ".join(settings)
        raise TrainingError(f"{what}: the weights do not fit this model: {diff}")

    # -- one optimisation step -------------------------------------------------------------------

    def train_step(self) -> dict:
        c, d = self.cfg, self.dist
        B = c.batch_size // c.accum  # global micro-batch
        local = B // d.world
        sl = slice(d.rank * local, (d.rank + 1) * local)
        num_scales = self.schedule.scales_at(self.step)
        lr = warmup_lr(c.lr, self.step, c.warmup)
        for group in self.opt.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(c.accum):
            gen = step_generator(c.seed, self.step, micro)
            idx = torch.randperm(len(self.images), generator=gen)[:B][sl].to(self.device)
            x = self.images[idx]
            labels = self.labels[idx] if (c.class_cond and self.labels is not None) else None
            noise = torch.randn((B,) + tuple(x.shape[1:]), generator=gen)[sl].to(self.device)
            if self.channels_last:
                noise = noise.contiguous(memory_format=torch.channels_last)
            draws = self.loss_fn.draw(B, gen, num_scales, step=self.step)
            draws = {k: v[sl] for k, v in draws.items()}
            torch.manual_seed((c.seed * 7919 + self.step) * 131 + micro + 1_000_000 * d.rank)
            sync = micro == c.accum - 1 or d.world == 1
            ctx = self.forward.no_sync() if not sync else contextlib.nullcontext()
            with ctx, torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                if c.mode == "edm":
                    per_sample, _ = self.loss_fn(self.forward, x, noise, draws, labels)
                else:
                    per_sample, _ = self.loss_fn(
                        self.forward, self.target, x, noise, draws, self.teacher, labels
                    )
                loss = per_sample.mean() / c.accum
            loss.backward()
            total += loss.detach()
        value = d.mean_(total).item()
        if not math.isfinite(value):
            raise TrainingError(
                f"the loss became {value} at step {self.step}; stopping without saving. The last "
                f"good checkpoint is {self.out / 'last.pt'} (if one was written). Try a lower --lr "
                "or --grad-clip."
            )
        if self.weighting is not None and d.world > 1:  # not a DDP module: average by hand
            for p in self.weighting.parameters():
                if p.grad is not None:
                    d.mean_(p.grad)
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        stats = {"loss": value, "lr": lr}
        with torch.no_grad():
            if self.target is not None:  # f^- <- mu f^- + (1 - mu) f, one fused multi-tensor op
                mu = self.schedule.target_rate(num_scales)
                targets = [p.data for p in self.target.parameters()]
                ops.ema_update_([p.detach() for p in self.params], [targets], [mu])
                stats.update(target_ema=mu)
                if not c.continuous:
                    stats.update(num_scales=num_scales)
            self.ema.update(rates=ema_warmup_rates(c.ema_rates, self.step, c.ema_warmup))
        self.step += 1
        return stats

    # -- state -----------------------------------------------------------------------------------

    def ema_state_dicts(self) -> dict:
        """{rate: the average as a UNet state_dict}: the checkpoint's "emas"."""
        return {str(r): self.ema.averaged_state_dict(k) for k, r in enumerate(self.ema.rates)}

    def state(self) -> dict:
        return make_checkpoint(
            self.model,
            self.ema_state_dicts(),
            target=self.target.net.state_dict() if self.target is not None else None,
            optimizer=self.opt.state_dict(),
            step=self.step,
            config=dataclasses.asdict(self.cfg),
            rng={"torch": torch.get_rng_state()},
            **({"weighting": self.weighting.state_dict()} if self.weighting is not None else {}),
        )

    def save(self, name: str = "last.pt") -> Path:
        """Write the checkpoint (with its checksum, verified on disk before it replaces the
        previous one). Ctrl-C while it is written waits for it."""
        path = self.out / name
        if self.dist.main:
            self._saving = True
            try:
                save_checkpoint(self.state(), path)
            except OSError as exc:
                kept = "the previous checkpoint there is intact" if path.exists() else (
                    "no earlier checkpoint exists")  # fmt: skip
                raise TrainingError(
                    f"cannot write the checkpoint {path} ({exc.strerror or exc}) at step "
                    f"{self.step}; {kept}"
                ) from exc
            finally:
                self._saving = False
        self.dist.barrier()
        return path

    def load(self, path: Path):
        try:
            ckpt = check_training_checkpoint(load_file(path), path)
        except CheckpointError as exc:
            raise TrainingError(f"--resume: {exc}") from exc
        if isinstance(ckpt.get("config"), dict):
            diffs = resume_differences(self.cfg, ckpt["config"])
            if diffs:
                raise TrainingError(
                    f"--resume: these settings differ from those {path} was trained with: "
                    f"{', '.join(diffs)}; give the checkpoint's settings to continue it exactly, "
                    "or start a new run with another --out"
                )
        self._load_weights(ckpt["model"], ckpt, f"--resume {path}")
        if self.target is not None:
            if ckpt.get("target") is None:
                raise TrainingError(f"{path} holds no target network (trained with another mode?)")
            self.target.net.load_state_dict(ckpt["target"])
        if self.weighting is not None:
            if ckpt.get("weighting") is None:
                raise TrainingError(f"{path} holds no adaptive weighting (--adaptive-weight)")
            self.weighting.load_state_dict(ckpt["weighting"])
        self.opt.load_state_dict(ckpt["optimizer"])
        rates = [str(r) for r in self.cfg.ema_rates]
        if sorted(ckpt["emas"]) != sorted(rates):
            raise TrainingError(f"{path} has EMAs {sorted(ckpt['emas'])}, this run wants {rates}")
        names = self.ema.names
        try:
            self.ema.load_state_dict({
                "rates": self.ema.rates, "names": names,
                "copies": [[ckpt["emas"][r][n] for n in names] for r in rates],
            })  # fmt: skip
        except (KeyError, ValueError) as exc:
            raise TrainingError(f"--resume {path}: its EMAs do not fit this model ({exc})") from exc
        self.step = int(ckpt["step"])
        torch.set_rng_state(ckpt["rng"]["torch"])

    def ema_model(self, k: int = 0) -> Denoiser:
        """A copy of the model holding the k-th evaluation EMA (for samples and evaluation)."""
        m = copy.deepcopy(self.model).eval()
        self.ema.copy_to(m.net, k)
        return m

    # -- samples and evaluation ------------------------------------------------------------------

    def _num_classes(self) -> int | None:
        return self.data.num_classes if self.cfg.class_cond else None

    def write_samples(self, tag: str):
        if self.dist.main:
            evaluation.write_grids(self.ema_model(), self.cfg.mode, tuple(self.images.shape[1:]),
                                   self.device, self.out, tag, self._num_classes())  # fmt: skip

    def evaluate(self) -> dict:
        real = load_dataset(self.cfg.data, split="test", image_size=self.cfg.image_size).images
        return evaluation.frechet_scores(self.ema_model(), self.cfg.mode, real,
                                         self.cfg.eval_samples, self.device,
                                         self._num_classes())  # fmt: skip

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> dict:
        try:
            self._claim_directory()
            return self._run()
        finally:
            self.run_dir.release()

    def _run(self) -> dict:
        c, main = self.cfg, self.dist.main
        if c.resume:
            last = self.out / "last.pt"
            if not last.exists():
                raise TrainingError(f"--resume: no checkpoint at {last} (start the run without "
                                    "--resume)")  # fmt: skip
            self.load(last)
        if main:
            write_text_atomic(self.out / "config.json", json.dumps(dataclasses.asdict(c), indent=2))
        log = open(self.out / "log.jsonl", "a" if c.resume else "w") if main else None
        bar = None
        if main and c.progress:
            from tqdm import tqdm

            bar = tqdm(total=c.steps, initial=self.step, desc=f"{c.mode}", dynamic_ncols=True)
        # Ctrl-C is ours until the last checkpoint is on disk.
        previous = signal.signal(signal.SIGINT, lambda signum, frame: self.request_stop())
        t_last, imgs = time.perf_counter(), 0
        stop = False
        try:
            while self.step < c.steps and not stop:
                stats = self.train_step()
                stop = self.stop_agreed()
                imgs += c.batch_size
                now = time.perf_counter()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{stats['loss']:.4f}", img_s=f"{imgs / (now - t_last):.0f}"
                    )
                if main and (_due(self.step, c.log_every) or self.step == c.steps):
                    rec = dict(step=self.step, **stats, img_per_s=imgs / (now - t_last))
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    t_last, imgs = now, 0
                if stop:
                    break
                if _due(self.step, c.ckpt_every) and self.step < c.steps:
                    self.save()
                if _due(self.step, c.sample_every) and self.step < c.steps:
                    self.write_samples(f"{self.step:06d}")
            if bar is not None:
                bar.close()
                bar = None
            path = self.save()
        except BaseException:
            if log is not None:
                log.close()
            raise
        finally:
            signal.signal(signal.SIGINT, previous)
            if bar is not None:
                bar.close()
        if stop:
            if log is not None:
                log.close()
            if main:
                print(f"interrupted at step {self.step}: saved {path}; continue with --resume",
                      file=sys.stderr)  # fmt: skip
            return {"interrupted": True, "step": self.step}
        self.write_samples("final")
        metrics = {"step": self.step}
        if c.eval_samples > 0 and main:
            metrics["frechet"] = self.evaluate()
            write_text_atomic(self.out / "metrics.json", json.dumps(metrics, indent=2))
            log.write(json.dumps({"final": metrics}) + "\n")
        if log:
            log.close()
        return metrics

    # -- Ctrl-C ----------------------------------------------------------------------------------

    def stop_agreed(self) -> bool:
        """Whether to stop after this step: one Ctrl-C on any rank stops every rank at the same
        step."""
        return self.dist.any(self.stop_requested, self.device)

    def request_stop(self):
        """What Ctrl-C does: finish the step, save and stop; while a checkpoint is written, wait
        for it; a second Ctrl-C stops at once without saving (KeyboardInterrupt)."""
        if self._saving:  # never break a checkpoint write: it ends on its own in a moment
            self.stop_requested = True
            print(f"\nCtrl-C: writing {self.out / 'last.pt'}; stopping once it is on disk",
                  file=sys.stderr, flush=True)  # fmt: skip
            return
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        if self.dist.main:
            print(f"\nCtrl-C: finishing step {self.step + 1}, then saving a checkpoint "
                  "(Ctrl-C again to stop at once without saving)", file=sys.stderr, flush=True)

    # -- the run directory -----------------------------------------------------------------------

    def _claim_directory(self):
        """Rank 0 makes --out this run's: takes its lock and refuses a fresh run over another
        run's checkpoint (every rank stops if rank 0 refuses)."""
        error = None
        if self.dist.main:
            try:
                self.run_dir.lock()
                self.run_dir.check_fresh_start(self.cfg)
            except TrainingError as exc:
                error = exc
        if self.dist.any(error is not None, self.device) and error is None:
            error = TrainingError(f"rank 0 cannot use {self.out} (its message says why)")
        if error is not None:
            raise error
