"""Consistency sampling captured in CUDA graphs: one graph per batch size, replayed.

At batch 1 a one-step sample is a few hundred small kernels, and the CPU time to launch them
(several us each in eager PyTorch) dominates the GPU time. A CUDA graph replays the whole network
evaluation with one launch. Shapes are static: the sampler keeps input/output buffers per batch
size, copies the inputs in, replays and returns a copy of the output.

    sampler = GraphedConsistencySampler(denoiser, (3, 64, 64), sigmas=[80.0, 0.821])
    images = sampler(z, noises)          # the same images as samplers.sample_multistep

What is captured is samplers.sample_multistep itself (through sample_multistep_given_noises),
with its noise source reading the static noise buffers in the order sample_multistep draws them;
the time points are clipped and those at sigma_min dropped exactly as there. On a CPU (or with
enabled=False) the same function runs eagerly, so results and the API do not depend on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cmkernels.noise_schedule import SIGMA_MAX, SIGMA_MIN
from cmkernels.sampling.samplers import consistency_time_points, sample_multistep_given_noises


class GraphedConsistencySampler:
    """One-step or few-step consistency sampling, captured in a CUDA graph per batch size.

    denoiser:    callable (x, sigma [B], class_labels) -> denoised x (e.g. diffusion.Denoiser)
    image_shape: (C, H, W)
    sigmas:      time points as for sample_multistep: [sigma_max] for one step, e.g. [80, 0.821]
                 for two; clipped into [sigma_min, sigma_max], points at sigma_min dropped
    sigma_min:   the boundary time (noise added before step i is sqrt(tau_i^2 - sigma_min^2))
    sigma_max:   the top of the clipping range
    dtype:       dtype of the noise buffers (the denoiser may autocast internally)
    enabled:     capture graphs (needs CUDA); False runs eagerly
    """

    def __init__(
        self,
        denoiser,
        image_shape: Sequence[int],
        sigmas: Sequence[float] = (SIGMA_MAX,),
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        dtype: torch.dtype = torch.float32,
        clamp: bool = True,
        enabled: bool = True,
        warmup: int = 2,
    ):
        self.denoiser = denoiser
        self.image_shape = tuple(image_shape)
        self.taus = consistency_time_points(sigmas, sigma_min, sigma_max)  # the evaluated points
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.dtype = dtype
        self.clamp = clamp
        self.enabled = enabled
        self.warmup = warmup
        self._graphs: dict[tuple, tuple] = {}

    @property
    def noises_per_sample(self) -> int:
        """How many fresh noise tensors a call takes: one per evaluated point after the first."""
        return len(self.taus) - 1

    def _run(self, z, noises, labels):
        return sample_multistep_given_noises(self.denoiser, z, noises, self.taus, self.sigma_min,
                                             labels, self.clamp, self.sigma_max)  # fmt: skip

    def _capture(self, key, z: Tensor, labels: Tensor | None):
        device = z.device
        static_z = torch.empty_like(z)
        static_noises = [torch.empty_like(z) for _ in range(self.noises_per_sample)]
        static_labels = labels.clone() if labels is not None else None
        static_z.copy_(z)
        for n in static_noises:
            n.normal_()
        # Warm up on a side stream (lazy initialisation, Triton compilation, cuBLAS workspaces).
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(self.warmup):
                self._run(static_z, static_noises, static_labels)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static_out = self._run(static_z, static_noises, static_labels)
        self._graphs[key] = (graph, static_z, static_noises, static_labels, static_out)
        return self._graphs[key]

    @torch.no_grad()
    def __call__(
        self,
        z: Tensor,  # (B, C, H, W) unit noise
        noises: Sequence[Tensor] = (),  # noises_per_sample fresh noises, like z
        class_labels: Tensor | None = None,
    ) -> Tensor:
        if tuple(z.shape[1:]) != self.image_shape:
            raise ValueError(f"z has shape {tuple(z.shape)}; expected (B, {self.image_shape})")
        if len(noises) != self.noises_per_sample:
            raise ValueError(
                f"{len(self.taus)} evaluated time points {self.taus} need "
                f"{self.noises_per_sample} noise tensors, got {len(noises)}"
            )
        z = z.to(self.dtype)
        noises = [n.to(device=z.device, dtype=self.dtype) for n in noises]
        if not (self.enabled and z.is_cuda):
            return self._run(z, noises, class_labels)
        key = (z.shape[0], z.device, class_labels is not None)
        entry = self._graphs.get(key) or self._capture(key, z, class_labels)
        graph, static_z, static_noises, static_labels, static_out = entry
        static_z.copy_(z)
        for dst, src in zip(static_noises, noises):
            dst.copy_(src)
        if static_labels is not None:
            static_labels.copy_(class_labels)
        graph.replay()
        return static_out.clone()

    def captured_batch_sizes(self) -> list[int]:
        return sorted(k[0] for k in self._graphs)
