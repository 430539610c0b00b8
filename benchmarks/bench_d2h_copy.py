"""Micro-benchmark: moving fp32 score tensors (Llama-3.2-1B linear shapes, 3.6 GiB) from the GPU to the CPU.

Compares ``.cpu()`` into pageable memory, one pinned buffer for everything, and ``brittle.scoring.CpuCopier``
(one pinned staging buffer the size of the largest tensor, then a clone). Needs a CUDA GPU. Usage:
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


def main() -> None:
    gib = sum(a * b for a, b in SHAPES) * 4 / 2**30
    for trial in range(2):
        a = timed(lambda ts: [x.cpu() for x in ts])
        b = timed(one_pinned_buffer)
        c = timed(lambda ts: list(map(CpuCopier(ts), ts)))
        print(f"trial {trial}: {gib:.2f} GiB: .cpu() {a:.2f}s ({gib / a:.1f} GiB/s); one pinned buffer {b:.2f}s; "
              f"staged (CpuCopier) {c:.2f}s")


if __name__ == "__main__":
    main()
