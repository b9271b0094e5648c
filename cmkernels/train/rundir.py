"""The run directory (--out): one training run owns it at a time.

Rank 0 takes an flock on DIR/.lock for the whole run (a second run in the same directory is
refused with the owner's pid), and a fresh run (no --resume) refuses to replace another run's
checkpoint unless --overwrite is given (a --ci smoke run may replace an earlier --ci run).
"""

from __future__ import annotations

import os
from pathlib import Path

from cmkernels.checkpoint import CheckpointError, load_file
from cmkernels.train.config import TrainConfig, TrainingError

try:  # POSIX file locks; without them (Windows) runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

LOCK_NAME = ".lock"  # held (flock) by the process that trains there
RUN_FILES = ("last.pt", "metrics.json", "log.jsonl", "config.json")  # + samples_*.png


class RunDirectory:
    def __init__(self, path: Path):
        self.path = path
        self._fd = None  # the open lock file (closing it releases the lock)

    def lock(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise TrainingError(
                f"--out {self.path}: cannot create the run directory or its lock file "
                f"({exc.strerror or exc})"
            ) from exc
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise TrainingError(
                    f"{self.path} is in use by another training run (pid {owner}); wait for it "
                    "to end or pick another --out"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def check_fresh_start(self, cfg: TrainConfig) -> None:
        """A run without --resume must not replace another run's checkpoint unless asked to;
        when it may, the previous run's files are removed first."""
        last = self.path / "last.pt"
        if cfg.resume or not last.exists():
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
        is_ci = "--ci" in cfg.extra.get("argv", [])
        if not (cfg.overwrite or (is_ci and was_ci)):
            raise TrainingError(
                f"{self.path} already holds a run: {what}; continue it with --resume, pick "
                "another --out, or pass --overwrite to replace it"
            )
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        for old_grid in self.path.glob("samples_*.png"):
            old_grid.unlink()
