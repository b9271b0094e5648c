"""Data-parallel set-up for the trainer: the process's rank and device, and the agreements all
ranks must reach (stop at the same step, refuse the same run directory).

    torchrun --nproc_per_node 2 -m cmkernels.train ...   # NCCL on CUDA, gloo on the CPU

Without torchrun (WORLD_SIZE unset or 1) everything here is a no-op for one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cmkernels.train.config import TrainingError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` is true on any rank (every rank gets the same answer, so all take the
        same branch after it; a flag read on each rank alone could let them part ways and hang)."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over the ranks, in place."""
        if self.world > 1:
            dist.all_reduce(t)
            t /= self.world
        return t


def setup_distributed(device: torch.device) -> Dist:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def pick_device(name: str, local_rank: int) -> torch.device:
    """--device as a torch.device: "auto" is cuda when available, else cpu; a bare "cuda" is the
    rank's local GPU. TrainingError when CUDA is asked for and absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda was asked for but no CUDA device is available")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device
