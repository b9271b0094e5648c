"""The CUDA-graph consistency sampler gives the eager sampler's images for the same noise."""

import pytest
import torch
from conftest import requires_cuda

from cmkernels.diffusion import Denoiser
from cmkernels.sampling import GraphedConsistencySampler, PerSampleNoise, sample_multistep
from cmkernels.unet import UNet, get_preset


def _model(device="cpu"):
    torch.manual_seed(0)
    net = UNet(get_preset("gray32", dropout=0.0))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return Denoiser(net, "cm").to(device).eval()


def _eager_and_graphed(model, sigmas, seeds, device, enabled):
    """(sample_multistep's images, the graphed sampler's) for the same per-sample noise."""
    noise = PerSampleNoise(seeds, (1, 32, 32), device)
    with torch.no_grad():
        ref = sample_multistep(model, noise(), sigmas, noise)
    sampler = GraphedConsistencySampler(model, (1, 32, 32), sigmas, enabled=enabled)
    noise = PerSampleNoise(seeds, (1, 32, 32), device)
    z = noise()
    out = sampler(z, [noise() for _ in range(sampler.noises_per_sample)])
    return ref, out, sampler


def test_cpu_path_equals_eager_multistep():
    ref, out, _ = _eager_and_graphed(_model(), [80.0, 0.8], range(3), "cpu", enabled=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_time_points_are_clipped_and_dropped_as_in_sample_multistep():
    # 100 is clipped to sigma_max = 80, 0.002 (sigma_min) is not evaluated: two evaluations,
    # one fresh noise, the images of sample_multistep.
    ref, out, sampler = _eager_and_graphed(_model(), [100.0, 5.0, 0.002], range(2), "cpu",
                                           enabled=False)  # fmt: skip
    assert sampler.taus == [80.0, 5.0]
    assert sampler.noises_per_sample == 1
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    calls = []
    model = _model()

    def counted(x, sigma, labels):
        calls.append(sigma[0].item())
        return model(x, sigma, labels)

    GraphedConsistencySampler(counted, (1, 32, 32), [100.0, 5.0, 0.002], enabled=False)(
        torch.randn(2, 1, 32, 32), [torch.randn(2, 1, 32, 32)]
    )
    assert calls == [80.0, 5.0]


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="decreasing"):
        GraphedConsistencySampler(model, (1, 32, 32), [0.5, 80.0])
    with pytest.raises(ValueError, match="finite"):
        GraphedConsistencySampler(model, (1, 32, 32), [80.0, float("nan")])
    with pytest.raises(ValueError, match="above sigma_min"):
        GraphedConsistencySampler(model, (1, 32, 32), [0.002])
    s = GraphedConsistencySampler(model, (1, 32, 32), [80.0, 0.8])
    with pytest.raises(ValueError, match="noise tensors"):
        s(torch.randn(2, 1, 32, 32), [])
    with pytest.raises(ValueError, match="expected"):
        s(torch.randn(2, 3, 32, 32), [torch.randn(2, 3, 32, 32)])


@requires_cuda
@pytest.mark.parametrize("sigmas", [[80.0, 0.8], [100.0, 5.0, 0.002]])
def test_cuda_graph_matches_eager_and_replays(sigmas):
    model = _model("cuda")
    sampler = GraphedConsistencySampler(model, (1, 32, 32), sigmas)
    for seed in (0, 1):  # the second call replays the captured graph with new inputs
        noise = PerSampleNoise(range(seed, seed + 4), (1, 32, 32), "cuda")
        z = noise()
        out = sampler(z, [noise() for _ in range(sampler.noises_per_sample)])
        noise = PerSampleNoise(range(seed, seed + 4), (1, 32, 32), "cuda")
        with torch.no_grad():
            ref = sample_multistep(model, noise(), sigmas, noise)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert sampler.captured_batch_sizes() == [4]
