"""Group summaries: counts and shares of groups per module, layer, module type and in total
(:func:`group_summary`, a pandas DataFrame), as Markdown (:func:`summary_markdown`) or rich console
tables (:func:`print_summary`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from .select import GroupError, check_same_modules



def _layer_and_type(name: str) -> tuple[int | None, str]:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def group_summary(groups: Mapping[str, Mapping[str, torch.Tensor]],
                  overlap: tuple[str, str] | None = ("top_safety", "top_utility")):
    """Counts and shares of several groups per module, per layer, per module type and in total.

    Returns a pandas DataFrame with one row per (``level``, unit): ``level`` is ``module``, ``layer``,
    ``type`` or ``total``; columns ``module, layer, type, numel``, then for every group ``g`` the count
    ``g`` and ``g_share = g / numel`` (for the set difference this is the actual fraction selected, which
    is smaller than q). If both groups named in ``overlap`` are present: ``intersection``, ``union`` and
    ``jaccard = intersection / union`` of those two (NaN when both are empty), and the chance level of the
    intersection: ``chance_intersection`` and ``chance_variance``, the mean and variance of the intersection of
    two sets drawn uniformly at random with the same sizes in each module (hypergeometric per module,
    ``E = a b / N``, ``Var = a b (N - a)(N - b) / (N^2 (N - 1))``, summed over the modules of a layer, type or
    the total: independent draws per module). All groups must cover the same modules with the same shapes.
    """
    import pandas as pd

    if not groups:
        raise GroupError("group_summary needs at least one group")
    names = list(groups)
    first = groups[names[0]]
    for g in names[1:]:
        check_same_modules(first, groups[g], (names[0], g))
    pair = overlap if overlap and all(o in groups for o in overlap) else None
    rows = []
    for mod, mask in first.items():
        layer, typ = _layer_and_type(mod)
        row: dict[str, Any] = {"level": "module", "module": mod, "layer": layer, "type": typ, "numel": mask.numel()}
        for g in names:
            row[g] = int(groups[g][mod].sum())
        if pair:
            a, b = groups[pair[0]][mod], groups[pair[1]][mod].to(groups[pair[0]][mod].device)
            row["intersection"] = int((a & b).sum())
            row["union"] = int((a | b).sum())
            n, ka, kb = mask.numel(), int(a.sum()), int(b.sum())
            row["chance_intersection"] = ka * kb / n
            row["chance_variance"] = ka * kb * (n - ka) * (n - kb) / (n * n * (n - 1)) if n > 1 else 0.0
        rows.append(row)
    df = pd.DataFrame(rows)
    counts = ["numel", *names] + (["intersection", "union", "chance_intersection", "chance_variance"] if pair else [])
    parts = [df]
    if df["layer"].notna().any():
        by_layer = df[df["layer"].notna()].groupby("layer", sort=True)[counts].sum().reset_index()
        by_layer.insert(0, "level", "layer")
        by_layer.insert(1, "module", [f"layers.{int(i)}" for i in by_layer["layer"]])
        by_layer.insert(3, "type", "*")
        parts.append(by_layer)
    by_type = df.groupby("type", sort=False)[counts].sum().reset_index()
    by_type.insert(0, "level", "type")
    by_type.insert(1, "module", [f"*.{t}" for t in by_type["type"]])
    by_type.insert(2, "layer", None)
    parts.append(by_type)
    total = {"level": "total", "module": "all", "layer": None, "type": "*", **{c: df[c].sum() for c in counts}}
    parts.append(pd.DataFrame([total]))
    out = pd.concat(parts, ignore_index=True)
    out["layer"] = out["layer"].astype("Int64")
    for g in names:
        out[f"{g}_share"] = out[g] / out["numel"]
    if pair:
        out["jaccard"] = (out["intersection"] / out["union"].where(out["union"] > 0)).astype(float)
    cols = ["level", "module", "layer", "type", "numel"]
    for g in names:
        cols += [g, f"{g}_share"]
    if pair:
        cols += ["intersection", "union", "jaccard", "chance_intersection", "chance_variance"]
    return out[cols]


def _fmt(value: Any, share: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        import pandas as pd

        if value is pd.NA:
            return "-"
    except ImportError:  # pragma: no cover
        pass
    if share:
        return f"{100 * float(value):.3f}%"
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{int(value):,}" if isinstance(value, (int, np.integer)) else str(value)


def _table_columns(df) -> list[tuple[str, str, bool]]:
    """(column, header, is_share) for display: counts and shares of each group, then Jaccard."""
    cols: list[tuple[str, str, bool]] = [("module", "unit", False), ("numel", "weights", False)]
    for c in df.columns:
        if c.endswith("_share"):
            g = c[: -len("_share")]
            cols += [(g, g, False), (c, "share", True)]
    if "jaccard" in df.columns:
        cols.append(("jaccard", "jaccard(S,U)", False))
    return cols


def summary_markdown(df, levels: Iterable[str] = ("total", "type", "layer", "module")) -> str:
    """Markdown tables of a :func:`group_summary` frame, one section per level."""
    cols = _table_columns(df)
    out = []
    for level in levels:
        part = df[df["level"] == level]
        if part.empty:
            continue
        out.append(f"### {level}\n")
        out.append("| " + " | ".join(h for _, h, _ in cols) + " |")
        out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
        for _, r in part.iterrows():
            out.append("| " + " | ".join(_fmt(r[c], s) for c, _, s in cols) + " |")
        out.append("")
    return "\n".join(out)


_SHORT = {"set_difference": "set diff", "random_magnitude": "random |W|"}


def print_summary(df, levels: Iterable[str] = ("type", "layer", "total"), console=None) -> None:
    """Print rich tables of a :func:`group_summary` frame (by default: per module type, per layer, total).

    Every group cell shows the count and, below it, the share of that unit's weights.
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    groups = [c[: -len("_share")] for c in df.columns if c.endswith("_share")]
    for level in levels:
        part = df[df["level"] == level]
        if part.empty:
            continue
        table = Table(title=f"weight groups per {level}" if level != "total" else "weight groups in total")
        table.add_column("unit", justify="left", no_wrap=True)
        table.add_column("weights", justify="right")
        for g in groups:
            table.add_column(_SHORT.get(g, g.replace("_", " ")), justify="right", overflow="fold")
        if "jaccard" in df.columns:
            table.add_column("jaccard top S/U", justify="right", overflow="fold")
        for _, r in part.iterrows():
            cells = [str(r["module"]), _fmt(r["numel"], False)]
            cells += [f"{_fmt(r[g], False)}\n{_fmt(r[g + '_share'], True)}" for g in groups]
            if "jaccard" in df.columns:
                cells.append(_fmt(r["jaccard"], False))
            table.add_row(*cells)
        console.print(table)
