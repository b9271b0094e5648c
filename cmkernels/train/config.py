"""The trainer's settings: TrainConfig (every flag is one of its fields), the per-mode defaults,
the checks that refuse a configuration that cannot train, and the command-line parser.

    cfg = parse_args(["--mode", "ct", "--ict"])    # the CLI's TrainConfig
    check_config(cfg)                              # TrainingError naming the flag, before any work
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field

from cmkernels import cli
from cmkernels.losses import (
    CD_NUM_SCALES,
    CD_TARGET_EMA,
    CT_MU0,
    CT_S0,
    CT_S1,
    ICT_S0,
    ICT_S1,
    TANGENT_NORMS,
    TRIGFLOW_P_MEAN,
    TRIGFLOW_P_STD,
)
from cmkernels.unet import PRESETS

PROG = "python -m cmkernels.train"
DTYPE_FLAGS = ("fp32", "bf16")  # --dtype: the autocast dtype (TrainConfig.bf16)


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
    num_scales: int = CD_NUM_SCALES  # CD: N points of the Karras grid
    target_ema: float = CD_TARGET_EMA  # CD: mu of the target network (paper: 0 on CIFAR-10)
    distance: str = "l2"  # l2 | l1 | pseudo_huber | lpips (with the two weight files below)
    lpips_vgg: str | None = None  # LPIPS: local torchvision VGG-16 state_dict (nothing downloads)
    lpips_lin: str | None = None  # LPIPS: local linear-layer weights (lpips' weights/v0.1/vgg.pth)
    ct_s0: int = CT_S0  # CT schedule N(k), mu(k)
    ct_s1: int = CT_S1
    ct_mu0: float = CT_MU0
    ict: bool = False  # iCT: pseudo-Huber, lognormal pairs, doubling curriculum, no target EMA
    # Continuous time (CD-infinity / CT-infinity, spec section 11) and sCM's stabilisers.
    continuous: bool = False
    tangent_norm: float = 0.0  # c of g / (||g|| + c) (sCM: 0.1); 0: off
    tangent_norm_scale: str = "l2"  # ||g|| (l2) or ||g|| / sqrt(dim) (rms) in that formula
    tangent_warmup: int = 0  # steps of the 0 -> 1 ramp of the network's tangent share; 0: off
    adaptive_weight: bool = False  # sCM's learned log-variance weighting w(t)
    trigflow: bool = False  # sCM's TrigFlow objective and parameterisation
    p_mean: float = TRIGFLOW_P_MEAN  # --trigflow: sigma = exp(p_mean + p_std n)
    p_std: float = TRIGFLOW_P_STD
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
# --continuous: the target is stopgrad(theta) (mu = 0), the case in which the discrete gradient
# divided by Delta u converges to the continuous one (spec section 11).
CONTINUOUS_DEFAULTS = dict(target_ema=0.0)
ICT_DEFAULTS = dict(distance="pseudo_huber", target_ema=0.0, ct_s0=ICT_S0, ct_s1=ICT_S1)
# A CI smoke run: a few steps of the same job.
CI_OVERRIDES = dict(steps=6, batch_size=8, log_every=2, sample_every=4, ckpt_every=3,
                    eval_samples=64)  # fmt: skip

# The choices of the settings that have a fixed set of values.
CHOICES = {
    "mode": ("edm", "cd", "ct"),
    "preset": tuple(PRESETS),
    "distance": ("l2", "l1", "pseudo_huber", "lpips"),
    "ops": ("kernels", "reference"),
    "tangent_norm_scale": TANGENT_NORMS,
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
    "target_ema": "CD (and CD/CT with --continuous): EMA rate mu of the target network",
    "distance": "consistency distance (lpips needs --lpips-vgg and --lpips-lin)",
    "lpips_vgg": "LPIPS: a local torchvision VGG-16 state_dict (vgg16-397923af.pth)",
    "lpips_lin": "LPIPS: the local linear-layer weights (weights/v0.1/vgg.pth of lpips)",
    "ct_s0": "CT: initial number of discretisation steps s0 of the N(k) schedule",
    "ct_s1": "CT: final number of discretisation steps s1 of the N(k) schedule",
    "ct_mu0": "CT: initial target EMA rate mu0",
    "ict": "CT: the iCT options (pseudo-Huber, lognormal pairs, doubling curriculum, no target "
           "EMA)",
    "continuous": "CD/CT in continuous time (CD-infinity, CT-infinity): u ~ U[0, 1], the "
                  "target network's tangent by one forward-mode JVP, l2",
    "tangent_norm": "--continuous: sCM's tangent normalisation g / (||g|| + c) with this c "
                    "(sCM: 0.1; 0: off)",
    "tangent_warmup": "--continuous: ramp the network's share of the tangent from 0 to 1 over "
                      "this many steps (sCM's tangent warm-up; with --trigflow its whole term "
                      "sin(s) (x_s + sigma_data dF_T/ds); 0: off)",
    "tangent_norm_scale": "--tangent-norm: the scale c is added to, the sample's L2 norm ||g|| "
                          "(l2, sCM's formula) or its per-element RMS ||g|| / sqrt(dim) (rms)",
    "adaptive_weight": "--continuous: sCM's learned log-variance weighting exp(-w(t)) d + w(t)",
    "trigflow": "--continuous: sCM's TrigFlow form. The model keeps the EDM scalings (boundary "
                "at sigma = 0; a CD student starts as the teacher), sigma is log-normal "
                "(--p-mean, --p-std), the loss is on the network output with g = cos(s) df/ds, "
                "s = arctan(sigma / sigma_data)",
    "p_mean": "--trigflow: mean of ln(sigma) (sCM's CIFAR-10 value)",
    "p_std": "--trigflow: standard deviation of ln(sigma) (sCM's CIFAR-10 value)",
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
    "bf16": "autocast the network to bf16, as --dtype bf16 (default: on for CUDA, off on the "
            "CPU)",
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
    if name in CONTINUOUS_DEFAULTS:
        shown.append(f"--continuous: {_show(CONTINUOUS_DEFAULTS[name])}")
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


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


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
    if cfg.continuous:
        if cfg.mode not in ("cd", "ct"):
            problems.append(f"--continuous applies to --mode cd and ct, not {cfg.mode}")
        if cfg.ict:
            problems.append("--continuous and --ict do not combine (iCT is a discrete recipe)")
        if cfg.distance != "l2":
            problems.append(f"--continuous trains with the l2 distance, not --distance "
                            f"{cfg.distance}")  # fmt: skip
    else:
        for name in ("tangent_norm", "tangent_norm_scale", "tangent_warmup", "adaptive_weight",
                     "trigflow"):  # fmt: skip
            if getattr(cfg, name) != _DEFAULTS[name]:
                problems.append(f"{_flag(name)} applies to --continuous runs")
    if not cfg.trigflow:
        for name in ("p_mean", "p_std"):
            if getattr(cfg, name) != _DEFAULTS[name]:
                problems.append(f"{_flag(name)} applies to --trigflow runs")
    if cfg.tangent_norm_scale != "l2" and cfg.tangent_norm == 0:
        problems.append(f"--tangent-norm-scale {cfg.tangent_norm_scale} needs --tangent-norm c > 0")
    if not math.isfinite(cfg.p_mean):
        problems.append(f"--p-mean must be a finite number, got {cfg.p_mean}")
    if not (math.isfinite(cfg.p_std) and cfg.p_std > 0):
        problems.append(f"--p-std must be a positive number, got {cfg.p_std}")
    if not (math.isfinite(cfg.tangent_norm) and cfg.tangent_norm >= 0):
        problems.append(f"--tangent-norm must be >= 0 (0: off), got {cfg.tangent_norm}")
    if cfg.tangent_warmup < 0:
        problems.append(f"--tangent-warmup must be >= 0, got {cfg.tangent_warmup}")
    if cfg.resume and cfg.overwrite:
        problems.append("--resume continues the run in --out; --overwrite replaces it: not both")
    if problems:
        raise TrainingError("; ".join(problems))


def resume_differences(cfg: TrainConfig, saved: dict) -> list[str]:
    """The settings (as flags) in which `cfg` differs from the config a checkpoint was trained
    with, leaving out those --resume may change: '--lr 0.001 (checkpoint: 0.0001)'."""
    diffs = []
    for name, value in dataclasses.asdict(cfg).items():
        if name in RESUME_MAY_CHANGE or name not in saved:
            continue
        if _show(value) != _show(saved[name]):
            was = saved[name]
            was = _setting(name, was) if isinstance(was, bool) else _show(was)
            diffs.append(f"{_setting(name, value)} (checkpoint: {was})")
    return diffs


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
    # One dtype flag spelling across the CLIs (sample and export take --dtype too).
    p.add_argument("--dtype", choices=DTYPE_FLAGS, default=None,
                   help="autocast dtype of the network (the same setting as --bf16 / --no-bf16; "
                   "default: bf16 on CUDA, fp32 on the CPU)")  # fmt: skip
    p.add_argument("--ci", action="store_true",
                   help="a short smoke run of the same job, as CI runs it (it may replace an "
                   "earlier --ci run in the same --out)")  # fmt: skip
    return p


def parse_args(argv=None) -> TrainConfig:
    p = build_parser()
    args = p.parse_args(argv)
    values = {k: v for k, v in vars(args).items()
              if v is not None and k not in ("ci", "debug", "dtype")}  # fmt: skip
    if args.dtype is not None:
        bf16 = args.dtype == "bf16"
        if values.get("bf16", bf16) != bf16:
            p.error(f"--dtype {args.dtype} and {_setting('bf16', values['bf16'])} disagree")
        values["bf16"] = bf16
    mode = values.get("mode", TrainConfig.mode)
    if mode not in MODE_DEFAULTS:
        p.error(f"--mode must be edm, cd or ct, not {mode!r}")
    merged = dict(MODE_DEFAULTS[mode])
    if values.get("ict"):
        if mode != "ct":
            p.error("--ict applies to --mode ct")
        merged.update(ICT_DEFAULTS)
    if values.get("continuous"):
        merged.update(CONTINUOUS_DEFAULTS)
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
