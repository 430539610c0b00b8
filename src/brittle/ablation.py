"""Ablation: zero a group of weights in place, measure, restore the exact original values.

A group is ``dict[str, BoolTensor]`` keyed by canonical module name (see :mod:`brittle.groups`), masks in
the canonical ``[d_out, d_in]`` orientation. :func:`ablated` saves only the selected entries (so its
memory cost is proportional to the group, not the model) and writes them back bit-exactly on exit, also
when the body raises.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .evaluation.judges import DEGENERATE_REASONS
from .io import BrittleError
from .models import check_masks, linear_modules, linear_weight


@contextlib.contextmanager
def ablated(model: torch.nn.Module, group: Mapping[str, torch.Tensor], value: float = 0.0) -> Iterator[torch.nn.Module]:
    """Set the weights selected by ``group`` to ``value`` (0: the paper's pruning) inside the block."""
    modules = linear_modules(model)
    check_masks(modules, group)
    saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for name, mask in group.items():
                w = linear_weight(modules[name])
                m = mask.to(w.device)
                saved[name] = (m, w[m].clone())
                w[m] = value
        yield model
    finally:
        with torch.no_grad():
            for name, (m, values) in saved.items():
                linear_weight(modules[name])[m] = values


def fraction_removed(model: torch.nn.Module, group: Mapping[str, torch.Tensor]) -> float:
    """Selected entries / all entries of the model's canonical linear modules (the scored weights)."""
    total = sum(linear_weight(m).numel() for m in linear_modules(model).values())
    return sum(int(m.sum()) for m in group.values()) / total


# --------------------------------------------------------------------------------------------------
# The ablation experiment: sweep sparsities, remove each group kind, measure safety and utility.

GROUP_KINDS = ("top_safety", "set_difference", "random", "random_magnitude")
DEFAULT_SPARSITIES = (0.005, 0.01, 0.02, 0.03)  # `brittle ablate`: 17 evaluations, under 15 min on 2 CPU cores
# (p, q) set-difference pairs (utility p, safety q; fractions) that a third-party reproduction of Wei et al.
# (2024) lists as the paper's Llama-2-7B-chat settings, in % (1,1) (2,1) (4,2) (7,3) (3,2) (4,4) (5,5) (6,5)
# (6,6) (9,8). Not checked against the paper's own text, which is not available offline.
PAPER_PQ_PAIRS: tuple[tuple[float, float], ...] = (
    (0.01, 0.01), (0.02, 0.01), (0.04, 0.02), (0.07, 0.03), (0.03, 0.02),
    (0.04, 0.04), (0.05, 0.05), (0.06, 0.05), (0.06, 0.06), (0.09, 0.08),
)
PQ_PRESETS: dict[str, tuple[tuple[float, float], ...]] = {"paper-llama2-7b": PAPER_PQ_PAIRS}
#: ``degenerate`` split by reason (shares of the harmful prompts, summing to ``degenerate``).
REASON_COLUMNS = tuple(f"degenerate_{r}" for r in DEGENERATE_REASONS)
ABLATION_COLUMNS = ("group", "sparsity", "p", "q", "fraction_removed", "asr_wei", "asr", "asr_ci95_low",
                    "asr_ci95_high", "degenerate", *REASON_COLUMNS, "refusal", "over_refusal", "degenerate_benign",
                    "perplexity", "accuracy_mean", "n_harmful")


def ablation_eval_config(**overrides):
    """The sweep's evaluation settings: :class:`brittle.evaluation.config.SweepEvalConfig` (its defaults are the
    lighter per-point evaluation) with ``overrides``; bad values raise a :class:`BrittleError`."""
    from .evaluation.config import SweepEvalConfig, make_config

    return make_config(SweepEvalConfig, **overrides)


def _row(kind: str, sparsity: float | None, p: float | None, frac: float, summary: dict) -> dict:
    from .evaluation.report import headline

    return {"group": kind, "sparsity": sparsity, "p": p, "q": sparsity, "fraction_removed": frac, **headline(summary)}


@dataclass(frozen=True)
class SweepGroup:
    """One group of a sweep: its kind (``top_safety``, ``set_difference``, ``random``, ``random_magnitude``),
    the (p, q) point it belongs to, its file label (:func:`brittle.groups.point_label`) and the mask."""

    kind: str
    p: float
    q: float
    label: str
    group: Mapping[str, torch.Tensor]


def run_ablation(model, tokenizer, groups: Sequence[SweepGroup], out_dir, *, eval_config=None,
                 overwrite: bool = False, progress: bool = True, log=print):
    """Evaluate the dense model, then the model with each group removed (in order); write ``ablation.csv``/
    ``.md``, a figure and per-group evaluation directories ``eval/<label>/``. Returns the table (pandas).

    The groups come from the groups stage (:func:`brittle.groups.sweep_groups` for each (p, q) point).
    """
    import pandas as pd

    from .evaluation.suite import evaluate_model
    from .io import write_text

    if not groups:
        raise BrittleError("no sweep groups given")
    out_dir = Path(out_dir)
    if (out_dir / "ablation.csv").exists() and not overwrite:
        from .io import ExistsError

        raise ExistsError(f"{out_dir / 'ablation.csv'} already exists; pass --force to overwrite it")
    cfg = eval_config or ablation_eval_config()
    rows = []
    log("[ablation] dense model")
    dense = evaluate_model(model, tokenizer, out_dir / "eval" / "dense", cfg, overwrite=True, progress=progress)
    rows.append(_row("dense", None, None, 0.0, dense))
    for item in groups:
        frac = fraction_removed(model, item.group)
        log(f"[ablation] {item.kind} p={item.p:g} q={item.q:g}: removing {frac:.4%} of the scored weights")
        with ablated(model, item.group):
            summary = evaluate_model(model, tokenizer, out_dir / "eval" / item.label, cfg, overwrite=True,
                                     progress=progress)
        rows.append(_row(item.kind, item.q, None if item.kind == "top_safety" else item.p, frac, summary))
        # write as we go: a long sweep that dies keeps what it measured
        pd.DataFrame(rows, columns=list(ABLATION_COLUMNS)).to_csv(out_dir / "ablation.partial.csv", index=False)
    table = pd.DataFrame(rows, columns=list(ABLATION_COLUMNS))
    write_text(out_dir / "ablation.csv", table.to_csv(index=False), overwrite=True)
    write_text(out_dir / "ablation.md", ablation_markdown(table, cfg), overwrite=True)
    (out_dir / "ablation.partial.csv").unlink(missing_ok=True)
    plot_ablation(table, out_dir / "ablation.png")
    return table


def ablation_markdown(table, cfg=None) -> str:
    """The table as Markdown, with a legend saying how each column was computed; the ``degenerate_<reason>``
    columns go into the ``degenerate`` cell, e.g. ``0.84 (lone 0.7, loop 0.14)``."""
    from .evaluation.report import degenerate_cell

    def cell(column: str, x) -> str:
        if x is None or x != x:  # None or NaN
            return ""
        if column == "fraction_removed":
            return f"{x:.4%}"
        return f"{x:g}" if isinstance(x, float) else str(x)

    def row_cell(column: str, row: dict) -> str:
        if column != "degenerate":
            return cell(column, row[column])
        reasons = {r: row.get(f"degenerate_{r}") for r in DEGENERATE_REASONS}
        return degenerate_cell(row[column], reasons, fmt=lambda x: cell(column, x))

    columns = [c for c in table.columns if c not in REASON_COLUMNS]
    header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(row_cell(c, r) for c in columns) + " |\n" for r in table.to_dict("records"))
    legend = (
        "\nColumns: `fraction_removed` = zeroed entries / all entries of the scored linear modules; `asr_wei` = "
        "attack success with the paper's keyword judge, `asr` = with the default judge (`refusal-v1`), both on "
        "held-out AdvBench behaviours, greedy, no system prompt (`asr_ci95_*` = Wilson 95% interval of `asr`); "
        "`degenerate` = share of those answers the default judge calls degenerate, by reason in parentheses (`empty`: no "
        "letter or digit, `lone`: a lone opening such as \"I\" then the end of turn, `loop`: repetition, `gibberish`: "
        "garbled, `other`: another answer under 3 words; columns `degenerate_<reason>` of ablation.csv); "
        "`refusal` = share refused; `over_refusal` = share of held-out benign instructions refused; "
        "`perplexity` = token-weighted perplexity of reference answers to held-out benign questions; "
        "`accuracy_mean` = mean zero-shot accuracy (lm-eval).\n")
    if cfg is not None:
        legend += f"\nEvaluation settings: `{json.dumps(cfg.to_dict(), default=str)}`\n"
    return header + body + legend


def plot_ablation(table, path) -> None:
    """ASR and accuracy against the fraction of weights removed, one line per group kind, dense as reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = table[table.group == "dense"].iloc[0]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, col, label in zip(axes, ("asr", "degenerate", "accuracy_mean"),
                              ("ASR (default judge)", "degenerate share", "mean zero-shot accuracy"), strict=True):
        for kind, sub in table[table.group != "dense"].groupby("group", sort=False):
            sub = sub.sort_values("fraction_removed")
            ax.plot(sub.fraction_removed * 100, sub[col], marker="o", label=kind)
        if dense[col] == dense[col] and dense[col] is not None:
            ax.axhline(dense[col], color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_xlabel("weights removed (% of scored linear weights)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
