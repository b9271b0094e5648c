"""Reference Frechet distances for the MNIST results table: the EDM teacher with the Heun sampler
(18 steps, 35 evaluations) and at one step (one Euler step, 1 evaluation), and real training
digits, each against the 1,000 held-out digits, in FD-LeNet.

    python scripts/mnist_reference_fd.py --teacher cmkernels/assets/teacher_mnist_edm.pt
"""

from __future__ import annotations

import argparse
import json

import torch

from cmkernels.checkpoint import load_denoiser
from cmkernels.data import load_dataset
from cmkernels.metrics import frechet_distance
from cmkernels.noise_schedule import karras_sigmas
from cmkernels.sampling import PerSampleNoise, sample_euler, sample_heun


@torch.no_grad()
def generate(teacher, n: int, sampler, sigmas, seed0: int = 1_000_000) -> torch.Tensor:
    out = []
    for start in range(0, n, 250):
        seeds = list(range(seed0 + start, seed0 + min(n, start + 250)))
        z = PerSampleNoise(seeds, (1, 32, 32))()
        out.append(sampler(teacher, z, sigmas).clamp(-1, 1))
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--teacher", default="cmkernels/assets/teacher_mnist_edm.pt")
    p.add_argument("--num", type=int, default=1000)
    args = p.parse_args()
    teacher = load_denoiser(args.teacher)
    test = load_dataset("mnist", split="test").images[: args.num]
    train = load_dataset("mnist", split="train").images[: args.num]
    result = {
        "real_train_vs_test": frechet_distance(train, test)["fd"],
        "teacher_heun18_35nfe": frechet_distance(
            generate(teacher, args.num, sample_heun, karras_sigmas(18).tolist()), test
        )["fd"],
        "teacher_euler_1nfe": frechet_distance(
            generate(teacher, args.num, sample_euler, [80.0]), test
        )["fd"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
