"""The report's figures: small functions that take DataFrames / arrays and return a matplotlib Figure.

Figures are built with the object API (``matplotlib.figure.Figure``, Agg canvas), never through pyplot's global
state, so rendering is thread-safe and leaves no open windows. :func:`png_bytes` turns one into PNG bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

GROUP_COLORS = {"top_safety": "#d62728", "set_difference": "#9467bd", "top_utility": "#1f77b4",
                "random": "#7f7f7f", "random_magnitude": "#2ca02c", "dense": "#000000"}
_FALLBACK = ("#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def group_color(name: str, i: int = 0) -> str:
    return GROUP_COLORS.get(name, _FALLBACK[i % len(_FALLBACK)])


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _wrap(title: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.fill(line, width) for line in title.splitlines())


def _suptitle(fig: Figure, title: str) -> None:
    fig.suptitle(_wrap(title, int(fig.get_figwidth() * 15)), fontsize=9)


def _axtitle(ax, title: str) -> None:
    ax.set_title(_wrap(title, int(ax.figure.get_figwidth() * 14)), fontsize=9)


# --------------------------------------------------------------------------------------------------
# Ablation


ABLATION_PANELS = (  # column, label, interval columns (low, high), log scale
    ("refusal", "refusal share, harmful prompts", ("refusal_ci95_low", "refusal_ci95_high"), False),
    ("asr", "ASR (default judge)", ("asr_ci95_low", "asr_ci95_high"), False),
    ("degenerate", "degenerate share, harmful answers", ("degenerate_ci95_low", "degenerate_ci95_high"), False),
    ("over_refusal", "over-refusal share, benign prompts", ("over_refusal_ci95_low", "over_refusal_ci95_high"), False),
    ("perplexity", "perplexity, benign answers (log scale)", None, True),
    ("accuracy_mean", "mean zero-shot accuracy", None, False),
)


def ablation_figure(table, title: str, *, xlabel: str = "weights removed (% of scored linear weights)") -> Figure:
    """One panel per measure against ``fraction_removed`` in % (the weights removed; for the rank-level sweep the
    rank removed, with its own ``xlabel``), one line per group kind with its 95 % interval as a band where the
    table has one (Wilson for shares, the table's interval for ASR); the dense model as a dashed line."""
    panels = [p for p in ABLATION_PANELS if p[0] in table.columns]
    ncols = 3
    nrows = max(1, (len(panels) + ncols - 1) // ncols)
    fig = Figure(figsize=(13, 3.6 * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    dense = table[table["group"] == "dense"]
    kinds = [k for k in dict.fromkeys(table.loc[table["group"] != "dense", "group"])]
    for ax, (col, label, ci, log) in zip(axes, panels, strict=False):
        for i, kind in enumerate(kinds):
            sub = table[table["group"] == kind].sort_values("fraction_removed")
            x = sub["fraction_removed"].astype(float) * 100
            y = sub[col].astype(float)
            c = group_color(kind, i)
            ax.plot(x, y, marker="o", color=c, label=kind, linewidth=1.5, markersize=4)
            if ci and ci[0] in sub.columns and ci[1] in sub.columns:
                lo, hi = sub[ci[0]].astype(float), sub[ci[1]].astype(float)
                ax.fill_between(x, lo, hi, color=c, alpha=0.15, linewidth=0)
        if len(dense) and dense.iloc[0][col] is not None and dense.iloc[0][col] == dense.iloc[0][col]:
            ax.axhline(float(dense.iloc[0][col]), color="black", linestyle="--", linewidth=1, label="dense")
        if log:
            ax.set_yscale("log")
        elif col != "accuracy_mean":
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if panels:
        axes[0].legend(fontsize=7, loc="best")
    if title:
        _suptitle(fig, title)
    fig.tight_layout(rect=(0, 0, 1, 0.95) if title else None)
    return fig


# --------------------------------------------------------------------------------------------------
# Fine-tuning


def loss_figure(loss, title: str) -> Figure:
    """Training loss per optimiser step (with a 10-step running mean) and the learning rate on a second axis."""
    fig = Figure(figsize=(8, 3.8))
    ax = fig.subplots()
    ax.plot(loss["step"], loss["loss"], color="#1f77b4", alpha=0.4, linewidth=1, label="loss per step")
    ax.plot(loss["step"], loss["loss"].rolling(10, min_periods=1).mean(), color="#1f77b4", linewidth=2,
            label="running mean (10 steps)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (nats per response token)")
    ax.grid(alpha=0.3)
    if "lr" in loss.columns:
        ax2 = ax.twinx()
        ax2.plot(loss["step"], loss["lr"], color="#ff7f0e", linewidth=1, linestyle=":", label="learning rate")
        ax2.set_ylabel("learning rate")
        top = float(loss["lr"].max())
        if top > 0:
            ax2.set_ylim(0, top * 1.15)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7)
    else:
        ax.legend(fontsize=7)
    _axtitle(ax, title)
    fig.tight_layout()
    return fig


def loss_overlay_figure(losses: Mapping[str, object], title: str) -> Figure:
    """Several fine-tunings' training loss in one axis: per fine-tuning (``losses``: name -> DataFrame with
    ``step, loss``) a thin line per step and a thick 10-step running mean in the same colour."""
    fig = Figure(figsize=(8, 3.8))
    ax = fig.subplots()
    colors = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f")
    for i, (name, loss) in enumerate(losses.items()):
        c = colors[i % len(colors)]
        ax.plot(loss["step"], loss["loss"], color=c, alpha=0.3, linewidth=1)
        ax.plot(loss["step"], loss["loss"].rolling(10, min_periods=1).mean(), color=c, linewidth=2,
                label=f"{name} (running mean, 10 steps)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (nats per response token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _axtitle(ax, title)
    fig.tight_layout()
    return fig


def before_after_figure(rows: Sequence[Mapping], title: str) -> Figure:
    """Shares before / after fine-tuning as grouped bars with 95 % intervals; perplexity and accuracy beside."""
    shares = [r for r in rows if r["metric"] in ("refusal", "asr", "degenerate", "over_refusal", "degenerate_benign")]
    others = [r for r in rows if r["metric"] in ("perplexity", "accuracy_mean")]
    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, 1 + len(others), squeeze=False, gridspec_kw={"width_ratios": [4] + [1] * len(others)})[0]
    colors = {"before": "#7f7f7f", "after": "#d62728"}

    def bars(ax, rs, with_ci: bool) -> None:
        w = 0.38
        for j, side in enumerate(("before", "after")):
            xs, ys, err = [], [], [[], []]
            for i, r in enumerate(rs):
                v = r.get(f"{side}_value")
                if v is None:
                    continue
                xs.append(i + (j - 0.5) * w)
                ys.append(v)
                lo, hi = r.get(f"{side}_ci95_low"), r.get(f"{side}_ci95_high")
                err[0].append(max(0.0, v - lo) if with_ci and lo is not None else 0.0)
                err[1].append(max(0.0, hi - v) if with_ci and hi is not None else 0.0)
            ax.bar(xs, ys, width=w, color=colors[side], label=f"{side} fine-tuning",
                   yerr=err if with_ci else None, capsize=3)
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([r["metric"].replace("_", " ") for r in rs], fontsize=8, rotation=15)
        ax.grid(alpha=0.3, axis="y")

    bars(axes[0], shares, True)
    axes[0].set_ylim(0, 1.05)
    axes[0].set_ylabel("share of answers (95 % Wilson interval)")
    axes[0].legend(fontsize=7)
    for ax, r in zip(axes[1:], others, strict=True):
        bars(ax, [r], False)
        ax.set_ylabel("perplexity" if r["metric"] == "perplexity" else "accuracy (share correct)")
    _suptitle(fig, title)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


# --------------------------------------------------------------------------------------------------
# Drift


def drift_over_training_figure(rows, title: str, ylabel: str) -> Figure:
    """Per group, a line over the logged steps with a band between two quantiles (``rows``: DataFrame with
    ``group, step, median, q25, q75``)."""
    fig = Figure(figsize=(8, 4.2))
    ax = fig.subplots()
    for i, (grp, sub) in enumerate(rows.groupby("group", sort=False)):
        sub = sub.sort_values("step")
        c = group_color(grp, i)
        ax.plot(sub["step"], sub["median"], marker="o", markersize=3, color=c, label=grp)
        ax.fill_between(sub["step"], sub["q25"], sub["q75"], color=c, alpha=0.15, linewidth=0)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _axtitle(ax, title)
    fig.tight_layout()
    return fig


def final_drift_figure(samples: Mapping[str, Mapping[str, object]], title: str) -> Figure:
    """Log-scale box plots of final |Delta| per module type (and all types pooled), one box per group
    (``samples``: group -> module type -> 1-D array). Exact zeros cannot be drawn on a log scale and are left out
    (the report's table counts them); boxes 25-75 %, whiskers 5-95 %, no fliers."""
    import numpy as np

    groups = list(samples)
    types = sorted({t for g in groups for t in samples[g]})
    cols = ["all"] + types
    fig = Figure(figsize=(min(13, max(8, 0.3 * len(cols) * max(1, len(groups)) + 2)), 5))
    ax = fig.subplots()
    width = 0.8 / max(1, len(groups))
    handles = []
    for gi, grp in enumerate(groups):
        data, pos = [], []
        for ci, ty in enumerate(cols):
            if ty == "all":
                vals = np.concatenate([np.asarray(v) for v in samples[grp].values()]) if samples[grp] else np.zeros(0)
            else:
                vals = np.asarray(samples[grp].get(ty, np.zeros(0)))
            vals = vals[vals > 0]
            if len(vals) == 0:
                continue
            data.append(vals)
            pos.append(ci + (gi - (len(groups) - 1) / 2) * width)
        c = group_color(grp, gi)
        if data:
            bp = ax.boxplot(data, positions=pos, widths=width * 0.9, whis=(5, 95), showfliers=False,
                            patch_artist=True, manage_ticks=False)
            for b in bp["boxes"]:
                b.set_facecolor(c)
                b.set_alpha(0.5)
            for m in bp["medians"]:
                m.set_color("black")
        handles.append(Patch(color=c, alpha=0.5, label=grp if data else f"{grp} (all exactly 0: not drawn)"))
    ax.set_yscale("log")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols)
    ax.set_xlabel("module type ('all' = pooled)")
    ax.set_ylabel("final |Delta| (weight units, log scale)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(handles=handles, fontsize=7)
    _axtitle(ax, title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# Overlap


def overlap_bars_figure(summary: Sequence[Mapping], title: str) -> Figure:
    """Jaccard with the original group per group: after fine-tuning vs the noise floor, chance as a marker."""
    fig = Figure(figsize=(7.5, 4))
    ax = fig.subplots()
    w = 0.38
    for j, (comp, color, label) in enumerate((("finetuned", "#d62728", "after fine-tuning"),
                                              ("noise_floor", "#7f7f7f", "noise floor (unchanged model, other sample)"))):
        xs = [i + (j - 0.5) * w for i, r in enumerate(summary) if r.get(f"{comp}_jaccard") is not None]
        ys = [r[f"{comp}_jaccard"] for r in summary if r.get(f"{comp}_jaccard") is not None]
        ax.bar(xs, ys, width=w, color=color, label=label)
    first = True
    for i, r in enumerate(summary):
        ch = r.get("finetuned_chance_jaccard", r.get("noise_floor_chance_jaccard"))
        if ch is not None:
            ax.hlines(ch, i - 0.45, i + 0.45, colors="black", linestyles="--", linewidth=1.5,
                      label="chance (random sets, same sizes)" if first else None)
            first = False
    ax.set_xticks(range(len(summary)))
    ax.set_xticklabels([r["group"] for r in summary])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Jaccard index with the original group")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    _axtitle(ax, title)
    fig.tight_layout()
    return fig


def overlap_heatmap_figure(layers, comparison: str, title: str) -> Figure:
    """Jaccard per group (rows) and layer (columns) for one comparison (``layers``: DataFrame with ``group,
    unit`` = ``layers.<i>``, ``jaccard``)."""
    import numpy as np

    sub = layers[layers["comparison"] == comparison].copy()
    sub["layer"] = [int(str(u).split(".")[1]) for u in sub["unit"]]
    from .collect import group_sort_key

    groups = sorted(dict.fromkeys(sub["group"]), key=group_sort_key)
    lys = sorted(sub["layer"].unique())
    mat = np.full((len(groups), len(lys)), np.nan)
    for _, r in sub.iterrows():
        mat[groups.index(r["group"]), lys.index(r["layer"])] = r["jaccard"]
    fig = Figure(figsize=(max(6, 0.32 * len(lys) + 3), 0.5 * len(groups) + 2))
    ax = fig.subplots()
    im = ax.imshow(mat, aspect="auto", vmin=0, vmax=1, cmap="viridis")
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels(groups)
    ax.set_xticks(range(len(lys)))
    ax.set_xticklabels([str(v) for v in lys], fontsize=7)
    ax.set_xlabel("layer")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("Jaccard index")
    _axtitle(ax, title)
    fig.tight_layout()
    return fig
