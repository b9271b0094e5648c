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

from cmkernels import ops
from cmkernels.checkpoint import load_denoiser, load_file, save_atomic
from cmkernels.data import load_dataset
from cmkernels.diffusion import SIGMA_MAX, Denoiser, karras_sigmas
from cmkernels.losses import (
    ConsistencyLoss,
    EDMLoss,
    ct_num_scales,
    ct_target_ema,
    ict_num_scales,
)
from cmkernels.unet import UNet, get_preset

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_TEACHER = ASSETS / "teacher_mnist_edm.pt"


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
    steps: int = 240  # optimiser steps (the default CD run: ~8.5 minutes on 2 CPU cores)
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
    ckpt_every: int = 500
    eval_samples: int = 1000  # images for the final Frechet distance (0: skip)
    device: str = "auto"
    bf16: bool | None = None  # autocast to bf16 (default: on for CUDA)
    channels_last: bool | None = None  # default: on (faster convolutions on CUDA and on the CPU)
    compile: bool = False
    ops: str = "kernels"  # kernels | reference
    resume: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)  # recorded verbatim (e.g. the command line)


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
        self.device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = setup_distributed(self.device)
        if cfg.batch_size % (self.dist.world * cfg.accum):
            raise TrainingError(
                f"--batch-size {cfg.batch_size} must be divisible by world size x --accum "
                f"({self.dist.world} x {cfg.accum})"
            )
        for name in ("steps", "log_every", "sample_every", "ckpt_every", "eval_samples"):
            if getattr(cfg, name) < 0:
                raise TrainingError(f"--{name.replace('_', '-')} must be >= 0")
        self.out = Path(cfg.out or f"runs/{cfg.mode}-{Path(cfg.data).name}")
        on_cuda = self.device.type == "cuda"
        self.bf16 = on_cuda if cfg.bf16 is None else cfg.bf16
        self.channels_last = True if cfg.channels_last is None else cfg.channels_last

        torch.manual_seed(cfg.seed)
        self.data = load_dataset(cfg.data, split="train", image_size=cfg.image_size)
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
        self.stop_requested = False

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
        teacher = load_denoiser(path, weights="ema", device=self.device)
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
        ckpt = load_file(path)
        state = (
            ckpt["emas"][next(iter(ckpt["emas"]))] if ckpt.get("emas") else ckpt.get("model", ckpt)
        )
        try:
            self.model.net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            msg = f"--init-from {path}: the weights do not fit this model: {exc}"
            raise TrainingError(msg) from exc

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
        path = self.out / name
        if self.dist.main:
            save_atomic(self.state(), path)
        if self.dist.world > 1:
            dist.barrier()
        return path

    def load(self, path: Path):
        ckpt = load_file(path)
        for key in ("model", "optimizer", "step", "emas"):
            if key not in ckpt:
                raise TrainingError(f"{path} is not a training checkpoint (no {key!r})")
        self.model.net.load_state_dict(ckpt["model"])
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
            z = noise()
            if self.cfg.mode == "edm":
                x = sample_heun(model, z, karras_sigmas(18).tolist())
            else:
                # One step: [sigma_max]; two steps: the official ts = 0, 22, 39 of a 40-point grid.
                taus = [SIGMA_MAX] if steps == "one" else ts_to_sigmas((0, 22, 39), 40)
                x = sample_multistep(model, z, taus, noise)
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
        c, main = self.cfg, self.dist.main
        if c.resume:
            last = self.out / "last.pt"
            if not last.exists():
                raise TrainingError(f"--resume: no checkpoint at {last}")
            self.load(last)
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(c), indent=2))
        log = open(self.out / "log.jsonl", "a") if main else None
        bar = None
        if main and c.progress:
            from tqdm import tqdm

            bar = tqdm(total=c.steps, initial=self.step, desc=f"{c.mode}", dynamic_ncols=True)
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        t_last, imgs = time.perf_counter(), 0
        try:
            while self.step < c.steps and not self.stop_requested:
                stats = self.train_step()
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
                if _due(self.step, c.ckpt_every) and self.step < c.steps:
                    self.save()
                if _due(self.step, c.sample_every) and self.step < c.steps:
                    self.write_samples(f"{self.step:06d}")
        finally:
            signal.signal(signal.SIGINT, previous)
            if bar is not None:
                bar.close()
        path = self.save()
        if self.stop_requested:
            if main:
                print(f"interrupted at step {self.step}: saved {path}; continue with --resume",
                      file=sys.stderr)  # fmt: skip
            return {"interrupted": True, "step": self.step}
        self.write_samples("final")
        metrics = {"step": self.step}
        if c.eval_samples > 0 and main:
            metrics["frechet"] = self.evaluate()
            (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
            log.write(json.dumps({"final": metrics}) + "\n")
        if log:
            log.close()
        return metrics

    def _on_sigint(self, signum, frame):
        if self.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True


# ------------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(
        prog="python -m cmkernels.train",
        description="Train an EDM teacher, or a consistency model by distillation (CD) or "
        "consistency training (CT/iCT).",
    )
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, f in fields.items():
        if name in ("extra",):
            continue
        flag = "--" + name.replace("_", "-")
        default = f.default
        if name == "ema_rates":
            p.add_argument(flag, type=lambda s: tuple(float(v) for v in s.split(",")), default=None,
                           help="comma-separated EMA rates (default 0.9999)")  # fmt: skip
        elif isinstance(default, bool) or f.type in ("bool", "bool | None"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            p.add_argument(flag, type=kind, default=None)
    p.add_argument("--ci", action="store_true", help="a short smoke run of the same job (CI)")
    args = p.parse_args(argv)
    values = {k: v for k, v in vars(args).items() if v is not None and k != "ci"}
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
    if distance not in ("l2", "l1", "pseudo_huber", "lpips"):
        p.error(f"--distance must be l2, l1, pseudo_huber or lpips, not {distance!r}")
    if distance == "lpips" and not (merged.get("lpips_vgg") and merged.get("lpips_lin")):
        p.error(
            "--distance lpips needs local weights (nothing is downloaded): --lpips-vgg PATH "
            "(torchvision's VGG-16 state_dict) and --lpips-lin PATH (lpips' v0.1/vgg.pth)"
        )
    merged["extra"] = {"argv": sys.argv[1:] if argv is None else list(argv)}
    return TrainConfig(**merged)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        trainer = Trainer(cfg)
        metrics = trainer.run()
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if trainer.dist.main and not metrics.get("interrupted"):
        print(json.dumps(metrics))
    return 130 if metrics.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
