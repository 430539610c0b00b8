"""Group overlap against chance (brittle.analysis.overlap): hand-built sets, chance levels against simulation."""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from brittle.analysis import overlap, overlap_markdown
from brittle.groups import GroupError


def _mask(shape, idx):
    m = torch.zeros(shape, dtype=torch.bool)
    m.view(-1)[list(idx)] = True
    return m


def _row(table, level, unit=None):
    rows = table[(table.level == level) & ((table.module == unit) if unit else True)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_hand_built_sets_identical_disjoint_empty_and_one_module():
    shape = (4, 5)
    a = {"layers.0.q": _mask(shape, range(6)), "layers.0.down": _mask(shape, [0, 1])}
    same = overlap(a, a)
    t = _row(same, "total")
    assert (t.a, t.b, t.intersection, t.union) == (8, 8, 8, 8) and t.jaccard == t.share_a == t.share_b == 1.0
    # chance: 6*6/20 + 2*2/20 = 2.0 expected in common; observing all 8 is very unlikely
    assert t.chance_intersection == pytest.approx(2.0) and t.enrichment == pytest.approx(4.0) and t.p_value < 1e-3
    disjoint = overlap(a, {"layers.0.q": _mask(shape, range(6, 12)), "layers.0.down": _mask(shape, [5])})
    t = _row(disjoint, "total")
    assert (t.intersection, t.union, t.jaccard, t.share_a) == (0, 15, 0.0, 0.0) and t.p_value == 1.0
    assert _row(disjoint, "module", "layers.0.q").p_value == 1.0  # P(K >= 0)
    empty = overlap({k: torch.zeros_like(v) for k, v in a.items()}, a)
    t = _row(empty, "total")
    assert t.a == 0 and math.isnan(t.share_a) and t.share_b == 0.0 and t.jaccard == 0.0 and t.chance_intersection == 0
    nothing = overlap({"layers.0.q": torch.zeros(shape, dtype=torch.bool)}, {"layers.0.q": torch.zeros(shape, dtype=torch.bool)})
    assert math.isnan(_row(nothing, "total").jaccard)  # 0 / 0: undefined, not 0 or 1
    one = overlap({"layers.3.v": _mask(shape, [1, 2, 3])}, {"layers.3.v": _mask(shape, [2, 3, 4, 5])})
    assert list(one.level) == ["total", "type", "layer", "module"]
    m = _row(one, "module")
    assert (m.intersection, m.union, m.share_a, m.share_b, m.jaccard) == (2, 5, 2 / 3, 0.5, 0.4)
    # exact hypergeometric tail for one module: P(K >= 2) with N=20, a=3, b=4
    p = sum(math.comb(4, k) * math.comb(16, 3 - k) for k in (2, 3)) / math.comb(20, 3)
    assert m.p_value == pytest.approx(p, rel=1e-12)
    with pytest.raises(GroupError):
        overlap(a, {"layers.0.q": a["layers.0.q"]})
    md = overlap_markdown(one, names=("S", "S'"))
    assert "| all | 3 | 4 | 2 | 66.67% | 50.00% | 0.4000 |" in md


def test_chance_levels_and_p_values_match_simulation():
    """Two modules of different sizes and densities: the chance level is a per-module sum (a pooled a*b/N over
    all entries would be off by 4x here), the random Jaccard concentrates at the plug-in value, and the
    normal-approximation p-value of the total matches the simulated tail."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"layers.0.q": (20, 50), "layers.1.up": (40, 100)}
    sizes = {"layers.0.q": (500, 500), "layers.1.up": (400, 40)}
    fixed_a = {m: _mask(s, torch.randperm(math.prod(s), generator=gen)[: sizes[m][0]].tolist()) for m, s in shapes.items()}
    inter, jac = [], []
    n_sim = 3000
    for _ in range(n_sim):
        b = {m: _mask(s, torch.randperm(math.prod(s), generator=gen)[: sizes[m][1]].tolist()) for m, s in shapes.items()}
        k = sum(int((fixed_a[m] & b[m]).sum()) for m in shapes)
        u = sum(int((fixed_a[m] | b[m]).sum()) for m in shapes)
        inter.append(k)
        jac.append(k / u)
    inter_t = torch.tensor(inter, dtype=torch.float64)
    table = overlap(fixed_a, b)
    t = _row(table, "total")
    expected = 500 * 500 / 1000 + 400 * 40 / 4000
    assert t.chance_intersection == pytest.approx(expected)
    se = inter_t.std().item() / math.sqrt(n_sim)
    assert abs(inter_t.mean().item() - t.chance_intersection) < 4 * se
    assert t.chance_variance == pytest.approx(inter_t.var().item(), rel=0.1)
    assert t.chance_jaccard == pytest.approx(sum(jac) / n_sim, rel=2e-3)
    # the p-value of an observed total intersection k0 against the simulated tail
    k0 = int(expected + 1.5 * math.sqrt(t.chance_variance))
    forced = {m: fixed_a[m].clone() for m in shapes}
    t0 = _row(overlap(forced, _with_intersection(fixed_a, shapes, sizes, k0, gen)), "total")
    assert t0.intersection == k0
    assert t0.p_value == pytest.approx((inter_t >= k0).double().mean().item(), abs=0.02)


def _with_intersection(a, shapes, sizes, k0, gen):
    """A group B of the sizes in ``sizes`` sharing exactly k0 entries with ``a`` (taken from the first module)."""
    out = {}
    left = k0
    for m, s in shapes.items():
        n_b = sizes[m][1]
        inside = a[m].view(-1).nonzero().view(-1)
        outside = (~a[m]).view(-1).nonzero().view(-1)
        take = min(left, n_b, len(inside))
        left -= take
        pick = torch.cat([inside[torch.randperm(len(inside), generator=gen)[:take]],
                          outside[torch.randperm(len(outside), generator=gen)[: n_b - take]]])
        out[m] = _mask(s, pick.tolist())
    assert left == 0
    return out


def test_overlap_command(tmp_path):
    from typer.testing import CliRunner

    from brittle.cli import app
    from brittle.groups import save_group

    shape = (4, 5)
    save_group(tmp_path / "s.safetensors", {"layers.0.q": _mask(shape, [1, 2, 3])})
    save_group(tmp_path / "t.safetensors", {"layers.0.q": _mask(shape, [2, 3, 4, 5])})
    runner = CliRunner()
    res = runner.invoke(app, ["overlap", str(tmp_path / "s.safetensors"), str(tmp_path / "t.safetensors"),
                              "--out", str(tmp_path / "o.csv")])
    assert res.exit_code == 0, res.output
    assert "| all | 3 | 4 | 2 | 66.67% | 50.00% | 0.4000 |" in res.output
    import pandas as pd

    assert list(pd.read_csv(tmp_path / "o.csv").level) == ["total", "type", "layer", "module"]
    assert (tmp_path / "o.md").is_file()
    res = runner.invoke(app, ["overlap", str(tmp_path / "s.safetensors"), str(tmp_path / "t.safetensors"),
                              "--out", str(tmp_path / "o.csv")])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(app, ["overlap", str(tmp_path / "s.safetensors"), str(tmp_path / "t.safetensors"),
                              "--levels", "total,rows"])
    assert res.exit_code == 2 and "unknown level(s) rows" in res.output


def _module_table(jaccards, total):
    import pandas as pd

    rows = [{"level": "total", "module": "all", "jaccard": total, "chance_jaccard": 0.01}]
    rows += [{"level": "module", "module": f"layers.{i}.q", "jaccard": j, "chance_jaccard": 0.01}
             for i, j in enumerate(jaccards)]
    return pd.DataFrame(rows)


def test_against_noise_floor_reaches_both_outcomes():
    """Modules are the units: 30 modules all 0.2 below the floor are beyond noise; the same values as the floor,
    or differences scattered around 0, are not (a wrong sign convention or a pooled-entries test would fail)."""
    from brittle.analysis import against_noise_floor

    rng = np.random.default_rng(0)
    floor = rng.uniform(0.7, 0.9, size=30)
    below = against_noise_floor(_module_table(floor - 0.2, 0.6), _module_table(floor, 0.8), n_boot=200)
    assert below["beyond_noise"] and below["n_below"] == 30 and below["median_diff"] == pytest.approx(-0.2)
    assert below["median_diff_ci_high"] < 0 and below["p_value"] < 1e-5
    assert below["jaccard_finetuned"] == 0.6 and below["jaccard_noise_floor"] == 0.8
    same = against_noise_floor(_module_table(floor, 0.8), _module_table(floor, 0.8), n_boot=200)
    assert not same["beyond_noise"] and same["p_value"] == 1.0 and same["n_below"] == 0
    scattered = against_noise_floor(_module_table(floor + rng.normal(0, 0.05, 30), 0.8), _module_table(floor, 0.8),
                                    n_boot=200)
    assert not scattered["beyond_noise"] and scattered["median_diff_ci_low"] < 0 < scattered["median_diff_ci_high"]
