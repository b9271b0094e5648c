"""The trainer: EDM teacher, consistency distillation (CD) and consistency training (CT / iCT).

    python -m cmkernels.train --mode cd                 # distil the shipped MNIST teacher
    python -m cmkernels.train --mode edm --steps 20000  # train a teacher
    python -m cmkernels.train --mode ct --ict           # consistency training, iCT options
    torchrun --nproc_per_node 2 -m cmkernels.train ...  # data parallel (NCCL on GPU, gloo on CPU)

What lives where:
  config.py       TrainConfig (one field per flag), per-mode defaults, checks, the parser
  loop.py         Trainer: builds the run, train_step(), run() (the loop), save/load, Ctrl-C
  distributed.py  ranks, devices and the agreements between ranks
  rundir.py       the run directory's lock and the fresh-start check
  evaluation.py   sample grids and the final Frechet distances
The objectives and their schedules (N(k), mu(k), warm-ups) are cmkernels.losses; the checkpoint
format is cmkernels.checkpoint; the noise schedule is cmkernels.noise_schedule.
"""

from __future__ import annotations

import json

from cmkernels import cli
from cmkernels.train.config import PROG, TrainConfig, TrainingError, build_parser, parse_args
from cmkernels.train.distributed import Dist, shutdown
from cmkernels.train.loop import Trainer, default_out

__all__ = ["Dist", "TrainConfig", "Trainer", "TrainingError", "build_parser", "main",
           "parse_args"]  # fmt: skip


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
            last = default_out(cfg) / "last.pt"
            kept = f"the last checkpoint, {last}, is intact" if last.exists() else (
                "no checkpoint was written")  # fmt: skip
            step = trainer.step if trainer is not None else 0
            cli.fail(PROG, f"stopped at step {step} without saving; {kept}", cli.INTERRUPTED)
        finally:
            shutdown()
        if trainer.dist.main and not result.get("interrupted"):
            print(json.dumps(result))

    cli.run(PROG, body, argv, user_errors=cli.USER_ERRORS + (TrainingError,))
    return 130 if result.get("interrupted") else 0
