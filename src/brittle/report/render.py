"""Writing the report: blocks -> ``report.md`` (figures as PNG files next to it) and a self-contained
``report.html`` (figures as base64 data URIs, inline CSS, nothing fetched from anywhere); results ->
``report.txt`` in the seed study's layout and ``results.json``."""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .fmt import DASH, fmt, fmt_ci, fmt_p

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1.5em 0; font-size: .85em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-size: .95em; color: #444; padding-bottom: .3em; white-space: normal; }
figure { margin: 1em 0 2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #444; }
.missing { color: #8a4b00; background: #fff6e5; border-left: 4px solid #e0a040; padding: .3em .6em; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: .85em; }
code { background: #f3f3f3; padding: 0 .2em; }
@media print { body { max-width: none; } table { display: table; font-size: .75em; } }
"""


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _inline_html(text: str) -> str:
    t = html.escape(text, quote=False)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", t)


def render_markdown(blocks: Sequence[tuple], figure_files: Mapping[str, str]) -> str:
    out: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2])
        elif kind == "p":
            out.append(b[1])
        elif kind == "missing":
            out.append(f"> {b[1]}")
        elif kind == "pre":
            out.append("```\n" + b[1] + "\n```")
        elif kind == "table":
            _, cap, header, rows = b
            lines = [f"*{cap}*", "", "| " + " | ".join(_md_cell(h) for h in header) + " |",
                     "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            out.append("\n".join(lines))
        elif kind == "figure":
            _, name, _fig, cap = b
            if name in figure_files:
                out.append(f"![{name}]({figure_files[name]})\n\n*{cap}*")
        out.append("")
    return "\n".join(out)


def render_html(blocks: Sequence[tuple], figure_png: Mapping[str, bytes], title: str) -> str:
    out = ["<!DOCTYPE html>", "<html lang=\"en\">", "<head>", "<meta charset=\"utf-8\">",
           f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>"]
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h{b[1]}>{_inline_html(b[2])}</h{b[1]}>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(b[1])}</p>")
        elif kind == "missing":
            out.append(f"<p class=\"missing\">{_inline_html(b[1])}</p>")
        elif kind == "pre":
            out.append(f"<pre>{html.escape(b[1])}</pre>")
        elif kind == "table":
            _, cap, header, rows = b
            out.append("<table>")
            out.append(f"<caption>{_inline_html(cap)}</caption>")
            out.append("<thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr></thead>")
            out.append("<tbody>")
            for r in rows:
                out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
            out.append("</tbody></table>")
        elif kind == "figure":
            _, name, _fig, cap = b
            if name in figure_png:
                data = base64.b64encode(figure_png[name]).decode("ascii")
                out.append(f"<figure><img alt=\"{html.escape(name)}\" src=\"data:image/png;base64,{data}\">"
                           f"<figcaption>{_inline_html(cap)}</figcaption></figure>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# report.txt: the seed study's text report (FINAL DRIFT BY GROUP, COMPARISONS, HYPOTHESIS EVALUATION)


RULE = "=" * 80
SUB = "-" * 80


def _row(cells: Sequence[Any], widths: Sequence[int]) -> str:
    return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=False)))


def _text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[str(h) for h in header]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [_row(cells[0], widths), "  ".join("-" * w for w in widths)]
    return lines + [_row(r, widths) for r in cells[1:]]


def render_text(results: Mapping[str, Any], context: str, groups: str) -> str:
    out = [RULE, "BRITTLE: SAFETY-CRITICAL WEIGHT DRIFT REPORT", RULE, "", context, groups, ""]
    missing = results.get("missing") or []
    if missing:
        out.append("Not in this run:")
        out += [f"  - {m}" for m in missing]
        out.append("")
    ft = results.get("finetune") or {}
    runs = ft["runs"] if "runs" in ft else {ft.get("name") or "": ft}
    for name, r in runs.items():
        st = r.get("settings") or {}
        if st:
            label = f"Fine-tuning {name} ({r.get('folder')})" if name else "Fine-tuning"
            out.append(f"{label}: data {st.get('data')} (n = {fmt(st.get('n_examples'))}), LoRA r {fmt(st.get('r'))}, "
                       f"alpha {fmt(st.get('alpha'))}, lr {fmt(st.get('lr'))}, steps {fmt(st.get('max_steps'))}, "
                       f"frozen: {st.get('freeze') or 'none'}")
            out.append("")
    out += [RULE, "FINAL DRIFT BY GROUP", RULE]
    drift = results.get("drift") or {}
    druns = drift["runs"] if "runs" in drift else {drift.get("finetune") or "": drift}
    if "runs" in drift:
        out += [f"  {m}" for m in drift.get("missing", [])]
    for name, d in druns.items():
        if name:
            out.append(f"Fine-tuning {name} ({d.get('folder')}):")
        fin = d.get("final")
        if fin:
            out.append(f"Final step {fmt(fin.get('step'))}; {fin['modules']}; abs = |Delta|, rel = |Delta|/|w0| "
                       f"(|w0| >= {fmt(fin['rel_threshold'])}); all entries.")
            out += _text_table(["group", "metric", "n", "median", "mean", "q25", "q75", "share 0"],
                               [[r["group"], r["metric"], r["n"], r["median"], r["mean"], r["q25"], r["q75"], r["share_zero"]]
                                for r in fin["by_group"]])
        else:
            out += [f"  {m}" for m in d.get("missing", [])] or ["  (no final drift)"]
        if len(druns) > 1:
            out.append("")
    out += ["", RULE, "COMPARISONS", RULE]
    stats = results.get("statistics") or {}
    comps = stats.get("comparisons")
    if comps:
        if stats.get("finetune"):
            out.append(f"Fine-tuning: {stats['finetune']} ({stats.get('folder')}).")
        out.append(f"Source: {stats.get('source')}. Effect = group - control; 95 % bootstrap intervals; p: Mann-Whitney U, "
                   "p adj: Benjamini-Hochberg.")
        for stratum in dict.fromkeys(r["type"] for r in comps):
            out += ["", f"Module type: {stratum}", SUB]
            rows = []
            for r in comps:
                if r["type"] != stratum:
                    continue
                rows.append([f"{r['group']} vs {r['control']}", r["metric"], f"{fmt(r.get('n_group'))}/{fmt(r.get('n_control'))}",
                             f"{fmt(r.get('cliffs_delta'))} {fmt_ci(r.get('cliffs_delta_ci_low'), r.get('cliffs_delta_ci_high'))}",
                             f"{fmt(r.get('cohens_d'))} {fmt_ci(r.get('cohens_d_ci_low'), r.get('cohens_d_ci_high'))}",
                             f"{fmt(r.get('median_diff'))} {fmt_ci(r.get('median_diff_ci_low'), r.get('median_diff_ci_high'))}",
                             fmt_p(r.get("p_value")), fmt_p(r.get("p_adjusted"))])
            out += _text_table(["comparison", "metric", "n", "Cliff's delta [CI]", "Cohen's d [CI]",
                                "median diff [CI]", "p", "p adj"], rows)
    else:
        out += [f"  {m}" for m in stats.get("missing", [])] or ["  (no comparisons)"]
    out += ["", RULE, "HYPOTHESIS EVALUATION", RULE]
    v = stats.get("verdict")
    if v:
        out.append(f"VERDICT: {v.get('verdict')}")
        out.append(f"Reason: {v.get('reason')}")
        out.append(f"Source: {v.get('source')}")
        if v.get("rule") is not None:
            out.append("Rule (verbatim):")
            out += ["  " + line for line in json.dumps(v["rule"], indent=2, default=str).splitlines()]
    else:
        out.append("  No verdict in this run (no stats/verdict.json).")
    ov = results.get("overlap") or {}
    if ov.get("summary_table"):
        out += ["", RULE, "OVERLAP WITH THE ORIGINAL GROUPS (EXPERIMENT 1)", RULE]
        if ov.get("finetune"):
            out.append(f"'finetuned' re-scored the merged model of {ov.get('finetune_name') or 'the fine-tuning'} "
                       f"({ov['finetune']}).")
        out += _text_table(["group", "Jaccard after FT", "Jaccard noise floor", "chance Jaccard"],
                           [[r["group"], r.get("finetuned_jaccard"), r.get("noise_floor_jaccard"),
                             r.get("finetuned_chance_jaccard", r.get("noise_floor_chance_jaccard"))]
                            for r in ov["summary_table"]])
    out.append("")
    return "\n".join(out)


def write_json(results: Mapping[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n", encoding="utf-8")


__all__ = ["render_markdown", "render_html", "render_text", "write_json", "DASH"]
