"""What the trainer shows of a model while and after it trains: sample grids and the Frechet
distance of one- and two-step samples against held-out images.

Image i of a call depends only on seed0 + i (per-sample generators), so grids of different steps
and runs compare image by image.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cmkernels.noise_schedule import SIGMA_MAX, karras_sigmas, ts_to_sigmas

CHUNK = 256  # images per sampler call
EVAL_SEED = 1_000_000  # the seeds of the evaluation samples start here (grids use 0, 1, ...)
OFFICIAL_TWO_STEP = ((0, 22, 39), 40)  # ts and grid size of the official two-step sampler


def sample_kinds(mode: str) -> list[str]:
    """The samplers a run of `mode` is shown with: EDM's Heun (18 steps), else one and two
    consistency steps."""
    return ["heun18"] if mode == "edm" else ["one", "two"]


@torch.no_grad()
def generate(model, shape: tuple, n: int, device, kind: str, num_classes: int | None = None,
             seed0: int = 0) -> torch.Tensor:  # fmt: skip
    """n images [n, *shape] in [-1, 1] (float32, CPU) from `model` with sampler `kind`
    (sample_kinds); with num_classes, a label per image drawn from its generator first (as the
    sampler CLI does)."""
    from cmkernels.sampling import PerSampleNoise, sample_heun, sample_multistep

    out = []
    for start in range(0, n, CHUNK):
        seeds = list(range(seed0 + start, seed0 + min(n, start + CHUNK)))
        noise = PerSampleNoise(seeds, shape, device)
        labels = noise.randint(num_classes) if num_classes is not None else None
        z = noise()
        if kind == "heun18":
            x = sample_heun(model, z, karras_sigmas(18).tolist(), labels)
        else:
            taus = [SIGMA_MAX] if kind == "one" else ts_to_sigmas(*OFFICIAL_TWO_STEP)
            x = sample_multistep(model, z, taus, noise, labels)
        out.append(x.clamp(-1, 1).float().cpu())
    return torch.cat(out)


def write_grids(model, mode: str, shape: tuple, device, out: Path, tag: str,
                num_classes: int | None = None) -> None:  # fmt: skip
    """64 samples per sampler as out/samples_<kind>-step_<tag>.png."""
    from cmkernels.images import save_grid

    for kind in sample_kinds(mode):
        imgs = generate(model, shape, 64, device, kind, num_classes)
        save_grid(imgs, out / f"samples_{kind}-step_{tag}.png", ncols=8)


def frechet_scores(model, mode: str, real: torch.Tensor, n: int, device,
                   num_classes: int | None = None) -> dict:  # fmt: skip
    """{kind: {metric, fd, num}}: the Frechet distance of n samples per sampler against the first
    n of `real`."""
    from cmkernels.metrics import frechet_distance

    n = min(n, len(real))
    result = {}
    for kind in sample_kinds(mode):
        fake = generate(model, tuple(real.shape[1:]), n, device, kind, num_classes, EVAL_SEED)
        fd = frechet_distance(fake, real[:n])
        result[kind] = {"metric": fd["metric"], "fd": fd["fd"], "num": n}
    return result
