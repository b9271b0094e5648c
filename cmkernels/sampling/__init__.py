"""Sampling, as a library: the samplers (samplers.py) and their CUDA-graph capture (cuda_graph.py).

The command line that generates and edits images is `python -m cmkernels.sample`; zero-shot
editing (Algorithm 4) is cmkernels.editing, built on sample_multistep. Import from here:

    from cmkernels.sampling import PerSampleNoise, sample_multistep, GraphedConsistencySampler
"""

from cmkernels.sampling.cuda_graph import GraphedConsistencySampler
from cmkernels.sampling.samplers import (
    NoiseSource,
    PerSampleNoise,
    check_sigmas,
    consistency_time_points,
    randn_per_sample,
    sample_euler,
    sample_heun,
    sample_multistep,
    sample_multistep_given_noises,
    sample_onestep,
)

__all__ = [
    "GraphedConsistencySampler",
    "NoiseSource",
    "PerSampleNoise",
    "check_sigmas",
    "consistency_time_points",
    "randn_per_sample",
    "sample_euler",
    "sample_heun",
    "sample_multistep",
    "sample_multistep_given_noises",
    "sample_onestep",
]
