"""Overhead of live drift tracking: LoRA fine-tuning with and without a DriftTracker, in one run.

Usage::

    .venv/bin/python benchmarks/bench_drift.py --run runs/demo            # groups and data of a demo run
    .venv/bin/python benchmarks/bench_drift.py --run runs/demo --steps 40 --every 10 --repeats 2

Trains the run's model (default: the organism of the demo, ``smollm2-135m-safe``) on its utility set with LoRA
(r 8, alpha 16, every linear module, batch 4, lr 1e-4) for ``--steps`` steps, alternating runs without tracking
and with a tracker on every group file of ``RUN/groups`` recorded every ``--every`` steps (plus step 0 and the
end), and prints the wall-clock ratio tracked / untracked of each pair (the target: at most 1.05 at every 10
steps). Training is deterministic, so both runs of a pair do the same arithmetic apart from the tracking. Since
two runs on a shared CPU differ by several percent on their own, the tracked run also times the tracker itself
(set-up, every record, the end) and prints 1 + tracker time / the rest of that run: the overhead measured
inside one run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from brittle.data.core import load_file, sample
from brittle.drift import DriftTracker
from brittle.finetune import LoraTrainConfig, train_lora
from brittle.groups import load_group
from brittle.presets import load_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="a run directory with groups/ and data/")
    ap.add_argument("--model", default="smollm2-135m-safe")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    examples = sample(load_file(args.run / "data" / "utility.jsonl", require_response=True), 4 * args.steps, 0)
    groups = {p.stem: load_group(p)[0] for p in sorted((args.run / "groups").glob("*.safetensors"))}
    tracked = sum(int(m.sum()) for g in groups.values() for m in g.values())
    cfg = LoraTrainConfig(r=8, alpha=16, lr=1e-4, batch_size=4, max_steps=args.steps, seed=0)
    print(f"model {args.model}, {args.steps} steps, batch 4, LoRA r 8 on every linear module; tracking "
          f"{len(groups)} groups ({', '.join(groups)}), {tracked:,} entries, every {args.every} steps; "
          f"torch threads {torch.get_num_threads()}")
    for rep in range(args.repeats):
        seconds = {}
        for kind in ("untracked", "tracked"):
            model, tok = load_model(args.model)
            t0 = time.perf_counter()
            tracker = DriftTracker(model, groups, every=args.every) if kind == "tracked" else None
            inside = [time.perf_counter() - t0]  # seconds spent in the tracker

            def on_step(step, loss, m):
                t = time.perf_counter()
                tracker.on_step(step, loss, m)
                inside[0] += time.perf_counter() - t

            trained, hist = train_lora(model, tok, examples, cfg, progress=False, on_step=on_step if tracker else None)
            if tracker:
                t = time.perf_counter()
                tracker.finish(args.steps, trained)
                inside[0] += time.perf_counter() - t
            seconds[kind] = time.perf_counter() - t0
            extra = ""
            if tracker:
                share = 1 + inside[0] / (seconds[kind] - inside[0])
                extra = f", {len(tracker.rows)} drift rows, {inside[0]:.1f} s in the tracker: in-run ratio {share:.3f}"
            print(f"  repeat {rep + 1} {kind:9s}: {seconds[kind]:7.1f} s (final loss {hist.loss[-1]:.4f}{extra})")
        print(f"  repeat {rep + 1} ratio tracked / untracked: {seconds['tracked'] / seconds['untracked']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
