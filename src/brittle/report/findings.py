"""The main findings of a run in a few plain lines, from the report's ``results.json`` (what ``brittle demo`` prints
at its end, and ``findings.txt`` beside the report). Each line names its n and interval; a part the run lacks is
left out rather than guessed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .fmt import fmt, fmt_ci, fmt_p


def _share(x: Any) -> str:
    """A share (refusal, degenerate) with two decimals, as the intervals around it."""
    return fmt(x) if x is None else f"{x:.2f}"


def _share_ci(lo: Any, hi: Any) -> str:
    return fmt_ci(lo, hi) if lo is None or hi is None else f"[{lo:.2f}, {hi:.2f}]"


def _ablation(a: Mapping[str, Any]) -> list[str]:
    rows = a.get("rows") or []
    dense = next((r for r in rows if r.get("group") == "dense"), None)
    removed = [r for r in rows if r.get("group") != "dense" and r.get("refusal") is not None]
    if not removed:
        return []
    q = min(r.get("q") or r.get("sparsity") or 0 for r in removed)
    at = {r["group"]: r for r in removed if (r.get("q") or r.get("sparsity") or 0) == q}
    n = (dense or next(iter(at.values()))).get("n_harmful")
    parts = []
    for g in ("set_difference", "top_safety", "random_magnitude", "random"):
        r = at.get(g)
        if r is not None:
            parts.append(f"{g} {_share(r['refusal'])} {_share_ci(r.get('refusal_ci95_low'), r.get('refusal_ci95_high'))}"
                         f" (degenerate {_share(r.get('degenerate'))}, perplexity {fmt(r.get('perplexity'))})")
    head = f"Ablation: refusal on {n} held-out harmful prompts"
    if dense is not None:
        head += f" is {_share(dense.get('refusal'))} for the unchanged model (perplexity {fmt(dense.get('perplexity'))})"
    return [f"{head}; with q = {q:g} of each matrix removed: " + "; ".join(parts) + " (Wilson 95 % intervals)."]


def _overlap(o: Mapping[str, Any]) -> list[str]:
    s = (o.get("summary") or {}).get("set_difference")
    if not s:
        return []
    verdict = ("the fine-tuned model's set differs from the original more than the noise floor does"
               if s.get("beyond_noise") else "within the noise floor")
    return [f"Experiment 1 (overlap after fine-tuning with the set difference frozen): Jaccard of the set difference "
            f"{fmt(s['jaccard_finetuned'])} after fine-tuning vs {fmt(s['jaccard_noise_floor'])} between two "
            f"calibration samples of the unchanged model (chance {fmt(s['chance_jaccard'])}); per-module difference "
            f"median {fmt(s['median_diff'])} {fmt_ci(s.get('median_diff_ci_low'), s.get('median_diff_ci_high'))} over "
            f"{s['n_modules']} modules, Wilcoxon p {fmt_p(s['p_value'])}: {verdict}."]


def _drift(st: Mapping[str, Any]) -> list[str]:
    v = st.get("verdict") or {}
    p = v.get("primary")
    if not p:
        return []
    return [f"Experiment 2 (drift during unconstrained fine-tuning): {p['group']} vs {p['control']}, |Delta| "
            f"median {fmt(p['median_group'])} vs {fmt(p['median_control'])} (n = {p['n_group']} + {p['n_control']}), "
            f"Cliff's delta {p['cliffs_delta']:+.3f} [{p['cliffs_delta_ci_low']:+.3f}, {p['cliffs_delta_ci_high']:+.3f}], "
            f"adjusted p {fmt_p(p['p_adjusted'])}: verdict {v.get('verdict')}, {v.get('reason', '').split(': ', 1)[-1]}."]


def _finetune(f: Mapping[str, Any]) -> list[str]:
    runs = f.get("runs") or ({"": f} if f.get("evaluation") else {})
    out = []
    for name, r in runs.items():
        ev = {m["metric"]: m for m in r.get("evaluation") or []}
        if "refusal" not in ev:
            continue
        m = ev["refusal"]
        settings = r.get("settings") or {}
        frozen = f"{settings['freeze']} frozen" if settings.get("freeze") else "nothing frozen"
        ppl = ev.get("perplexity")
        out.append(f"Fine-tuning{' ' + name if name else ''} ({settings.get('data', '?')}, {frozen}): refusal "
                   f"{_share(m['before_value'])} -> {_share(m['after_value'])} "
                   f"{_share_ci(m.get('after_ci95_low'), m.get('after_ci95_high'))} (n = {m.get('after_n')})"
                   + (f", perplexity {fmt(ppl['before_value'])} -> {fmt(ppl['after_value'])}" if ppl else "") + ".")
    return out


def findings(results: Mapping[str, Any]) -> list[str]:
    """One line per finding of ``results`` (the report's ``results.json``): ablation, fine-tunings, Experiment 1,
    Experiment 2, in that order; parts the run does not have give no line."""
    return [*_ablation(results.get("ablation") or {}), *_finetune(results.get("finetune") or {}),
            *_overlap(results.get("overlap") or {}), *_drift(results.get("statistics") or {})]
