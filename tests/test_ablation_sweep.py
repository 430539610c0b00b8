"""The ablation sweep end to end on a tiny model (real prompt sets, tiny evaluation)."""

from __future__ import annotations

import json

import pandas as pd
import torch

from brittle.ablation import ABLATION_COLUMNS, ablation_eval_config, run_ablation
from brittle.groups import load_group
from brittle.models import linear_modules, linear_weight
from brittle.testing import tiny_model


def test_sweep_writes_table_figure_and_groups_and_restores_the_model(smol_tokenizer, tmp_path):
    model = tiny_model("llama", vocab_size=len(smol_tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    weights = {n: linear_weight(m).detach() for n, m in linear_modules(model).items()}
    safety = {n: w.abs() * torch.rand(w.shape, generator=g) for n, w in weights.items()}
    utility = {n: w.abs() * torch.rand(w.shape, generator=g) for n, w in weights.items()}
    cfg = ablation_eval_config(n_harmful=4, max_new_tokens=4, n_benign=3, n_perplexity=3, tasks=[])
    table = run_ablation(model, smol_tokenizer, safety, utility, [0.01, 0.05], tmp_path, progress=False, log=lambda s: None,
                         eval_config=cfg)
    assert list(table.columns) == list(ABLATION_COLUMNS)
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
        sd, _ = load_group(tmp_path / "groups" / f"set_difference-{s:g}.safetensors")
        assert sum(int(m.sum()) for m in sd.values()) > 0
    assert all(0 <= x <= 1 for x in table.asr) and all(0 <= x <= 1 for x in table.asr_wei)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


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
    table = pd.read_csv(tmp_path / "run" / "ablation.csv")
    assert list(table.group) == ["dense", "top_safety", "set_difference", "random", "random_magnitude"]
    assert (tmp_path / "run" / "ablation.png").exists()
    settings = json.loads((tmp_path / "run" / "eval" / "dense" / "summary.json").read_text())["config"]
    assert (settings["n_harmful"], settings["limit"], settings["max_new_tokens"]) == (2, 2, 3)
    assert settings["tasks"] == ablation_eval_config().tasks  # not given: the sweep defaults
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "--force" in res.output
    bad = CliRunner().invoke(app, args[:-2] + ["--sparsities", "5", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "fractions in (0, 1]" in bad.output
    bad = CliRunner().invoke(app, args[:-2] + ["--max-new-tokens", "0", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "max_new_tokens" in bad.output and not (tmp_path / "x").exists()
