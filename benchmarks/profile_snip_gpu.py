"""Profile SNIP scoring of a random Llama-3.2-1B-shaped model on a CUDA GPU (torch.profiler tables).

Usage: python benchmarks/profile_snip_gpu.py bfloat16|float32, after
``python benchmarks/bench_scoring.py --export .gpu`` on a machine with the asset wheels (writes the tokenizer
and the data it reads). Output of 2026-11-27 on an H200: benchmarks/results/*profile*."""
import sys, time, torch
sys.path.insert(0, "benchmarks")
from bench_scoring import load_bench_model, batches_of, floor_time, sync
from brittle.data.core import load_file, sample
from brittle.scoring import compute_scores
dtype = getattr(torch, sys.argv[1])
model, tok = load_bench_model("random:llama-1b", ".gpu/tok", dtype, "cuda")
ex = sample(load_file(".gpu/harmful-fixed-refusal.jsonl", require_response=True), 32, 0)
b = batches_of(tok, ex, 8, 512, "cuda")
floor_time(model, b[:1])
compute_scores(model, tok, ex[:8], "snip", batch_size=8, max_length=512, progress=False)  # warm-up
sync("cuda"); t = time.perf_counter()
compute_scores(model, tok, ex, "snip", batch_size=8, max_length=512, progress=False)
sync("cuda"); print(sys.argv[1], "SNIP 32 ex after warm-up", round(time.perf_counter() - t, 2), "floor", round(floor_time(model, b), 2))
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    compute_scores(model, tok, ex[:16], "snip", batch_size=8, max_length=512, progress=False)
    sync("cuda")
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
