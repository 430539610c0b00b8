"""Several processes (brittle.distributed): two gloo processes on the CPU score like one process, in the library
and through a launcher (torchrun) running `brittle score`, where process 0 alone writes the stage folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from brittle.scoring import compute_scores, load_scores
from brittle.testing import tiny_model

N_EXAMPLES = 7  # odd: the two shards differ in size


def _examples(vocab: int = 512) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(N_EXAMPLES):
        n = 6 + 3 * i
        ids = torch.randint(3, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 2] = -100  # the prompt half
        out.append({"input_ids": ids, "labels": labels})
    return out


def _worker(rank: int, world: int, init_file: str, out_file: str, method: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        stats: dict = {}
        scores = compute_scores(tiny_model("llama"), None, _examples(), method, batch_size=2, max_length=None,
                                progress=False, stats=stats)
        if rank == 0:
            torch.save({"scores": scores, "stats": stats}, out_file)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("method", ["snip", "wanda"])
def test_two_gloo_processes_give_the_scores_of_one(method, tmp_path):
    """Each process scores its share of the examples and the accumulators are summed: equal to one process up to
    fp32 summation order. Catches a missing all_reduce (each process would hold half the sum), examples scored
    by both processes (twice the sum) and counts of one share only."""
    import torch.multiprocessing as mp

    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out), method), nprocs=2, join=True)
    got = torch.load(out)
    stats: dict = {}
    ref = compute_scores(tiny_model("llama"), None, _examples(), method, batch_size=2, max_length=None,
                         progress=False, stats=stats)
    assert list(got["scores"]) == list(ref)
    for name, r in ref.items():
        assert r.abs().max() > 0
        assert (got["scores"][name] - r).abs().max() <= 1e-5 * r.abs().max(), name
    assert got["stats"] == stats and stats["n_examples"] == N_EXAMPLES


def test_torchrun_brittle_score_writes_one_folder_with_the_single_process_scores(smol_tokenizer, tmp_path):
    """`torchrun --nproc_per_node 2 -m brittle score`: one stage folder and manifest (process 0's), no leftovers
    of process 1, the scores of a single-process run (to fp32 summation order), and logs printed once."""
    from conftest import tiny_run_settings

    sets = tiny_run_settings(smol_tokenizer, tmp_path)
    model = json.loads(sets[0].split("=", 1)[1])
    data = json.loads(sets[1].split("=", 1)[1])
    base = ["score", "--model", model, "--data", data, "--nsamples", "5", "--batch-size", "2", "--max-length", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "brittle", *base, "--out", str(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "brittle", *base, "--out", str(tmp_path / "two")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stdout + multi.stderr
    assert multi.stdout.count("scores: ") == 1  # process 0 alone reports
    folder = tmp_path / "two" / "scores" / "safety-snip"
    leftovers = sorted(p.name for p in folder.parent.iterdir())
    assert leftovers == ["safety-snip"], leftovers
    one, _ = load_scores(tmp_path / "one" / "scores" / "safety-snip" / "scores.safetensors")
    two, meta = load_scores(folder / "scores.safetensors")
    for name, r in one.items():
        assert (two[name] - r).abs().max() <= 1e-5 * r.abs().max(), name
    man = json.loads((folder / "manifest.json").read_text())
    assert man["outputs"]["n_examples"] == 5 and int(meta["n_examples"]) == 5


def test_shipped_accelerate_configs_load_in_accelerate():
    """configs/accelerate/*.yaml: one GPU, one node with several GPUs, several nodes; each read by accelerate's
    own config loader (unknown keys or bad values raise there)."""
    from importlib.resources import files

    from accelerate.commands.config.config_args import ClusterConfig

    folder = files("brittle") / "resources" / "configs" / "accelerate"
    got = {}
    for name in ("one-gpu", "one-node", "several-nodes"):
        cfg = ClusterConfig.from_yaml_file(str(folder / f"{name}.yaml"))
        got[name] = (str(cfg.distributed_type).split(".")[-1], cfg.num_machines, cfg.mixed_precision)
    assert got == {"one-gpu": ("NO", 1, "no"), "one-node": ("MULTI_GPU", 1, "no"),
                   "several-nodes": ("MULTI_GPU", 2, "no")}
