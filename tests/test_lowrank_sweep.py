"""The rank sweep (stage ``lowrank``, ActSVD) end to end on a tiny model: its files and rows, the model restored
bit-exactly, reuse, the random control's ranks, and bad input refused before any weight changes."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from brittle.config import ConfigError, load_config
from brittle.io import BrittleError
from brittle.lowrank import LOWRANK_COLUMNS, sweep_points, target_modules, top_directions
from brittle.models import linear_modules, linear_weight, weight_fingerprint
from brittle.pipeline import run_experiment
from brittle.presets import load_model
from brittle.stage import RunContext
from brittle.testing import tiny_model
from conftest import run_settings, tiny_run_settings

TINY_EVAL = ["n_harmful=2", "max_new_tokens=2", "n_benign=2", "n_perplexity=2", "tasks=[]"]
# the tiny Llama: hidden 32, intermediate 64, k/v d_out 16 -> ranks up to 16, r_utility below 16
TINY = ['stages=["data", "lowrank"]', "scores.nsamples=4", "scores.batch_size=2", "scores.max_length=64",
        "lowrank.ranks=[1, 4]", "lowrank.orthogonal=[[8, 2]]", *[f"lowrank.eval.{x}" for x in TINY_EVAL]]


@pytest.fixture(scope="module")
def sweep(smol_tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lowrank")
    sets = [*tiny_run_settings(smol_tokenizer, tmp), *TINY]
    cache: dict = {}
    logs: list[str] = []
    results = run_experiment(load_config(None, sets), RunContext(out=tmp / "run", progress=False, log=logs.append,
                                                                 cache=cache))
    return sets, tmp, results, cache, logs


def test_stage_writes_one_row_per_point_and_its_files(sweep):
    _, tmp, results, _, _ = sweep
    lr = results["lowrank"]
    table = pd.read_csv(lr.path("table"))
    assert list(table.columns) == list(LOWRANK_COLUMNS)
    labels = ["top_safety-r1", "top_safety-r4", "random-r1", "random-r4", "orthogonal-u8-s2"]
    assert list(table.group) == ["dense", "top_safety", "top_safety", "random", "random", "orthogonal"]
    assert lr.outputs["rows"] == len(table) == 1 + 2 * 2 + 1
    for label in ["dense", *labels]:
        assert (lr.folder / "eval" / label / "summary.json").is_file()
    assert lr.path("markdown").read_text().startswith("| group | rank | r_utility | r_safety | fraction_removed |")
    assert "min(d_out, d_in)" in lr.path("markdown").read_text()
    assert lr.path("figure").stat().st_size > 1000
    assert not (lr.folder / "lowrank.partial.csv").exists()
    dense = table.iloc[0]
    assert dense.fraction_removed == 0 and dense[["rank", "r_utility", "r_safety"]].isna().all()
    assert table.asr.between(0, 1).all() and table.perplexity.notna().all()
    # fractions: r / min(d_out, d_in) per module, the table's value their mean over the modules
    fr = pd.read_csv(lr.path("fractions"))
    assert set(fr.label) == set(labels) and fr.groupby("label").size().nunique() == 1  # every module, every point
    assert (fr.fraction == fr["rank"] / fr[["d_out", "d_in"]].min(axis=1)).all()
    for label, row in zip(labels, table.iloc[1:].itertuples(), strict=True):
        assert row.fraction_removed == pytest.approx(fr[fr.label == label].fraction.mean())
    orth = fr[fr.label == "orthogonal-u8-s2"]
    assert (orth["rank"] == (orth.d_out - 8).clip(upper=2)).all()  # min(r_safety, d_out - r_utility)
    cal = lr.outputs["calibration"]
    assert set(cal) == {"safety", "utility"} and all(c["n_examples"] == 4 and c["n_response_tokens"] > 0
                                                     for c in cal.values())


def test_random_control_rows_use_the_same_ranks(sweep):
    table = pd.read_csv(sweep[2]["lowrank"].path("table"))
    top, rand = table[table.group == "top_safety"], table[table.group == "random"]
    assert list(top["rank"]) == list(rand["rank"]) == [1, 4]
    assert list(top.fraction_removed) == list(rand.fraction_removed)
    assert list(top.r_safety) == [1, 4] and rand.r_safety.isna().all()
    orth = table[table.group == "orthogonal"].iloc[0]
    assert (orth.r_utility, orth.r_safety, orth["rank"]) == (8, 2, 2)


def test_weights_are_bit_identical_after_the_stage(sweep):
    _, tmp, _, cache, _ = sweep
    (model, _, fingerprint), = cache.values()
    fresh, _ = load_model(str(tmp / "m"))
    assert weight_fingerprint(model) == fingerprint
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_rerun_reuses_the_stage(sweep):
    sets, tmp, results, _, _ = sweep
    logs: list[str] = []
    again = run_settings(None, sets, tmp / "run", logs=logs)
    assert again["lowrank"].reused and any("[lowrank] reusing" in line for line in logs)
    manifest = json.loads((tmp / "run" / "lowrank" / "manifest.json").read_text())
    assert manifest["config"]["calibration"] == {"nsamples": 4, "batch_size": 2, "max_length": 64}
    assert set(manifest["inputs"]["data"]) == {"safety", "utility"}


@pytest.mark.parametrize("bad, message", [
    ("lowrank.ranks=[0, 4]", "integer >= 1"),
    ("lowrank.ranks=[]", "at least one rank"),
    ("lowrank.ranks=[4, 4]", "listed twice"),
    ("lowrank.ranks=[2.5]", "integer >= 1"),
    ("lowrank.orthogonal=[[0, 2]]", "r_utility"),
    ("lowrank.orthogonal=[[8]]", "pairs"),
    ('lowrank.targets=["q", "all"]', "all"),
    ('stages=["lowrank"]', "add the data stage"),
])
def test_bad_settings_are_refused_when_the_config_loads(bad, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, bad])


@pytest.mark.parametrize("bad, message", [
    ("lowrank.ranks=[1, 17]", r"lowrank.ranks.*\[1, 16\].*layers.0.k is 16 x 32"),
    ("lowrank.orthogonal=[[16, 2]]", r"r_utility.*\[1, 15\]"),
    ('lowrank.targets=["q", "query"]', "unknown role.*query.*q, k, v, o, gate, up, down"),
])
def test_ranks_and_roles_the_model_cannot_take_fail_before_anything_is_recorded(smol_tokenizer, tmp_path, bad, message,
                                                                                 monkeypatch):
    import brittle.lowrank as L

    monkeypatch.setattr(L, "record_output_covariance", lambda *a, **k: pytest.fail("recorded before the check"))
    sets = [*tiny_run_settings(smol_tokenizer, tmp_path), *TINY, bad]
    with pytest.raises(BrittleError, match=message):
        run_settings(None, sets, tmp_path / "run")
    assert not (tmp_path / "run" / "lowrank").exists()


@pytest.mark.parametrize("case", ["no responses", "truncated"])
def test_calibration_data_without_response_tokens_is_an_error(smol_tokenizer, tmp_path, case):
    sets = [*tiny_run_settings(smol_tokenizer, tmp_path), *TINY]
    if case == "no responses":
        (tmp_path / "safety.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(4)))
        message = "missing or empty 'response'"
    else:
        sets.append("scores.max_length=3")
        message = "no response tokens after truncation"
    with pytest.raises(BrittleError, match=message):
        run_settings(None, sets, tmp_path / "run")
    assert not (tmp_path / "run" / "lowrank" / "lowrank.csv").exists()


def test_points_edit_the_chosen_roles_and_restore_them(smol_tokenizer):
    model = tiny_model("llama", vocab_size=len(smol_tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mods = target_modules(model, ["q", "down"])
    assert list(mods) == [n for n in linear_modules(model) if n.endswith((".q", ".down"))]
    g = torch.Generator().manual_seed(0)
    covs = {}
    for n, m in mods.items():
        x = torch.randn(50, linear_weight(m).shape[0], generator=g)
        covs[n] = x.t() @ x
    safety = {n: top_directions(c, 4) for n, c in covs.items()}
    utility = {n: top_directions(c + 1, 8) for n, c in covs.items()}
    points, per_module = sweep_points(model, safety, utility, [1, 4], [(8, 2)], seed=0)
    assert [p.label for p in points] == ["top_safety-r1", "top_safety-r4", "random-r1", "random-r4", "orthogonal-u8-s2"]
    assert {r["module"] for r in per_module} == set(mods)
    for point in points:
        with point.apply():
            changed = {n for n, m in linear_modules(model).items()
                       if not torch.equal(linear_weight(m), before[_param(model, m)])}
            assert changed == set(mods), point.label
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _param(model, module) -> str:
    return next(k for k, v in model.state_dict().items() if v.data_ptr() == module.weight.data_ptr())


def test_lowrank_command(smol_tokenizer, tmp_path):
    from typer.testing import CliRunner

    from brittle.cli import app

    sets = tiny_run_settings(smol_tokenizer, tmp_path)
    args = ["lowrank", "--out", str(tmp_path / "run"), "--ranks", "2", "--orthogonal", "none", "--targets", "q,v",
            "--nsamples", "3", "--n-harmful", "2", "--max-new-tokens", "2",
            *[x for s in [*sets, "scores.batch_size=2", "scores.max_length=64",
                          *[f"lowrank.eval.{x}" for x in TINY_EVAL]] for x in ("--set", s)]]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "run" / "lowrank" / "lowrank.csv")
    assert list(table.group) == ["dense", "top_safety", "random"] and list(table["rank"].dropna()) == [2, 2]
    fr = pd.read_csv(tmp_path / "run" / "lowrank" / "fractions.csv")
    assert set(fr.module.str.split(".").str[2]) == {"q", "v"}
    bad = CliRunner().invoke(app, [*args, "--orthogonal", "8-2", "--force"])
    assert bad.exit_code == 2 and "r_utility:r_safety" in bad.output
