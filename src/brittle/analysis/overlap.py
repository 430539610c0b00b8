"""Overlap of two groups of the same model (Experiment 1), against the chance level of random sets.

For groups ``A`` and ``B`` (bool masks per module, see :mod:`brittle.groups`), per module, per layer, per
module type and overall: ``|A & B|``, ``|A & B| / |A|`` (share of A kept in B), ``|A & B| / |B|``, Jaccard
``|A & B| / |A | B|``; and what two sets of the same sizes drawn uniformly at random in each module would give:

* ``chance_intersection`` ``E[K] = sum_m a_m b_m / N_m`` (hypergeometric per module, independent modules);
* ``chance_jaccard`` = ``E[K] / (|A| + |B| - E[K])``: the plug-in value (the random Jaccard concentrates around
  it; its relative error is of order ``Var[K] / E[K]^2``, below 1e-3 once ``E[K]`` exceeds a few thousand);
* ``p_value``: ``P(K >= observed)`` for random sets -- exact (hypergeometric upper tail) for one module, a
  normal approximation with continuity correction for a sum over modules (a sum of many independent
  hypergeometric counts);
* ``enrichment`` = observed / chance intersection.

A noise floor (the same selection on the unchanged model from another calibration sample) is the overlap of
two such groups computed with this same function; the report sets the two side by side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

LEVELS = ("total", "type", "layer", "module")


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def _p_value(row) -> float:
    k, e, var = row["intersection"], row["chance_intersection"], row["chance_variance"]
    if k <= 0:
        return 1.0  # an intersection is never negative
    if row["level"] == "module":
        from scipy.stats import hypergeom

        return float(hypergeom.sf(k - 1, row["numel"], row["a"], row["b"]))
    if var <= 0:
        return 1.0 if k <= e else 0.0
    return _normal_sf((k - 0.5 - e) / math.sqrt(var))


def overlap(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]):
    """The overlap table of groups ``a`` and ``b`` (same modules and shapes): a pandas DataFrame with one row per
    (``level``, unit), levels ``total``, ``type``, ``layer``, ``module`` in that order; columns ``module``
    (unit name), ``layer``, ``type``, ``numel``, ``a``, ``b`` (sizes), ``intersection``, ``union``, ``share_a``
    (``|A & B| / |A|``), ``share_b``, ``jaccard``, ``chance_intersection``, ``chance_jaccard``, ``enrichment``,
    ``chance_variance``, ``p_value`` (see the module docstring; ratios with a zero denominator are NaN)."""
    import numpy as np

    from ..groups.summary import group_summary

    df = group_summary({"a": a, "b": b}, overlap=("a", "b"))
    df = df.drop(columns=["a_share", "b_share"])
    df["share_a"] = df["intersection"] / df["a"].where(df["a"] > 0)
    df["share_b"] = df["intersection"] / df["b"].where(df["b"] > 0)
    denom = df["a"] + df["b"] - df["chance_intersection"]
    df["chance_jaccard"] = df["chance_intersection"] / denom.where(denom > 0)
    df["enrichment"] = df["intersection"] / df["chance_intersection"].where(df["chance_intersection"] > 0)
    df["p_value"] = [_p_value(r) for _, r in df.iterrows()]
    df = df.astype({c: float for c in ("share_a", "share_b", "jaccard", "chance_jaccard", "enrichment")})
    order = {lv: i for i, lv in enumerate(LEVELS)}
    df = df.iloc[np.argsort([order[x] for x in df["level"]], kind="stable")].reset_index(drop=True)
    cols = ["level", "module", "layer", "type", "numel", "a", "b", "intersection", "union", "share_a", "share_b",
            "jaccard", "chance_intersection", "chance_variance", "chance_jaccard", "enrichment", "p_value"]
    return df[cols]


def _p(p: float) -> str:
    return f"{p:.2g}" if p > 0 else "< 1e-300"  # below the smallest double: the tail underflowed


def overlap_markdown(table, *, names: tuple[str, str] = ("A", "B"), levels: tuple[str, ...] = ("total", "type")) -> str:
    """The rows of ``levels`` as a Markdown table (shares in %, p-values in scientific notation)."""
    na, nb = names
    head = (f"| unit | |{na}| | |{nb}| | |{na}&{nb}| | share of {na} | share of {nb} | Jaccard | chance Jaccard | "
            f"enrichment | p (random sets) |")
    lines = [head, "|" + "---|" * 10]

    def pct(x: float) -> str:
        return "-" if x != x else f"{100 * x:.2f}%"

    for _, r in table[table["level"].isin(levels)].iterrows():
        enr = "-" if r["enrichment"] != r["enrichment"] else f"{r['enrichment']:.2f}x"
        lines.append(f"| {r['module']} | {int(r['a']):,} | {int(r['b']):,} | {int(r['intersection']):,} | "
                     f"{pct(r['share_a'])} | {pct(r['share_b'])} | {r['jaccard']:.4f} | {r['chance_jaccard']:.4f} | "
                     f"{enr} | {_p(r['p_value'])} |")
    return "\n".join(lines) + "\n"


def against_noise_floor(finetuned, noise, *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Is the overlap after fine-tuning below the noise floor? Both arguments are :func:`overlap` tables of the
    same group (original vs fine-tuned, original vs another calibration sample of the unchanged model).

    Per module with a non-empty union in both tables, ``d_m = J_finetuned,m - J_noise,m``; returned: the overall
    Jaccards, ``n_modules``, ``n_below`` (modules with ``d_m < 0``), the median of ``d_m`` with a 95 %
    percentile-bootstrap interval (``n_boot`` resamples of the modules, seeded), the two-sided Wilcoxon
    signed-rank p-value of ``d_m`` (modules are the units: the entries of one module are not independent), and
    ``beyond_noise``: the rule ``p < alpha`` and the interval entirely below 0 (the selection changed more than
    recomputing it on other calibration data changes it)."""
    import numpy as np
    from scipy.stats import wilcoxon

    def by_module(t):
        rows = t[t["level"] == "module"]
        return dict(zip(rows["module"], rows["jaccard"], strict=True))

    def total(t):
        return float(t[t["level"] == "total"]["jaccard"].iloc[0])

    ft, nz = by_module(finetuned), by_module(noise)
    d = np.array([ft[m] - nz[m] for m in ft if m in nz and ft[m] == ft[m] and nz[m] == nz[m]])
    out = {"jaccard_finetuned": total(finetuned), "jaccard_noise_floor": total(noise),
           "chance_jaccard": float(finetuned[finetuned["level"] == "total"]["chance_jaccard"].iloc[0]),
           "n_modules": len(d), "n_below": int((d < 0).sum()), "alpha": alpha, "n_boot": n_boot, "seed": seed}
    if len(d) < 2:
        return {**out, "median_diff": float("nan"), "median_diff_ci_low": float("nan"),
                "median_diff_ci_high": float("nan"), "p_value": float("nan"), "beyond_noise": False}
    rng = np.random.default_rng(seed)
    boot = np.median(d[rng.integers(0, len(d), size=(n_boot, len(d)))], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    p = float(wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
    return {**out, "median_diff": float(np.median(d)), "median_diff_ci_low": float(lo), "median_diff_ci_high": float(hi),
            "p_value": p, "beyond_noise": bool(p < alpha and hi < 0)}
