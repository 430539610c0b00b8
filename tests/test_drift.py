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


# --- the torch statistics path (what runs on a CUDA model), exercised on CPU tensors -----------------------------

def _reference(d, w0, rows, rel_threshold=1e-6):
    """Brute force in float64 from a full sort: order statistics read at their ranks (quantile ``q``:
    ``s[lo] + (s[hi] - s[lo]) (p - lo)``, ``p = (n - 1) q``), the ratio formed in fp32 as the tracker does."""
    def summary(v, prefix):
        n = len(v)
        if n == 0:
            return {f"{prefix}_{k}": math.nan for k in ("mean", "median", "q05", "q25", "q75", "q95", "max")}
        s = np.sort(v).astype(np.float64)
        out = {f"{prefix}_mean": math.fsum(s) / n, f"{prefix}_median": s[(n - 1) // 2], f"{prefix}_max": s[-1]}
        for q in (0.05, 0.25, 0.75, 0.95):
            p = (n - 1) * q
            lo, hi = int(p), min(int(p) + 1, n - 1)
            out[f"{prefix}_q{int(q * 100):02d}"] = s[lo] + (s[hi] - s[lo]) * (p - lo)
        return out

    d32, w32 = np.float32(d), np.float32(w0)
    keep = np.abs(w32.astype(np.float64)) >= rel_threshold
    moved = np.abs(d32).max() != 0
    rel = np.abs(d32[keep]) / np.abs(w32[keep]) if moved else np.zeros(int(keep.sum()), np.float32)
    out = {"n": len(d), "n_rel_excluded": int((~keep).sum()), **summary(np.abs(d32), "abs"), **summary(rel, "rel")}
    a, dd = w32.astype(np.float64), d32.astype(np.float64)
    cos, l2, rl2 = [], [], []
    for r in np.unique(rows):
        wa, da = a[rows == r], dd[rows == r]
        l2.append(math.sqrt(math.fsum(da * da)))
        n0 = math.sqrt(math.fsum(wa * wa))
        cos.append(math.fsum(wa * (wa + da)) / max(n0 * math.sqrt(math.fsum((wa + da) ** 2)), 1e-300))
        rl2.append(l2[-1] / max(n0, 1e-300))
    k = (len(cos) - 1) // 2
    out.update({"n_rows": len(cos), "row_cosine_mean": np.mean(cos), "row_cosine_median": np.sort(cos)[k],
                "row_l2_mean": np.mean(l2), "row_l2_median": np.sort(l2)[k], "row_rel_l2_mean": np.mean(rl2),
                "row_rel_l2_median": np.sort(rl2)[k]})
    return out


ORDER = ("median", "q05", "q25", "q75", "q95", "max")


def _case(name):
    rng = np.random.default_rng(1)
    if name == "random":  # ragged rows (1 to 40 entries), |w0| = 0 and 0 < |w0| < threshold (a huge ratio if kept)
        rows = np.concatenate([[0], np.sort(rng.integers(1, 300, size=4999))])  # row 0 holds one entry
        w0 = rng.normal(scale=0.02, size=5000)
        w0[[3, 17, 400]] = 0.0
        w0[[5, 900, 4999]] = 3e-7
        return rng.normal(scale=1e-4, size=5000), w0, rows, 1e-6
    if name == "one entry":
        return np.array([-2.5e-3]), np.array([0.7]), np.array([4]), 1e-6
    if name == "all-zero delta":  # no sort on the CPU path; on the torch path the same zeros, with 0/0 kept as 0
        w0 = rng.normal(size=64)
        w0[:3] = 0.0
        return np.zeros(64), w0, np.arange(64) // 5, 0.0
    if name == "nothing kept":  # every |w0| below the threshold: relative statistics NaN, counted as excluded
        return rng.normal(size=30), np.full(30, 1e-8), np.zeros(30, dtype=np.int64), 1e-6
    if name == "one entry per row":
        return rng.normal(scale=1e-2, size=50), rng.normal(size=50), np.arange(50) * 3, 1e-6
    raise AssertionError(name)


@pytest.mark.parametrize("case", ["random", "one entry", "all-zero delta", "nothing kept", "one entry per row"])
def test_torch_statistics_equal_numpy_path_and_brute_force(case):
    """The torch path (one torch.sort, excluded entries sorted last as +inf, float64 index_add_) against the numpy
    path and a float64 brute force: order statistics exactly, means and row statistics to 1e-12. Catches a rank
    off by one, ranks of n read where n_kept was meant (the padding leaking in), excluded entries in the relative
    mean or max, an fp32 mean, a wrong row inverse index, and 0/0 = NaN for an all-zero Delta."""
    d, w0, rows, thr = _case(case)
    args = (torch.tensor(d, dtype=torch.float32), torch.tensor(w0, dtype=torch.float32), torch.tensor(rows))
    got_numpy = entry_stats(*args, thr)
    got_torch = entry_stats(*args, thr, _torch=True)
    want = _reference(d, w0, rows, thr)
    assert list(got_torch) == list(got_numpy)  # the same columns, in the same order
    for k, v in want.items():
        for got in (got_numpy, got_torch):
            if isinstance(v, int):
                assert got[k] == v, k
            elif math.isnan(v):
                assert math.isnan(got[k]), k
            elif k.split("_", 1)[0] in ("abs", "rel") and k.rsplit("_", 1)[1] in ORDER:
                assert got[k] == v, (k, got[k], v)  # order statistics do not depend on the summation
            else:
                assert math.isclose(got[k], v, rel_tol=1e-12, abs_tol=1e-300), (k, got[k], v)
    if case == "all-zero delta":
        assert got_torch["rel_max"] == 0.0 and got_torch["row_l2_mean"] == 0.0


def test_torch_statistics_path_never_waits_for_the_device():
    """On the meta device every read of a value (``.item()``, ``bool()``, a boolean-mask selection, ``.numpy()``)
    raises: the torch path must run there, since each such read on CUDA waits for the GPU. The numpy path
    cannot."""
    from brittle.drift import _entry_vector, stats_context

    d, w0, rows, thr = _case("random")
    ctx = stats_context(torch.tensor(w0, dtype=torch.float32), torch.tensor(rows), thr, _torch=True)
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in ctx.items()}
    out = _entry_vector(torch.tensor(d, dtype=torch.float32, device="meta"), meta)
    assert out.device.type == "meta" and out.shape == _entry_vector(torch.tensor(d, dtype=torch.float32), ctx).shape
    cpu_ctx = stats_context(torch.tensor(w0, dtype=torch.float32), torch.tensor(rows), thr)
    with pytest.raises((RuntimeError, TypeError, NotImplementedError)):
        _entry_vector(torch.tensor(d, dtype=torch.float32, device="meta"),
                      {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in cpu_ctx.items()})


@pytest.mark.parametrize("full", [False, True])
def test_tracker_on_the_torch_path_logs_what_the_numpy_path_logs(smol_tokenizer, monkeypatch, full):
    """A tracker built with the torch statistics context (what a CUDA model gets: device-side record, one transfer
    of the scalars, the subsample gathered on the device) beside the default CPU tracker in the same run, LoRA with a
    weights-frozen group or full fine-tuning: the same rows (order statistics exactly), subsamples and final Delta,
    and CPU tensors in ``final``, ``w0`` and ``state_dict``."""
    import brittle.drift as drift

    model = tiny_model("llama", vocab_size=len(smol_tokenizer), initializer_range=0.5)
    groups = _groups(model)
    cpu = DriftTracker(model, groups, every=2)
    real = drift.stats_context
    monkeypatch.setattr(drift, "stats_context", lambda *a, **k: real(*a, **k, _torch=True))
    dev = DriftTracker(model, groups, every=2)
    monkeypatch.setattr(drift, "stats_context", real)
    assert all(c["torch"] for c in dev.context.values()) and not any(c["torch"] for c in cpu.context.values())

    def on_step(step, loss, m):
        cpu.on_step(step, loss, m)
        dev.on_step(step, loss, m)

    cfg = LoraTrainConfig(r=4, alpha=16, lr=1e-2, batch_size=4, max_steps=5, seed=0, targets=("q", "v", "down"))
    frozen = {n: m for n, m in groups["set_difference"].items() if n.split(".", 2)[2] in cfg.targets}
    freeze = {} if full else dict(freeze=frozen, freeze_mode="weights")
    trained, _ = train_lora(model, smol_tokenizer, EXAMPLES, cfg, progress=False, full=full, on_step=on_step, **freeze)
    for t in (cpu, dev):
        t.finish(5, trained)
    a, b = cpu.table(), dev.table()
    assert list(a.columns) == list(b.columns) and len(a) == len(b) and (a.step > 0).any()
    for col in a.columns:
        if a[col].dtype.kind != "f" or col.rsplit("_", 1)[1] in ORDER:
            assert a[col].equals(b[col]), col
        else:
            assert np.allclose(a[col], b[col], rtol=1e-12, atol=0, equal_nan=True), col
    for g in groups:
        assert all(torch.equal(x, y) for x, y in zip(cpu.samples[g], dev.samples[g], strict=True))
        for m, d in cpu.final[g].items():
            assert torch.equal(dev.final[g][m], d) and torch.equal(dev.w0[g][m], cpu.w0[g][m])
    state = dev.state_dict()
    assert all(d.device.type == "cpu" for ds in state["final"].values() for d in ds.values())


def test_full_fine_tuning_drift_of_a_transposed_conv1d_weight():
    """GPT-2 keeps its linear weights transposed (Conv1D, ``[d_in, d_out]``): W_0 and W_t are gathered at the
    tracked entries of the ``[d_out, d_in]`` view, not at the same flat positions of the storage."""
    model = tiny_model("gpt2")
    mods = linear_modules(model)
    groups = _groups(model)
    before = _weights(model)
    tracker = DriftTracker(model, groups, every=1)
    with torch.no_grad():
        for m in mods.values():
            m.weight.add_(torch.randn_like(m.weight) * 1e-3)
    deltas, trainable = tracker.deltas(model)
    after = _weights(model)
    assert not linear_weight(next(iter(mods.values()))).is_contiguous()
    for g, group in groups.items():
        for n, mask in group.items():
            if mask.any():
                assert torch.equal(tracker.w0[g][n], before[n][mask].float())
                torch.testing.assert_close(deltas[g][n].double(), (after[n] - before[n])[mask], rtol=1e-6, atol=1e-9)
    assert trainable == set(mods)
