"""Several processes (brittle.distributed): two gloo processes on the CPU score like one process, in the library
and through a launcher (torchrun) running `brittle score`, where process 0 alone writes the stage folders; and they
fine-tune like one process (data parallel), with a frozen group and checkpoints written by process 0."""

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


def _finetune(tok_dir: str, checkpoint_dir: str | None):
    """LoRA on a tiny Llama: 7 examples, micro-batches of 2, 2 per step (the last micro-batch of the epoch has one
    example: one process's share is empty), 3 steps, a group frozen in two modules (weights mode)."""
    from transformers import AutoTokenizer

    from brittle.data.core import Example
    from brittle.finetune import LoraTrainConfig, merge_lora, train_lora

    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = tiny_model("llama", vocab_size=len(tok))
    examples = [Example(f"Question {i}: what is {i} plus {i}?", f"It is {2 * i}." + " More words." * i, "t", str(i))
                for i in range(N_EXAMPLES)]
    g = torch.Generator().manual_seed(1)
    freeze = {name: torch.rand(mod.weight.shape, generator=g) < 0.2
              for name, mod in [("layers.0.q", model.model.layers[0].self_attn.q_proj),
                                ("layers.1.down", model.model.layers[1].mlp.down_proj)]}
    original = {"layers.0.q": model.model.layers[0].self_attn.q_proj.weight.detach().clone(),
                "layers.1.down": model.model.layers[1].mlp.down_proj.weight.detach().clone()}
    cfg = LoraTrainConfig(r=4, alpha=8, lr=1e-2, batch_size=2, grad_accumulation=2, max_steps=3)
    trained, hist = train_lora(model, tok, examples, cfg, progress=False, freeze=freeze, checkpoint_dir=checkpoint_dir,
                               checkpoint_every=2 if checkpoint_dir else None)
    lora = {n: p.detach().clone() for n, p in trained.named_parameters() if "lora_" in n}
    merged = merge_lora(trained)
    weights = {"layers.0.q": merged.model.layers[0].self_attn.q_proj.weight.detach(),
               "layers.1.down": merged.model.layers[1].mlp.down_proj.weight.detach()}
    return {"lora": lora, "loss": hist.loss, "freeze": freeze, "original": original, "merged": weights}


def _finetune_worker(rank: int, world: int, init_file: str, out_file: str, tok_dir: str, ckpt: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        got = _finetune(tok_dir, ckpt)
        torch.save(got, f"{out_file}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_fine_tune_like_one_with_the_frozen_entries_unchanged(smol_dir, tmp_path):
    """Each process takes its share of every micro-batch and the gradients are summed: the losses and LoRA factors
    equal one process's up to fp32 summation order, both processes end with the same weights, and the frozen
    entries keep their bits. Catches a missing gradient all-reduce (the processes' weights differ from each other
    and from one process), losses normalised per share instead of per micro-batch (the losses differ), and an
    empty share that skips the all-reduce (the run hangs)."""
    import torch.multiprocessing as mp

    out = tmp_path / "rank"
    mp.spawn(_finetune_worker, args=(2, str(tmp_path / "init"), str(out), smol_dir, str(tmp_path / "ckpt")),
             nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    ref = _finetune(smol_dir, None)
    assert len(ref["loss"]) == 3
    for got in ranks:
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert list(got["lora"]) == list(ref["lora"])
        for name, r in ref["lora"].items():
            assert (got["lora"][name] - r).abs().max() <= 1e-4 * max(1.0, float(r.abs().max())), name
        for name, mask in ref["freeze"].items():
            assert torch.equal(got["merged"][name][mask], got["original"][name][mask])  # bit-identical
            assert not torch.equal(got["merged"][name][~mask], got["original"][name][~mask])  # the rest trained
    assert all(torch.equal(ranks[0]["lora"][n], ranks[1]["lora"][n]) for n in ranks[0]["lora"])  # one model
    steps = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert steps == ["step-2", "step-3"]  # written once, by process 0, complete


def _one_and_two_processes(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    """`python -m brittle ARGS --out tmp/one`, then the same under `torchrun --nproc_per_node 2` into tmp/two (one
    thread each); both must succeed. Returns the two-process run (its output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "brittle", *args, "--out", str(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "brittle", *args, "--out", str(tmp_path / "two")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stdout + multi.stderr
    return multi


def test_torchrun_brittle_score_writes_one_folder_with_the_single_process_scores(smol_tokenizer, tmp_path):
    """`torchrun --nproc_per_node 2 -m brittle score`: one stage folder and manifest (process 0's), no leftovers
    of process 1, the scores of a single-process run (to fp32 summation order), and logs printed once."""
    from conftest import tiny_run_settings

    sets = tiny_run_settings(smol_tokenizer, tmp_path)
    model = json.loads(sets[0].split("=", 1)[1])
    data = json.loads(sets[1].split("=", 1)[1])
    base = ["score", "--model", model, "--data", data, "--nsamples", "5", "--batch-size", "2", "--max-length", "64"]
    multi = _one_and_two_processes(base, tmp_path)
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


def test_torchrun_brittle_finetune_trains_once_with_the_group_frozen_and_drift_tracked(smol_tokenizer, tmp_path):
    """`torchrun --nproc_per_node 2 -m brittle finetune` with a frozen group, drift tracking and checkpoints: one
    stage folder (process 0's), no checkpoint or private folder left, the single-process run's loss curve and
    drift (to fp32 summation order), and the frozen entries of the merged model bit-identical to the original."""
    import pandas as pd
    from safetensors.torch import load_file

    from brittle.groups import save_group
    from conftest import tiny_run_settings

    sets = tiny_run_settings(smol_tokenizer, tmp_path, n_utility=7)
    model = json.loads(sets[0].split("=", 1)[1])
    data = json.loads(sets[2].split("=", 1)[1])
    weights = load_file(f"{model}/model.safetensors")
    g = torch.Generator().manual_seed(2)
    group = {"layers.0.q": torch.rand(weights["model.layers.0.self_attn.q_proj.weight"].shape, generator=g) < 0.1,
             "layers.1.up": torch.rand(weights["model.layers.1.mlp.up_proj.weight"].shape, generator=g) < 0.1}
    save_group(tmp_path / "group.safetensors", group)
    base = ["finetune", "--model", model, "--data", data, "--freeze", str(tmp_path / "group.safetensors"),
            "--track", str(tmp_path / "group.safetensors"), "--drift-every", "1", "--max-steps", "3", "--batch-size",
            "3", "--lr", "0.01", "--checkpoint-every", "2", "--no-eval", "--merge", "--max-length", "64"]
    multi = _one_and_two_processes(base, tmp_path)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert not (tmp_path / "two" / "checkpoints" / "finetune").exists()
    assert sorted(p.name for p in (tmp_path / "two").glob("finetune*")) == ["finetune"]
    one, two = (pd.read_csv(tmp_path / d / "finetune" / "loss.csv") for d in ("one", "two"))
    assert len(one) == 3 and two["loss"].tolist() == pytest.approx(one["loss"].tolist(), rel=1e-5)
    d1, d2 = (pd.read_parquet(tmp_path / d / "finetune" / "drift" / "drift.parquet") for d in ("one", "two"))
    assert len(d1) == len(d2) > 0 and d1["step"].tolist() == d2["step"].tolist()
    assert d2["abs_mean"].to_numpy() == pytest.approx(d1["abs_mean"].to_numpy(), rel=1e-3, abs=1e-9)
    merged = load_file(str(tmp_path / "two" / "finetune" / "merged" / "model.safetensors"))
    for name, key in (("layers.0.q", "model.layers.0.self_attn.q_proj.weight"),
                      ("layers.1.up", "model.layers.1.mlp.up_proj.weight")):
        assert torch.equal(merged[key][group[name]], weights[key][group[name]])
        assert not torch.equal(merged[key][~group[name]], weights[key][~group[name]])


def _generate_worker(rank: int, world: int, init_file: str, out_file: str, tok_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_generations(tok_dir), f"{out_file}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _generations(tok_dir: str) -> dict[str, list[list[str]]]:
    from transformers import AutoTokenizer

    from brittle.evaluation.generation import GenerationConfig, generate

    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = tiny_model("llama", vocab_size=len(tok))
    prompts = [f"Tell me about the number {i}." + " Please." * i for i in range(5)]  # 3 batches of 2: 2 + 1 per process
    greedy = generate(model, tok, prompts, GenerationConfig(max_new_tokens=5, batch_size=2), progress=False)
    sampled = generate(model, tok, prompts, GenerationConfig(max_new_tokens=5, batch_size=2, temperature=1.0,
                                                             num_samples=2, seed=4), progress=False)
    return {"greedy": greedy, "sampled": sampled}


def test_two_gloo_processes_generate_the_answers_of_one(smol_dir, tmp_path):
    """Generation split by whole batches, seeded as in one process, gathered in order: both processes return exactly
    one process's answers. Catches answers in process order instead of prompt order, batches answered twice or not
    at all, and seeds that depend on the process."""
    import torch.multiprocessing as mp

    out = tmp_path / "gen"
    mp.spawn(_generate_worker, args=(2, str(tmp_path / "init"), str(out), smol_dir), nprocs=2, join=True)
    ref = _generations(smol_dir)
    assert len(ref["greedy"]) == 5 and all(len(a) == 2 for a in ref["sampled"])
    assert len({a[0] for a in ref["greedy"]}) > 1  # the prompts get different answers: order matters
    for r in range(2):
        assert torch.load(f"{out}.{r}") == ref


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
