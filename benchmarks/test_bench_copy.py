"""The memory-bandwidth ceiling of this machine, measured in the same run as the ops: a device copy
(`dst.copy_(src)`, one read and one write) of a large fp32 buffer. `bench_report` divides every
benchmark's GB/s by the best of these to give "% of copy", the figure the bandwidth targets use.
"""

import pytest
import torch
from conftest import DEVICE, ON_GPU, timed

SIZES_MB = (256, 1024) if ON_GPU else (16, 64)


@pytest.mark.parametrize("size_mb", SIZES_MB)
def test_copy(benchmark, size_mb):
    n = size_mb * 2**20 // 4
    src = torch.randn(n, device=DEVICE)
    dst = torch.empty_like(src)
    timed(benchmark, lambda: dst.copy_(src), group="copy-bandwidth", provider=f"copy-{size_mb}MB",
          bytes_moved=2 * src.numel() * src.element_size())  # fmt: skip
    assert torch.equal(dst, src)
