"""Generate or edit images with a consistency model (or an EDM teacher).

    python -m cmkernels.sample --checkpoint run/ckpt.pt --num-samples 64 --out samples
    python -m cmkernels.sample --checkpoint cd_imagenet64_l2.pt --preset imagenet64 \\
        --sampler multistep --ts 0,22,39 --steps 40 --class-label 207 --out samples
    python -m cmkernels.sample --checkpoint ckpt.pt --task inpaint --image photo.png \\
        --mask mask.png --out inpainted
    python -m cmkernels.sample --checkpoint diffusers-cd_imagenet64_l2/ --ts 0,22,39

--checkpoint also takes a diffusers directory (ConsistencyModelPipeline or UNet2DModel); its
scheduler_config.json, if any, sets the defaults of --steps, rho and clamping.

Writes DIR/samples.png (a grid of the first images) and DIR/samples.npz (uint8 images NHWC under
"images", plus "labels" for class-conditional models); editing tasks also write DIR/reference.png.
Image i uses the seed --seed + i, so it does not depend on --batch-size.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from cmkernels import cli, editing, images, sampling
from cmkernels.diffusers_format import DTYPES, SchedulerSettings, load_any
from cmkernels.diffusion import PARAMETERIZATIONS
from cmkernels.noise_schedule import RHO, ts_to_sigmas
from cmkernels.sampling import GraphedConsistencySampler

TASKS = ("generate", "inpaint", "colorize", "superres", "denoise", "stroke", "interpolate")
SAMPLERS = ("onestep", "multistep", "heun", "euler")
NEEDS_IMAGE = ("inpaint", "colorize", "superres", "denoise", "stroke")
MASKED_EDITS = ("inpaint", "colorize", "superres")
GRID_MAX = 256  # Images shown in samples.png (the .npz holds all of them).
PROG = "python -m cmkernels.sample"


def comma_list(kind: type, what: str):
    """An argparse type: a nonempty comma-separated list of finite `kind` values ("0,22,39")."""

    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        if not all(math.isfinite(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected finite {what}, got {text!r}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    from cmkernels.unet import PRESETS

    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a cmkernels checkpoint, an official state_dict .pt (see --preset), or a "
        "diffusers ConsistencyModelPipeline / UNet2DModel directory",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="architecture of a plain state_dict .pt, such as an official file (required for "
        "them; the error without it names the preset whose layout matches)",
    )
    p.add_argument(
        "--parameterization",
        choices=PARAMETERIZATIONS,
        help="override the denoiser parameterization (official edm_*.pt: edm; trigflow: a "
        "--trigflow run's consistency model)",
    )
    p.add_argument(
        "--weights",
        default="ema",
        help="our format: 'ema' (the first EMA; default), 'model' or an EMA key such as 0.9999",
    )
    p.add_argument("--task", choices=TASKS, default="generate", help="default: generate")
    p.add_argument("--num-samples", type=int, default=16, metavar="N", help="default: 16")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="default: 16")
    p.add_argument(
        "--sampler",
        choices=SAMPLERS,
        help="generate only; default: onestep (multistep with --ts/--sigmas) for a "
        "consistency model, heun for an EDM model",
    )
    p.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="points of the Karras grid: --ts indexes it (default 40, or a diffusers "
        "scheduler's num_train_timesteps); heun/euler steps (default 18)",
    )
    p.add_argument(
        "--ts",
        type=comma_list(int, "integers"),
        metavar="I,J,...",
        help="time points as indices into the --steps grid, e.g. 0,22,39",
    )
    p.add_argument(
        "--sigmas",
        type=comma_list(float, "numbers"),
        metavar="S,...",
        help="explicit descending time points (noise levels), e.g. 80,0.8; "
        "default for inpaint/colorize/superres: every point of the --steps grid, "
        "for stroke: 5.38,2.24",
    )
    p.add_argument(
        "--class-label",
        type=int,
        metavar="K",
        help="class of every sample (class-conditional models; default: random)",
    )
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: 0)")
    p.add_argument("--image", metavar="PATH", help="reference image of an editing task")
    p.add_argument(
        "--mask",
        metavar="PATH",
        help="inpaint: mask of the model's size, WHITE = region to generate",
    )
    p.add_argument("--factor", type=int, default=4, help="superres: upscaling factor (default: 4)")
    p.add_argument(
        "--noise-sigma",
        type=float,
        metavar="S",
        help="denoise: noise level of --image (in units of the [-1, 1] range)",
    )
    p.add_argument(
        "--add-noise",
        action="store_true",
        help="denoise: add the --noise-sigma noise first (to try it on a clean image)",
    )
    p.add_argument(
        "--out",
        default="samples",
        metavar="DIR",
        help=f"output folder (default: samples); samples.png shows the first {GRID_MAX} images",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="generate with onestep/multistep: replay the sampler from a CUDA graph "
        "captured once per batch size (same images, less launch overhead)",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda when available, else cpu",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the network on NHWC activations (default; faster convolutions on GPUs and CPUs)",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="fp32",
        help="dtype the network computes in (autocast; default: fp32); the sampler state "
        "stays fp32",
    )
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that need no model; each failure exits through parser.error. The output folder is
    tried for writing here, before any image is computed (it is created when the images are
    written)."""
    if args.num_samples < 1 or args.batch_size < 1:
        parser.error("--num-samples and --batch-size must be positive")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be positive")
    if args.ts is not None and args.sigmas is not None:
        parser.error("give --ts or --sigmas, not both")
    if args.sampler is not None and args.task != "generate":
        parser.error(f"--sampler applies to --task generate, not {args.task}")
    if args.sampler == "onestep" and (args.ts or args.sigmas):
        parser.error("--sampler onestep takes no --ts/--sigmas (use --sampler multistep)")
    if args.task in ("denoise", "interpolate") and (args.ts or args.sigmas):
        parser.error(f"--task {args.task} is one step: it takes no --ts/--sigmas")
    if args.task in NEEDS_IMAGE and not args.image:
        parser.error(f"--task {args.task} needs --image")
    if args.task not in NEEDS_IMAGE and args.image:
        parser.error(f"--image does not apply to --task {args.task}")
    if (args.task == "inpaint") != bool(args.mask):
        parser.error("--mask is required by, and only used by, --task inpaint")
    if args.task == "denoise" and (args.noise_sigma is None or args.noise_sigma <= 0):
        parser.error("--task denoise needs a positive --noise-sigma")
    if args.factor < 1:
        parser.error("--factor must be positive")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"bad --device {args.device!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is available")
    from cmkernels.checkpoint import check_writable

    check_writable(args.out, "--out", create=False)  # created when the images are written


def check_steps(parser, args: argparse.Namespace, sampler: str | None) -> None:
    """--steps must mean something: the grid --ts indexes, the heun/euler steps, or the grid of
    the masked edits (an ignored flag would hide a mistake)."""
    if args.steps is None or args.ts is not None:
        return
    if args.sigmas is None and (sampler in ("heun", "euler") or args.task in MASKED_EDITS):
        return
    parser.error(
        "--steps does nothing here: it sets the grid that --ts indexes, the heun/euler steps or "
        f"the grid of inpaint/colorize/superres (this run: --task {args.task}"
        + (f", sampler {sampler}" if sampler else "")
        + (", --sigmas" if args.sigmas is not None else "") + "); give --ts or drop --steps"
    )


def load_model(args: argparse.Namespace):
    """(Denoiser of --checkpoint on --device in eval mode, SchedulerSettings: the sampler's
    defaults); a one-line user error on failure."""
    try:
        return load_any(args.checkpoint, preset=args.preset, parameterization=args.parameterization,
                        weights=args.weights, device=args.device)  # fmt: skip
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise cli.UserError(f"cannot load {args.checkpoint}: {e}") from None


def time_points(parser, args, sampler: str | None, sigma_min: float, sigma_max: float,
                grid_points: int = 40, rho: float = RHO):  # fmt: skip
    """The noise levels of the run: --sigmas, --ts of the --steps grid, or the task's default.
    grid_points / rho: the Karras grid --ts indexes unless --steps is given (a diffusers
    scheduler's num_train_timesteps and rho)."""
    if args.task in ("denoise", "interpolate") or sampler == "onestep":
        return None
    try:
        if args.sigmas is not None:
            return sampling.check_sigmas(args.sigmas)
        steps = args.steps or (18 if sampler in ("heun", "euler") else grid_points)
        if args.ts is not None:
            return ts_to_sigmas(args.ts, steps, sigma_min, sigma_max, rho).tolist()
        if args.task == "stroke":
            return list(editing.STROKE_SIGMAS)
        if sampler == "multistep":
            raise ValueError("--sampler multistep needs --ts or --sigmas")
        if steps < 2:
            raise ValueError("--steps must be at least 2 for a grid of noise levels")
        # heun/euler: the Karras grid of --steps points; masked edits: every point of it.
        return ts_to_sigmas(range(steps), steps, sigma_min, sigma_max, rho).tolist()
    except ValueError as e:
        parser.error(str(e))


@dataclass
class Plan:
    """What every batch of the run does, fixed before the first one."""

    sampler: str | None  # generate: onestep | multistep | heun | euler; None for the other tasks
    sigmas: list[float] | None  # the time points (None: one step)
    scheduler: SchedulerSettings  # the checkpoint's scheduler (clip_denoised: clamp f's output)
    graphed: GraphedConsistencySampler | None = None  # --cuda-graph: replaces the eager sampler


@dataclass
class Inputs:
    image: Tensor | None = None  # (1, C, S, S) reference (superres: (1, C, S/p, S/p))
    mask: Tensor | None = None  # (1, 1, S, S), 1 = generate


def load_inputs(parser, args, channels: int, size: int, device) -> Inputs:
    if args.task not in NEEDS_IMAGE:
        return Inputs()
    if args.task == "colorize" and channels != 3:
        parser.error(f"colorization needs an RGB model; this one has {channels} channel(s)")
    image_size = size
    if args.task == "superres":
        if size % args.factor:
            parser.error(f"--factor {args.factor} does not divide the image size {size}")
        image_size = size // args.factor
    try:
        image = images.load_image(args.image, channels, image_size).to(device)
        mask = images.load_mask(args.mask, size).to(device) if args.mask else None
    except (OSError, ValueError) as e:
        raise cli.UserError(str(e)) from None
    return Inputs(image, mask)


def run_batch(args, denoiser, plan: Plan, inputs: Inputs, noise, labels, indices) -> Tensor:
    """Samples of one batch [B, C, H, W] in [-1, 1] (float32)."""
    smin, smax = denoiser.sigma_min, denoiser.sigma_max
    sampler, sigmas = plan.sampler, plan.sigmas
    kw = dict(class_labels=labels, sigma_min=smin, sigma_max=smax)
    task = args.task
    if task == "generate":
        z = noise()  # (B, C, H, W)
        if plan.graphed is not None:  # the same draws, in the same order, as sample_multistep
            noises = [noise() for _ in range(plan.graphed.noises_per_sample)]
            return plan.graphed(z, noises, labels)
        clamp = plan.scheduler.clip_denoised
        if sampler == "onestep":
            return sampling.sample_onestep(denoiser, z, smax, labels, clamp=clamp)
        if sampler == "multistep":
            return sampling.sample_multistep(denoiser, z, sigmas, noise, clamp=clamp, **kw)
        sample = sampling.sample_heun if sampler == "heun" else sampling.sample_euler
        return sample(denoiser, z, sigmas, labels)
    if task == "interpolate":
        z0 = noise()  # Every row is the noise of --seed; z1 that of --seed + 1.
        z1 = sampling.randn_per_sample([args.seed + 1] * len(indices), z0.shape[1:], z0.device)
        weights = torch.tensor(indices, dtype=torch.float64) / max(args.num_samples - 1, 1)
        return editing.interpolate(denoiser, z0, z1, weights, smax, labels)
    y = inputs.image.expand(len(indices), -1, -1, -1)  # (B, C, h, w)
    if task == "inpaint":
        return editing.inpaint(denoiser, y, inputs.mask, sigmas, noise, **kw)
    if task == "colorize":
        return editing.colorize(denoiser, y, sigmas, noise, **kw)
    if task == "superres":
        return editing.superresolve(denoiser, y, args.factor, sigmas, noise, **kw)
    if task == "stroke":
        return editing.stroke_guided(denoiser, y, sigmas, noise, **kw)
    if args.add_noise:  # denoise
        y = y + args.noise_sigma * noise()
    return editing.denoise(denoiser, y, args.noise_sigma, labels)


def main(argv: list[str] | None = None) -> None:
    """The command line. Errors end it with one line on stderr and SystemExit(2)."""
    cli.run(PROG, lambda: _main(argv), argv)


def _main(argv: list[str] | None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    device = torch.device(args.device)

    denoiser, scheduler = load_model(args)
    if args.channels_last:  # NHWC weights make every convolution produce NHWC activations
        denoiser = denoiser.to(memory_format=torch.channels_last)
    config = denoiser.net.config
    channels, size, num_classes = config.in_channels, config.image_size, config.num_classes
    if args.class_label is not None:
        if num_classes is None:
            parser.error("--class-label given, but the model is unconditional")
        if not 0 <= args.class_label < num_classes:
            parser.error(f"--class-label must be in [0, {num_classes}), got {args.class_label}")
    sampler = None
    if args.task == "generate":
        sampler = args.sampler or (
            "heun"
            if denoiser.parameterization == "edm"
            else "multistep"
            if (args.ts or args.sigmas)
            else "onestep"
        )
    check_steps(parser, args, sampler)
    grid = (scheduler.num_train_timesteps, scheduler.rho)  # --ts grid defaults
    sigmas = time_points(parser, args, sampler, denoiser.sigma_min, denoiser.sigma_max, *grid)
    inputs = load_inputs(parser, args, channels, size, device)
    plan = Plan(sampler, sigmas, scheduler)
    if args.cuda_graph:
        if device.type != "cuda":
            parser.error("--cuda-graph needs --device cuda")
        if sampler not in ("onestep", "multistep"):
            parser.error(
                "--cuda-graph applies to --task generate with the onestep/multistep sampler"
            )
        plan.graphed = GraphedConsistencySampler(
            denoiser,
            (channels, size, size),
            [denoiser.sigma_max] if sampler == "onestep" else sigmas,
            denoiser.sigma_min,
            denoiser.sigma_max,
            clamp=scheduler.clip_denoised,
        )

    autocast = contextlib.nullcontext()
    if args.dtype != "fp32":
        autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype])
    all_images, all_labels = [], []
    starts = range(0, args.num_samples, args.batch_size)
    for start in tqdm(starts, desc="batches", unit="batch"):
        indices = list(range(start, min(start + args.batch_size, args.num_samples)))
        # interpolate: all frames share the noise (and label) of --seed; else sample i: seed + i.
        seeds = (
            [args.seed] * len(indices)
            if args.task == "interpolate"
            else [args.seed + i for i in indices]
        )
        noise = sampling.PerSampleNoise(seeds, (channels, size, size), device)
        labels = None
        if num_classes is not None:
            labels = noise.randint(num_classes)  # (B,), drawn before the noise
            if args.class_label is not None:
                labels = torch.full_like(labels, args.class_label)
        with torch.inference_mode(), autocast:
            x = run_batch(args, denoiser, plan, inputs, noise, labels, indices)
        all_images.append(images.to_uint8(x.float()))
        if labels is not None:
            all_labels.append(labels.cpu().numpy())

    os.makedirs(args.out, exist_ok=True)
    array = np.concatenate(all_images)  # (N, H, W, C) uint8
    label_array = np.concatenate(all_labels) if all_labels else None
    images.save_npz(os.path.join(args.out, "samples.npz"), array, label_array)
    images.save_grid(array[:GRID_MAX], os.path.join(args.out, "samples.png"))
    if inputs.image is not None:
        images.save_grid(inputs.image, os.path.join(args.out, "reference.png"))
    what = f"{args.task} ({sampler})" if sampler else args.task
    print(f"wrote {len(array)} images ({what}) to {args.out}/samples.npz and samples.png")


if __name__ == "__main__":
    main()
