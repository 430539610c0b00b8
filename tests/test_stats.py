"""Experiment 2 statistics (brittle.analysis.stats): effect sizes against brute force, deterministic
subsampling, and synthetic drift data with known effects reaching each verdict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brittle.analysis.stats import (
    MARGIN,
    GroupDrift,
    cliffs_delta,
    cohens_d,
    compare,
    compare_groups,
    subsample,
    verdict,
)


def test_effect_sizes_match_brute_force():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 40).astype(float)  # many ties
    y = rng.integers(1, 6, 30).astype(float)
    brute = np.mean([np.sign(a - b) for a in x for b in y])
    assert cliffs_delta(x, y) == pytest.approx(brute, abs=1e-12)
    pooled = np.sqrt(((len(x) - 1) * np.var(x, ddof=1) + (len(y) - 1) * np.var(y, ddof=1)) / (len(x) + len(y) - 2))
    assert cohens_d(x, y) == pytest.approx((x.mean() - y.mean()) / pooled)
    assert cliffs_delta(y, x) == pytest.approx(-brute)


def test_subsampling_is_deterministic_and_bounded():
    x = np.arange(100.0)
    a, b = subsample(x, 10, 3), subsample(x, 10, 3)
    assert len(a) == 10 and np.array_equal(a, b) and len(set(a)) == 10
    assert not np.array_equal(a, subsample(x, 10, 4))
    assert subsample(x, 1000, 3) is x


def _drift(rng, scale, n):
    return np.abs(rng.normal(0, scale, n))


@pytest.mark.parametrize("case,expected", [("more", "H1"), ("same", "H2"), ("few", "inconclusive"),
                                            ("less", "inconclusive")])
def test_each_verdict_is_reachable_on_synthetic_drift(case, expected):
    rng = np.random.default_rng(1)
    control = _drift(rng, 1.0, 4000)
    group = {"more": _drift(rng, 2.0, 4000),  # true Cliff's delta ~ +0.41
             "same": _drift(rng, 1.0, 4000),  # 0
             "few": _drift(rng, 1.15, 30),  # a small real effect, too few entries to decide either way
             "less": _drift(rng, 0.5, 4000)}[case]
    row = compare(group, control if case != "few" else control[:30], n_boot=300, seed=0)
    got, reason = verdict(row)
    assert got == expected, reason
    if case == "less":
        assert "drifts less" in reason
    assert row["cliffs_delta_ci_low"] <= row["cliffs_delta"] <= row["cliffs_delta_ci_high"]


def test_verdict_thresholds_are_the_stated_ones():
    base = {"cliffs_delta_ci_low": 0.05, "cliffs_delta_ci_high": 0.3, "p_value": 1e-9, "p_adjusted": 1e-9}
    assert verdict({**base, "cliffs_delta": MARGIN})[0] == "H1"
    assert verdict({**base, "cliffs_delta": MARGIN - 1e-3})[0] == "inconclusive"  # significant but too small
    assert verdict({**base, "cliffs_delta": 0.2, "p_adjusted": 0.06})[0] == "inconclusive"
    assert verdict({"cliffs_delta": 0.0, "cliffs_delta_ci_low": -0.14, "cliffs_delta_ci_high": 0.14,
                    "p_value": 0.5})[0] == "H2"


def test_compare_groups_pools_and_stratifies_by_module_type():
    rng = np.random.default_rng(2)
    mods = ["layers.0.q", "layers.0.down", "layers.1.q", "layers.1.down"]

    def group(scale, tiny_w0=0):
        delta = {m: torch.tensor(rng.normal(0, scale, 300), dtype=torch.float32) for m in mods}
        w0 = {m: torch.tensor(rng.normal(0, 1, 300), dtype=torch.float32) for m in mods}
        w0[mods[0]][:tiny_w0] = 0.0  # excluded from the relative metric
        return GroupDrift(delta, w0)

    groups = {"set_difference": group(2.0, tiny_w0=10), "random_magnitude": group(1.0), "random": group(1.0)}
    table = compare_groups(groups, mods, metrics=("abs", "rel"), max_n=500, n_boot=100, seed=0)
    assert set(table.type) == {"all", "q", "down"} and set(table.control) == {"random_magnitude", "random"}
    pooled = table[(table.type == "all") & (table.metric == "abs") & (table.control == "random_magnitude")].iloc[0]
    assert pooled.n_group == 500 and pooled.n_control == 500  # subsampled from 1200
    whole = compare_groups(groups, mods, metrics=("abs", "rel"), max_n=10**6, n_boot=20, seed=0)
    pick = lambda t, m: whole[(whole.type == t) & (whole.metric == m) & (whole.control == "random")].iloc[0]  # noqa: E731
    assert (pick("q", "abs").n_group, pick("q", "rel").n_group, pick("down", "rel").n_group) == (600, 590, 600)
    assert (table.p_adjusted >= table.p_value - 1e-15).all()
    again = compare_groups(groups, mods, metrics=("abs", "rel"), max_n=500, n_boot=100, seed=0)
    assert table.equals(again)


def test_bootstrap_by_counts_equals_explicit_resampling():
    """The O(n) bootstrap (multiplicity counts over the sorted values) gives exactly the effects of the explicitly
    resampled arrays, ties included: a wrong tie rule in Cliff's delta, a median off by one order statistic or an
    unweighted variance would differ."""
    from brittle.analysis.stats import _effects, _Resampler

    rng = np.random.default_rng(3)
    x, y = np.round(rng.exponential(size=301), 1), np.round(rng.exponential(size=200), 1)  # many ties
    r = _Resampler(x, y)
    for _ in range(3):
        cx = np.bincount(rng.integers(0, len(x), len(x)), minlength=len(x))
        cy = np.bincount(rng.integers(0, len(y), len(y)), minlength=len(y))
        got, want = r.effects(cx, cy), _effects(np.repeat(r.xs, cx), np.repeat(r.ys, cy))
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_row_metrics_match_a_brute_force():
    """Row cosine and row L2 over each row's group entries, from flat indices and d_in; rows whose W_0 entries are
    all zero are left out of the cosine. A per-entry cosine, rows taken as columns (index % d_in) or a missing
    square root would differ."""
    from brittle.analysis.stats import GroupDrift

    rng = np.random.default_rng(0)
    d_in = 7
    index = torch.tensor(sorted(rng.choice(5 * d_in, size=15, replace=False)))
    w0 = torch.tensor(rng.normal(size=15), dtype=torch.float32)
    rows = index // d_in
    w0[rows == rows[0]] = 0.0  # the first row's W_0 is zero: no cosine for it
    delta = torch.tensor(rng.normal(scale=0.1, size=15), dtype=torch.float32)
    g = GroupDrift({"m": delta}, {"m": w0}, {"m": rows})
    cos, l2 = [], []
    for r in sorted(set(rows.tolist())):
        sel = (rows == r).numpy()
        a, d = w0.double().numpy()[sel], delta.double().numpy()[sel]
        l2.append(np.linalg.norm(d))
        if np.any(a != 0):
            cos.append(a @ (a + d) / np.linalg.norm(a) / np.linalg.norm(a + d))
    assert g.values("row_l2", ["m"]) == pytest.approx(l2, rel=1e-12)
    assert g.values("row_cosine", ["m"]) == pytest.approx(cos, rel=1e-12)
    with pytest.raises(ValueError, match="needs the entries' rows"):
        GroupDrift({"m": delta}, {"m": w0}).values("row_l2", ["m"])
