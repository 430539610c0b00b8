"""Experiment 1 (stage ``overlap``: noise floor and fine-tuned model as sub-runs) and Experiment 2 (stage
``stats``) on a tiny model, in one run with two fine-tunings (``finetune.variants``: ``frozen`` with the set
difference frozen and merged, for the overlap; ``free``, unconstrained, for the statistics): their files, what
the sub-runs score, reuse, and bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from safetensors.torch import load_file as load_tensors

from brittle.analysis import overlap
from brittle.data.core import load_file, sample
from brittle.groups import load_group
from brittle.io import BrittleError
from conftest import run_settings, tiny_run_settings
from test_finetune_stage import TINY, TINY_EVAL

STAGES = 'stages=["data", "scores", "groups", "finetune", "overlap", "stats", "report"]'
VARIANTS = 'finetune.variants={frozen = {freeze = "set_difference", merge = true}, free = {}}'


@pytest.fixture(scope="module")
def experiment(smol_tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exp")
    base = [s for s in TINY if not s.startswith(("finetune.freeze=", "finetune.merge="))]
    sets = [*tiny_run_settings(smol_tokenizer, tmp, n_utility=8), STAGES, *base, "stats.n_boot=50",
            "overlap.n_boot=50", VARIANTS, 'overlap.finetune="frozen"', 'stats.finetune="free"']
    logs: list[str] = []
    return sets, tmp, run_settings(None, sets, tmp / "run", logs=logs), logs


# The shipped demo config itself at a tiny size: only sizes are overridden (its stages, groups, variants and
# analyses stay as shipped)
TINY_DEMO = [*[s for s in TINY if not s.startswith(("finetune.freeze=", "finetune.merge=", "groups."))],
             "stats.n_boot=50", "overlap.n_boot=50", "ablation.sparsities=[0.05]",
             *[f"ablation.eval.{x}" for x in TINY_EVAL]]


def test_demo_runs_every_stage_of_the_shipped_config_and_prints_the_findings(smol_tokenizer, tmp_path):
    from typer.testing import CliRunner

    from brittle.cli import app
    from brittle.config import load_config, shipped_config

    sets = [*tiny_run_settings(smol_tokenizer, tmp_path, n_utility=8), *TINY_DEMO]
    args = ["demo", "--out", str(tmp_path / "demo"), *sum((["--set", s] for s in sets), [])]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    cfg = load_config(shipped_config("demo"), sets)
    assert set(cfg.stages) == {"data", "scores", "groups", "ablation", "finetune", "overlap", "stats", "report"}
    report = tmp_path / "demo" / "report"
    assert f"report: {(report / 'report.html').resolve()}" in res.output
    # the ablation's dense model was evaluated with the fine-tunings' settings: both copy it, none evaluates again
    assert res.output.count("evaluated already") == 2 and "evaluating the model before" not in res.output
    dense = json.loads((tmp_path / "demo" / "ablation" / "eval" / "dense" / "summary.json").read_text())
    assert json.loads((tmp_path / "demo" / "finetune" / "free" / "eval" / "before" / "summary.json").read_text()) == dense
    findings = (report / "findings.txt").read_text()
    for part in ("Ablation: refusal on 2 held-out harmful prompts", "Fine-tuning frozen", "Fine-tuning free",
                 "Experiment 1", "Experiment 2", "verdict"):
        assert part in findings, part
    assert findings in res.output
    verdict = json.loads((tmp_path / "demo" / "stats" / "verdict.json").read_text())
    assert f"verdict {verdict['verdict']}" in findings
    res = CliRunner().invoke(app, args)  # a finished demo again: every stage reused
    assert res.exit_code == 0 and "reusing" in res.output and "recomputing" not in res.output, res.output
    assert findings in res.output


def test_noise_floor_scores_other_examples_and_refit_scores_the_finetuned_model(experiment):
    sets, tmp, results, _ = experiment
    run = tmp / "run"
    for name in ("safety", "utility"):  # the noise floor's calibration examples: those the run's scores left out
        used = {json.dumps(e.to_dict()) for e in sample(load_file(run / "data" / f"{name}.jsonl"), 4, 0)}
        other = {json.dumps(e.to_dict()) for e in load_file(run / "noise" / "data" / f"{name}.jsonl")}
        assert other and not used & other
        assert len(used | other) == len(load_file(run / "data" / f"{name}.jsonl"))
    refit = json.loads((run / "refit" / "scores" / "safety-snip" / "manifest.json").read_text())
    mine = json.loads((run / "scores" / "safety-snip" / "manifest.json").read_text())
    assert refit["inputs"]["data"] == mine["inputs"]["data"]  # the run's own calibration set ...
    assert refit["inputs"]["model_weights"] != mine["inputs"]["model_weights"]  # ... on the fine-tuned weights
    merged_weights = results["finetune:frozen"].folder / "merged"
    assert results["finetune:frozen"].folder == run / "finetune" / "frozen"
    assert json.loads((run / "overlap" / "manifest.json").read_text())["outputs"]["finetune"] == "finetune/frozen"
    assert json.loads((run / "stats" / "manifest.json").read_text())["outputs"]["finetune"] == "finetune/free"
    assert json.loads((run / "refit" / "config.toml").read_text().split("model = ")[1].split("\n")[0]) == str(merged_weights)


def test_overlap_table_matches_the_group_files(experiment):
    _, tmp, results, _ = experiment
    run = tmp / "run"
    table = pd.read_csv(results["overlap"].path("table"))
    assert set(table.comparison) == {"noise_floor", "finetuned"}
    assert set(table.group) == {"top_safety", "top_utility", "set_difference"}
    for comparison, sub in (("noise_floor", "noise"), ("finetuned", "refit")):
        for g in ("top_safety", "set_difference"):
            want = overlap(load_group(run / "groups" / f"{g}.safetensors")[0],
                           load_group(run / sub / "groups" / f"{g}.safetensors")[0])
            got = table[(table.comparison == comparison) & (table.group == g)].reset_index(drop=True)
            assert list(got.unit) == list(want.module)
            assert got.intersection.tolist() == want.intersection.tolist()
            assert got.jaccard.fillna(-1).tolist() == pytest.approx(want.jaccard.fillna(-1).tolist())
    summary = json.loads(results["overlap"].path("summary").read_text())
    s = summary["set_difference"]
    assert s["n_modules"] > 1 and 0 <= s["n_below"] <= s["n_modules"] and isinstance(s["beyond_noise"], bool)
    total = table[(table.comparison == "finetuned") & (table.group == "set_difference") & (table.level == "total")]
    assert s["jaccard_finetuned"] == pytest.approx(float(total.jaccard.iloc[0]))
    assert "noise floor" in results["overlap"].path("markdown").read_text()


def test_stats_compare_the_final_drift_and_follow_the_subsample_over_time(experiment):
    _, _, results, _ = experiment
    table = pd.read_csv(results["stats"].path("table"))
    assert {("set_difference", "random_magnitude"), ("top_safety", "random")} <= set(zip(table.group, table.control))
    assert (table.n_group > 1).all() and table.p_adjusted.between(0, 1).all()
    assert set(table.metric) == {"abs", "rel", "row_cosine", "row_l2"}  # per entry and per output row
    verdict = json.loads(results["stats"].path("verdict").read_text())
    assert verdict["verdict"] in ("H1", "H2", "inconclusive") and verdict["rule"]["margin"] == 0.147
    assert verdict["primary"]["group"] == "set_difference" and verdict["primary"]["control"] == "random_magnitude"
    over = pd.read_csv(results["stats"].path("over_time"))
    for g, rows in over.groupby("group"):
        assert rows.step.tolist() == [0, 2, 4], g
        assert rows["median"].iloc[0] == 0 and (rows.q25 <= rows["median"]).all() and (rows["median"] <= rows.q75).all()
    free = over[(over.group == "set_difference") & (over.step > 0)]  # the statistics read the unconstrained run
    assert (free["median"] > 0).all()
    frozen = load_tensors(str(results["finetune:frozen"].folder / "drift" / "samples.safetensors"))["set_difference"]
    assert bool((frozen == 0).all())  # frozen in `weights` mode: it never moves


def test_report_shows_both_experiments(experiment):
    _, _, results, _ = experiment
    folder = results["report"].folder
    for name in ("report.md", "report.html", "report.txt", "results.json"):
        assert (folder / name).is_file(), name
    data = json.loads((folder / "results.json").read_text())
    assert data["overlap"]["summary_table"] and data["statistics"]["verdict"]
    assert not data["overlap"].get("missing") and not data["statistics"].get("missing")
    verdict = json.loads(results["stats"].path("verdict").read_text())["verdict"]
    assert verdict in (folder / "report.txt").read_text()


def test_the_model_before_fine_tuning_is_evaluated_once_for_both_fine_tunings(experiment):
    _, _, results, logs = experiment
    frozen, free = results["finetune:frozen"].folder, results["finetune:free"].folder
    assert sum("evaluating the model before fine-tuning" in line for line in logs) == 1
    assert sum("evaluated already" in line for line in logs) == 1
    assert (json.loads((free / "eval" / "before" / "summary.json").read_text())
            == json.loads((frozen / "eval" / "before" / "summary.json").read_text()))
    assert results["finetune:free"].outputs["evaluation"]["before"] == results["finetune:frozen"].outputs["evaluation"]["before"]


def test_rerun_reuses_every_stage_and_sub_run(experiment):
    sets, tmp, _, _ = experiment
    logs: list[str] = []
    results = run_settings(None, sets, tmp / "run", logs=logs)
    assert all(r.reused for r in results.values())
    assert sum("reusing" in line for line in logs if line.startswith("(noise)")) == 4  # data, 2 scores, groups
    assert sum("reusing" in line for line in logs if line.startswith("(refit)")) == 4


def test_bad_input_is_refused_before_any_work(experiment, tmp_path):
    sets, tmp, _, _ = experiment
    no_merge = [*sets, 'finetune.variants={frozen = {freeze = "set_difference"}, free = {}}']
    with pytest.raises(BrittleError, match="finetune.merge = true"):  # when the config loads
        run_settings(None, no_merge, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(BrittleError, match="2 fine-tunings"):
        run_settings(None, [s for s in sets if not s.startswith("stats.finetune")], tmp_path / "a")  # which one?
    with pytest.raises(BrittleError, match="no such fine-tuning"):
        run_settings(None, [*sets, 'overlap.finetune="nope"'], tmp_path / "a")
    with pytest.raises(BrittleError, match="variant 'free': freez"):
        run_settings(None, [*sets, 'finetune.variants={free = {freez = 1}}'], tmp_path / "a")
    with pytest.raises(BrittleError, match="add the finetune stage"):
        run_settings(None, [*sets, 'stages=["data", "scores", "groups", "stats"]'], tmp_path / "a")
    with pytest.raises(BrittleError, match="noise floor needs others"):
        run_settings(None, [*sets, "scores.nsamples=50", "overlap.finetuned=false", 'stages=["data", "scores", '
                                                                                     '"groups", "overlap"]'],
                     tmp_path / "b")
    with pytest.raises(BrittleError, match="not among the run's groups"):
        run_settings(None, [*sets, 'overlap.groups=["top_safety", "nope"]'], tmp / "run")  # before the sub-runs


def test_report_command_on_a_run_and_on_an_empty_directory(experiment, tmp_path):
    from typer.testing import CliRunner

    from brittle.cli import app

    _, tmp, _, _ = experiment
    result = CliRunner().invoke(app, ["report", str(tmp / "run")])
    assert result.exit_code == 0 and "report.html" in result.output
    result = CliRunner().invoke(app, ["report", str(tmp_path)])  # nothing in it: a report that says so
    assert result.exit_code == 0 and "No weight groups" in (tmp_path / "report" / "report.md").read_text()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such run directory" in result.output
