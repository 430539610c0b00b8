"""The report's content as a list of blocks (headings, paragraphs, tables, figures), built once from the collected
results and rendered to Markdown and HTML by :mod:`brittle.report.render`; numbers go through
:func:`brittle.report.fmt.fmt` here and nowhere else.

Blocks are tuples: ``("h", level, text)``, ``("p", text)``, ``("missing", text)``, ``("pre", text)``,
``("table", caption, header, rows)`` (cells already strings), ``("figure", name, Figure, caption)``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from .collect import RunData, group_sort_key
from .fmt import DASH, fmt, fmt_ci, fmt_p, fmt_value

Block = tuple


# --------------------------------------------------------------------------------------------------
# The context every table and figure states


def model_line(res: Mapping[str, Any]) -> str:
    r = res.get("run", {})
    model = r.get("model") or "unknown (no record in the run directory)"
    w = f" (weights {r['weights']})" if r.get("weights") else ""
    seed = fmt(r.get("seed")) if r.get("seed") is not None else "not recorded"
    return f"model `{model}`{w}, seed {seed}"


def groups_line(res: Mapping[str, Any], short: bool = False) -> str:
    g = res.get("groups", {})
    d = g.get("definitions")
    if not d:
        return "groups: definitions not recorded in this run"
    top, p, q, scope = fmt(d.get("top")), fmt(d.get("p")), fmt(d.get("q")), d.get("scope", "?")
    seed = fmt(d.get("seed")) if d.get("seed") is not None else "?"
    if short:
        return (f"groups: top {top} per {scope}; set difference = top-q {q} safety minus top-p {p} utility; "
                f"controls seed {seed}")
    bins = f" ({fmt(d['bins'])} |W| bins)" if d.get("bins") is not None else ""
    src = g.get("definitions_source")
    if src and Path(src).is_absolute():
        try:
            src = os.path.relpath(src)
        except ValueError:
            pass
    return (f"Groups ({src}): `top_safety` / `top_utility` = top {top} of the SNIP safety / utility scores per "
            f"{scope}; `set_difference` (safety-critical) = top-q {q} safety minus top-p {p} utility; `random` = "
            f"the same count per module as the set difference, uniform positions; `random_magnitude` = the same count "
            f"and |W| histogram per module{bins}; seed {seed}.")


def caption(res: Mapping[str, Any], data: str, n: str) -> str:
    return f"{model_line(res)}; {groups_line(res, short=True)}; data: {data}; n: {n}."


def _title(res: Mapping[str, Any], what: str, data: str, n: str) -> str:
    r = res.get("run", {})
    d = res.get("groups", {}).get("definitions") or {}
    gdef = (f"top {fmt(d.get('top'))}/{d.get('scope', '?')}, set diff q {fmt(d.get('q'))} - p {fmt(d.get('p'))}"
            if d else "groups not recorded")
    return f"{what}\n{r.get('model') or 'model ?'}, seed {fmt(r.get('seed'))}; {gdef}; data: {data}; n: {n}"


def _missing_blocks(res: Mapping[str, Any], section: str) -> list[Block]:
    return [("missing", line) for line in res.get(section, {}).get("missing", [])]


def _table(caption_: str, header: list[str], rows: list[list[Any]]) -> Block:
    return ("table", caption_, header, [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows])


# --------------------------------------------------------------------------------------------------
# Sections


def run_section(run: RunData) -> list[Block]:
    res = run.results
    r = res.get("run", {})
    out: list[Block] = [("h", 2, "1. Run")]
    src = f" (model from {r['model_source']})" if r.get("model_source") else ""
    out.append(("p", f"Run directory `{r.get('run_dir')}`: {model_line(res)}{src}"
                     + (f", dtype {r['dtype']}" if r.get("dtype") else "") + "."))
    out += _missing_blocks(res, "run")
    if r.get("stages"):
        rows = [[s["folder"], s["stage"], s.get("created") or DASH, s.get("seconds"), s.get("git_commit") or DASH]
                for s in r["stages"]]
        out.append(_table("Stages present (from each stage folder's manifest.json). "
                          + caption(res, "the stages' manifests", f"{fmt(len(rows))} stages"),
                          ["folder", "stage", "created", "seconds", "git commit"], rows))
    if res.get("missing"):
        out.append(("p", "Not in this run (the report leaves these parts out):"))
        out += [("missing", m) for m in res["missing"]]
    return out


def groups_section(run: RunData) -> list[Block]:
    res = run.results
    g = res.get("groups", {})
    out: list[Block] = [("h", 2, "2. Weight groups")]
    out += _missing_blocks(res, "groups")
    if g.get("definitions"):
        out.append(("p", groups_line(res)))
    if g.get("scoring"):
        parts = []
        for s in g["scoring"]:
            of = f" of {fmt(s['set_size'])}" if s.get("set_size") is not None else ""
            parts.append(f"`{s['set']}` set ({s['folder']}: {s.get('method')}, {fmt(s.get('n_examples'))}{of} examples "
                         f"(nsamples {fmt(s.get('nsamples'))}), {fmt(s.get('n_response_tokens'))} response tokens, "
                         f"max length {fmt(s.get('max_length'))})")
        out.append(("p", "Scoring data: " + "; ".join(parts) + "."))
    data = ", ".join(f"{s['set']} n={fmt(s.get('n_examples'))}" for s in g.get("scoring", [])) or "scores of this run"
    if g.get("counts"):
        rows = [[c["group"], c.get("count"), c.get("fraction")] for c in g["counts"]]
        out.append(_table(caption(res, f"SNIP scores ({data})", "entries per group in the table"),
                          ["group", "entries", "share of scored weights"], rows))
    groups = g.get("groups", [])
    if g.get("total") or g.get("by_type"):
        header = ["unit", "weights"] + [x for grp in groups for x in (grp, f"{grp} share")]
        extra = [c for c in ("intersection", "union", "jaccard") if any(c in r for r in g.get("total", []))]
        header += [{"intersection": "top safety ∩ top utility", "union": "top safety ∪ top utility",
                    "jaccard": "Jaccard (top safety, top utility)"}[c] for c in extra]
        rows = []
        for r in g.get("total", []) + g.get("by_type", []):
            rows.append([r.get("module", DASH), r.get("numel")] + [r.get(x) for grp in groups for x in (grp, f"{grp}_share")]
                        + [r.get(c) for c in extra])
        out.append(_table(caption(res, f"SNIP scores ({data})", "entries per group and unit in the cells; "
                                  "per-layer and per-module rows in groups/summary.csv"), header, rows))
    return out


ABLATION_COLUMNS = (  # column, header, interval columns
    ("group", "group", None), ("sparsity", "s", None), ("p", "p", None), ("q", "q", None),
    ("fraction_removed", "weights removed (fraction)", None),
    ("refusal", "refusal", ("refusal_ci95_low", "refusal_ci95_high")),
    ("asr", "ASR", ("asr_ci95_low", "asr_ci95_high")), ("asr_wei", "ASR keyword-wei", None),
    ("degenerate", "degenerate", ("degenerate_ci95_low", "degenerate_ci95_high")),
    ("over_refusal", "over-refusal", ("over_refusal_ci95_low", "over_refusal_ci95_high")),
    ("degenerate_benign", "degenerate benign", ("degenerate_benign_ci95_low", "degenerate_benign_ci95_high")),
    ("perplexity", "perplexity", None), ("accuracy_mean", "accuracy", None), ("n_harmful", "n harmful", None),
)


def ablation_section(run: RunData) -> list[Block]:
    from . import figures

    res = run.results
    a = res.get("ablation", {})
    out: list[Block] = [("h", 2, "3. Ablation")]
    out += _missing_blocks(res, "ablation")
    if not a.get("rows"):
        return out
    st = a.get("settings", {})
    if st:
        out.append(("p", "Evaluation of every point (ablation/manifest.json): "
                    + ", ".join(f"{k} {fmt_value(v)}" for k, v in st.items()) + "."))
    nh = st.get("n_harmful", a["rows"][0].get("n_harmful"))
    data = (f"{fmt(nh)} held-out AdvBench prompts, {fmt(st.get('n_benign'))} benign instructions, perplexity on "
            f"{fmt(st.get('n_perplexity'))} {st.get('perplexity_data', '?')} answers, accuracy "
            f"{fmt_value(st.get('tasks'))} x {fmt(st.get('limit'))} documents")
    n = f"{fmt(nh)} harmful / {fmt(st.get('n_benign'))} benign prompts per point"
    df = run.tables.get("ablation")
    if df is not None:
        fig = figures.ablation_figure(df, _title(res, "Ablation: measures against the share of weights removed", data, n))
        out.append(("figure", "ablation", fig,
                    "Ablation curves per group kind against the share of weights removed (dense model dashed); bands: "
                    f"95 % intervals (ASR: the table's Wilson interval; shares: Wilson from n). {caption(res, data, n)}"))
    known = {c for c, _, ci in ABLATION_COLUMNS} | {x for _, _, ci in ABLATION_COLUMNS if ci for x in ci}
    kinds = a.get("degenerate_kinds", [])
    extra = [c for c in a["rows"][0] if c not in known and c not in kinds]
    header = [h if ci is None else f"{h} [95 % CI]" for _, h, ci in ABLATION_COLUMNS] + kinds + extra
    rows = []
    for r in a["rows"]:
        row = []
        for c, _, ci in ABLATION_COLUMNS:
            v = fmt(r.get(c)) if not isinstance(r.get(c), str) else r.get(c)
            if ci:
                v = f"{v} {fmt_ci(r.get(ci[0]), r.get(ci[1]))}"
            row.append(v)
        rows.append(row + [r.get(k) for k in kinds] + [r.get(c) for c in extra])
    out.append(_table("Ablation sweep (ablation/ablation.csv; intervals: Wilson 95 %"
                      + ("; degenerate_* = degenerate answers by kind" if kinds else "") + "). " + caption(res, data, n),
                      header, rows))
    return out


def _safe(name: str) -> str:
    """A fine-tuning's name as part of a figure's file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "finetune"


def _ft_data(st: Mapping[str, Any]) -> str:
    return f"{st.get('data', '?')} ({fmt(st.get('n_examples'))} examples)"


def _freeze_text(st: Mapping[str, Any]) -> str:
    if not st.get("freeze"):
        return "none"
    return f"{st['freeze']} ({st['freeze_mode']})" if st.get("freeze_mode") else str(st["freeze"])


def finetune_section(run: RunData) -> list[Block]:
    res = run.results
    f = res.get("finetune", {})
    out: list[Block] = [("h", 2, "4. Fine-tuning")]
    out += _missing_blocks(res, "finetune")
    if "runs" not in f:
        if f.get("name"):
            out.append(("p", f"One fine-tuning in this run: `{f['name']}` ({f.get('folder')}/)."))
        ft = _finetune_of(run, f.get("name") or "")
        return out + _finetune_body(run, f, ft.folder if ft else "finetune", ft.name if ft else "", False)
    runs = f["runs"]
    out.append(("p", f"This run holds {fmt(len(runs))} fine-tunings: "
                + ", ".join(f"`{name}` ({r.get('folder')}/)" for name, r in runs.items())
                + ". The table compares them; each has its own subsection below."))
    comp = f.get("comparison") or []
    if comp:
        out += _comparison_blocks(run, comp)
    losses = {name: run.tables.get("ft", {}).get(r.get("name", name), {}).get("loss") for name, r in runs.items()}
    losses = {k: v for k, v in losses.items() if v is not None}
    if losses:
        from . import figures

        data = "; ".join(f"{name}: {_ft_data(runs[name].get('settings') or {})}" for name in losses)
        n = ", ".join(f"{name} {fmt((runs[name].get('loss') or {}).get('steps'))} steps" for name in losses)
        fig = figures.loss_overlay_figure(losses, _title(res, "Fine-tuning loss, one line per fine-tuning", data, n))
        out.append(("figure", "loss", fig, "Training loss per optimiser step, one line per fine-tuning (thin: per "
                    f"step; thick: running mean of 10 steps). {caption(res, data, n)}"))
    for i, (name, r) in enumerate(runs.items(), start=1):
        out.append(("h", 3, f"4.{i} Fine-tuning `{name}` ({r.get('folder')}/)"))
        out += [("missing", line) for line in r.get("missing", [])]
        out += _finetune_body(run, r, r.get("folder") or f"finetune/{name}", r.get("name", name), True)
    return out


def _finetune_of(run: RunData, name: str):
    from .collect import finetunes

    return next((ft for ft in finetunes(run) if ft.name == name), None)


COMPARE_LABELS = (("refusal", "refusal"), ("asr", "ASR"), ("degenerate", "degenerate"), ("perplexity", "perplexity"),
                  ("accuracy_mean", "accuracy"))


def _comparison_blocks(run: RunData, comp: list[Mapping[str, Any]]) -> list[Block]:
    res = run.results

    def cell(m: Mapping[str, Any] | None) -> str:
        if not m:
            return DASH

        def side(k: str) -> str:
            ci = fmt_ci(m.get(f"{k}_ci95_low"), m.get(f"{k}_ci95_high"))
            return fmt(m.get(f"{k}_value")) + ("" if ci == DASH else f" {ci}")

        return f"{side('before')} -> {side('after')} (change {fmt(m.get('change'))})"

    rows = []
    for c in comp:
        method = "full" if c.get("full") else (f"LoRA r {fmt(c.get('r'))}" if c.get("r") is not None else "LoRA")
        rows.append([c["name"], f"{c.get('data') or '?'} ({fmt(c.get('n_examples'))} examples)", method,
                     _freeze_text(c), c.get("steps")] + [cell((c.get("metrics") or {}).get(m)) for m, _ in COMPARE_LABELS])
    first = res.get("finetune", {}).get("runs", {})
    ns = []
    for r in first.values():
        ev = {e["metric"]: e for e in r.get("evaluation") or []}
        nh = (ev.get("refusal") or {}).get("before_n") or (ev.get("refusal") or {}).get("after_n")
        ns.append(fmt(nh))
    n = ", ".join(dict.fromkeys(ns)) + " held-out harmful prompts per fine-tuning and side (details in each subsection)"
    data = "each fine-tuning's data (column data); evaluation in <folder>/eval/before|after"
    return [_table("Fine-tunings compared: before -> after fine-tuning, with 95 % Wilson intervals "
                   "(perplexity and accuracy: no interval). " + caption(res, data, n),
                   ["fine-tuning", "data", "method", "freeze (group, mode)", "steps"]
                   + [f"{h} before -> after" for _, h in COMPARE_LABELS], rows)]


def _finetune_body(run: RunData, f: Mapping[str, Any], folder: str, name: str, several: bool) -> list[Block]:
    """Settings, training and loss tables, loss figure (one fine-tuning only) and before / after of one
    fine-tuning; figure names get the fine-tuning's name when there are several."""
    from . import figures

    res = run.results
    out: list[Block] = []
    tables = run.tables.get("ft", {}).get(name, {})
    st = f.get("settings")
    if not st and not f.get("loss") and not f.get("evaluation"):
        return out
    if st:
        out.append(("p", f"Settings ({folder}/manifest.json): " + ", ".join(f"{k} {fmt_value(v)}" for k, v in st.items()) + "."))
    for note in f.get("notes", []):
        out.append(("p", note))
    data = f"{(st or {}).get('data', '?')} ({fmt((st or {}).get('n_examples'))} examples)"
    if name:
        data = f"`{name}`, {data}"
    if f.get("train"):
        t = f["train"]
        out.append(_table(f"Training ({folder}/manifest.json outputs). {caption(res, data, 'optimiser steps')}",
                          ["steps", "seconds", "first loss", "final loss"],
                          [[t.get("steps"), t.get("seconds"), t.get("first_loss"), t.get("final_loss")]]))
    if f.get("loss"):
        lo = f["loss"]
        out.append(_table(f"Loss ({folder}/loss.csv, nats per response token). {caption(res, data, 'optimiser steps')}",
                          ["steps", "first", "last", "min", "mean of the last 10 steps"],
                          [[lo["steps"], lo["first"], lo["last"], lo["min"], lo["mean_last_10"]]]))
        if tables.get("loss") is not None and not several:
            fig = figures.loss_figure(tables["loss"], _title(res, "Fine-tuning loss", data, f"{fmt(lo['steps'])} steps"))
            out.append(("figure", "loss", fig, f"Training loss per optimiser step. {caption(res, data, fmt(lo['steps']) + ' steps')}"))
    rows = f.get("evaluation")
    if rows:
        nh = next((r.get("before_n") or r.get("after_n") for r in rows if r["metric"] == "refusal"), None)
        nb = next((r.get("before_n") or r.get("after_n") for r in rows if r["metric"] == "over_refusal"), None)
        edata = f"{fmt(nh)} held-out harmful prompts, {fmt(nb)} benign instructions ({folder}/eval/)"
        table_rows = []
        for r in rows:
            table_rows.append([r["label"], r.get("before_value"), fmt_ci(r.get("before_ci95_low"), r.get("before_ci95_high")),
                               r.get("after_value"), fmt_ci(r.get("after_ci95_low"), r.get("after_ci95_high")),
                               r.get("change"), f"{fmt(r.get('before_n'))} / {fmt(r.get('after_n'))}"])
        out.append(_table(f"Safety and utility before and after fine-tuning on {data} (95 % Wilson intervals). "
                          + caption(res, edata, "before / after per row"),
                          ["metric", "before", "95 % CI", "after", "95 % CI", "change", "n (before / after)"], table_rows))
        fig = figures.before_after_figure(rows, _title(res, f"Before vs after fine-tuning on {data}", edata, f"{fmt(nh)} / {fmt(nb)}"))
        out.append(("figure", f"before_after_{_safe(name)}" if several else "before_after", fig,
                    "Before vs after fine-tuning (error bars: 95 % Wilson intervals). "
                    + caption(res, edata, f"{fmt(nh)} harmful / {fmt(nb)} benign prompts")))
    return out


def _settings_of(res: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    f = res.get("finetune", {}) or {}
    if "runs" in f:
        r = next((r for k, r in f["runs"].items() if r.get("name", k) == name), None)
        return (r or {}).get("settings") or {}
    return f.get("settings") or {}


def drift_section(run: RunData) -> list[Block]:
    res = run.results
    d = res.get("drift", {})
    out: list[Block] = [("h", 2, "5. Drift")]
    out += _missing_blocks(res, "drift")
    if "runs" not in d:
        name = d.get("finetune") or ""
        if name:
            out.append(("p", f"Drift of the fine-tuning `{name}` ({d.get('folder')}/): {d.get('chosen_by')}."))
        for o in d.get("not_shown", []):
            out.append(("p", f"Not shown: the fine-tuning `{o['finetune']}` ({o['folder']}/), "
                             + ("which has drift/ but is not the one the statistics are of." if o.get("has_drift")
                                else "which has no drift/ folder.")))
        folder = d.get("folder") or "finetune"
        return out + _drift_body(run, d, folder, name, False)
    out.append(("p", f"Drift of {fmt(len(d['runs']))} fine-tunings ({d.get('chosen_by')}; no stats stage names one): "
                + ", ".join(f"`{k}` ({r.get('folder')}/)" for k, r in d["runs"].items()) + "."))
    for i, (label, r) in enumerate(d["runs"].items(), start=1):
        name = "" if r.get("folder") == "finetune" else label
        out.append(("h", 3, f"5.{i} Drift of the fine-tuning `{label}` ({r.get('folder')}/)"))
        out += [("missing", line) for line in r.get("missing", [])]
        out += _drift_body(run, r, r.get("folder") or f"finetune/{label}", name, True)
    return out


def _drift_body(run: RunData, d: Mapping[str, Any], folder: str, name: str, several: bool) -> list[Block]:
    from . import figures

    res = run.results
    tables = run.tables.get("ft", {}).get(name, {})
    st = _settings_of(res, name)
    data = f"fine-tuning on {st.get('data', '?')} ({fmt(st.get('n_examples'))} examples)"
    if name:
        data = f"fine-tuning `{name}` on {st.get('data', '?')} ({fmt(st.get('n_examples'))} examples)"
    suffix = f"_{_safe(name)}" if several else ""
    out: list[Block] = []
    rec = d.get("records")
    if rec:
        out.append(("p", f"Drift log ({folder}/drift/drift.parquet): steps {fmt_value(rec['steps'])}; groups "
                         f"{', '.join(rec['groups'])}; {fmt(rec['modules'])} modules, {fmt(rec.get('modules_adapted'))} "
                         f"adapted (only adapted modules count below)."))
    ot = d.get("over_training")
    if ot and ot.get("rows"):
        from_samples = ot["source"].endswith("samples.safetensors")
        label = ("median |Delta| with interquartile band" if from_samples else
                 "entry-weighted mean of per-module median |Delta| (band: same of q25-q75)")
        extra = ""
        if from_samples:
            extra = f" (sample of {fmt(ot.get('n_sample'))} entries per group, seed {fmt(ot.get('sample_seed'))})"
        out.append(("p", f"Drift over training ({ot['source']}): {ot['definition']}{extra}."))
        df = tables["over_training"]
        ns = {r["group"]: r["n"] for r in ot["rows"]}
        n = ", ".join(f"{g} {fmt(v)}" for g, v in ns.items())
        fig = figures.drift_over_training_figure(df, _title(res, f"Drift over training: {label}", data, n),
                                                 f"|Delta| (weight units): {'median' if from_samples else 'weighted mean of medians'}")
        out.append(("figure", f"drift_over_training{suffix}", fig, f"Drift over training per group: {label}. "
                    + caption(res, data, n + (' (sampled entries)' if from_samples else ' entries'))))
        groups = list(dict.fromkeys(r["group"] for r in ot["rows"]))
        steps = sorted({r["step"] for r in ot["rows"]})
        cell = {(r["group"], r["step"]): f"{fmt(r['median'])} [{fmt(r['q25'])}, {fmt(r['q75'])}]" for r in ot["rows"]}
        rows = [[s] + [cell.get((g, s), DASH) for g in groups] for s in steps]
        last_n = {}
        for r in ot["rows"]:
            last_n.setdefault(r["group"], set()).add(r["n"])
        rows.append(["n"] + [", ".join(fmt(v) for v in sorted(last_n[g])) for g in groups])
        out.append(_table(f"Drift over training, {label} [q25, q75]. " + caption(res, data, "last row"),
                          ["step"] + groups, rows))
    fin = d.get("final")
    if fin:
        n_note = (f"final step {fmt(fin.get('step'))}; {fin['modules']}; relative change |Delta|/|w0| over entries with "
                  f"|w0| >= {fmt(fin['rel_threshold'])}")
        samples = tables.get("final_samples")
        if samples:
            fig = figures.final_drift_figure(samples, _title(res, "Final drift per group and module type", data,
                                                             f"at most {fmt(fin['sample_per_type'])} per group and type"))
            out.append(("figure", f"final_drift{suffix}", fig,
                        f"Final |Delta| per group and module type, log scale (box 25-75 %, whiskers 5-95 %; at most "
                        f"{fmt(fin['sample_per_type'])} entries per group and type drawn by a seeded permutation, seed "
                        f"{fmt(fin['sample_seed'])}; exact zeros cannot be drawn on a log scale and are counted in the "
                        f"table). {caption(res, data, 'per group and type in the table below')}"))
        rows = [[r["group"], r["metric"], r["n"], r["median"], r["mean"], r["q25"], r["q75"], r["share_zero"],
                 r.get("n_excluded", DASH)] for r in fin["by_group"]]
        out.append(_table(f"FINAL DRIFT BY GROUP (all entries, {n_note}). " + caption(res, data, "column n"),
                          ["group", "metric", "n", "median", "mean", "q25", "q75", "share exactly 0",
                           "excluded (|w0| small)"], rows))
        rows = [[r["group"], r["type"], r["n"], r["median"], r["q25"], r["q75"], r["share_zero"]] for r in fin["by_type"]]
        out.append(_table("Final |Delta| per group and module type (all entries). " + caption(res, data, "column n"),
                          ["group", "module type", "n", "median", "q25", "q75", "share exactly 0"], rows))
    return out


def _effect_cell(r: Mapping[str, Any], effect: str) -> str:
    return f"{fmt(r.get(effect))} {fmt_ci(r.get(f'{effect}_ci_low'), r.get(f'{effect}_ci_high'))}"


STAT_KNOWN = ("group", "control", "metric", "type", "n_group", "n_control", "median_group", "median_control",
              "p_value", "p_adjusted")


def statistics_section(run: RunData) -> list[Block]:
    res = run.results
    s = res.get("statistics", {})
    name = s.get("finetune") or ""
    st = _settings_of(res, name)
    data = f"final drift after fine-tuning on {st.get('data', '?')}"
    if name:
        data = f"final drift after fine-tuning `{name}` on {st.get('data', '?')}"
    out: list[Block] = [("h", 2, "6. Statistics (Experiment 2: do safety-critical weights drift more?)")]
    out += _missing_blocks(res, "statistics")
    if name:
        how = "stats/manifest.json outputs.finetune" if s.get("source", "").startswith("stats/") else "its drift folder"
        out.append(("p", f"Statistics of the fine-tuning `{name}` ({s.get('folder')}/; from {how})."))
    elif s.get("folder"):
        out.append(("p", f"Statistics of the fine-tuning in {s['folder']}/ (stats/manifest.json outputs.finetune), "
                         "which this run does not hold."))
    for note in s.get("notes", []):
        out.append(("p", note))
    v = s.get("verdict")
    if v:
        out.append(("p", f"**Verdict: {v.get('verdict')}** ({v.get('source')}). {v.get('reason') or ''}"))
        if v.get("rule") is not None:
            out.append(("p", "Rule, verbatim:"))
            out.append(("pre", json.dumps(v["rule"], indent=2, default=str)))
            flat = _flatten(v["rule"])
            out.append(_table("The rule's settings. " + caption(res, data, "see the primary comparison"),
                              ["rule key", "value"], [[k, x] for k, x in flat]))
        if v.get("primary"):
            prim = v["primary"]
            n = f"{fmt(prim.get('n_group'))} vs {fmt(prim.get('n_control'))}" if isinstance(prim, Mapping) else DASH
            out.append(_table("The comparison the verdict rests on. " + caption(res, data, n), ["field", "value"],
                              [[k, x] for k, x in _flatten(prim)]))
    comps = s.get("comparisons")
    if comps:
        effects = s.get("effects", [])
        extra = [c for c in comps[0] if c not in STAT_KNOWN and c not in effects
                 and not c.endswith("_ci_low") and not c.endswith("_ci_high")]
        header = ["group", "control", "metric", "type", "n group", "n control", "median group", "median control"]
        header += [f"{e} [95 % CI]" for e in effects] + extra + ["p", "p adjusted (BH)"]
        rows = []
        for r in comps:
            rows.append([r["group"], r["control"], r["metric"], r["type"], r.get("n_group"), r.get("n_control"),
                         r.get("median_group"), r.get("median_control")] + [_effect_cell(r, e) for e in effects]
                        + [r.get(c) for c in extra] + [fmt_p(r.get("p_value")), fmt_p(r.get("p_adjusted"))])
        ns = sorted({(r.get("n_group"), r.get("n_control")) for r in comps}, key=str)
        n = ", ".join(f"{fmt(a)} vs {fmt(b)}" for a, b in ns[:4]) + (" ..." if len(ns) > 4 else "")
        out.append(_table(f"Group vs control comparisons ({s.get('source')}; all module types pooled first, then per "
                          f"module type; metric abs = |Delta|, rel = |Delta|/|w0|; intervals: 95 % bootstrap; p: "
                          f"Mann-Whitney U, adjusted by Benjamini-Hochberg). " + caption(res, data, n), header, rows))
    return out


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list) and any(isinstance(x, (Mapping, list)) for x in obj):
        for i, v in enumerate(obj):
            out += _flatten(v, f"{prefix}[{i}]")
    elif isinstance(obj, list):
        out.append((prefix, fmt_value(obj)))
    else:
        out.append((prefix, obj))
    return out


OVERLAP_COLS = (("size_a", "|A| (original)"), ("size_b", "|B|"), ("intersection", "|A∩B|"),
                ("share_a", "share of A kept"), ("share_b", "share of B"), ("jaccard", "Jaccard"),
                ("chance_jaccard", "chance Jaccard"), ("enrichment", "enrichment"), ("p_value", "p (random sets)"))


def overlap_section(run: RunData) -> list[Block]:
    from . import figures

    res = run.results
    o = res.get("overlap", {})
    out: list[Block] = [("h", 2, "7. Overlap before / after fine-tuning (Experiment 1)")]
    out += _missing_blocks(res, "overlap")
    summ = o.get("summary_table")
    if not summ:
        return out
    if o.get("finetune"):
        which = f"`{o['finetune_name']}` ({o['finetune']}/)" if o.get("finetune_name") else f"in {o['finetune']}/"
        out.append(("p", f"The `finetuned` comparison re-scored the merged model of the fine-tuning {which} "
                         "(overlap/manifest.json outputs.finetune)."))
    elif len(res.get("finetune", {}).get("runs", {}) or {}) > 1 and "finetuned" in (o.get("comparisons") or []):
        out.append(("missing", "overlap/manifest.json does not say which fine-tuning the `finetuned` comparison "
                               "re-scored (no outputs.finetune)"))
    data = ("original groups vs groups re-selected after fine-tuning (finetuned) and vs groups re-selected on the "
            "unchanged model from another calibration sample (noise floor)")
    sizes = ", ".join(f"{r['group']} {fmt(r.get('finetuned_size_a', r.get('noise_floor_size_a')))}" for r in summ)
    rows = [[r["group"], r.get("finetuned_jaccard"), r.get("noise_floor_jaccard"), r.get("finetuned_chance_jaccard"),
             r.get("noise_floor_chance_jaccard")] for r in summ]
    out.append(_table("Jaccard index with the original group (overlap/overlap.csv, unit all). " + caption(res, data, sizes),
                      ["group", "Jaccard after fine-tuning", "Jaccard noise floor", "chance Jaccard (fine-tuned sizes)",
                       "chance Jaccard (noise-floor sizes)"], rows))
    fig = figures.overlap_bars_figure(summ, _title(res, "Overlap with the original groups", "after fine-tuning vs noise floor", sizes))
    out.append(("figure", "overlap", fig, "Jaccard after fine-tuning vs the noise floor, chance as a dashed marker. "
                + caption(res, data, sizes)))
    detail = []
    for r in summ:
        for comp in ("finetuned", "noise_floor"):
            if r.get(f"{comp}_jaccard") is None and r.get(f"{comp}_size_a") is None:
                continue
            detail.append([comp, r["group"], "all"] + [r.get(f"{comp}_{c}") for c, _ in OVERLAP_COLS])
    for r in o.get("by_type", []):
        detail.append([r["comparison"], r["group"], r["unit"]] + [r.get(c) for c, _ in OVERLAP_COLS])
    for row in detail:
        row[-1] = fmt_p(row[-1])
    out.append(_table("Overlap in detail, all units pooled and per module type (A = original group, B = re-selected). "
                      + caption(res, data, "columns |A|, |B|"), ["comparison", "group", "unit"] + [h for _, h in OVERLAP_COLS],
                      detail))
    layers = [r for r in o.get("by_layer", [])]
    if layers:
        import pandas as pd

        ldf = pd.DataFrame(layers)
        for comp in sorted(ldf["comparison"].unique()):
            fig = figures.overlap_heatmap_figure(ldf, comp, _title(res, f"Jaccard per layer: {comp}", data, sizes))
            out.append(("figure", f"overlap_layers_{comp}", fig, f"Jaccard per group and layer, {comp}. " + caption(res, data, sizes)))
        cols = list(dict.fromkeys((r["comparison"], r["group"]) for r in layers))
        cols.sort(key=lambda cg: (cg[0], group_sort_key(cg[1])))
        units = sorted({r["unit"] for r in layers}, key=lambda u: int(str(u).split(".")[1]))
        cell = {(r["comparison"], r["group"], r["unit"]): r["jaccard"] for r in layers}
        rows = [[u] + [cell.get((c, g, u)) for c, g in cols] for u in units]
        out.append(_table("Jaccard per layer. " + caption(res, data, sizes), ["layer"] + [f"{g} ({c})" for c, g in cols], rows))
    summary = o.get("summary") or {}
    vs_floor = [(g, v) for g, v in summary.items() if isinstance(v, dict) and "n_modules" in v]
    if vs_floor:  # brittle.analysis.against_noise_floor: modules are the units
        rows = [[g, v["jaccard_finetuned"], v["jaccard_noise_floor"], v["chance_jaccard"], v["n_below"], v["n_modules"],
                 v["median_diff"], v["median_diff_ci_low"], v["median_diff_ci_high"], fmt_p(v["p_value"]),
                 "yes" if v["beyond_noise"] else "no"] for g, v in vs_floor]
        first = vs_floor[0][1]
        rule = (f"beyond noise = Wilcoxon signed-rank p < {fmt(first['alpha'])} over the modules and the 95 % bootstrap "
                f"interval ({fmt(first['n_boot'])} resamples of the modules, seed {fmt(first['seed'])}) of the median "
                "per-module difference J(fine-tuned) - J(noise floor) below 0")
        out.append(_table("After fine-tuning against the noise floor, per module (overlap/summary.json); " + rule + ". "
                          + caption(res, data, "modules with a non-empty union in both comparisons"),
                          ["group", "Jaccard after fine-tuning", "noise floor", "chance", "modules below the floor",
                           "modules", "median difference", "95 % CI low", "95 % CI high", "Wilcoxon p", "beyond noise"],
                          rows))
    return out


SECTIONS = (run_section, groups_section, ablation_section, finetune_section, drift_section, statistics_section,
            overlap_section)


def build_blocks(run: RunData) -> list[Block]:
    """Every section's blocks; a section that fails to render becomes one ``missing`` line naming the error."""
    r = run.results.get("run", {})
    name = r.get("run_dir") or str(run.run_dir)
    blocks: list[Block] = [("h", 1, f"brittle report: {name}"),
                           ("p", f"{model_line(run.results)}. Every number below is also in results.json.")]
    for fn in SECTIONS:
        try:
            blocks += fn(run)
        except Exception as e:  # noqa: BLE001 - one broken section must not stop the report
            blocks.append(("missing", f"Could not render {fn.__name__.replace('_section', '')}: {type(e).__name__}: {e}"))
    return blocks
