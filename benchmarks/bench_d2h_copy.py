"""Micro-benchmark: moving fp32 score tensors (Llama-3.2-1B linear shapes, 3.6 GiB) from the GPU to the CPU.

Compares ``.cpu()`` into pageable memory, one pinned buffer for everything, and one pinned staging buffer
(the size of the largest tensor) followed by a clone -- the last is what ``brittle.scoring.to_cpu`` does.
Needs a CUDA GPU. Usage: ``python benchmarks/bench_d2h_copy.py`` (results of 2026-11-27 on an H200 in
``benchmarks/results/``).
"""
import time, torch
shapes = [(2048, 2048)] * 32 + [(512, 2048)] * 32 + [(8192, 2048)] * 32 + [(2048, 8192)] * 16  # ~ llama-1b linears
def mk(): return [torch.rand(s, device="cuda") for s in shapes]
tot = sum(a * b for a, b in shapes) * 4 / 2**30
for trial in range(2):
    g = mk(); torch.cuda.synchronize(); t = time.perf_counter()
    out = [x.cpu() for x in g]; torch.cuda.synchronize(); a = time.perf_counter() - t
    del out
    g = mk(); torch.cuda.synchronize(); t = time.perf_counter()
    flat = torch.empty(sum(x.numel() for x in g), dtype=torch.float32, pin_memory=True); t_alloc = time.perf_counter() - t
    views, o = [], 0
    for x in g:
        v = flat[o:o + x.numel()].view(x.shape); v.copy_(x, non_blocking=True); views.append(v); o += x.numel()
    torch.cuda.synchronize(); b = time.perf_counter() - t
    del views, flat
    g = mk(); torch.cuda.synchronize(); t = time.perf_counter()
    stage = torch.empty(max(x.numel() for x in g), dtype=torch.float32, pin_memory=True)
    out = []
    for x in g:
        s = stage[:x.numel()].view(x.shape); s.copy_(x); out.append(s.clone())
    c = time.perf_counter() - t
    print(f"trial {trial}: {tot:.2f} GiB: .cpu() {a:.2f}s ({tot/a:.1f} GiB/s); one pinned buffer {b:.2f}s (alloc {t_alloc:.2f}s); staged+clone {c:.2f}s")
