"""The C++ CPU kernels' baseline x86-64 code (what CPUs without AVX2 run): the fp32 hot loops are
compiled twice and picked at run time, so on an AVX2 machine the rest of the suite only reaches
the AVX2 variants. CMKERNELS_NO_AVX2=1 (read once, at the first kernel call) forces the baseline;
a subprocess checks every fp32 C++ kernel against its reference in float64 there.
"""

import os
import subprocess
import sys

import pytest

from cmkernels import build_info

SCRIPT = r"""
import torch
import cmkernels

assert cmkernels.build_info()["cpu_avx2_kernels"] is False, cmkernels.build_info()
from cmkernels.ops.ema import ema_update_, ema_update_ref_
from cmkernels.ops.groupnorm_silu import groupnorm_silu, groupnorm_silu_ref
from cmkernels.ops.heun_step import heun_step1, heun_step1_ref, heun_step2, heun_step2_ref

torch.manual_seed(0)
close = lambda a, b: torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=2e-5)

# groupnorm_silu forward and every gradient, NCHW and channels_last, odd sizes, both activations
for shape, fmt in [((3, 64, 7, 5), torch.contiguous_format), ((2, 96, 9, 11), torch.channels_last)]:
    for act in (True, False):
        x = (torch.randn(shape) * 3 + 1).contiguous(memory_format=fmt).requires_grad_()
        N, C = shape[:2]
        w, b = torch.randn(C).requires_grad_(), torch.randn(C).requires_grad_()
        s, sh = torch.randn(N, C).requires_grad_(), torch.randn(N, C).requires_grad_()
        ins = (x, w, b, s, sh)
        g = torch.randn(shape)
        y = groupnorm_silu(*ins, groups=16, activation=act)
        grads = torch.autograd.grad(y, ins, g)
        ins64 = [t.detach().double().requires_grad_() for t in ins]
        y64 = groupnorm_silu_ref(*ins64, groups=16, activation=act)
        grads64 = torch.autograd.grad(y64, ins64, g.double())
        close(y, y64)
        for a, r in zip(grads, grads64):
            close(a, r)

# heun_step1 / heun_step2 (per-sample t, odd sizes)
x, den, den1 = (torch.randn(5, 3, 13, 7) for _ in range(3))
t, tn = torch.rand(5) * 10 + 1, torch.rand(5) + 0.5
x1, d = heun_step1(x, den, t, tn)
r1, rd = heun_step1_ref(x.double(), den.double(), t.double(), tn.double())
close(x1, r1)
close(d, rd)
close(heun_step2(x, d, x1, den1, t, tn),
      heun_step2_ref(x.double(), d.double(), x1.double(), den1.double(), t.double(), tn.double()))

# ema_update_ at three rates over tensors of odd sizes
params = [torch.randn(n) for n in (1, 7, 33, 1000, 4099)]
emas = [[torch.randn(p.shape) for p in params] for _ in range(3)]
want = [[e.double().clone() for e in copies] for copies in emas]
rates = [0.9, 0.99, 0.9999]
ema_update_(params, emas, rates)
ema_update_ref_([p.double() for p in params], want, rates)
for copies, refs in zip(emas, want):
    for e, r in zip(copies, refs):
        close(e, r)
print("baseline kernels OK")
"""


@pytest.mark.skipif(not build_info().get("extension"), reason="needs the compiled extension")
def test_baseline_code_matches_the_references():
    env = dict(os.environ, CMKERNELS_NO_AVX2="1", OMP_NUM_THREADS="2")
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "baseline kernels OK" in run.stdout
