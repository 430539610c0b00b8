"""Drift tracking: the callback's Delta equals merged fp32 weights minus W_0 recomputed independently; the
statistics equal a float64 brute force; frozen entries have zero drift; untouched modules are marked."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from brittle.data import Example
from brittle.drift import DriftTracker, entry_stats
from brittle.finetune import LoraTrainConfig, merge_lora, train_lora
from brittle.models import linear_modules, linear_weight
from brittle.testing import tiny_model

EXAMPLES = [Example(f"Question number {i}?", f"Answer {i}: always the same words.", "t", str(i)) for i in range(8)]


def _groups(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = linear_modules(model)
    a = {n: torch.rand(linear_weight(m).shape, generator=g) < 0.05 for n, m in mods.items()}
    b = {n: torch.rand(linear_weight(m).shape, generator=g) < 0.02 for n, m in mods.items()}
    return {"set_difference": a, "random": b}


def _weights(model):
    return {n: linear_weight(m).detach().clone().double() for n, m in linear_modules(model).items()}


def _check_final_equals_merged_minus_w0(tracker, trained, before, groups):
    merged = _weights(merge_lora(copy.deepcopy(trained)))
    for g, group in groups.items():
        for m, mask in group.items():
            want = (merged[m] - before[m])[mask]  # flat index order, as the tracker keeps them
            got = tracker.final[g][m].double()
            # 1e-6 of the largest drift, plus the merge's own rounding: W + Delta stored in fp32 is rounded
            # relative to |W| (the tracker never forms that sum)
            tol = 1e-6 * want.abs().max().item() + 2**-24 * merged[m][mask].abs().max().item()
            assert (got - want).abs().max().item() <= tol, (g, m)


@pytest.mark.parametrize("full", [False, True])
def test_callback_drift_equals_merged_weights_minus_w0(smol_tokenizer, full):
    model = tiny_model("llama", vocab_size=len(smol_tokenizer), initializer_range=0.5)
    before = _weights(model)
    groups = _groups(model)
    tracker = DriftTracker(model, groups, every=2)
    cfg = LoraTrainConfig(r=4, alpha=16, lr=1e-2, batch_size=4, max_steps=5, seed=0,
                          targets=("all",) if full else ("q", "v", "down"))
    trained, _ = train_lora(model, smol_tokenizer, EXAMPLES, cfg, progress=False, full=full, on_step=tracker.on_step)
    tracker.finish(5, trained)
    _check_final_equals_merged_minus_w0(tracker, trained, before, groups)
    table = tracker.table()
    n_modules = {g: sum(bool(m.any()) for m in grp.values()) for g, grp in groups.items()}
    assert sorted(table.step.unique()) == [0, 2, 4, 5]
    assert len(table) == 4 * sum(n_modules.values())
    assert (table[table.step == 0].abs_max == 0).all()
    last = table[table.step == 5]
    if full:
        assert last.adapted.all() and (last.abs_max > 0).all()
    else:  # LoRA on q, v, down: the other modules cannot move and are marked, with exactly zero drift
        untouched = last[~last.type.isin(["q", "v", "down"])]
        assert len(untouched) and not untouched.adapted.any() and (untouched.abs_max == 0).all()
        assert last[last.type.isin(["q", "v", "down"])].adapted.all()
        assert (last[last.adapted].abs_max > 0).all()


def test_frozen_entries_have_zero_drift(smol_tokenizer):
    model = tiny_model("llama", vocab_size=len(smol_tokenizer), initializer_range=0.5)
    before = _weights(model)
    groups = _groups(model)
    tracker = DriftTracker(model, groups, every=1)
    cfg = LoraTrainConfig(r=4, alpha=16, lr=1e-2, batch_size=4, max_steps=3, seed=0)
    trained, _ = train_lora(model, smol_tokenizer, EXAMPLES, cfg, progress=False, on_step=tracker.on_step,
                            freeze=groups["set_difference"], freeze_mode="weights")
    tracker.finish(3, trained)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in tracker.final["set_difference"].values())
    assert any(d.abs().max() > 0 for d in tracker.final["random"].values())
    _check_final_equals_merged_minus_w0(tracker, trained, before, groups)


def test_entry_stats_against_a_float64_brute_force():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=40)
    w0[[3, 17]] = 0.0  # excluded from the relative change, and counted
    d = rng.normal(scale=0.01, size=40)
    rows = np.repeat(np.arange(8), 5)
    got = entry_stats(torch.tensor(d, dtype=torch.float32), torch.tensor(w0, dtype=torch.float32), torch.tensor(rows))
    d32, w32 = np.float32(d).astype(np.float64), np.float32(w0).astype(np.float64)
    assert got["n"] == 40 and got["n_rel_excluded"] == 2 and got["n_rows"] == 8
    assert math.isclose(got["abs_mean"], np.abs(d32).mean(), rel_tol=1e-12)
    assert math.isclose(got["abs_median"], np.sort(np.abs(d32))[19], rel_tol=1e-12)  # torch: the lower middle
    assert math.isclose(got["abs_q95"], np.quantile(np.abs(d32), 0.95), rel_tol=1e-12)
    keep = w32 != 0
    assert math.isclose(got["rel_max"], (np.abs(d32[keep]) / np.abs(w32[keep])).max(), rel_tol=1e-6)  # the ratio is formed in fp32
    cos, l2, rel = [], [], []
    for r in range(8):
        a, b = w32[rows == r], w32[rows == r] + d32[rows == r]
        cos.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        l2.append(np.linalg.norm(d32[rows == r]))
        rel.append(l2[-1] / np.linalg.norm(a))
    assert math.isclose(got["row_cosine_mean"], np.mean(cos), rel_tol=1e-12)
    assert math.isclose(got["row_l2_median"], np.sort(l2)[3], rel_tol=1e-12)
    assert math.isclose(got["row_rel_l2_mean"], np.mean(rel), rel_tol=1e-12)


def test_saved_drift_files_round_trip(smol_tokenizer, tmp_path):
    from safetensors.torch import load_file

    model = tiny_model("llama", vocab_size=len(smol_tokenizer))
    groups = _groups(model)
    tracker = DriftTracker(model, groups, every=1)
    trained, _ = train_lora(model, smol_tokenizer, EXAMPLES, LoraTrainConfig(r=2, alpha=4, lr=1e-2, batch_size=4,
                                                                              max_steps=2), progress=False,
                            on_step=tracker.on_step)
    tracker.finish(2, trained)
    files = tracker.save(tmp_path)
    assert pd.read_parquet(tmp_path / files["table"]).equals(tracker.table())
    saved = load_file(str(tmp_path / files["final:random"]))
    for m, mask in groups["random"].items():
        if mask.any():
            assert torch.equal(saved[f"{m}.delta"], tracker.final["random"][m])
            assert torch.equal(saved[f"{m}.index"], mask.reshape(-1).nonzero().squeeze(1))
    with pytest.raises(ValueError, match="every N >= 1"):
        DriftTracker(model, groups, every=0)


def test_samples_follow_fixed_entries_over_time(smol_tokenizer, tmp_path):
    """The over-time subsample: the same entries at every record (their |Delta| equals the per-entry final drift
    at the last record), drawn uniformly over the group's modules, n_sample of them, and saved per step."""
    from safetensors.torch import load_file

    model = tiny_model("llama", vocab_size=len(smol_tokenizer))
    groups = _groups(model)
    total = sum(int(m.sum()) for m in groups["random"].values())
    tracker = DriftTracker(model, groups, every=1, n_sample=total // 3, seed=5)
    trained, _ = train_lora(model, smol_tokenizer, EXAMPLES, LoraTrainConfig(r=2, alpha=4, lr=1e-2, batch_size=4,
                                                                              max_steps=2), progress=False,
                            on_step=tracker.on_step)
    tracker.finish(2, trained)
    tracker.save(tmp_path)
    saved = load_file(str(tmp_path / "samples.safetensors"))
    assert saved["steps"].tolist() == [0, 1, 2]
    table = saved["random"]
    assert table.shape == (3, total // 3) and bool((table[0] == 0).all()) and bool((table[-1] > 0).any())
    expected = torch.cat([tracker.final["random"][m][pos].abs() for m, pos in tracker.sample_index["random"].items()])
    assert torch.equal(table[-1], expected)
    assert len(tracker.sample_index["random"]) > 1  # spread over modules, not the first one's entries
    again = DriftTracker(model, groups, every=1, n_sample=total // 3, seed=5).sample_index["random"]
    assert all(torch.equal(again[m], p) for m, p in tracker.sample_index["random"].items())
