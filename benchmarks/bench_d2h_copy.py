"""Micro-benchmark: moving fp32 score tensors (Llama-3.2-1B linear shapes, 3.6 GiB) from the GPU to the CPU.

Compares ``.cpu()`` into pageable memory, one pinned buffer for everything, ``brittle.scoring.CpuCopier`` (one
pinned staging buffer the size of the largest tensor, then a clone), and a double-buffered variant of it (the
copy of tensor ``k + 1`` into one pinned buffer runs while the CPU clones tensor ``k`` out of the other), a
candidate for ``CpuCopier`` if it is faster; its copies are checked equal to ``.cpu()``'s. Needs a CUDA GPU. Usage:
``PYTHONPATH=src python benchmarks/bench_d2h_copy.py``. The 2026-11-27 H200 output in ``benchmarks/results/``
was made with an inline copy of the same staging code, before it moved into brittle.
"""

import time

import torch

from brittle.scoring import CpuCopier

SHAPES = [(2048, 2048)] * 32 + [(512, 2048)] * 32 + [(8192, 2048)] * 32 + [(2048, 8192)] * 16


def timed(fn) -> float:
    tensors = [torch.rand(s, device="cuda") for s in SHAPES]
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn(tensors)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def one_pinned_buffer(tensors) -> list[torch.Tensor]:
    flat = torch.empty(sum(x.numel() for x in tensors), dtype=torch.float32, pin_memory=True)
    views, offset = [], 0
    for x in tensors:
        views.append(flat[offset:offset + x.numel()].view(x.shape).copy_(x, non_blocking=True))
        offset += x.numel()
    return views


def double_buffered(tensors) -> list[torch.Tensor]:
    """Each tensor copied (non-blocking) into one of two pinned buffers the size of the largest; while that copy
    runs, the CPU clones the previous tensor out of the other buffer (after its copy's event)."""
    size = max(x.numel() for x in tensors)
    buffers = [torch.empty(size, dtype=torch.float32, pin_memory=True) for _ in range(2)]
    events = [torch.cuda.Event(), torch.cuda.Event()]
    out: list[torch.Tensor] = []

    def take(k: int, x: torch.Tensor) -> None:
        events[k].synchronize()
        out.append(buffers[k][: x.numel()].view(x.shape).clone())

    for i, x in enumerate(tensors):  # buffer i % 2 is free: the clone of tensor i - 2 finished at step i - 1
        buffers[i % 2][: x.numel()].view(x.shape).copy_(x, non_blocking=True)
        events[i % 2].record()
        if i:
            take((i - 1) % 2, tensors[i - 1])
    take((len(tensors) - 1) % 2, tensors[-1])
    return out


def compare(trials: int = 2, with_pageable: bool = True) -> None:
    """Print the time of each strategy on :data:`SHAPES` (fresh tensors per run), ``trials`` times."""
    gib = sum(a * b for a, b in SHAPES) * 4 / 2**30
    check = [torch.rand(s, device="cuda") for s in SHAPES[:3] + SHAPES[-3:]]
    same = all(torch.equal(a, b) for a, b in zip(double_buffered(check), (x.cpu() for x in check)))
    print(f"host copy: double-buffered copies equal .cpu()'s: {same}")
    for trial in range(trials):
        a = f".cpu() {timed(lambda ts: [x.cpu() for x in ts]):.2f}s; " if with_pageable else ""
        b = timed(one_pinned_buffer)
        c = timed(lambda ts: list(map(CpuCopier(ts), ts)))
        d = timed(double_buffered)
        print(f"host copy, trial {trial}: {gib:.2f} GiB: {a}one pinned buffer {b:.2f}s; staged (CpuCopier) {c:.2f}s "
              f"({gib / c:.1f} GiB/s); double-buffered {d:.2f}s ({gib / d:.1f} GiB/s)")


def main() -> None:
    compare()


if __name__ == "__main__":
    main()
