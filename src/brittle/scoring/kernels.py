"""GPU products for SNIP: a fused kernel for ``acc += sum_n |dY[n]^T X[n]|`` that never writes the per-example
gradients, and the cuBLAS mixed-precision batched product that serves when the kernel does not.

Why: a batched product writes ``B x d_out x d_in`` fp32 per-example gradients to memory and reads them back
for ``|.|`` and the sum: for a 1B model that is ~100 GB of traffic per batch of 8, more than the whole
forward+backward pass. This kernel keeps each output tile of ``G_n`` in registers, takes ``|.|`` and sums
over the examples there, and writes one fp32 tile per module and batch.

Precision: the inputs are the layer's own bf16/fp16 activations and output gradients; the products run on
tensor cores with fp32 accumulation (the products of bf16/fp16 values are exact in fp32), the sum over
examples is fp32. The result equals the fp32 batched product up to fp32 summation order.

Tested on the CPU in Triton's interpreter for every autotuner configuration (``tests/test_kernels.py``, fp16).
Used on CUDA with bf16/fp16 inputs when Triton is importable (``BRITTLE_FUSED_SNIP=0`` turns it off: then
:func:`mixed_products`, cuBLAS batched products of the bf16/fp16 factors with fp32 output, serve; until
2026-11-29 that fallback upcast both factors and ran fp32 products). Checked on an H200 (2026-11-28,
``benchmarks/bench_gpu.py``) against a float64 reference on ragged lengths: max relative error 4.3e-07 once,
8.6e-07 accumulated twice (an earlier version failed that check: the autotuner ran the in-place kernel once per
trial; ``restore_value`` fixed it). :func:`fused_available` decides.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with PyTorch's CUDA builds; the CPU build has none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installed torch
    triton = None


#: Devices whose ``torch.bmm`` takes bf16/fp16 factors with ``out_dtype=torch.float32`` (PyTorch's docs: CUDA and
#: XPU); ``meta`` runs the same calls on shapes only (the tests' device-read check).
MIXED_PRODUCT_DEVICES = ("cuda", "xpu", "meta")
#: ``torch.bmm(..., out_dtype)`` exists (PyTorch >= 2.8: the ``aten::bmm.dtype`` overload); older builds upcast.
BMM_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads()


def mixed_available(acc: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> bool:
    """True when :func:`mixed_products` can form this module's per-example gradients from its own bf16/fp16
    factors (no fp32 copies of ``x`` and ``g``, tensor cores instead of fp32 arithmetic)."""
    return (BMM_OUT_DTYPE and acc.device.type in MIXED_PRODUCT_DEVICES and x.device == acc.device
            and g.device == acc.device
            and x.dtype in (torch.bfloat16, torch.float16) and g.dtype == x.dtype)


def mixed_products(g_t: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[n] = g_t[n] @ x[n]`` in fp32 from bf16/fp16 factors: fp32 accumulation and output (the products of
    bf16/fp16 values are exact in fp32), so it equals the fp32 product of the upcast factors up to fp32 summation
    order, without forming the upcast copies or running fp32 arithmetic."""
    return torch.bmm(g_t, x, torch.float32, out=out)


def fused_available(acc: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> bool:
    """True when the fused kernel can serve this module (and ``BRITTLE_FUSED_SNIP=0`` does not turn it off)."""
    return (triton is not None and acc.is_cuda and x.device == acc.device and g.device == acc.device
            and x.dtype in (torch.bfloat16, torch.float16) and g.dtype == x.dtype
            and os.environ.get("BRITTLE_FUSED_SNIP", "1") != "0")


if triton is not None:

    @triton.autotune(
        configs=[
            triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_warps=8, num_stages=3),
            triton.Config({"BM": 128, "BN": 64, "BK": 64}, num_warps=4, num_stages=4),
            triton.Config({"BM": 64, "BN": 128, "BK": 64}, num_warps=4, num_stages=4),
            triton.Config({"BM": 64, "BN": 64, "BK": 64}, num_warps=4, num_stages=3),
        ],
        key=["M", "N"],
        restore_value=["ACC"],  # autotuning runs the kernel several times: each run adds into ACC
    )
    @triton.jit
    def _abs_example_grads_kernel(G, X, ACC, LEN, B, M, N,
                                  sgb, sgt, sgm, sxb, sxt, sxn, sam, san,
                                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # One program per [BM, BN] tile of the [M = d_out, N = d_in] accumulator.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        total = tl.zeros((BM, BN), dtype=tl.float32)
        for b in range(B):
            length = tl.load(LEN + b)
            tile = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, length, BK):
                kk = k0 + rk
                # G[b, kk, rm] loaded as [BM, BK] (transposed read), X[b, kk, rn] as [BK, BN].
                g = tl.load(G + b * sgb + kk[None, :] * sgt + rm[:, None] * sgm,
                            mask=(kk[None, :] < length) & (rm[:, None] < M), other=0.0)
                x = tl.load(X + b * sxb + kk[:, None] * sxt + rn[None, :] * sxn,
                            mask=(kk[:, None] < length) & (rn[None, :] < N), other=0.0)
                tile += tl.dot(g, x)
            total += tl.abs(tile)
        ptrs = ACC + rm[:, None] * sam + rn[None, :] * san
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(ptrs, tl.load(ptrs, mask=mask) + total, mask=mask)


def add_abs_example_grads(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor, lengths: torch.Tensor | list[int]) -> None:
    """``acc[i, j] += sum_n |sum_{t < lengths[n]} g[n, t, i] * x[n, t, j]|`` in place.

    ``acc``: fp32 ``[d_out, d_in]``; ``g``: ``[B, T, d_out]``; ``x``: ``[B, T, d_in]`` (bf16/fp16, same CUDA
    device); ``lengths``: per example, the positions that enter its gradient (best an int32 tensor on that device,
    made once per batch: a list is copied to the device on every call, which waits for the GPU).
    """
    B, _, M = g.shape
    N = x.shape[-1]
    lens = lengths if isinstance(lengths, torch.Tensor) else torch.tensor(lengths, dtype=torch.int32, device=acc.device)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))  # noqa: E731
    _abs_example_grads_kernel[grid](g, x, acc, lens, B, M, N, *g.stride(), *x.stride(), *acc.stride())
