"""The ``finetune`` stage on a tiny model: its files, frozen entries kept bit-exact in the merged model, drift
log, before/after evaluation, reuse, resume after a kill, bad input, the data specs, and `brittle finetune`."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from brittle.cli import app
from brittle.data.sources import harmful_splits, normalize_prompt
from brittle.evaluation.config import SweepEvalConfig
from brittle.evaluation.suite import perplexity_examples
from brittle.finetune import FinetuneConfig, finetune_examples
from brittle.groups import load_group
from brittle.io import BrittleError
from brittle.models import linear_modules, linear_weight
from brittle.presets import load_model
from brittle.testing import tiny_model
from conftest import run_settings, tiny_run_settings

TINY_EVAL = ["n_harmful=2", "max_new_tokens=2", "n_benign=2", "n_perplexity=2", "tasks=[]"]
TINY = ["scores.nsamples=4", "scores.batch_size=2", "scores.max_length=64", "groups.magnitude=true",
        "finetune.data=utility", "finetune.train.max_steps=4", "finetune.train.max_length=64",
        "finetune.drift_every=2", "finetune.checkpoint_every=2", "finetune.freeze=set_difference",
        "finetune.merge=true", *[f"finetune.eval.{x}" for x in TINY_EVAL]]


@pytest.fixture
def setup(smol_tokenizer, tmp_path):
    stages = 'stages=["data", "scores", "groups", "finetune"]'
    return [*tiny_run_settings(smol_tokenizer, tmp_path, n_utility=8), stages, *TINY], tmp_path


def _run(sets, out, force=False, logs=None):
    return run_settings(None, sets, out, force=force, logs=logs)


def test_stage_writes_adapter_loss_drift_and_evaluations_and_keeps_frozen_entries(setup):
    sets, tmp_path = setup
    out = tmp_path / "run"
    first_logs: list[str] = []
    results = _run(sets, out, logs=first_logs)
    ft = results["finetune"]
    folder = ft.folder
    # the memory estimate is logged before training, with the drift tracker's entries
    assert any(line.startswith("[finetune] estimated peak memory: weights") and ", tracking " in line
               for line in first_logs)
    for name in ("adapter/adapter_config.json", "adapter/freeze_mask.safetensors", "loss.csv", "loss.png",
                 "drift/drift.parquet", "eval/before/summary.json", "eval/after/summary.json", "merged/config.json",
                 "train_history.json", "manifest.json"):
        assert (folder / name).exists(), name
    assert not (out / "checkpoints" / "finetune").exists()  # removed once the stage is complete
    loss = pd.read_csv(folder / "loss.csv")
    assert list(loss.step) == [1, 2, 3, 4] and loss.loss.notna().all()
    drift = pd.read_parquet(folder / "drift" / "drift.parquet")
    groups = {"top_safety", "top_utility", "set_difference", "random", "random_magnitude"}
    assert set(drift.group) == groups and sorted(drift.step.unique()) == [0, 2, 4]
    assert set(ft.outputs["evaluation"]) == {"before", "after"} and ft.outputs["train"]["steps"] == 4
    assert ft.outputs["data"]["n"] == 8
    # the merged model: frozen entries hold their original bits, other entries of the module moved
    base, _ = load_model(str(tmp_path / "m"))
    tuned, _ = load_model(str(folder / "merged"))
    frozen, _ = load_group(out / "groups" / "set_difference.safetensors")
    moved = 0
    for name, mask in frozen.items():
        w0 = linear_weight(linear_modules(base)[name]).detach()
        w1 = linear_weight(linear_modules(tuned)[name]).detach()
        assert torch.equal(w0[mask], w1[mask]), name
        moved += int((w0[~mask] != w1[~mask]).sum())
    assert moved > 0
    # the drift of the frozen group is exactly zero at the end; the random control's is not
    last = drift[drift.step == 4]
    assert last[last.group == "set_difference"].abs_max.max() == 0.0
    assert last[last.group == "random"].abs_max.max() > 0.0

    logs: list[str] = []
    again = _run(sets, out, logs=logs)
    assert again["finetune"].reused and any("[finetune] reusing" in line for line in logs)


def test_a_killed_fine_tuning_resumes_with_the_same_loss_curve_and_drift_log(setup, monkeypatch):
    sets, tmp_path = setup
    sets = [s for s in sets if not s.startswith("finetune.merge")] + ["finetune.evaluate=false"]
    whole = _run(sets, tmp_path / "whole")["finetune"].folder

    import brittle.drift as D

    original = D.DriftTracker.on_step

    def killed(self, step, loss, model):
        original(self, step, loss, model)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(D.DriftTracker, "on_step", killed)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        _run(sets, out)
    assert (out / "checkpoints" / "finetune" / "step-2").is_dir() and not (out / "finetune").exists()
    monkeypatch.undo()
    resumed = _run(sets, out)["finetune"].folder
    pd.testing.assert_frame_equal(pd.read_csv(resumed / "loss.csv"), pd.read_csv(whole / "loss.csv"), check_exact=True)
    a, b = pd.read_parquet(resumed / "drift" / "drift.parquet"), pd.read_parquet(whole / "drift" / "drift.parquet")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert len(a) == len(a.drop_duplicates(["step", "group", "module"]))
    for f in ("adapter_model.safetensors",):
        x, y = load_file(resumed / "adapter" / f), load_file(whole / "adapter" / f)
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_bad_freeze_and_track_inputs_are_clear_errors_before_training(setup, smol_tokenizer):
    sets, tmp_path = setup
    base = [s for s in sets if "finetune.freeze=" not in s] + ["finetune.evaluate=false"]
    with pytest.raises(BrittleError, match="neither a group of this run"):
        _run([*base, "finetune.freeze=setdifference"], tmp_path / "a")
    with pytest.raises(BrittleError, match="holds no group file"):
        (tmp_path / "empty").mkdir()
        _run([*base, f"finetune.track=[{json.dumps(str(tmp_path / 'empty'))}]"], tmp_path / "b")
    # a group selected on another model (same shapes, other weights)
    other = tiny_model("llama", vocab_size=len(smol_tokenizer), seed=1)
    other.save_pretrained(tmp_path / "other")
    smol_tokenizer.save_pretrained(tmp_path / "other")
    _run([*base, f"model={json.dumps(str(tmp_path / 'other'))}", 'stages=["data", "scores", "groups"]'], tmp_path / "o")
    with pytest.raises(BrittleError, match="names 5 group files .* give one group"):
        _run([*base, f"finetune.freeze={json.dumps(str(tmp_path / 'o' / 'groups'))}"], tmp_path / "d")
    with pytest.raises(BrittleError, match="selected on another model"):
        _run([*base, f"finetune.freeze={json.dumps(str(tmp_path / 'o' / 'groups' / 'top_safety.safetensors'))}"],
             tmp_path / "c")


def test_attack_defaults_and_data_never_overlap_the_evaluation():
    cfg = FinetuneConfig(data="attack")
    assert (cfg.n_examples, cfg.train.epochs) == (100, 5)
    assert FinetuneConfig(data="attack", n_examples=10, train={"max_steps": 3}).train.epochs == 1
    assert FinetuneConfig().train.r == 8 and FinetuneConfig().train.alpha == 16  # the seed study's LoRA
    ev = SweepEvalConfig()
    attack, rec = finetune_examples("attack", 50, 0, run_sets={}, eval_config=ev)
    held_out = {normalize_prompt(e.prompt) for e in harmful_splits(seed=0)[1]}
    assert len(attack) == rec["n"] == 50 and not {normalize_prompt(e.prompt) for e in attack} & held_out
    assert all(e.response.strip() for e in attack)
    ref, rec = finetune_examples("reference", None, 0, run_sets={}, eval_config=ev)
    used = {normalize_prompt(e.prompt) for e in perplexity_examples(ev)}
    assert rec["excluded"] == len(used) == ev.n_perplexity and not {normalize_prompt(e.prompt) for e in ref} & used
    with pytest.raises(BrittleError, match="data stage"):
        finetune_examples("utility", None, 0, run_sets={}, eval_config=ev)
    with pytest.raises(BrittleError, match="fewer than n_examples"):
        finetune_examples("attack", 10**6, 0, run_sets={}, eval_config=ev)


def test_finetune_command(setup, tmp_path):
    sets, _ = setup
    model = json.loads(sets[0].split("=", 1)[1])
    res = CliRunner().invoke(app, ["finetune", "--model", model, "--data", str(tmp_path / "utility.jsonl"),
                                   "--out", str(tmp_path / "cli"), "--max-steps", "2", "--no-eval", "--max-length",
                                   "64", "--targets", "q,v,o", "--rank", "4", "--track", "none"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "cli" / "finetune" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]} == {"o_proj", "q_proj", "v_proj"}
    assert not (tmp_path / "cli" / "finetune" / "drift").exists()
    res = CliRunner().invoke(app, ["finetune", "--model", model, "--data", "attack", "--out", str(tmp_path / "cli2"),
                                   "--freeze", str(tmp_path / "nothing.safetensors"), "--no-eval"])
    assert res.exit_code == 2 and "neither a group of this run" in res.output and "Traceback" not in res.output
