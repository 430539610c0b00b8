"""Ablation context manager: zeroes exactly the group, restores bit-exactly (also on exceptions); the table."""

from __future__ import annotations

import pytest
import torch

from brittle.ablation import (
    ABLATION_COLUMNS,
    REASON_COLUMNS,
    ablated,
    ablation_markdown,
    fraction_removed,
)
from brittle.io import BrittleError
from brittle.models import linear_modules, linear_weight, linear_weights
from brittle.testing import tiny_model


def _random_group(model, frac, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(linear_weight(m).shape, generator=g) < frac for k, m in linear_modules(model).items()}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_zeroes_group_and_restores_bit_exactly(arch):
    model = tiny_model(arch)
    before = _state(model)
    saved = {name: linear_weight(m).detach().clone() for name, m in linear_modules(model).items()}
    group = _random_group(model, 0.1)
    assert all(saved[n][group[n]].ne(0).all() for n in saved)  # random init: the zeroing is visible
    x = torch.randint(0, 512, (1, 12))
    with ablated(model, group):
        for name, m in linear_modules(model).items():
            w = linear_weight(m)
            assert (w[group[name]] == 0).all()
            assert torch.equal(w[~group[name]], saved[name][~group[name]])  # everything else untouched
        changed = model(x).logits
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(model(x).logits, changed)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_recovering_from_another_model_takes_its_values_and_restores_bit_exactly(arch):
    """With a source model the selected entries take exactly its values (GPT-2: through the transposed Conv1D
    layout), all others stay, and the original bits come back on exit."""
    model, other = tiny_model(arch, seed=0), tiny_model(arch, seed=1)
    before = _state(model)
    saved = {name: linear_weight(m).detach().clone() for name, m in linear_modules(model).items()}
    group = _random_group(model, 0.2)
    src = linear_weights(other)
    assert all(not torch.equal(src[n][group[n]], linear_weight(m).detach()[group[n]])
               for n, m in linear_modules(model).items())  # different seeds: the recovery is visible
    with ablated(model, group, source=src):
        for name, m in linear_modules(model).items():
            w = linear_weight(m)
            assert torch.equal(w[group[name]], src[name][group[name]])
            assert torch.equal(w[~group[name]], saved[name][~group[name]])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    wrong = {n: torch.zeros(3, 3) for n in src}
    with pytest.raises(BrittleError, match="to recover from has .* of shape"):
        with ablated(model, group, source=wrong):
            pass
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_restores_on_exception():
    model = tiny_model("qwen2")
    before = _state(model)
    with pytest.raises(RuntimeError):
        with ablated(model, _random_group(model, 0.5)):
            raise RuntimeError("evaluation crashed")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_groups_are_rejected():
    model = tiny_model("llama")
    with pytest.raises(BrittleError, match="does not exist"):
        with ablated(model, {"layers.9.q": torch.zeros(2, 2, dtype=torch.bool)}):
            pass
    with pytest.raises(BrittleError, match="expected torch.bool"):
        with ablated(model, {"layers.0.q": torch.zeros(3, 3, dtype=torch.bool)}):
            pass


def test_fraction_removed():
    model = tiny_model("llama")
    mods = linear_modules(model)
    total = sum(linear_weight(m).numel() for m in mods.values())
    g = {"layers.0.q": torch.zeros_like(linear_weight(mods["layers.0.q"]), dtype=torch.bool)}
    g["layers.0.q"][0, :10] = True
    assert fraction_removed(model, g) == pytest.approx(10 / total)


def test_table_has_degenerate_reason_columns_and_markdown_shows_them_compactly():
    import pandas as pd

    assert REASON_COLUMNS == ("degenerate_empty", "degenerate_lone_opening", "degenerate_looping",
                              "degenerate_gibberish", "degenerate_other")
    cols = list(ABLATION_COLUMNS)
    assert cols[cols.index("degenerate") + 1 : cols.index("degenerate") + 6] == list(REASON_COLUMNS)
    row = dict.fromkeys(ABLATION_COLUMNS) | {"group": "set_difference", "sparsity": 0.01, "asr": 0.16, "degenerate": 0.84,
                                             "degenerate_empty": 0.0, "degenerate_lone_opening": 0.7,
                                             "degenerate_looping": 0.1, "degenerate_gibberish": 0.0,
                                             "degenerate_other": 0.04, "n_harmful": 50}
    dense = dict.fromkeys(ABLATION_COLUMNS) | {"group": "dense", "degenerate": 0.0, "n_harmful": 50}
    md = ablation_markdown(pd.DataFrame([dense, row], columns=cols))
    header = md.splitlines()[0]
    assert "| degenerate |" in header and not any(c in header for c in REASON_COLUMNS)
    assert "| 0.84 (lone 0.7, loop 0.1, other 0.04) |" in md
    assert md.splitlines()[2].startswith("| dense |") and "| 0 |" in md.splitlines()[2]
    # an old table without the reason columns still renders, the share alone
    old = pd.DataFrame([row], columns=cols).drop(columns=list(REASON_COLUMNS))
    assert "| 0.84 |" in ablation_markdown(old)
