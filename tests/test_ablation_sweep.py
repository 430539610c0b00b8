"""The ablation sweep end to end on a tiny model (real prompt sets, tiny evaluation)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from brittle.ablation import (
    ABLATION_COLUMNS,
    DEFAULT_SPARSITIES,
    GROUP_KINDS,
    PAPER_PQ_PAIRS,
    SweepGroup,
    ablation_eval_config,
    run_ablation,
)
from brittle.groups import GroupError, build_groups, load_group
from brittle.io import BrittleError
from brittle.models import linear_modules, linear_weight, weight_fingerprint
from brittle.scoring import save_scores
from brittle.testing import tiny_model


def sweep(model, safety, utility, points, folder):
    """The sweep groups as the groups stage builds them (score files -> build_groups -> sweep/*.safetensors)."""
    meta = {"model": "tiny", "model_hash": weight_fingerprint(model)}
    save_scores(folder / "safety.safetensors", safety, meta)
    save_scores(folder / "utility.safetensors", utility, meta)
    weights = {n: linear_weight(m).detach() for n, m in linear_modules(model).items()}
    res = build_groups(folder / "safety.safetensors", folder / "utility.safetensors", folder / "groups",
                       top=0.01, p=0.05, q=0.05, scope="matrix", seed=0, bins=10, weights=weights, model_fingerprint=meta["model_hash"], sweep=points, sweep_kinds=GROUP_KINDS)
    return [SweepGroup(s["kind"], s["p"], s["q"], s["label"], load_group(folder / "groups" / s["file"])[0])
            for s in res.outputs["sweep"]]


def test_sweep_writes_table_figure_and_groups_and_restores_the_model(smol_tokenizer, tmp_path):
    model = tiny_model("llama", vocab_size=len(smol_tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    weights = {n: linear_weight(m).detach() for n, m in linear_modules(model).items()}
    safety = {n: w.abs() * torch.rand(w.shape, generator=g) for n, w in weights.items()}
    utility = {n: w.abs() * torch.rand(w.shape, generator=g) for n, w in weights.items()}
    cfg = ablation_eval_config(n_harmful=4, max_new_tokens=4, n_benign=3, n_perplexity=3, tasks=[])
    items = sweep(model, safety, utility, [(0.01, 0.01), (0.05, 0.05)], tmp_path)
    table = run_ablation(model, smol_tokenizer, items, tmp_path, progress=False, log=lambda s: None, eval_config=cfg)
    assert list(table.columns) == list(ABLATION_COLUMNS)
    reasons = [c for c in ABLATION_COLUMNS if c.startswith("degenerate_") and c != "degenerate_benign"]
    assert len(reasons) == 5 and table[reasons].sum(axis=1).tolist() == pytest.approx(table.degenerate.tolist(), abs=1e-3)
    assert len(table) == 1 + 4 * 2 and table.iloc[0].group == "dense" and table.iloc[0].fraction_removed == 0
    on_disk = pd.read_csv(tmp_path / "ablation.csv")
    assert list(on_disk.group) == list(table.group)
    assert (tmp_path / "ablation.md").read_text().startswith("| group |")
    assert (tmp_path / "ablation.png").stat().st_size > 1000
    for s in (0.01, 0.05):
        row = table[(table.group == "set_difference") & (table.sparsity == s)].iloc[0]
        top = table[(table.group == "top_safety") & (table.sparsity == s)].iloc[0]
        assert 0 < row.fraction_removed <= top.fraction_removed
        # both controls are sized like the set difference (per module, hence in total)
        for kind in ("random", "random_magnitude"):
            ctrl = table[(table.group == kind) & (table.sparsity == s)].iloc[0]
            assert ctrl.fraction_removed == row.fraction_removed
        sd, _ = load_group(tmp_path / "groups" / "sweep" / f"set_difference-{s:g}.safetensors")
        assert sum(int(m.sum()) for m in sd.values()) > 0
    assert all(0 <= x <= 1 for x in table.asr) and all(0 <= x <= 1 for x in table.asr_wei)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _random_scores(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: linear_weight(m).detach().abs() * torch.rand(linear_weight(m).shape, generator=g)
            for n, m in linear_modules(model).items()}


def test_sweep_over_pq_pairs_measures_top_safety_once_per_q(smol_tokenizer, tmp_path):
    model = tiny_model("llama", vocab_size=len(smol_tokenizer))
    safety, utility = _random_scores(model, 0), _random_scores(model, 1)
    cfg = ablation_eval_config(n_harmful=2, max_new_tokens=2, n_benign=2, n_perplexity=2, tasks=[])
    points = [(0.05, 0.05), (0.2, 0.05), (0.1, 0.1)]
    table = run_ablation(model, smol_tokenizer, sweep(model, safety, utility, points, tmp_path), tmp_path,
                         progress=False, log=lambda s: None, eval_config=cfg)
    tops = table[table.group == "top_safety"]
    assert list(tops.q) == [0.05, 0.1] and tops.p.isna().all()  # top-q safety does not depend on p
    sd = table[table.group == "set_difference"]
    assert list(zip(sd.p, sd.q, strict=True)) == points
    # removing more utility weights (larger p) leaves a smaller set difference
    assert sd.fraction_removed.iloc[1] < sd.fraction_removed.iloc[0]
    names = sorted(f.stem for f in (tmp_path / "groups" / "sweep").glob("set_difference*"))
    assert names == ["set_difference-0.05", "set_difference-0.1", "set_difference-p0.2-q0.05"]
    assert (tmp_path / "eval" / "random_magnitude-p0.2-q0.05" / "summary.json").exists()
    with pytest.raises(GroupError, match="q must satisfy"):
        sweep(model, safety, utility, [(0.05, 5)], tmp_path / "bad")
    with pytest.raises(BrittleError, match="no sweep groups"):
        run_ablation(model, smol_tokenizer, [], tmp_path / "none", eval_config=cfg)


def test_pq_option_parsing():
    from brittle.cli import _pq
    from brittle.config import load_config

    assert _pq("paper-llama2-7b") == "paper-llama2-7b" and len(PAPER_PQ_PAIRS) == 10
    assert load_config(None, options={"ablation": {"pq": _pq("paper-llama2-7b")}}).ablation.points() == list(PAPER_PQ_PAIRS)
    assert _pq("0.02:0.01, 0.04:0.02") == [[0.02, 0.01], [0.04, 0.02]]
    assert load_config(None, options={"ablation": {"pq": _pq("0.02:0.01")}}).ablation.points() == [(0.02, 0.01)]
    for bad, msg in (("0.02", "'p:q' pairs .* '0.02' is not one"), ("0.02:0.01:3", "'0.02:0.01:3' is not one"),
                     ("a:b", "numbers")):
        with pytest.raises(BrittleError, match=msg):
            _pq(bad)
    with pytest.raises(BrittleError, match="p must be a fraction"):
        load_config(None, options={"ablation": {"pq": _pq("2:1")}})


def test_ablate_command_end_to_end(smol_tokenizer, tmp_path):
    """`brittle ablate` on score files of a tiny saved model: table, figure, refusal to overwrite."""
    from typer.testing import CliRunner

    from brittle.cli import app
    from brittle.models import weight_fingerprint
    from brittle.scoring import save_scores

    model = tiny_model("llama", vocab_size=len(smol_tokenizer))
    model.save_pretrained(tmp_path / "m")
    smol_tokenizer.save_pretrained(tmp_path / "m")
    g = torch.Generator().manual_seed(1)
    meta = {"model": str(tmp_path / "m"), "model_hash": weight_fingerprint(model)}
    for kind in ("safety", "utility"):
        scores = {n: linear_weight(m).detach().abs() * torch.rand(linear_weight(m).shape, generator=g)
                  for n, m in linear_modules(model).items()}
        save_scores(tmp_path / f"{kind}.safetensors", scores, meta)
    args = ["ablate", "--model", str(tmp_path / "m"), "--safety", str(tmp_path / "safety.safetensors"),
            "--utility", str(tmp_path / "utility.safetensors"), "--sparsities", "0.05", "--n-harmful", "2",
            "--limit", "2", "--max-new-tokens", "3", "--out", str(tmp_path / "run")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "run" / "ablation" / "ablation.csv")
    assert list(table.group) == ["dense", "top_safety", "set_difference", "random", "random_magnitude"]
    assert (tmp_path / "run" / "ablation" / "ablation.png").exists()
    # the ablation removed exactly the groups stage's sweep groups
    sd, _ = load_group(tmp_path / "run" / "groups" / "sweep" / "set_difference-0.05.safetensors")
    assert table[table.group == "set_difference"].fraction_removed.iloc[0] == pytest.approx(
        sum(int(m.sum()) for m in sd.values()) / sum(linear_weight(m).numel() for m in linear_modules(model).values()))
    for stage in ("groups", "ablation"):
        assert json.loads((tmp_path / "run" / stage / "manifest.json").read_text())["stage"] == stage
    settings = json.loads((tmp_path / "run" / "ablation" / "eval" / "dense" / "summary.json").read_text())["config"]
    assert (settings["n_harmful"], settings["limit"], settings["max_new_tokens"]) == (2, 2, 3)
    assert settings["tasks"] == ablation_eval_config().tasks  # not given: the sweep defaults
    res = CliRunner().invoke(app, args)  # the same again: both stages reused
    assert res.exit_code == 0 and res.output.count("reusing") == 2, res.output
    res = CliRunner().invoke(app, [a if a != "3" else "4" for a in args])
    assert res.exit_code == 2 and "config.eval.max_new_tokens" in res.output and "--force" in res.output
    bad = CliRunner().invoke(app, args[:-2] + ["--sparsities", "5", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "sparsity must be a fraction with 0 < sparsity <= 1" in bad.output
    bad = CliRunner().invoke(app, args[:-2] + ["--pq", "0.1:0.05", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "either --pq or --sparsities" in bad.output
    bad = CliRunner().invoke(app, args[:-2] + ["--max-new-tokens", "0", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "max_new_tokens" in bad.output and not (tmp_path / "x").exists()


def test_ablate_help_shows_the_sweep_defaults():
    from typer.testing import CliRunner

    from brittle.cli import app

    res = CliRunner().invoke(app, ["ablate", "--help"], env={"COLUMNS": "250"})
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for default in ("(default: 0.005,0.01,0.02,0.03)", "(default: 50)", "(default: 30)", "(default: 32)", "(default: matrix)"):
        assert default in text
    cfg = ablation_eval_config()  # the help must say what the sweep really uses
    assert (cfg.n_harmful, cfg.limit, cfg.max_new_tokens) == (50, 30, 32)
    assert DEFAULT_SPARSITIES == (0.005, 0.01, 0.02, 0.03)


def test_wanda_scores_bottom_up_pruning_and_recovery_in_one_run(smol_tokenizer, tmp_path):
    """The paper's remaining weight-level variants as run settings: groups from Wanda scores
    (scores.method), the bottom-q safety entries removed (bottom-up pruning, as many entries as top-q safety,
    disjoint from them), and removed entries given another model's values (recover_from) -- recorded in the
    manifest, refused when that model's shapes differ."""
    from conftest import run_settings, tiny_run_settings

    sets = tiny_run_settings(smol_tokenizer, tmp_path)
    other = tiny_model("llama", seed=1, vocab_size=len(smol_tokenizer))
    other.save_pretrained(tmp_path / "other")
    smol_tokenizer.save_pretrained(tmp_path / "other")
    sets += ['stages=["data", "scores", "groups", "ablation"]', 'scores.method="wanda"', "scores.nsamples=4",
             "scores.max_length=64", "ablation.sparsities=[0.1]", 'ablation.kinds=["top_safety", "bottom_safety"]',
             f"ablation.recover_from={json.dumps(str(tmp_path / 'other'))}",
             *[f"ablation.eval.{x}" for x in ("n_harmful=2", "max_new_tokens=2", "n_benign=2", "n_perplexity=2",
                                             "tasks=[]")]]
    logs: list[str] = []
    results = run_settings(None, sets, tmp_path / "run", logs=logs)
    assert results["scores:safety"].manifest["config"]["method"] == "wanda"
    table = pd.read_csv(results["ablation"].path("table")).set_index("group")
    assert list(table.index) == ["dense", "top_safety", "bottom_safety"]
    assert table.loc["bottom_safety", "fraction_removed"] == table.loc["top_safety", "fraction_removed"] > 0
    folder = results["groups"].folder / "sweep"
    top, _ = load_group(folder / "top_safety-0.1.safetensors")
    bottom, meta = load_group(folder / "bottom_safety-0.1.safetensors")
    assert meta["definition"] == "bottom_safety" and not any((top[n] & bottom[n]).any() for n in top)
    man = results["ablation"].manifest
    assert man["config"]["recover_from"] == str(tmp_path / "other")
    assert man["inputs"]["recover_from_weights"] == weight_fingerprint(other)
    assert any("recover their values from" in line for line in logs)

    small = tiny_model("llama", seed=1, vocab_size=len(smol_tokenizer), intermediate=32)
    small.save_pretrained(tmp_path / "small")
    smol_tokenizer.save_pretrained(tmp_path / "small")
    bad = [s for s in sets if not s.startswith("ablation.recover_from")]
    bad.append(f"ablation.recover_from={json.dumps(str(tmp_path / 'small'))}")
    with pytest.raises(BrittleError, match="to recover from has"):
        run_settings(None, bad, tmp_path / "run2")
