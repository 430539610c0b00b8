"""The fused SNIP kernel (brittle.scoring.kernels) on the CPU, in Triton's interpreter (``TRITON_INTERPRET=1``):
its arithmetic for every configuration the autotuner may pick on a GPU, against a float64 reference.

The interpreter runs the kernel's own code with numpy, so masking by length, the absolute value per example and
the accumulation are checked here; speed and the tensor-core products are the GPU's (``benchmarks/bench_gpu.py``).
fp16 inputs: the interpreter does not handle bf16 loads (numpy has no bf16), and the kernel's code does not
depend on which of the two half types it reads."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

SCRIPT = r"""
import json
import torch
import triton
from brittle.scoring import kernels

kernel = kernels._abs_example_grads_kernel  # the autotuner; .fn is the kernel itself
gen = torch.Generator().manual_seed(0)
B, T, M, N = 5, 37, 100, 70  # M, N not multiples of any block; T past every example's length
lengths = torch.tensor([33, 1, 0, 20, 6], dtype=torch.int32)
g = torch.randn(B, T, M, generator=gen).half()
x = torch.randn(B, T, N, generator=gen).half()
for b, n in enumerate(lengths.tolist()):  # past each length: never read (a NaN would spread otherwise)
    g[b, n:] = float("nan")
    x[b, n:] = float("nan")
gd, xd = g.double(), x.double()
ref = sum((gd[b, :n].t() @ xd[b, :n]).abs() for b, n in enumerate(lengths.tolist()))
out = []
for config in kernel.configs:
    meta = {k: config.kwargs[k] for k in ("BM", "BN", "BK")}
    acc = torch.zeros(M, N)
    grid = (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))
    for _ in range(2):  # adds into acc
        kernel.fn[grid](g, x, acc, lengths, B, M, N, *g.stride(), *x.stride(), *acc.stride(), **meta)
    out.append({"config": meta, "finite": bool(torch.isfinite(acc).all()),
                "error": float(((acc.double() - 2 * ref).abs().max() / ref.abs().max()))})
print(json.dumps(out))
"""


@pytest.mark.skipif((platform.system(), platform.machine()) != ("Linux", "x86_64"),
                    reason="triton (the test extra) installs on Linux x86-64 only")
def test_fused_kernel_matches_float64_in_every_autotuner_configuration():
    """Catches a mask that reads past an example's length (NaN), ``|.|`` taken after the sum over examples (a
    different value), a store that overwrites instead of adding (half the reference after two calls), or a tile
    edge mishandled for sizes that are not multiples of the block (wrong or missing entries)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 4
    for r in results:
        assert r["finite"] and r["error"] < 1e-5, r  # fp32 accumulation of exact fp16 products
