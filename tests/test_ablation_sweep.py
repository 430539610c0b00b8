"""The ablation sweep end to end on a tiny model (real prompt sets, tiny evaluation)."""

from __future__ import annotations

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
