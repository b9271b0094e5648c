"""The trainer: EDM teacher, consistency distillation (CD) and consistency training (CT / iCT).

    python -m cmkernels.train --mode cd                 # distil the shipped MNIST teacher
    python -m cmkernels.train --mode edm --steps 20000  # train a teacher
    python -m cmkernels.train --mode ct --ict           # consistency training, iCT options
    torchrun --nproc_per_node 2 -m cmkernels.train ...  # data parallel (NCCL on GPU, gloo on CPU)

One loop for all modes. Every random draw of step k comes from generators seeded by (seed, k), and
the per-sample draws are made for the global batch and sliced per rank, so a resumed run repeats
an uninterrupted one exactly and a data-parallel run matches one process with the same global batch.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from cmkernels import cli, ops
from cmkernels.checkpoint import (
    CheckpointError,
    config_differences,
    describe_mismatch,
    load_denoiser,
    load_file,
    save_checkpoint,
    write_text_atomic,
)
from cmkernels.data import load_dataset
from cmkernels.diffusion import SIGMA_MAX, Denoiser, karras_sigmas
from cmkernels.losses import (
    ConsistencyLoss,
    EDMLoss,
    ct_num_scales,
    ct_target_ema,
    ict_num_scales,
)
from cmkernels.unet import PRESETS, UNet, get_preset

try:  # POSIX file locks (a run directory has one owner); without them runs are not locked
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

PROG = "python -m cmkernels.train"
ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_TEACHER = ASSETS / "teacher_mnist_edm.pt"
LOCK_NAME = ".lock"  # in the run directory: held (flock) by the process that trains there


class TrainingError(RuntimeError):
    """A failure to report to the user in one line (bad configuration, NaN loss, ...)."""


@dataclass
class TrainConfig:
    mode: str = "cd"  # edm | cd | ct
    data: str = "mnist"  # mnist | twemoji | a folder / .npz / CIFAR-10 batches folder
    image_size: int | None = None  # None: the dataset's own (mnist 32, twemoji 32)
    preset: str = "gray32"  # UNet preset; channels follow the data
    model_channels: int | None = None  # override the preset's width
    dropout: float | None = None  # override the preset's dropout
    class_cond: bool = False  # condition on the dataset's labels
    steps: int = 240  # optimiser steps (the default CD run: ~6.5 minutes on 2 CPU cores)
    batch_size: int = 32  # global batch (split across ranks)
    accum: int = 1  # gradient-accumulation micro-batches per step
    lr: float = 1e-4
    warmup: int = 20  # linear learning-rate warm-up steps
    grad_clip: float = 0.0  # max gradient norm (0: off)
    # Consistency models.
    num_scales: int = 18  # CD: N points of the Karras grid
    target_ema: float = (
        0.95  # CD: mu of the target network (paper: 0 on CIFAR-10, 0.95 on ImageNet)
    )
    distance: str = "l2"  # l2 | l1 | pseudo_huber | lpips (with the two weight files below)
    lpips_vgg: str | None = None  # LPIPS: local torchvision VGG-16 state_dict (nothing downloads)
    lpips_lin: str | None = None  # LPIPS: local linear-layer weights (lpips' weights/v0.1/vgg.pth)
    ct_s0: int = 2  # CT schedule N(k)
    ct_s1: int = 150
    ct_mu0: float = 0.9
    ict: bool = False  # iCT: pseudo-Huber, lognormal pairs, doubling curriculum, no target EMA
    teacher: str | None = None  # CD teacher checkpoint (default: the shipped MNIST teacher)
    init_from_teacher: bool = True  # CD: start the student from the teacher's weights (official)
    init_from: str | None = None  # start CT/CD from these weights (ECT-style); off by default
    ema_rates: tuple[float, ...] = (0.9999,)  # evaluation EMAs (with the warm-up below)
    ema_warmup: bool = True  # effective rate min(r, (1 + k) / (10 + k)) early in training
    # Run.
    seed: int = 0
    out: str | None = None  # default runs/<mode>-<data>
    log_every: int = 25  # these three: every K steps, 0 = only at the end
    sample_every: int = 500
    ckpt_every: int = 60
    eval_samples: int = 1000  # images for the final Frechet distance (0: skip)
    device: str = "auto"
    bf16: bool | None = None  # autocast to bf16 (default: on for CUDA)
    channels_last: bool | None = None  # default: on (faster convolutions on CUDA and on the CPU)
    compile: bool = False
    ops: str = "kernels"  # kernels | reference
    resume: bool = False
    overwrite: bool = False  # start afresh in an --out that holds another run's checkpoint
    progress: bool = True
    extra: dict = field(default_factory=dict)  # recorded verbatim (e.g. the command line)


# Settings that --resume may change: they do not alter the training trajectory.
RESUME_MAY_CHANGE = {"steps", "out", "resume", "overwrite", "progress", "log_every",
                     "sample_every", "ckpt_every", "eval_samples", "device", "compile", "extra"}


def _setting(name: str, value) -> str:
    """A setting as its flag: --batch-size 8, --class-cond / --no-class-cond, --teacher unset."""
    if isinstance(value, bool):
        return _flag(name) if value else "--no-" + name.replace("_", "-")
    return f"{_flag(name)} {'unset' if value is None else _show(value)}"


# Per-mode defaults, applied where the command line does not say otherwise.
MODE_DEFAULTS = {
    "edm": dict(lr=1e-3, steps=6000, batch_size=64, warmup=100, ema_rates=(0.999,)),
    "cd": dict(),
    "ct": dict(lr=2e-4),
}
ICT_DEFAULTS = dict(distance="pseudo_huber", target_ema=0.0, ct_s0=10, ct_s1=1280)
# A CI smoke run: a few steps of the same job.
CI_OVERRIDES = dict(steps=6, batch_size=8, log_every=2, sample_every=4, ckpt_every=3,
                    eval_samples=64)  # fmt: skip

# The choices of the settings that have a fixed set of values.
CHOICES = {
    "mode": ("edm", "cd", "ct"),
    "preset": tuple(PRESETS),
    "distance": ("l2", "l1", "pseudo_huber", "lpips"),
    "ops": ("kernels", "reference"),
}
# One line of help per setting (the flag's default and choices are added to it).
HELP = {
    "mode": "what to train: an EDM teacher (edm), consistency distillation (cd) or consistency "
            "training (ct)",
    "data": "mnist, twemoji, or a path: a folder of images (class = sub-folder), an .npz of uint8 "
            "images, a CIFAR-10 batches folder",
    "image_size": "resize the images to this size (default: the data's own; 32 for the "
                  "built-ins)",
    "preset": "UNet architecture; its channel count follows the data",
    "model_channels": "override the preset's base width",
    "dropout": "override the preset's dropout",
    "class_cond": "condition the model on the dataset's class labels",
    "steps": "optimiser steps (with --resume it may be raised to train on)",
    "batch_size": "global batch, split across the data-parallel ranks",
    "accum": "gradient-accumulation micro-batches per step",
    "lr": "Adam learning rate",
    "warmup": "linear learning-rate warm-up steps",
    "grad_clip": "maximum gradient norm (0: no clipping)",
    "num_scales": "CD: points N of the Karras grid",
    "target_ema": "CD: EMA rate mu of the target network",
    "distance": "consistency distance (lpips needs --lpips-vgg and --lpips-lin)",
    "lpips_vgg": "LPIPS: a local torchvision VGG-16 state_dict (vgg16-397923af.pth)",
    "lpips_lin": "LPIPS: the local linear-layer weights (weights/v0.1/vgg.pth of lpips)",
    "ct_s0": "CT: initial number of discretisation steps s0 of the N(k) schedule",
    "ct_s1": "CT: final number of discretisation steps s1 of the N(k) schedule",
    "ct_mu0": "CT: initial target EMA rate mu0",
    "ict": "CT: the iCT options (pseudo-Huber, lognormal pairs, doubling curriculum, no target "
           "EMA)",
    "teacher": "CD: the EDM teacher checkpoint (default: the shipped MNIST teacher, for "
               "--data mnist)",
    "init_from_teacher": "CD: start the student from the teacher's weights, as the official "
                         "code does",
    "init_from": "start CD/CT from the weights of this checkpoint (its first EMA, else its "
                 "model)",
    "ema_rates": "comma-separated rates of the evaluation EMAs",
    "ema_warmup": "effective EMA rate min(r, (1 + k) / (10 + k)) early in training",
    "seed": "seed of every random draw (step k's draws depend only on the seed and k)",
    "out": "run directory (default: runs/<mode>-<data>)",
    "log_every": "write a log line every N steps (0: only at the end)",
    "sample_every": "write sample grids every N steps (0: only at the end)",
    "ckpt_every": "write last.pt every N steps (0: only at the end)",
    "eval_samples": "images for the final Frechet distance (0: skip it)",
    "device": "auto (cuda when available, else cpu), cpu, cuda or cuda:N",
    "bf16": "autocast the network to bf16 (default: on for CUDA, off on the CPU)",
    "channels_last": "NHWC activations, faster convolutions on CUDA and on the CPU (default: "
                     "on)",
    "compile": "torch.compile the training forward",
    "ops": "the fused kernels or their pure-PyTorch references",
    "resume": "continue the run in --out from its last.pt, with the same settings",
    "overwrite": "start a fresh run in an --out that already holds a run's checkpoint, "
                 "replacing it and its log, samples and metrics",
    "progress": "show a progress bar",
}  # fmt: skip


def _help(name: str, default) -> str:
    """A flag's help: its line, then its default, with the per-mode defaults ("default: 1e-4;
    --mode edm: 0.001, --mode ct: 0.0002") and the --ci value."""
    text = HELP[name]
    if "(default" in text:
        return text
    shown = [_show(default)]
    shown += [f"--mode {mode}: {_show(d[name])}" for mode, d in MODE_DEFAULTS.items() if name in d]
    if name in ICT_DEFAULTS:
        shown.append(f"--ict: {_show(ICT_DEFAULTS[name])}")
    if name in CI_OVERRIDES:
        shown.append(f"--ci: {_show(CI_OVERRIDES[name])}")
    return f"{text} (default: {'; '.join(shown)})"


def _show(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot train (TrainingError naming the flag), before any work."""
    problems = []
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            problems.append(f"{_flag(name)} must be one of {', '.join(choices)}, not "
                            f"{getattr(cfg, name)!r}")  # fmt: skip
    positive = ["batch_size", "accum", "ct_s0", "ct_s1"]
    for name in positive + ["model_channels", "image_size"]:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            problems.append(f"{_flag(name)} must be a positive integer, got {value}")
    for name in ("steps", "warmup", "log_every", "sample_every", "ckpt_every", "eval_samples"):
        if getattr(cfg, name) < 0:
            problems.append(f"{_flag(name)} must be >= 0, got {getattr(cfg, name)}")
    if cfg.num_scales < 2:
        problems.append(f"--num-scales must be at least 2, got {cfg.num_scales}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        problems.append(f"--lr must be a positive number, got {cfg.lr}")
    if not (math.isfinite(cfg.grad_clip) and cfg.grad_clip >= 0):
        problems.append(f"--grad-clip must be >= 0 (0: off), got {cfg.grad_clip}")
    rates = {"target_ema": [cfg.target_ema], "ct_mu0": [cfg.ct_mu0], "ema_rates": cfg.ema_rates}
    for name, values in rates.items():
        if not values or not all(math.isfinite(v) and 0 <= v < 1 for v in values):
            problems.append(f"{_flag(name)} must lie in [0, 1), got {_show(values)}")
    if cfg.dropout is not None and not 0 <= cfg.dropout < 1:
        problems.append(f"--dropout must lie in [0, 1), got {cfg.dropout}")
    if len(set(cfg.ema_rates)) != len(cfg.ema_rates):
        problems.append(f"--ema-rates has a rate twice: {_show(cfg.ema_rates)}")
    if cfg.resume and cfg.overwrite:
        problems.append("--resume continues the run in --out; --overwrite replaces it: not both")
    if problems:
        raise TrainingError("; ".join(problems))


# ------------------------------------------------------------------------------------------------
# Distributed set-up.


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> Dist:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return d


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda was asked for but no CUDA device is available")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The generator of all per-sample draws of (step, micro-batch), a pure function of both."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 131 + micro)


# ------------------------------------------------------------------------------------------------
# Model, EMA and checkpoints.


def build_model(cfg: TrainConfig, channels: int, image_size: int, num_classes: int | None):
    overrides = dict(in_channels=channels, out_channels=channels, image_size=image_size)
    if cfg.model_channels:
        overrides["model_channels"] = cfg.model_channels
    if cfg.dropout is not None:
        overrides["dropout"] = cfg.dropout
    overrides["num_classes"] = num_classes if cfg.class_cond else None
    overrides["ops"] = cfg.ops
    net = UNet(get_preset(cfg.preset, **overrides))
    kind = "edm" if cfg.mode == "edm" else "cm"
    return Denoiser(net, parameterization=kind)


def denoiser_meta(den: Denoiser) -> dict:
    return dict(
        parameterization=den.parameterization,
        sigma_data=den.sigma_data,
        sigma_min=den.sigma_min,
        sigma_max=den.sigma_max,
        c_noise=den.c_noise_convention,
    )


def _due(step: int, every: int) -> bool:
    """True every `every` steps; never for 0 (the end of the run writes everything anyway)."""
    return every > 0 and step % every == 0


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        check_config(cfg)
        self.device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = setup_distributed(self.device)
        if cfg.batch_size % (self.dist.world * cfg.accum):
            raise TrainingError(
                f"--batch-size {cfg.batch_size} must be divisible by world size x --accum "
                f"({self.dist.world} x {cfg.accum})"
            )
        self.out = Path(cfg.out or f"runs/{cfg.mode}-{Path(cfg.data).name}")
        on_cuda = self.device.type == "cuda"
        self.bf16 = on_cuda if cfg.bf16 is None else cfg.bf16
        self.channels_last = True if cfg.channels_last is None else cfg.channels_last

        torch.manual_seed(cfg.seed)
        try:
            self.data = load_dataset(cfg.data, split="train", image_size=cfg.image_size)
        except (OSError, ValueError, ImportError, RuntimeError) as exc:
            raise TrainingError(f"--data {cfg.data}: {exc}") from exc
        if len(self.data) == 0:
            raise TrainingError(f"--data {cfg.data}: no images")
        images = self.data.images.to(self.device)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.images = images
        self.labels = self.data.labels.to(self.device) if self.data.labels is not None else None
        _, C, H, W = self.images.shape
        if cfg.class_cond and self.data.labels is None:
            raise TrainingError(f"--class-cond: the dataset {cfg.data!r} has no labels")

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
        self.params = [p for p in self.model.parameters()]
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)

        # Target network f^- (CD/CT) and the evaluation EMAs, all fp32, updated by one op call.
        self.target = None
        if cfg.mode in ("cd", "ct"):
            self.target = copy.deepcopy(self.model).requires_grad_(False)
        self.emas = [[p.detach().clone().float() for p in self.params] for _ in cfg.ema_rates]

        if cfg.mode == "edm":
            self.loss_fn = EDMLoss()
        else:
            ict = cfg.mode == "ct" and cfg.ict
            distance = cfg.distance
            if distance == "lpips":
                from cmkernels.lpips import LPIPS, LPIPSError

                try:
                    distance = LPIPS.from_files(cfg.lpips_vgg, cfg.lpips_lin).to(self.device)
                except LPIPSError as exc:
                    raise TrainingError(str(exc)) from None
            self.loss_fn = ConsistencyLoss(
                distance=distance,
                weighting="ict" if ict else "uniform",
                sampling="lognormal" if ict else "uniform",
            )
        self.forward = self.model
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:
            self.forward = torch.compile(self.forward)
        self.step = 0
        self.stop_requested = False  # set by Ctrl-C (on this rank)
        self._saving = False  # a checkpoint is being written: Ctrl-C must not break it
        self._lock = None  # the open lock file of the run directory (rank 0)

    # -- set-up helpers --------------------------------------------------------------------------

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
        except CheckpointError as exc:
            raise TrainingError(f"--init-from: {exc}") from exc
        state = (
            ckpt["emas"][next(iter(ckpt["emas"]))] if ckpt.get("emas") else ckpt.get("model", ckpt)
        )
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

    # -- schedules -------------------------------------------------------------------------------

    def num_scales(self) -> int:
        c = self.cfg
        if c.mode in ("cd", "edm"):  # (EDM draws no grid points)
            return c.num_scales
        if c.ict:
            return ict_num_scales(self.step, c.steps, c.ct_s0, c.ct_s1)
        return ct_num_scales(self.step, c.steps, c.ct_s0, c.ct_s1)

    def target_rate(self, num_scales: int) -> float:
        c = self.cfg
        if c.mode == "ct":
            return 0.0 if c.ict else ct_target_ema(num_scales, c.ct_s0, c.ct_mu0)
        return c.target_ema

    def ema_rates(self) -> list[float]:
        k = self.step
        if not self.cfg.ema_warmup:
            return list(self.cfg.ema_rates)
        return [min(r, (1 + k) / (10 + k)) for r in self.cfg.ema_rates]

    # -- one optimisation step -------------------------------------------------------------------

    def train_step(self) -> dict:
        c, d = self.cfg, self.dist
        B = c.batch_size // c.accum  # global micro-batch
        local = B // d.world
        sl = slice(d.rank * local, (d.rank + 1) * local)
        num_scales = self.num_scales()
        lr = c.lr * min(1.0, (self.step + 1) / max(c.warmup, 1))
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
            draws = {k: v[sl] for k, v in self.loss_fn.draw(B, gen, num_scales).items()}
            torch.manual_seed((c.seed * 7919 + self.step) * 131 + micro + 1_000_000 * d.rank)
            sync = micro == c.accum - 1 or d.world == 1
            ctx = self.forward.no_sync() if (not sync and d.world > 1) else contextlib.nullcontext()
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
        if d.world > 1:
            dist.all_reduce(total)
            total /= d.world
        value = total.item()
        if not math.isfinite(value):
            raise TrainingError(
                f"the loss became {value} at step {self.step}; stopping without saving. The last "
                f"good checkpoint is {self.out / 'last.pt'} (if one was written). Try a lower --lr "
                "or --grad-clip."
            )
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        # Target network and evaluation EMAs: one fused multi-tensor update.
        copies, rates = [], []
        if self.target is not None:
            copies.append([p.data for p in self.target.parameters()])
            rates.append(self.target_rate(num_scales))
        copies += self.emas
        rates += self.ema_rates()
        with torch.no_grad():
            ops.ema_update_([p.detach() for p in self.params], copies, rates)
        self.step += 1
        stats = {"loss": value, "lr": lr}
        if c.mode != "edm":
            stats.update(num_scales=num_scales, target_ema=rates[0])
        return stats

    # -- state -----------------------------------------------------------------------------------

    def ema_state_dicts(self) -> dict:
        names = [n for n, _ in self.model.net.named_parameters()]
        prefix_len = len("net.")
        full = dict(self.model.named_parameters())
        out = {}
        for rate, tensors in zip(self.cfg.ema_rates, self.emas):
            state = {n: t for n, t in zip([k[prefix_len:] for k in full], tensors)}
            assert list(state) == names
            out[str(rate)] = state
        return out

    def state(self) -> dict:
        net = self.model.net
        return {
            "format": "cmkernels",
            "version": 1,
            "unet_config": dataclasses.asdict(net.config),
            "denoiser": denoiser_meta(self.model),
            "model": net.state_dict(),
            "target": self.target.net.state_dict() if self.target is not None else None,
            "emas": self.ema_state_dicts(),
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "config": dataclasses.asdict(self.cfg),
            "rng": {"torch": torch.get_rng_state()},
        }

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
        if self.dist.world > 1:
            dist.barrier()
        return path

    def load(self, path: Path):
        try:
            ckpt = load_file(path)
        except CheckpointError as exc:
            raise TrainingError(f"--resume: {exc}") from exc
        for key in ("model", "optimizer", "step", "emas"):
            if key not in ckpt:
                raise TrainingError(f"{path} is not a training checkpoint (no {key!r})")
        if isinstance(ckpt.get("config"), dict):
            self._check_resume_config(ckpt["config"], path)
        self._load_weights(ckpt["model"], ckpt, f"--resume {path}")
        if self.target is not None:
            if ckpt.get("target") is None:
                raise TrainingError(f"{path} holds no target network (trained with another mode?)")
            self.target.net.load_state_dict(ckpt["target"])
        self.opt.load_state_dict(ckpt["optimizer"])
        rates = [str(r) for r in self.cfg.ema_rates]
        if sorted(ckpt["emas"]) != sorted(rates):
            raise TrainingError(f"{path} has EMAs {sorted(ckpt['emas'])}, this run wants {rates}")
        for rate, tensors in zip(rates, self.emas):
            for t, (_, v) in zip(tensors, ckpt["emas"][rate].items()):
                t.copy_(v)
        self.step = int(ckpt["step"])
        torch.set_rng_state(ckpt["rng"]["torch"])

    def _check_resume_config(self, saved: dict, path: Path):
        """--resume continues a run exactly only with its settings: name every difference."""
        ours = dataclasses.asdict(self.cfg)
        diffs = []
        for name, value in ours.items():
            if name in RESUME_MAY_CHANGE or name not in saved:
                continue
            if _show(value) != _show(saved[name]):
                was = saved[name]
                was = _setting(name, was) if isinstance(was, bool) else _show(was)
                diffs.append(f"{_setting(name, value)} (checkpoint: {was})")
        if diffs:
            raise TrainingError(
                f"--resume: this run's settings differ from those {path} was trained with: "
                f"{', '.join(diffs)}; give the checkpoint's settings to continue it exactly, or "
                "start a new run with another --out"
            )

    def ema_model(self, k: int = 0) -> Denoiser:
        """A copy of the model holding the k-th evaluation EMA (for samples and evaluation)."""
        m = copy.deepcopy(self.model).eval()
        with torch.no_grad():
            for p, e in zip(m.parameters(), self.emas[k]):
                p.copy_(e)
        return m

    # -- samples and evaluation ------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, seed0: int = 0, steps: str = "one") -> torch.Tensor:
        """n images from the first evaluation EMA; image i depends only on seed0 + i."""
        from cmkernels.samplers import PerSampleNoise, sample_heun, sample_multistep, ts_to_sigmas

        model = self.ema_model()
        shape = tuple(self.images.shape[1:])
        out = []
        for start in range(0, n, 256):
            seeds = list(range(seed0 + start, seed0 + min(n, start + 256)))
            noise = PerSampleNoise(seeds, shape, self.device)
            labels = None
            if self.cfg.class_cond:  # a label per image, drawn first (as the sampler CLI does)
                labels = noise.randint(self.data.num_classes)
            z = noise()
            if self.cfg.mode == "edm":
                x = sample_heun(model, z, karras_sigmas(18).tolist(), labels)
            else:
                # One step: [sigma_max]; two steps: the official ts = 0, 22, 39 of a 40-point grid.
                taus = [SIGMA_MAX] if steps == "one" else ts_to_sigmas((0, 22, 39), 40)
                x = sample_multistep(model, z, taus, noise, labels)
            out.append(x.clamp(-1, 1).float().cpu())
        return torch.cat(out)

    def write_samples(self, tag: str):
        from cmkernels.images import save_grid

        if not self.dist.main:
            return
        for kind in self.sample_kinds():
            imgs = self.sample(64, steps=kind)
            save_grid(imgs, self.out / f"samples_{kind}-step_{tag}.png", ncols=8)

    def sample_kinds(self) -> list[str]:
        return ["heun18"] if self.cfg.mode == "edm" else ["one", "two"]

    def evaluate(self) -> dict:
        from cmkernels.evaluate import frechet_distance

        real = load_dataset(self.cfg.data, split="test", image_size=self.cfg.image_size).images
        n = min(self.cfg.eval_samples, len(real))
        result = {}
        for kind in self.sample_kinds():
            fake = self.sample(n, seed0=1_000_000, steps=kind)
            fd = frechet_distance(fake, real[:n])
            result[kind] = {"metric": fd["metric"], "fd": fd["fd"], "num": n}
        return result

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> dict:
        try:
            self._claim_directory()
            return self._run()
        finally:
            self._release_directory()

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
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        t_last, imgs = time.perf_counter(), 0
        stop = False
        try:
            while self.step < c.steps and not stop:
                stats = self.train_step()
                stop = self._agree_to_stop()
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

    def _agree_to_stop(self) -> bool:
        """Whether to stop after this step: one Ctrl-C on any rank stops every rank at the same
        step (a flag read on each rank alone could let them part ways and hang)."""
        if self.dist.world == 1:
            return self.stop_requested
        flag = torch.tensor([float(self.stop_requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _on_sigint(self, signum, frame):
        if self._saving:  # never break a checkpoint write: it ends on its own in a moment
            self.stop_requested = True
            print(f"\nCtrl-C: writing {self.out / 'last.pt'}; stopping once it is on disk",
                  file=sys.stderr, flush=True)  # fmt: skip
            return
        if self.stop_requested:  # a second Ctrl-C: stop now, without saving
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
                self._lock_directory()
                self._check_fresh_start()
            except TrainingError as exc:
                error = exc
        if self.dist.world > 1:
            flag = torch.tensor([float(error is not None)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0 and error is None:
                error = TrainingError(f"rank 0 cannot use {self.out} (its message says why)")
        if error is not None:
            raise error

    def _lock_directory(self):
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise TrainingError(
                f"--out {self.out}: cannot create the run directory or its lock file "
                f"({exc.strerror or exc})"
            ) from exc
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise TrainingError(
                    f"{self.out} is in use by another training run (pid {owner}); wait for it to "
                    "end or pick another --out"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock = fd

    def _release_directory(self):
        if self._lock is not None:
            os.close(self._lock)  # (closing the file releases its lock)
            self._lock = None

    def _check_fresh_start(self):
        """A run without --resume must not replace another run's checkpoint unless asked to
        (--overwrite; a --ci smoke run may replace an earlier --ci run)."""
        c, last = self.cfg, self.out / "last.pt"
        if c.resume or not last.exists():
            return
        try:
            previous = load_file(last)
            old = previous.get("config") or {}
            what = "a checkpoint"
            if "step" in previous and "steps" in old:
                what += f" of step {previous['step']} of {old['steps']}"
            was_ci = "--ci" in (old.get("extra") or {}).get("argv", [])
        except CheckpointError as exc:
            what, was_ci = f"a checkpoint it cannot read ({exc})", False
        is_ci = "--ci" in c.extra.get("argv", [])
        if not (c.overwrite or (is_ci and was_ci)):
            raise TrainingError(
                f"{self.out} already holds a run: {what}; continue it with --resume, pick "
                "another --out, or pass --overwrite to replace it"
            )
        for name in ("last.pt", "metrics.json", "log.jsonl", "config.json"):
            (self.out / name).unlink(missing_ok=True)
        for old_grid in self.out.glob("samples_*.png"):
            old_grid.unlink()


# ------------------------------------------------------------------------------------------------
# Command line.


def _ema_rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        rates = ()
    if not rates:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates, got {text!r}")
    return rates


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog=PROG,
        description="Train an EDM teacher, or a consistency model by distillation (CD) or "
        "consistency training (CT/iCT). Every flag is a field of TrainConfig.",
    )
    for f in dataclasses.fields(TrainConfig):
        name = f.name
        if name == "extra":
            continue
        default = f.default
        text = _help(name, default)
        if name == "ema_rates":
            p.add_argument(_flag(name), type=_ema_rates, default=None, metavar="R[,R...]",
                           help=text)  # fmt: skip
        elif isinstance(default, bool) or f.type in ("bool", "bool | None"):
            p.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None,
                           help=text)  # fmt: skip
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            metavar = {int: "N", float: "X"}.get(kind, "NAME" if name == "device" else "PATH")
            if name in CHOICES:  # argparse shows and checks them
                p.add_argument(_flag(name), choices=CHOICES[name], default=None, help=text)
            else:
                p.add_argument(_flag(name), type=kind, default=None, metavar=metavar, help=text)
    p.add_argument("--ci", action="store_true",
                   help="a short smoke run of the same job, as CI runs it (it may replace an "
                   "earlier --ci run in the same --out)")  # fmt: skip
    return p


def parse_args(argv=None) -> TrainConfig:
    p = build_parser()
    args = p.parse_args(argv)
    values = {k: v for k, v in vars(args).items() if v is not None and k not in ("ci", "debug")}
    mode = values.get("mode", TrainConfig.mode)
    if mode not in MODE_DEFAULTS:
        p.error(f"--mode must be edm, cd or ct, not {mode!r}")
    merged = dict(MODE_DEFAULTS[mode])
    if values.get("ict"):
        if mode != "ct":
            p.error("--ict applies to --mode ct")
        merged.update(ICT_DEFAULTS)
    if args.ci:
        merged.update(CI_OVERRIDES)
    merged.update(values)
    distance = merged.get("distance", "l2")
    if distance not in CHOICES["distance"]:
        p.error(f"--distance must be l2, l1, pseudo_huber or lpips, not {distance!r}")
    if distance == "lpips" and not (merged.get("lpips_vgg") and merged.get("lpips_lin")):
        p.error(
            "--distance lpips needs local weights (nothing is downloaded): --lpips-vgg PATH "
            "(torchvision's VGG-16 state_dict) and --lpips-lin PATH (lpips' v0.1/vgg.pth)"
        )
    merged["extra"] = {"argv": sys.argv[1:] if argv is None else list(argv)}
    cfg = TrainConfig(**merged)
    try:
        check_config(cfg)
    except TrainingError as exc:
        p.error(str(exc))
    return cfg


def main(argv=None) -> int:
    """The command line: 0 when done, 130 when stopped by Ctrl-C (after saving). Errors end it
    with one line on stderr and SystemExit(2)."""
    result = {}

    def body():
        cfg = parse_args(argv)
        trainer = None
        try:
            trainer = Trainer(cfg)
            result.update(trainer.run())
        except KeyboardInterrupt:  # a second Ctrl-C: stopped without saving
            last = Path(cfg.out or f"runs/{cfg.mode}-{Path(cfg.data).name}") / "last.pt"
            kept = f"the last checkpoint, {last}, is intact" if last.exists() else (
                "no checkpoint was written")  # fmt: skip
            step = trainer.step if trainer is not None else 0
            cli.fail(PROG, f"stopped at step {step} without saving; {kept}", cli.INTERRUPTED)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        if trainer.dist.main and not result.get("interrupted"):
            print(json.dumps(result))

    cli.run(PROG, body, argv, user_errors=cli.USER_ERRORS + (TrainingError,))
    return 130 if result.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
