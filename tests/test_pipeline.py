"""The experiment runner on a tiny model: every stage, one manifest per stage folder, resume, reuse, refusal,
--force, and `brittle run` on the command line."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from brittle.cli import app
from brittle.config import load_config
from brittle.stage import StageMismatchError
from conftest import run_settings, tiny_run_settings

TINY = ["scores.nsamples=4", "scores.batch_size=2", "scores.max_length=64", "ablation.sparsities=[0.05]",
        "ablation.eval.n_harmful=2", "ablation.eval.max_new_tokens=2", "ablation.eval.n_benign=2",
        "ablation.eval.n_perplexity=2", "ablation.eval.tasks=[]"]
STAGE_FOLDERS = ["data", "scores/safety-snip", "scores/utility-snip", "groups", "ablation"]


@pytest.fixture
def setup(smol_tokenizer, tmp_path):
    return [*tiny_run_settings(smol_tokenizer, tmp_path, n_utility=6), *TINY], tmp_path


def _run(sets, out, force=False, logs=None):
    return run_settings("configs/ablation.toml", sets, out, force=force, logs=logs)


def test_every_stage_writes_its_folder_and_manifest_then_everything_is_reused(setup):
    sets, tmp_path = setup
    out = tmp_path / "run"
    results = _run(sets, out)
    assert list(results) == ["data", "scores:safety", "scores:utility", "groups", "ablation"]
    for folder in STAGE_FOLDERS:
        man = json.loads((out / folder / "manifest.json").read_text())
        assert man["stage"] in results and "git_commit" in man
        assert {"config", "inputs", "outputs", "versions", "seeds"} <= set(man)
    table = pd.read_csv(results["ablation"].path("table"))
    assert list(table.group) == ["dense", "top_safety", "set_difference", "random", "random_magnitude"]
    # each stage's recorded inputs are the hashes of the previous stage's outputs
    groups = json.loads((out / "groups" / "manifest.json").read_text())
    assert groups["inputs"]["safety_scores"] == results["scores:safety"].outputs["scores"]["sha256"]
    ablation = json.loads((out / "ablation" / "manifest.json").read_text())
    assert ablation["inputs"]["groups"] == {s["label"]: s["sha256"] for s in groups["outputs"]["sweep"]}
    assert (out / "config.toml").is_file() and load_config(out / "config.toml") == load_config("configs/ablation.toml", sets)
    stamp = (out / "ablation" / "ablation.csv").stat().st_mtime_ns

    logs: list[str] = []
    again = _run(sets, out, logs=logs)  # same settings: every stage is reused, nothing rewritten
    assert all(r.reused for r in again.values()) and sum("reusing" in line for line in logs) == 5
    assert (out / "ablation" / "ablation.csv").stat().st_mtime_ns == stamp


def test_changed_settings_are_refused_then_force_recomputes_only_what_depends_on_them(setup):
    sets, tmp_path = setup
    out = tmp_path / "run"
    _run(sets, out)
    changed = [*sets, "ablation.sparsities=[0.1]"]
    with pytest.raises(StageMismatchError, match=r"groups was made with other settings or inputs \(config\.sweep_points\)"):
        _run(changed, out)
    results = _run(changed, out, force=True)
    assert [name for name, r in results.items() if not r.reused] == ["groups", "ablation"]
    assert list(pd.read_csv(out / "ablation" / "ablation.csv").sparsity.dropna().unique()) == [0.1]


def test_resume_after_an_interruption_between_stages(setup, monkeypatch):
    sets, tmp_path = setup
    out = tmp_path / "run"
    import brittle.ablation as A

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "run_ablation", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(sets, out)
    assert (out / "groups" / "manifest.json").exists() and not (out / "ablation").exists()
    monkeypatch.undo()
    results = _run(sets, out)
    assert [name for name, r in results.items() if not r.reused] == ["ablation"]
    assert not (out / "ablation.partial").exists()


def test_run_command_prints_config_and_runs(setup):
    sets, tmp_path = setup
    runner = CliRunner()
    res = runner.invoke(app, ["run", "ablation", "--print-config", "--set", "groups.p=0.2"])
    assert res.exit_code == 0 and "p = 0.2" in res.output and 'model = "smollm2-135m-safe"' in res.output
    args = ["run", "configs/ablation.toml", "--out", str(tmp_path / "cli")]
    for s in sets:
        args += ["--set", s]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "ablation" / "ablation.csv").exists() and "0 of 5 stages reused" in res.output
    res = runner.invoke(app, [*args, "--set", "groups.top=0.02"])
    assert res.exit_code == 2 and "config.top" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["run", "configs/ablation.toml", "--set", "groups.qq=1"])
    assert res.exit_code == 2 and "unknown key 'groups.qq'" in res.output
    res = runner.invoke(app, ["run", "ablation", "--out", str(tmp_path / "cli"), *sum((["--set", s] for s in sets), [])])
    assert res.exit_code == 0 and "5 of 5 stages reused" in res.output, res.output
