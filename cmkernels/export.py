"""Export a checkpoint to the diffusers layout and/or the official state_dict layout.

    python -m cmkernels.export runs/cd-mnist/last.pt --diffusers cd-mnist-diffusers
    python -m cmkernels.export cd_imagenet64_l2.pt --preset imagenet64 --diffusers out --steps 40
    python -m cmkernels.export diffusers-dir/ --official cd_model.pt

SRC is a cmkernels checkpoint, an official .pt (with --preset) or a diffusers directory.
--diffusers DIR writes a ConsistencyModelPipeline directory (DIR/model_index.json, DIR/unet/,
DIR/scheduler/); with --unet-only a bare UNet2DModel directory (config.json, weights and
scheduler_config.json in DIR). --official FILE writes the plain UNet state_dict of the official
code (our tensor names; loads with torch.load(weights_only=True)).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from cmkernels import cli
from cmkernels.diffusion import PARAMETERIZATIONS

PROG = "python -m cmkernels.export"
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # the keys of diffusers_format.DTYPES, as sample spells them


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "source", metavar="SRC", help="cmkernels checkpoint, official .pt or diffusers directory"
    )
    p.add_argument("--diffusers", metavar="DIR", help="write a diffusers directory here")
    p.add_argument(
        "--unet-only",
        action="store_true",
        help="with --diffusers: a bare UNet2DModel directory instead of a pipeline",
    )
    p.add_argument("--official", metavar="FILE", help="write the official-layout .pt here")
    p.add_argument(
        "--preset", choices=("imagenet64", "lsun256"), help="architecture of an official .pt"
    )
    p.add_argument(
        "--weights",
        default="ema",
        choices=("ema", "model"),
        help="cmkernels checkpoints: the first EMA (default) or the raw model weights",
    )
    p.add_argument(
        "--parameterization",
        choices=PARAMETERIZATIONS,
        help="override the denoiser parameterization (cm: export a teacher's weights as a "
        "consistency model, as the official CD initialises its student)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="fp32",
        help="dtype of the written weights (default: fp32)",
    )
    p.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="scheduler num_train_timesteps: the Karras grid that diffusers timesteps index "
        "(default: SRC's scheduler, else 40)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    """The command line. Errors end it with one line on stderr and SystemExit(2)."""
    cli.run(PROG, lambda: _main(argv), argv)


def _main(argv: list[str] | None) -> None:
    # Imported here so --help is fast.
    from cmkernels import diffusers_format as dfm
    from cmkernels.checkpoint import CheckpointError, save_atomic

    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.diffusers or args.official):
        parser.error("nothing to write: give --diffusers DIR and/or --official FILE")
    if args.unet_only and not args.diffusers:
        parser.error("--unet-only goes with --diffusers")
    if args.steps is not None and args.steps < 2:
        parser.error("--steps must be at least 2")
    try:
        denoiser, settings = dfm.load_any(args.source, preset=args.preset,
                                          parameterization=args.parameterization,
                                          weights=args.weights)  # fmt: skip
        dtype = dfm.DTYPES[args.dtype]
        written = []
        if args.diffusers:
            if args.steps is not None:
                settings = dataclasses.replace(settings, num_train_timesteps=args.steps)
            layout = "unet" if args.unet_only else "pipeline"
            dfm.save_diffusers(
                denoiser, args.diffusers, scheduler=settings, layout=layout, dtype=dtype
            )
            kind = dfm.UNET_CLASS if args.unet_only else dfm.PIPELINE_CLASS
            steps = settings.num_train_timesteps
            written.append(f"{args.diffusers} ({kind}, num_train_timesteps {steps})")
        if args.official:
            state = {k: v.detach().to("cpu", dtype) for k, v in denoiser.net.state_dict().items()}
            save_atomic(state, args.official)
            written.append(f"{args.official} (official-layout state_dict, {len(state)} tensors)")
    except (CheckpointError, OSError, ValueError, KeyError, RuntimeError) as e:
        raise cli.UserError(f"cannot export {args.source}: {e}") from None
    print("wrote " + " and ".join(written))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
