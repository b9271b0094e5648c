"""The CUDA-graph consistency sampler gives the eager sampler's images for the same noise."""

import pytest
import torch
from conftest import requires_cuda

from cmkernels.diffusion import Denoiser
from cmkernels.graph_sampler import GraphedConsistencySampler
from cmkernels.samplers import PerSampleNoise, sample_multistep
from cmkernels.unet import UNet, get_preset


def _model(device="cpu"):
    torch.manual_seed(0)
    net = UNet(get_preset("gray32", dropout=0.0))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return Denoiser(net, "cm").to(device).eval()


def test_cpu_path_equals_eager_multistep():
    model, sigmas = _model(), [80.0, 0.8]
    noise = PerSampleNoise(range(3), (1, 32, 32))
    z, n1 = noise(), noise()
    noise = PerSampleNoise(range(3), (1, 32, 32))
    with torch.no_grad():
        ref = sample_multistep(model, noise(), sigmas, noise)
    out = GraphedConsistencySampler(model, (1, 32, 32), sigmas)(z, [n1])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="decreasing"):
        GraphedConsistencySampler(model, (1, 32, 32), [0.5, 80.0])
    s = GraphedConsistencySampler(model, (1, 32, 32), [80.0, 0.8])
    with pytest.raises(ValueError, match="noise tensors"):
        s(torch.randn(2, 1, 32, 32), [])
    with pytest.raises(ValueError, match="expected"):
        s(torch.randn(2, 3, 32, 32), [torch.randn(2, 3, 32, 32)])


@requires_cuda
def test_cuda_graph_matches_eager_and_replays():
    model = _model("cuda")
    sigmas = [80.0, 0.8]
    sampler = GraphedConsistencySampler(model, (1, 32, 32), sigmas)
    for seed in (0, 1):  # the second call replays the captured graph with new inputs
        noise = PerSampleNoise(range(seed, seed + 4), (1, 32, 32), "cuda")
        z, n1 = noise(), noise()
        out = sampler(z, [n1])
        noise = PerSampleNoise(range(seed, seed + 4), (1, 32, 32), "cuda")
        with torch.no_grad():
            ref = sample_multistep(model, noise(), sigmas, noise)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert sampler.captured_batch_sizes() == [4]
