"""GPU benchmark in one call (issue "Scale"): SNIP against the forward+backward floor, LoRA with and without
drift tracking, peak memory. Randomly initialised models of public shapes (no weights can be downloaded on a
lent GPU machine); the tokenizer comes from a directory (``bench_scoring.py --export DIR`` writes one).

Usage (prepared and tried on the CPU with ``--shapes llama-135m --examples 8 --length 96 --lora-steps 4``)::

    python benchmarks/bench_gpu.py --tokenizer .gpu/tok --shapes llama-1b,llama2-7b 2>&1 | tee bench_gpu.txt

(Filter its output with ``grep --line-buffered`` if at all: a plain ``grep`` in a pipe holds everything back
until it exits, and a run stopped at a time limit then shows nothing -- which cost this project a GPU run.)

Sections, in this order (each prints its figures as soon as it has them; a failing section does not stop the
others; the open targets come first, so that a run stopped at its time limit has them):

1. kernel check: the fused SNIP kernel (``brittle.scoring.kernels``) and the cuBLAS products that serve without it,
   each against a float64 reference on random bf16 inputs with ragged lengths (the kernel skipped where it is
   unavailable); then, per linear-module shape of the
   benchmarked models, one module's SNIP products for a batch (``Snip.accumulate``, the scorer's own call) with the
   fused kernel and with the cuBLAS products (``BRITTLE_FUSED_SNIP=0``), beside the weight-gradient product of the
   floor (``dY^T X`` over the batch's tokens, bf16): time and TFLOP/s of each, which says whether the per-example
   products cost what a weight gradient does;
2. per shape: SNIP (with brittle.memory's estimate beside the measured peak) on ``--examples`` x ``--length``
   tokens (bf16 model, fp32 accumulators, the fused kernel: the default on CUDA), the plain forward+backward floor
   over the same batches, their ratio, peak GPU memory;
3. on the last shape: ``--lora-steps`` LoRA steps (r 8, alpha 16, every linear module, lr 1e-4; batch 16 of
   ``--length`` tokens, as 4 x 4 with gradient accumulation when the trainer has it) without and with a drift
   tracker on five random 1 % groups every 10 steps (drawn on the device; the tracker's construction timed on its
   own, before the tracked run); the ratio of the two wall-clock times and the tracker's share measured inside the
   tracked run;
4. on the last shape: one ablation evaluation's generation (``--eval-prompts`` prompts, 64 new tokens, a random 1 %
   group zeroed), then 4x as many prompts with ``batch_size="auto"`` (the size chosen, the peak beside the estimate);
5. on the first shape, SNIP again and its variants: without the fused kernel (``BRITTLE_FUSED_SNIP=0``: cuBLAS
   batched products of the bf16 factors with fp32 output) and the difference between the two score sets, with the accumulators in host memory beside
   the memory planner's cost model for it, and with gradient checkpointing (peak beside the estimate).
6. on the first shape, a torch.profiler summary of two batches of SNIP and of the floor: time, device busy time,
   kernel launches, and the CUDA calls that make the host wait for the device (and copies), per batch; SNIP's top
   device kernels;
7. (CUDA only) the scores' copy to the host (``bench_d2h_copy.compare``): ``CpuCopier``'s staged copy against a
   double-buffered one. Section 2 also says how much of SNIP's time that copy took: the floor has nothing like it,
   and for a 7B model it moves 24 GiB.

Examples are random vocabulary words (a prompt of ~40 % of the length, the rest response), so that batches are
full-length: the timing does not depend on the text.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_scoring import batches_of, floor_time, gpu_peak_mb, load_bench_model, sync  # noqa: E402

from brittle.data.core import Example  # noqa: E402
from brittle.scoring import compute_scores  # noqa: E402


DEVICE = "cuda"


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def estimate_line(model, kind: str, **kw) -> str:
    """brittle.memory's estimate for this model, to set beside the measured peak (checks the planner's formulas)."""
    from brittle import memory

    shape = memory.ModelShape.of_model(model)
    est = (memory.estimate_scoring if kind == "scoring" else memory.estimate_finetune)(shape, dtype="bfloat16", **kw)
    return f"; brittle.memory estimate {est.total / 2**20:.0f} MiB ({', '.join(est.lines()[:-1])})"


def random_examples(tok, n: int, length: int, seed: int) -> list[Example]:
    """``n`` examples of roughly ``length`` tokens: random vocabulary tokens decoded to text."""
    rng = random.Random(seed)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(min(len(tok), 32000)) if i not in special]
    out = []
    for k in range(n):
        total = rng.randint(int(0.9 * length), int(1.1 * length))
        ids = [rng.choice(vocab) for _ in range(total)]
        cut = int(0.4 * total)
        out.append(Example(id=f"r{k}", prompt=tok.decode(ids[:cut]), response=tok.decode(ids[cut:]), source="random"))
    return out


def kernel_check() -> None:
    from brittle.scoring import kernels

    os.environ["BRITTLE_FUSED_SNIP"] = "1"
    dev = torch.device(DEVICE)
    g = torch.randn(5, 333, 1000, device=dev, dtype=torch.bfloat16)
    x = torch.randn(5, 333, 700, device=dev, dtype=torch.bfloat16)
    lengths = [333, 1, 0, 200, 65]
    acc = torch.zeros(1000, 700, device=dev)
    gd, xd = g.double(), x.double()
    ref = sum((gd[b, :n].t() @ xd[b, :n]).abs() for b, n in enumerate(lengths))
    # the cuBLAS products (the path without the kernel), through the scorer's own call
    from brittle.scoring.methods import BatchInfo, Snip

    os.environ["BRITTLE_FUSED_SNIP"] = "0"
    try:
        mixed = torch.zeros_like(acc)
        Snip().accumulate(mixed, x, g, BatchInfo(tuple(g.shape[:2]), upto=lengths), None)
    finally:
        os.environ["BRITTLE_FUSED_SNIP"] = "1"
    print(f"product check: max |cuBLAS products - float64| / max|ref| = "
          f"{((mixed.double() - ref).abs().max() / ref.abs().max()).item():.2e} "
          f"({'bf16 factors, fp32 output' if kernels.mixed_available(acc, x, g) else 'fp32 factors'})")
    if not kernels.fused_available(acc, x, g):
        print("kernel check: fused kernel not available here (no Triton or not CUDA)")
        return
    kernels.add_abs_example_grads(acc, g, x, lengths)
    err = ((acc.double() - ref).abs().max() / ref.abs().max()).item()
    acc2 = acc.clone()
    kernels.add_abs_example_grads(acc2, g, x, lengths)  # accumulates on top
    err2 = ((acc2.double() - 2 * ref).abs().max() / ref.abs().max()).item()
    print(f"kernel check: max |fused - float64| / max|ref| = {err:.2e} (once), {err2:.2e} (accumulated twice)")


def module_shapes(shapes: list[str]) -> list[tuple[int, int]]:
    """The distinct ``(d_out, d_in)`` of a Llama block's linear modules in the ``RANDOM_MODELS`` shapes."""
    from bench_scoring import RANDOM_MODELS

    out = []
    for name in shapes:
        c = RANDOM_MODELS[name]
        d, f = c["hidden_size"], c["intermediate_size"]
        kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
        out += [(d, d), (kv, d), (f, d), (d, f)]
    return list(dict.fromkeys(out))


def host_copy_section() -> None:
    """``bench_d2h_copy.compare``: the scores' copy to the host, staged (``CpuCopier``) against double-buffered."""
    from bench_d2h_copy import compare

    print("\n== scores to the host (1B shapes, 3.6 GiB of fp32)")
    compare(trials=2, with_pageable=False)


def products_section(args) -> None:
    """Per module shape: one batch of SNIP products (``Snip.accumulate``) fused and through cuBLAS, against the
    floor's weight-gradient product of the same factors; time per call (mean of 5, after a warm-up) and TFLOP/s,
    counting ``2 B T d_out d_in`` for each."""
    from brittle.scoring import kernels
    from brittle.scoring.methods import BatchInfo, Snip

    B, T = args.batch_size, args.length
    dev = torch.device(DEVICE)
    snip = Snip()
    batch = BatchInfo((B, T), upto=[T] * B)
    print(f"\n== SNIP products per module and batch ({B} x {T} tokens, bf16 factors, fp32 accumulator)")
    for M, N in module_shapes(args.shapes.split(",")):
        g = torch.randn(B, T, M, device=dev, dtype=torch.bfloat16)
        x = torch.randn(B, T, N, device=dev, dtype=torch.bfloat16)
        acc = torch.zeros(M, N, device=dev)
        work = torch.empty(snip.workspace_numel((M, N), B), device=dev)
        runs = {"fused": lambda: snip.accumulate(acc, x, g, batch, work),
                "cuBLAS": lambda: snip.accumulate(acc, x, g, batch, work),
                "weight gradient": lambda: torch.mm(g.view(-1, M).t(), x.view(-1, N))}
        line = []
        for name, run in runs.items():
            os.environ["BRITTLE_FUSED_SNIP"] = "0" if name == "cuBLAS" else "1"
            if name == "fused" and not kernels.fused_available(acc, x, g) or (
                    name == "cuBLAS" and not kernels.mixed_available(acc, x, g)):
                name += " (not available here: fp32 products)"
            run()
            sync(DEVICE)
            t = time.perf_counter()
            for _ in range(5):
                run()
            sync(DEVICE)
            s = (time.perf_counter() - t) / 5
            line.append(f"{name} {s * 1e3:.2f} ms ({2 * B * T * M * N / s / 1e12:.3g} TFLOP/s)")
        os.environ["BRITTLE_FUSED_SNIP"] = "1"
        print(f"{M} x {N}: " + ", ".join(line))
        del g, x, acc, work


def snip_section(shape: str, args, variants: bool = False) -> None:
    dtype = torch.bfloat16
    t = time.perf_counter()
    model, tok = load_bench_model(f"random:{shape}", args.tokenizer, dtype, DEVICE)
    sync(DEVICE)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n== {shape}: {n_params / 1e9:.2f} B parameters, bf16, initialised on {DEVICE} in {time.perf_counter() - t:.1f} s")
    examples = random_examples(tok, args.examples, args.length, 0)
    kw = dict(batch_size=args.batch_size, max_length=args.length, progress=False)
    compute_scores(model, tok, examples[: args.batch_size], "snip", **kw)  # warm-up (kernel autotuning)
    stats: dict = {}
    copies: list[float] = []
    fused, snip_s = timed_snip(model, tok, examples, kw, copies, stats=stats)
    print(f"SNIP {args.examples} x {args.length}: {snip_s:.2f} s ({stats['n_tokens']} tokens, "
          f"{stats['n_response_tokens']} in the loss, batch {args.batch_size}){gpu_peak_mb(DEVICE)}"
          f"{estimate_line(model, 'scoring', method='snip', batch_size=args.batch_size, max_length=args.length, fused=True)}")
    batches = batches_of(tok, examples, args.batch_size, args.length, DEVICE)
    floor_time(model, batches[:1])  # warm-up
    reset_peak()
    floor_s = floor_time(model, batches)
    print(f"floor (plain fwd+bwd, weights requiring grad, same batches): {floor_s:.2f} s{gpu_peak_mb(DEVICE)}; "
          f"SNIP / floor = {snip_s / floor_s:.2f} (target <= 1.5)")
    gib = sum(v.numel() for v in fused.values()) * 4 / 2**30
    print(f"of SNIP's time, the scores' copy to the host ({gib:.2f} GiB): {sum(copies):.2f} s "
          f"({gib / max(sum(copies), 1e-9):.1f} GiB/s); SNIP without it / floor = {(snip_s - sum(copies)) / floor_s:.2f}")
    if variants:
        os.environ["BRITTLE_FUSED_SNIP"] = "0"
        try:
            plain, plain_s = timed_snip(model, tok, examples, kw)
        finally:
            os.environ["BRITTLE_FUSED_SNIP"] = "1"
        print(f"SNIP without the fused kernel (cuBLAS products, fp32 output): {plain_s:.2f} s = {plain_s / floor_s:.2f} x floor; "
              f"max over modules of max|fused - unfused| / max|unfused| = {max_rel_diff(fused, plain):.2e}")
        del plain
        host_section(model, tok, examples, kw, snip_s, fused)
        ckpt, ckpt_s = timed_snip(model, tok, examples, kw, gradient_checkpointing=True)
        print(f"SNIP with gradient checkpointing: {ckpt_s:.2f} s = {ckpt_s / floor_s:.2f} x floor{gpu_peak_mb(DEVICE)}"
              f"{estimate_line(model, 'scoring', method='snip', batch_size=args.batch_size, max_length=args.length, fused=True, gradient_checkpointing=True)}"
              f"; max|checkpointed - plain| / max|plain| = {max_rel_diff(ckpt, fused):.2e}")
        del ckpt
    del fused, model


def timed_snip(model, tok, examples, kw, copy_seconds: list | None = None, **options) -> tuple[dict, float]:
    """SNIP scores and the seconds they took (GPU synchronised, peak memory counter reset first); with
    ``copy_seconds``, the seconds of the scores' final copy to the host (``CpuCopier``) are appended to it."""
    from brittle.scoring.compute import CpuCopier

    call = CpuCopier.__call__

    def timed_call(self, t):  # the copy is synchronous anyway: the syncs only separate it from the queued work
        sync(DEVICE)
        start = time.perf_counter()
        out = call(self, t)
        copy_seconds.append(time.perf_counter() - start)
        return out

    reset_peak()
    sync(DEVICE)
    if copy_seconds is not None:
        CpuCopier.__call__ = timed_call
    try:
        t = time.perf_counter()
        scores = compute_scores(model, tok, examples, "snip", **kw, **options)
        sync(DEVICE)
        return scores, time.perf_counter() - t
    finally:
        CpuCopier.__call__ = call


def max_rel_diff(a: dict, b: dict) -> float:
    """Max over modules of ``max|a - b| / max|b|``."""
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max()).item() for n in b)


#: CUDA runtime calls that make the host wait for the device (a read of a device value is one of them), and copies.
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync", "cudaMemcpy")


def profile_section(shape: str, args) -> None:
    """torch.profiler over two batches of SNIP and of the floor on ``shape``: time, device busy time, kernel launches
    and the CUDA calls that make the host wait for the device (and copies), per batch; then SNIP's top device
    kernels. Says on the GPU why SNIP / floor is what it is (the scorer's own waits are meant to be a few host-to-device
    copies per batch, before its forward pass)."""
    from torch.profiler import ProfilerActivity, profile

    model, tok = load_bench_model(f"random:{shape}", args.tokenizer, torch.bfloat16, DEVICE)
    examples = random_examples(tok, 2 * args.batch_size, args.length, 0)
    kw = dict(batch_size=args.batch_size, max_length=args.length, progress=False)
    batches = batches_of(tok, examples, args.batch_size, args.length, DEVICE)
    compute_scores(model, tok, examples, "snip", **kw)  # warm-up
    floor_time(model, batches)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    print(f"\n== profile on {shape}: 2 batches of {args.batch_size} x {args.length}, per batch")
    for name, run in (("SNIP", lambda: compute_scores(model, tok, examples, "snip", **kw)),
                      ("floor", lambda: floor_time(model, batches))):
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            run()
            sync(DEVICE)
            wall_ms = (time.perf_counter() - t) * 1e3 / 2
        events = prof.key_averages()
        count = {e.key: e.count for e in events}
        dev_ms = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3 / 2
        waits = ", ".join(f"{k} {count[k] / 2:g}" for k in WAITS if count.get(k))
        print(f"{name}: {wall_ms:.1f} ms (profiled), device busy {dev_ms:.1f} ms, "
              f"{count.get('cudaLaunchKernel', 0) / 2:g} kernel launches; waits and copies: {waits or 'none'}")
        if name == "SNIP" and DEVICE == "cuda":
            print(events.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=60))


def host_section(model, tok, examples, kw, device_s: float, device_scores) -> None:
    """SNIP with the accumulators in host memory (``--accumulators host``) against the same run on the device, and
    the memory planner's cost model for it: ``4 * P_lin / R_host`` seconds per batch, with ``R_host`` measured by
    ``brittle.memory.measure_rates``."""
    from brittle.memory import ModelShape, measure_rates
    from brittle.models import linear_modules, linear_weight

    w = linear_weight(next(iter(linear_modules(model).values())))
    flops, host_rate = measure_rates(w.device, w.dtype)
    host, host_s = timed_snip(model, tok, examples, kw, host_accumulators=True)
    n_batches = -(-len(examples) // kw["batch_size"])
    predicted = 4 * ModelShape.of_model(model).linear_params / host_rate
    worst = max_rel_diff(host, device_scores)
    print(f"SNIP with host accumulators: {host_s:.2f} s against {device_s:.2f} s on the device, "
          f"{(host_s - device_s) / n_batches:.3f} s more per batch; planner's model 4 P_lin / R_host = {predicted:.3f} s "
          f"per batch (R_host {host_rate / 2**30:.1f} GiB/s, matmul {flops / 1e12:.3g} TFLOP/s){gpu_peak_mb(DEVICE)}; "
          f"max|host - device| / max|device| = {worst:.2e}")


def eval_section(shape: str, args) -> None:
    """One ablation evaluation's generation: a random 1 % group zeroed, ``--eval-prompts`` prompts answered greedily
    (64 new tokens, batches of 64), weights restored. Random weights: the text is noise, the time is not."""
    from brittle.ablation import ablated
    from brittle.evaluation.generation import GenerationConfig, generate

    model, tok = load_bench_model(f"random:{shape}", args.tokenizer, torch.bfloat16, DEVICE)
    group = random_group(model, torch.Generator(device=DEVICE).manual_seed(0))
    prompts = [e.prompt[:200] for e in random_examples(tok, args.eval_prompts, 64, 2)]
    cfg = GenerationConfig(max_new_tokens=64, batch_size=64)
    generate(model, tok, prompts[:8], GenerationConfig(max_new_tokens=4, batch_size=8), progress=False)  # warm-up
    reset_peak()
    sync(DEVICE)
    t = time.perf_counter()
    with ablated(model, group):
        answers = generate(model, tok, prompts, cfg, progress=False)
    sync(DEVICE)
    s = time.perf_counter() - t
    new_tokens = sum(len(tok(a[0], add_special_tokens=False)["input_ids"]) for a in answers)
    print(f"\n== ablation evaluation on {shape}: {len(prompts)} prompts x 64 new tokens (greedy, batch 64) with a "
          f"random 1 % group zeroed: {s:.1f} s ({new_tokens / s:.0f} decoded tokens/s){gpu_peak_mb(DEVICE)}")
    del group
    # batch_size="auto" on 4x the prompts (the group's masks freed first): the size chosen from the free memory,
    # the time, and the measured peak beside brittle.memory's estimate for that batch
    from brittle.data.core import render_prompt
    from brittle.evaluation.generation import auto_batch_size
    from brittle.memory import ModelShape, estimate_generation

    many = prompts * 4
    auto_cfg = GenerationConfig(max_new_tokens=64, batch_size="auto")
    texts = [render_prompt(tok, p, None) for p in many]
    n = auto_batch_size(model, tok, texts, auto_cfg)
    longest = max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    est = estimate_generation(ModelShape.of_model(model), dtype="bfloat16", batch_size=n, prompt_length=longest,
                              max_new_tokens=64)
    reset_peak()
    sync(DEVICE)
    t = time.perf_counter()
    answers = generate(model, tok, many, auto_cfg, progress=False)
    sync(DEVICE)
    s = time.perf_counter() - t
    new_tokens = sum(len(tok(a[0], add_special_tokens=False)["input_ids"]) for a in answers)
    print(f"generation with batch_size=auto: {n} prompts per batch for {len(many)} prompts: {s:.1f} s "
          f"({new_tokens / s:.0f} decoded tokens/s){gpu_peak_mb(DEVICE)}; brittle.memory estimate of that batch "
          f"{est.total / 2**20:.0f} MiB ({', '.join(est.lines()[:-1])}; longest prompt {longest} tokens)")
    del model


def random_group(model, gen: torch.Generator, fraction: float = 0.01) -> dict[str, torch.Tensor]:
    """A random group: each linear weight entry in it with probability ``fraction``, drawn on ``DEVICE`` (a 7B
    model's 6.5 G draws take milliseconds there, minutes on the CPU); the masks stay there (1 byte per weight)."""
    from brittle.models import linear_modules, linear_weight

    return {n: torch.rand(linear_weight(m).shape, generator=gen, device=DEVICE) < fraction
            for n, m in linear_modules(model).items()}


def lora_section(shape: str, args) -> None:
    from brittle.drift import DriftTracker
    from brittle.finetune import LoraTrainConfig, train_lora

    model, tok = load_bench_model(f"random:{shape}", args.tokenizer, torch.bfloat16, DEVICE)
    examples = random_examples(tok, 16 * args.lora_steps, args.length, 1)
    accumulate = "grad_accumulation" in LoraTrainConfig.model_fields
    batch = dict(batch_size=4, grad_accumulation=4) if accumulate else dict(batch_size=16)
    cfg = LoraTrainConfig(r=8, alpha=16, lr=1e-4, max_steps=args.lora_steps, max_length=args.length, seed=0, **batch)
    print(f"\n== LoRA on {shape}: {args.lora_steps} steps of {'4 x 4' if accumulate else '16'} examples x {args.length} "
          f"tokens; tracker: 5 random 1 % groups every 10 steps")
    seconds, built = {}, 0.0
    for kind in ("untracked", "tracked"):
        tracker = None
        if kind == "tracked":  # built before the timed run, its masks freed: the peak below is the training's
            sync(DEVICE)
            t = time.perf_counter()
            gen = torch.Generator(device=DEVICE).manual_seed(0)
            groups = {f"random{k}": random_group(model, gen) for k in range(5)}
            sync(DEVICE)
            drawn = time.perf_counter() - t
            mask_gib = sum(m.numel() for g in groups.values() for m in g.values()) / 2**30
            t = time.perf_counter()
            tracker = DriftTracker(model, groups, every=10)
            sync(DEVICE)
            built = time.perf_counter() - t
            tracked = sum(len(rows) for idx in tracker.index.values() for rows, _ in idx.values())
            del groups
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            print(f"tracker: {tracked:,} entries; masks drawn on {DEVICE} in {drawn:.2f} s ({mask_gib:.1f} GiB), "
                  f"tracker built in {built:.2f} s (W_0, statistics context, step-0 record)")
        reset_peak()
        sync(DEVICE)
        t0 = time.perf_counter()
        inside = [0.0]

        def on_step(step, loss, m):
            sync(DEVICE)
            t = time.perf_counter()
            tracker.on_step(step, loss, m)
            sync(DEVICE)
            inside[0] += time.perf_counter() - t

        trained, hist = train_lora(model, tok, examples, cfg, progress=False, on_step=on_step if tracker else None)
        if tracker is not None:
            t = time.perf_counter()
            tracker.finish(args.lora_steps, trained)
            sync(DEVICE)
            inside[0] += time.perf_counter() - t
        sync(DEVICE)
        seconds[kind] = time.perf_counter() - t0
        extra = ""
        if tracker is not None:
            extra = (f", {len(tracker.rows)} drift rows, {inside[0]:.2f} s in the tracker: in-run ratio "
                     f"{1 + inside[0] / (seconds[kind] - inside[0]):.3f}")
        print(f"{kind:9s}: {seconds[kind]:.1f} s = {seconds[kind] / args.lora_steps:.3f} s/step, final loss "
              f"{hist.loss[-1]:.4f}{gpu_peak_mb(DEVICE)}{extra}"
              f"{estimate_line(model, 'finetune', batch_size=cfg.batch_size, max_length=args.length)}")
        model = trained.unload()  # the base model without the adapters (nothing was merged)
    print(f"ratio tracked / untracked: {seconds['tracked'] / seconds['untracked']:.3f} (target <= 1.05); with the "
          f"tracker's construction: {(seconds['tracked'] + built) / seconds['untracked']:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="a tokenizer directory")
    ap.add_argument("--shapes", default="llama-1b,llama2-7b", help="comma-separated bench_scoring.RANDOM_MODELS names")
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lora-steps", type=int, default=100)
    ap.add_argument("--eval-prompts", type=int, default=128, help="0: no ablation-evaluation section")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to try the script out on a tiny shape")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu.py needs a CUDA device (--device cpu to try it out)")
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
              f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    shapes = args.shapes.split(",")
    # the open targets first (SNIP / floor, drift overhead), so that a run cut at its time limit has them
    sections = [("kernel check", kernel_check), ("SNIP products", lambda: products_section(args))]
    sections += [(f"SNIP {s}", lambda s=s: snip_section(s, args)) for s in shapes]
    if args.lora_steps:
        sections.append((f"LoRA {shapes[-1]}", lambda: lora_section(shapes[-1], args)))
    if args.eval_prompts:
        sections.append((f"evaluation {shapes[-1]}", lambda: eval_section(shapes[-1], args)))
    sections.append((f"SNIP variants {shapes[0]}", lambda: snip_section(shapes[0], args, variants=True)))
    sections.append((f"profile {shapes[0]}", lambda: profile_section(shapes[0], args)))
    if DEVICE == "cuda":
        sections.append(("host copy", host_copy_section))
    failed = 0
    for name, run in sections:
        try:
            run()
        except Exception:  # report and go on: one call of a scarce GPU should bring back every figure it can
            failed += 1
            print(f"\n!! section '{name}' failed:")
            traceback.print_exc(file=sys.stdout)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
