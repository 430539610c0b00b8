"""Ablation: zero a group of weights in place, measure, restore the exact original values.

A group is ``dict[str, BoolTensor]`` keyed by canonical module name (see :mod:`brittle.groups`), masks in
the canonical ``[d_out, d_in]`` orientation. :func:`ablated` saves only the selected entries (so its
memory cost is proportional to the group, not the model) and writes them back bit-exactly on exit, also
when the body raises.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .evaluation.judges import DEGENERATE_REASONS
from .io import BrittleError
from .models import check_masks, linear_modules, linear_weight


@contextlib.contextmanager
def ablated(model: torch.nn.Module, group: Mapping[str, torch.Tensor], value: float = 0.0, *,
            source: Mapping[str, torch.Tensor] | None = None) -> Iterator[torch.nn.Module]:
    """Set the weights selected by ``group`` to ``value`` (0: the paper's pruning) inside the block, or, with
    ``source`` (canonical name -> ``[d_out, d_in]`` weights of another model, e.g. the base model before
    alignment: :func:`brittle.models.linear_weights`), to that model's values at the same entries (the paper's recovery)."""
    modules = linear_modules(model)
    check_masks(modules, group)
    if source is not None:
        check_source(model, source, group)
    saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for name, mask in group.items():
                w = linear_weight(modules[name])
                m = mask.to(w.device)
                saved[name] = (m, w[m].clone())
                w[m] = value if source is None else source[name].to(device=w.device, dtype=w.dtype)[m]
        yield model
    finally:
        with torch.no_grad():
            for name, (m, values) in saved.items():
                linear_weight(modules[name])[m] = values


def check_source(model: torch.nn.Module, source: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> None:
    """A :class:`BrittleError` unless ``source`` has every linear module of ``model`` (or of ``names``) with the
    same ``[d_out, d_in]`` shape."""
    shapes = {n: tuple(linear_weight(m).shape) for n, m in linear_modules(model).items()}
    for n in (shapes if names is None else names):
        if n not in source:
            raise BrittleError(f"the model to recover from has no module {n}")
        if tuple(source[n].shape) != shapes[n]:
            raise BrittleError(f"the model to recover from has {n} of shape {tuple(source[n].shape)}, this model "
                               f"{shapes[n]}: recovering needs the same architecture")


def fraction_removed(model: torch.nn.Module, group: Mapping[str, torch.Tensor]) -> float:
    """Selected entries / all entries of the model's canonical linear modules (the scored weights)."""
    total = sum(linear_weight(m).numel() for m in linear_modules(model).values())
    return sum(int(m.sum()) for m in group.values()) / total


# --------------------------------------------------------------------------------------------------
# The ablation experiment: sweep sparsities, remove each group kind, measure safety and utility.

GROUP_KINDS = ("top_safety", "set_difference", "random", "random_magnitude")  # the default sweep
#: every kind a sweep can evaluate: the default four and bottom_safety (bottom-up pruning: the bottom-q safety
#: entries, as many as top_safety, the least important ones)
SWEEP_KINDS = (*GROUP_KINDS, "bottom_safety")
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


@dataclass(frozen=True)
class SweepGroup:
    """One group of a sweep: its kind (``top_safety``, ``set_difference``, ``random``, ``random_magnitude``),
    the (p, q) point it belongs to, its file label (:func:`brittle.groups.point_label`) and the mask."""

    kind: str
    p: float
    q: float
    label: str
    group: Mapping[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# The sweep loop, shared by the weight-level ablation and the rank-level one (brittle.lowrank, stage lowrank)


@dataclass(frozen=True)
class SweepLayout:
    """What a sweep writes: ``<name>.csv``/``.md``/``.png`` with ``columns`` (``group``, the point's own columns,
    ``fraction_removed``, then the evaluation's headline columns), the legend of ``fraction_removed`` and the
    figure's x axis."""

    name: str
    columns: tuple[str, ...]
    fraction_legend: str
    xlabel: str


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep: its kind (the ``group`` column), file label (``eval/<label>/``), its own columns
    (``fields``), the fraction removed, a log line, and ``apply``: a zero-argument callable returning a context
    manager that changes the model inside the block and restores it exactly on exit."""

    kind: str
    label: str
    fields: Mapping[str, Any]
    fraction: float
    apply: Callable[[], contextlib.AbstractContextManager]
    note: str = ""


ABLATION_LAYOUT = SweepLayout(
    "ablation", ABLATION_COLUMNS,
    "`fraction_removed` = zeroed entries / all entries of the scored linear modules",
    "weights removed (% of scored linear weights)")


def run_sweep(model, tokenizer, points: Sequence[SweepPoint], out_dir, layout: SweepLayout, *, eval_config=None,
              overwrite: bool = False, progress: bool = True, log=print):
    """Evaluate the dense model, then the model inside each point's ``apply()`` (in order); write
    ``<layout.name>.csv``/``.md``, a figure and per-point evaluation directories ``eval/<label>/`` (``eval/dense/``
    for the dense model). Returns the table (pandas)."""
    import pandas as pd

    from .evaluation.report import headline
    from .evaluation.suite import evaluate_model
    from .io import write_text

    if not points:
        raise BrittleError("no sweep points given")
    out_dir = Path(out_dir)
    name = layout.name
    if (out_dir / f"{name}.csv").exists() and not overwrite:
        from .io import ExistsError

        raise ExistsError(f"{out_dir / f'{name}.csv'} already exists; pass --force to overwrite it")
    cfg = eval_config or ablation_eval_config()
    columns = list(layout.columns)
    rows = []
    log(f"[{name}] dense model")
    dense = evaluate_model(model, tokenizer, out_dir / "eval" / "dense", cfg, overwrite=True, progress=progress)
    rows.append({"group": "dense", "fraction_removed": 0.0, **headline(dense)})
    for point in points:
        log(f"[{name}] {point.note or point.label}")
        with point.apply():
            summary = evaluate_model(model, tokenizer, out_dir / "eval" / point.label, cfg, overwrite=True,
                                     progress=progress)
        rows.append({"group": point.kind, **point.fields, "fraction_removed": point.fraction, **headline(summary)})
        # write as we go: a long sweep that dies keeps what it measured
        pd.DataFrame(rows, columns=columns).to_csv(out_dir / f"{name}.partial.csv", index=False)
    table = pd.DataFrame(rows, columns=columns)
    write_text(out_dir / f"{name}.csv", table.to_csv(index=False), overwrite=True)
    write_text(out_dir / f"{name}.md", ablation_markdown(table, cfg, fraction_legend=layout.fraction_legend),
               overwrite=True)
    (out_dir / f"{name}.partial.csv").unlink(missing_ok=True)
    plot_ablation(table, out_dir / f"{name}.png", xlabel=layout.xlabel, title=f"{name}: the dense model and each point")
    return table


def run_ablation(model, tokenizer, groups: Sequence[SweepGroup], out_dir, *, eval_config=None,
                 overwrite: bool = False, progress: bool = True, log=print,
                 source: Mapping[str, torch.Tensor] | None = None):
    """Evaluate the dense model, then the model with each group removed (in order); write ``ablation.csv``/
    ``.md``, a figure and per-group evaluation directories ``eval/<label>/``. Returns the table (pandas).

    The groups come from the groups stage (:func:`brittle.groups.sweep_groups` for each (p, q) point).
    ``source``: removed entries take these weights' values instead of 0 (see :func:`ablated`).
    """
    from .groups import Q_ONLY_KINDS

    if not groups:
        raise BrittleError("no sweep groups given")
    points = []
    verb = "zeroing" if source is None else "recovering from the other model"
    for item in groups:
        frac = fraction_removed(model, item.group)
        points.append(SweepPoint(
            item.kind, item.label, {"sparsity": item.q, "p": None if item.kind in Q_ONLY_KINDS else item.p, "q": item.q},
            frac, functools.partial(ablated, model, item.group, source=source),
            f"{item.kind} p={item.p:g} q={item.q:g}: {verb} {frac:.4%} of the scored weights"))
    return run_sweep(model, tokenizer, points, out_dir, ABLATION_LAYOUT, eval_config=eval_config, overwrite=overwrite,
                     progress=progress, log=log)


def ablation_markdown(table, cfg=None, *, fraction_legend: str = ABLATION_LAYOUT.fraction_legend) -> str:
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
        f"\nColumns: {fraction_legend}; `asr_wei` = "
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


def plot_ablation(table, path, *, xlabel: str = ABLATION_LAYOUT.xlabel, title: str = "") -> None:
    """The sweep's figure: the report's :func:`brittle.report.figures.ablation_figure` (refusal, ASR, degenerate
    share, over-refusal, perplexity and accuracy against the fraction removed, one line per group kind with its
    interval where the table has one, the dense model dashed), saved as a PNG."""
    from .report.figures import ablation_figure

    ablation_figure(table, title, xlabel=xlabel).savefig(path, dpi=110)
