"""The benchmark scripts run end to end on a tiny shape on the CPU: a script that rots is found here, not on the
way to a scarce GPU (benchmarks/bench_gpu.py is what a lent GPU runs, in one call)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def test_bench_gpu_runs_every_section_on_a_tiny_shape(smol_dir):
    out = _run("benchmarks/bench_gpu.py", "--device", "cpu", "--tokenizer", str(smol_dir), "--shapes", "llama-tiny",
               "--examples", "4", "--length", "96", "--batch-size", "2", "--lora-steps", "2", "--eval-prompts", "2")
    assert "!! section" not in out
    for line in ("SNIP / floor = ", "ratio tracked / untracked: ", "generation with batch_size=auto: ",
                 "SNIP without the fused kernel", "SNIP with host accumulators: ", "SNIP with gradient checkpointing: ",
                 "== profile on llama-tiny", "waits and copies: ",
                 "== SNIP products per module and batch", "product check: max |cuBLAS products - float64|", "of SNIP's time, the scores' copy to the host", "128 x 64: fused ", "cuBLAS ", "weight gradient "):
        assert line in out, line


def test_bench_scoring_bench_overhead_and_memory_table_run():
    out = _run("benchmarks/bench_scoring.py", "--model", "random:llama-tiny", "--nsamples", "4", "--batch-size", "2",
               "--max-length", "96", "--baseline-layers", "1", "--baseline-examples", "2")
    assert "SNIP / mean floor = " in out and "max relative difference brittle vs layer-by-layer = " in out
    out = _run("benchmarks/bench_overhead.py", "--layers", "2", "--examples", "8", "--repeats", "1")
    assert "SNIP / floor = " in out and "Wanda / forward = " in out
    table = _run("benchmarks/memory_table.py").splitlines()
    assert table[0].startswith("| model |") and len(table) == 7  # header, rule, five models
