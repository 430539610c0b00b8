"""Ablation context manager: zeroes exactly the group, restores bit-exactly (also on exceptions)."""

from __future__ import annotations

import pytest
import torch

from brittle.ablation import ablated, fraction_removed
from brittle.io import BrittleError
from brittle.models import linear_modules, linear_weight
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
