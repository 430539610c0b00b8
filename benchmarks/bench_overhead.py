"""The scorer's CPU-side cost per batch, the part a GPU cannot hide when the host is the bottleneck: SNIP and Wanda
against a plain forward+backward (and a plain forward) on a deep model whose arithmetic is negligible (16 layers of
width 32, vocabulary 512, random weights, pre-encoded random tokens), so that the time is Python, autograd and
operator dispatch. Ratios are measured in one run (best of ``--repeats``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_overhead.py

Why: on an H200 the scorer measured 2-4x the floor while its kernels were a fraction of that time (README, "On a
GPU"); the causes found were host reads of GPU values, which make the CPU wait for the GPU. Once nothing waits,
what remains on the host per batch is this overhead; if the floor itself is host-bound, SNIP / floor approaches
the ratio printed here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_scoring import floor_time  # noqa: E402

from brittle.data.core import IGNORE_INDEX  # noqa: E402
from brittle.models import linear_modules  # noqa: E402
from brittle.scoring import compute_scores  # noqa: E402
from brittle.scoring.compute import calibration_batches  # noqa: E402
from brittle.testing import tiny_model  # noqa: E402


def best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--length", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(0)
    encoded = []
    for _ in range(args.examples):
        ids = torch.randint(3, 500, (args.length,), generator=gen)
        labels = ids.clone()
        labels[: int(0.4 * args.length)] = IGNORE_INDEX  # the prompt: no loss
        encoded.append({"input_ids": ids, "labels": labels})
    model = tiny_model("llama", vocab_size=512, layers=args.layers, hidden=32, intermediate=64)
    n_mod = len(linear_modules(model))
    batches = calibration_batches(None, encoded, args.batch_size)
    kw = dict(batch_size=args.batch_size, max_length=args.length, progress=False)

    def forward() -> None:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False, logits_to_keep=1)

    per = {
        "SNIP": best(lambda: compute_scores(model, None, encoded, "snip", **kw), args.repeats),
        "floor (plain forward+backward, same loss)": best(lambda: floor_time(model, batches), args.repeats),
        "Wanda": best(lambda: compute_scores(model, None, encoded, "wanda", **kw), args.repeats),
        "plain forward": best(forward, args.repeats),
    }
    n_batches = len(batches)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); llama, {args.layers} layers of width 32, "
          f"{n_mod} scored modules; {args.examples} examples x {args.length} tokens in batches of {args.batch_size}")
    for name, seconds in per.items():
        print(f"{name}: {seconds / n_batches * 1e3:.2f} ms per batch")
    snip, floor = per["SNIP"], per["floor (plain forward+backward, same loss)"]
    wanda, fwd = per["Wanda"], per["plain forward"]
    print(f"SNIP / floor = {snip / floor:.2f}; SNIP adds {(snip - floor) / n_batches / n_mod * 1e6:.0f} us per module "
          f"and batch. Wanda / forward = {wanda / fwd:.2f}; Wanda adds {(wanda - fwd) / n_batches / n_mod * 1e6:.0f} us")


if __name__ == "__main__":
    main()
