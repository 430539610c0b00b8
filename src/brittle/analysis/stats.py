"""Experiment 2: do safety-critical weights drift more than random ones? Comparisons and verdicts.

Data: the final per-entry drift of each tracked group (``finetune/drift/final/<group>.safetensors``, see
:mod:`brittle.drift`), restricted to modules the fine-tuning could change. Metrics per entry:

* ``abs``: ``|Delta|``;
* ``rel``: ``|Delta| / |w0|`` over entries with ``|w0| >= 1e-6`` (the others are left out and counted).

A *comparison* is one group (``set_difference``, ``top_safety``) against one control (``random_magnitude``,
``random``, ``top_utility``) for one metric, over all module types pooled and per module type. Groups of
millions of entries are subsampled deterministically (a seeded permutation; at most ``max_n`` per side; the
report states n). For each comparison (:func:`compare`):

* difference of medians and of means (group - control), Cliff's delta ``P(X > Y) - P(X < Y)`` (from the
  Mann-Whitney U statistic: ``2 U / (n_x n_y) - 1``) and Cohen's d (pooled standard deviation), each with a
  95 % percentile-bootstrap interval (``n_boot`` resamples of both sides, seeded);
* the two-sided Mann-Whitney U test p-value (no normality assumed: drift is skewed and zero-inflated), with
  the Benjamini-Hochberg correction over all comparisons of a run (``scipy.stats.false_discovery_control``).

Verdicts (:func:`verdict`), written down before looking at data, on the primary comparison (``set_difference``
vs ``random_magnitude``, metric ``abs``, all module types pooled), with ``MARGIN = 0.147`` (the conventional
bound of a "negligible" Cliff's delta, Romano et al. 2006) and ``ALPHA = 0.05``:

* **H1** (fragile safety: safety-critical weights drift more): adjusted p < ALPHA, the 95 % interval of Cliff's
  delta above 0, and its point estimate >= MARGIN;
* **H2** (pathway creation: no meaningful difference): the 95 % interval of Cliff's delta inside
  (-MARGIN, +MARGIN);
* **inconclusive**: neither (including a significant effect in the other direction, which the report names).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MARGIN = 0.147
ALPHA = 0.05
REL_THRESHOLD = 1e-6
PRIMARY = ("set_difference", "random_magnitude", "abs")
METRICS = ("abs", "rel", "row_cosine", "row_l2")
ROW_METRICS = ("row_cosine", "row_l2")


@dataclass(frozen=True)
class GroupDrift:
    """One group's final drift: per module, ``delta`` and ``w0`` of its entries (float32, flat order) and, for
    the row metrics, each entry's output row (``rows``; ``None`` when unknown)."""

    delta: Mapping[str, torch.Tensor]
    w0: Mapping[str, torch.Tensor]
    rows: Mapping[str, torch.Tensor] | None = None

    def values(self, metric: str, modules: Sequence[str]) -> np.ndarray:
        """The metric's values over ``modules`` (float64), in module order: per entry for ``abs`` (|Delta|) and
        ``rel`` (|Delta| / |w0|, entries with |w0| >= 1e-6); per output row ``i`` holding group entries ``J_i``
        for ``row_cosine`` (cosine(W_0[i, J_i], W_t[i, J_i]), rows with W_0[i, J_i] = 0 left out; lower = more
        drift) and ``row_l2`` (||Delta[i, J_i]||; it grows with the number of entries in the row)."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric '{metric}' (known: {', '.join(METRICS)})")
        if metric in ROW_METRICS and self.rows is None:
            raise ValueError(f"metric '{metric}' needs the entries' rows (a drift file with d_in, or d_in given)")
        parts = []
        for m in modules:
            d = self.delta[m].double()
            if metric == "abs":
                parts.append(d.abs())
            elif metric == "rel":
                w = self.w0[m].double().abs()
                keep = w >= REL_THRESHOLD
                parts.append(d.abs()[keep] / w[keep])
            else:
                w = self.w0[m].double()
                _, inv = torch.unique_consecutive(self.rows[m], return_inverse=True)  # rows come sorted (flat order)
                n = int(inv.max()) + 1 if len(inv) else 0
                ww, wd, dd = (torch.zeros(n, dtype=torch.float64).index_add_(0, inv, a * b)
                              for a, b in ((w, w), (w, d), (d, d)))
                if metric == "row_l2":
                    parts.append(dd.sqrt())
                else:
                    keep = ww > 0
                    parts.append((ww + wd)[keep] / (ww[keep] * (ww + 2 * wd + dd)[keep].clamp_min(0)).sqrt())
        return torch.cat(parts).numpy() if parts else np.zeros(0)


def load_group_drift(path: str | Path, d_in: Mapping[str, int] | None = None) -> GroupDrift:
    """Read ``drift/final/<group>.safetensors`` (written by :meth:`brittle.drift.DriftTracker.save`). The rows of
    the entries come from their flat indices and each module's ``d_in``: recorded in the file's metadata, or given
    (e.g. from the shapes of the group files); without either, the row metrics are unavailable."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    t = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    d_in = dict(d_in or json.loads(meta.get("d_in", "{}")))
    mods = sorted({k.rsplit(".", 1)[0] for k in t})
    rows = {m: t[f"{m}.index"] // d_in[m] for m in mods} if mods and all(m in d_in for m in mods) else None
    return GroupDrift({m: t[f"{m}.delta"] for m in mods}, {m: t[f"{m}.w0"] for m in mods}, rows)


def drift_over_time(samples: Mapping[str, torch.Tensor]) -> list[dict[str, float]]:
    """Per recorded step and group, the median and quartiles (linear interpolation) of ``|Delta|`` over the
    tracker's fixed subsample (``drift/samples.safetensors``: ``steps`` ``[n_records]`` and per group
    ``[n_records, n]``); rows ``{"group", "step", "median", "q25", "q75", "n"}``, non-finite values left out."""
    steps = [int(s) for s in samples["steps"].reshape(-1).tolist()]
    rows = []
    for group, table in samples.items():
        if group == "steps":
            continue
        if table.ndim != 2 or table.shape[0] != len(steps):
            raise ValueError(f"tensor '{group}' has shape {list(table.shape)}, expected [{len(steps)}, n_sample]")
        for step, v in zip(steps, table.double(), strict=True):
            v = v[torch.isfinite(v)].numpy()
            q25, med, q75 = np.quantile(v, [0.25, 0.5, 0.75]) if len(v) else (float("nan"),) * 3
            rows.append({"group": group, "step": step, "median": float(med), "q25": float(q25), "q75": float(q75),
                         "n": len(v)})
    return rows


def subsample(x: np.ndarray, max_n: int, seed: int) -> np.ndarray:
    """At most ``max_n`` values of ``x``, chosen by a seeded permutation (all of them, in order, if fewer)."""
    if len(x) <= max_n:
        return x
    return x[np.random.default_rng(seed).permutation(len(x))[:max_n]]


def cliffs_delta(x: np.ndarray, y: np.ndarray, u: float | None = None) -> float:
    """``P(X > Y) - P(X < Y)`` over all pairs, from the Mann-Whitney U statistic (ties count half); ``u``: that
    statistic when already computed."""
    from scipy.stats import mannwhitneyu

    if len(x) == 0 or len(y) == 0:
        return float("nan")
    if u is None:
        u = mannwhitneyu(x, y, alternative="two-sided").statistic
    return float(2 * u / (len(x) * len(y)) - 1)


def cohens_d(x: np.ndarray, y: np.ndarray) -> float:
    """``(mean x - mean y) / pooled sd`` (NaN when the pooled sd is 0)."""
    nx, ny = len(x), len(y)
    if nx < 2 or ny < 2:
        return float("nan")
    pooled = np.sqrt(((nx - 1) * x.var(ddof=1) + (ny - 1) * y.var(ddof=1)) / (nx + ny - 2))
    return float((x.mean() - y.mean()) / pooled) if pooled > 0 else float("nan")


def _effects(x: np.ndarray, y: np.ndarray, u: float | None = None) -> dict[str, float]:
    return {"median_diff": float(np.median(x) - np.median(y)), "mean_diff": float(x.mean() - y.mean()),
            "cliffs_delta": cliffs_delta(x, y, u), "cohens_d": cohens_d(x, y)}


class _Resampler:
    """Bootstrap resamples of ``x`` and ``y`` as multiplicity counts over the sorted values, so that each
    resample's effects cost O(n) (a cumulative sum and look-ups) instead of a sort: resampling uniformly from the
    sorted array is resampling from the original one. ``effects(cx, cy)`` equals :func:`_effects` of the
    resampled arrays ``np.repeat(xs, cx)``, ``np.repeat(ys, cy)`` (tested)."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.xs, self.ys = np.sort(x), np.sort(y)
        self.left = np.searchsorted(self.ys, self.xs, "left")  # per x value: how many y are below / not above it
        self.right = np.searchsorted(self.ys, self.xs, "right")

    def _median(self, values: np.ndarray, counts: np.ndarray) -> float:
        cum, n = np.cumsum(counts), int(counts.sum())
        lo, hi = np.searchsorted(cum, [(n + 1) // 2, n // 2 + 1])  # the 1-based middle order statistics
        return float((values[lo] + values[hi]) / 2)

    @staticmethod
    def _moments(values: np.ndarray, counts: np.ndarray) -> tuple[float, float, int]:
        n = int(counts.sum())
        mean = float(counts @ values) / n
        var = float(counts @ (values - mean) ** 2) / (n - 1)
        return mean, var, n

    def effects(self, cx: np.ndarray, cy: np.ndarray) -> dict[str, float]:
        (mx, vx, nx), (my, vy, ny) = self._moments(self.xs, cx), self._moments(self.ys, cy)
        below = np.concatenate([[0], np.cumsum(cy)])  # below[k] = resampled y among the k smallest values
        u = float(cx @ (below[self.left] + 0.5 * (below[self.right] - below[self.left])))
        pooled = np.sqrt(((nx - 1) * vx + (ny - 1) * vy) / (nx + ny - 2))
        return {"median_diff": self._median(self.xs, cx) - self._median(self.ys, cy), "mean_diff": mx - my,
                "cliffs_delta": 2 * u / (nx * ny) - 1, "cohens_d": (mx - my) / pooled if pooled > 0 else float("nan")}


def bootstrap_effects(x: np.ndarray, y: np.ndarray, *, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """``n_boot`` percentile-bootstrap replicates of each effect of :func:`_effects`: ``x`` and ``y`` resampled
    with replacement, independently (seeded)."""
    rng = np.random.default_rng(seed)
    r = _Resampler(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    boots = {k: np.empty(n_boot) for k in ("median_diff", "mean_diff", "cliffs_delta", "cohens_d")}
    for i in range(n_boot):
        cx = np.bincount(rng.integers(0, len(x), len(x)), minlength=len(x))
        cy = np.bincount(rng.integers(0, len(y), len(y)), minlength=len(y))
        for k, v in r.effects(cx, cy).items():
            boots[k][i] = v
    return boots


def compare(x: np.ndarray, y: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Effect sizes of ``x`` (group) against ``y`` (control), their 95 % bootstrap intervals and the Mann-Whitney
    p-value (see the module docstring); ``x`` and ``y`` are already subsampled."""
    from scipy.stats import mannwhitneyu

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    test = mannwhitneyu(x, y, alternative="two-sided")  # one test: its U gives Cliff's delta, its p the p-value
    out: dict[str, float] = {"n_group": len(x), "n_control": len(y), "median_group": float(np.median(x)),
                             "median_control": float(np.median(y)), **_effects(x, y, test.statistic)}
    out["p_value"] = float(test.pvalue)
    boots = bootstrap_effects(x, y, n_boot=n_boot, seed=seed)
    for k, v in boots.items():
        lo, hi = np.nanpercentile(v, [2.5, 97.5])
        out[f"{k}_ci_low"], out[f"{k}_ci_high"] = float(lo), float(hi)
    return out


def compare_groups(groups: Mapping[str, GroupDrift], modules: Sequence[str], *,
                   pairs: Sequence[tuple[str, str]] = (("set_difference", "random_magnitude"),
                                                       ("set_difference", "random"), ("set_difference", "top_utility"),
                                                       ("top_safety", "random_magnitude"), ("top_safety", "random")),
                   metrics: Sequence[str] = METRICS, max_n: int = 20000, n_boot: int = 1000, seed: int = 0,
                   progress: bool = False):
    """Every (group, control, metric) comparison over ``modules`` (the modules the fine-tuning could change),
    pooled (``type = "all"``) and per module type; pairs whose groups are missing are skipped. Returns a pandas
    DataFrame with :func:`compare`'s columns plus ``group, control, metric, type`` and ``p_adjusted``
    (Benjamini-Hochberg over all rows)."""
    import pandas as pd
    from scipy.stats import false_discovery_control

    types = sorted({m.split(".", 2)[2] if m.count(".") >= 2 else m for m in modules})
    strata = [("all", list(modules))] + [(t, [m for m in modules if m.endswith(f".{t}")]) for t in types]
    from tqdm.auto import tqdm

    rows = []
    todo = [(g, c, metric, k, stratum, mods) for g, c in pairs if g in groups and c in groups
            for metric in metrics for k, (stratum, mods) in enumerate(strata)]
    for g, c, metric, k, stratum, mods in tqdm(todo, desc="comparisons", unit="comparison", disable=not progress):
        mods = [m for m in mods if m in groups[g].delta and m in groups[c].delta]
        x = subsample(groups[g].values(metric, mods), max_n, seed + 1)
        y = subsample(groups[c].values(metric, mods), max_n, seed + 2)
        if len(x) < 2 or len(y) < 2:
            continue
        rows.append({"group": g, "control": c, "metric": metric, "type": stratum,
                     **compare(x, y, n_boot=n_boot, seed=seed + k)})
    table = pd.DataFrame(rows)
    if len(table):
        table["p_adjusted"] = false_discovery_control(table["p_value"].clip(lower=1e-300), method="bh")
    return table


def verdict(row: Mapping[str, float], *, margin: float = MARGIN, alpha: float = ALPHA) -> tuple[str, str]:
    """``(verdict, reason)`` for one comparison row (see the module docstring for the rules)."""
    d, lo, hi = row["cliffs_delta"], row["cliffs_delta_ci_low"], row["cliffs_delta_ci_high"]
    p = row.get("p_adjusted", row["p_value"])
    ci = f"Cliff's delta {d:+.3f} [{lo:+.3f}, {hi:+.3f}], adjusted p {p:.2g}"
    if p < alpha and lo > 0 and d >= margin:
        return "H1", f"{ci}: significant and at least {margin} (H1: safety-critical weights drift more)"
    if -margin < lo and hi < margin:
        return "H2", f"{ci}: the interval lies inside +/-{margin} (H2: no meaningful difference)"
    note = " (a significant effect in the other direction: the group drifts less)" if p < alpha and hi < 0 else ""
    return "inconclusive", f"{ci}: neither H1 (p < {alpha}, interval above 0, delta >= {margin}) nor H2 " \
                           f"(interval inside +/-{margin}){note}"
