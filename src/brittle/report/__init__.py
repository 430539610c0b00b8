"""Render a run directory into a report: ``report.md`` (with PNG figures next to it), a self-contained
``report.html``, ``report.txt`` (the seed study's layout), ``results.json`` (every number the report shows) and
``findings.txt`` (the main findings in a few lines, :mod:`brittle.report.findings`).

``build_report(run_dir, out_dir=None)`` reads only what the run directory holds (see
:mod:`brittle.report.collect` for the files and columns); a missing part is left out with a line saying what is
missing, never an error. Sections: run, groups, ablation, fine-tuning, drift, statistics (Experiment 2), overlap
(Experiment 1). A run with several fine-tunings (``finetune/<name>/``) gets a comparison table, one loss figure
with a line per fine-tuning and a subsection per fine-tuning (figures ``before_after_<name>``); drift and
statistics are of the fine-tuning the stats stage analysed (else one subsection per fine-tuning with drift,
figures ``drift_over_training_<name>``, ``final_drift_<name>``); see :mod:`brittle.report.collect` for
``results.json``.
"""

from __future__ import annotations

from pathlib import Path

from .collect import RunData, collect
from .fmt import clean, fmt, number_tokens, numbers

FIGURE_NAMES = ("ablation", "loss", "before_after", "drift_over_training", "final_drift", "overlap",
                "overlap_layers_finetuned", "overlap_layers_noise_floor")
# with several fine-tunings: <prefix>_<fine-tuning name>.png
PER_FINETUNE_FIGURES = ("before_after", "drift_over_training", "final_drift")


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write the report of ``run_dir`` into ``out_dir`` (default ``run_dir / "report"``). Returns the written
    files: ``{"md", "html", "txt", "json", "findings"}`` and ``"figure:<name>"`` for each PNG."""
    from .render import render_html, render_markdown, render_text, write_json
    from .sections import build_blocks, groups_line, model_line

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    run = collect(run_dir)
    run.results = clean(run.results)  # render exactly the values results.json holds
    blocks = build_blocks(run)
    written: dict[str, Path] = {}
    files: dict[str, str] = {}
    pngs: dict[str, bytes] = {}
    from .figures import png_bytes

    for b in blocks:
        if b[0] != "figure":
            continue
        name, fig = b[1], b[2]
        try:
            data = png_bytes(fig)
        except Exception as e:  # noqa: BLE001 - a figure that cannot be drawn is reported, not fatal
            run.results.setdefault("missing", []).append(f"Figure {name} could not be drawn: {type(e).__name__}: {e}")
            continue
        path = out / f"{name}.png"
        path.write_bytes(data)
        files[name] = path.name
        pngs[name] = data
        written[f"figure:{name}"] = path
    stale_files = [out / f"{name}.png" for name in FIGURE_NAMES]
    for prefix in PER_FINETUNE_FIGURES:
        stale_files += sorted(out.glob(f"{prefix}_*.png"))
    for path in stale_files:  # figures of an earlier rendering that this run no longer has
        if path.stem not in files and path.is_file():
            path.unlink()
    title = f"brittle report: {run.results.get('run', {}).get('run_dir', run_dir)}"
    md = render_markdown(blocks, files)
    (out / "report.md").write_text(md, encoding="utf-8")
    written["md"] = out / "report.md"
    (out / "report.html").write_text(render_html(blocks, pngs, title), encoding="utf-8")
    written["html"] = out / "report.html"
    txt = render_text(run.results, model_line(run.results), groups_line(run.results))
    (out / "report.txt").write_text(txt, encoding="utf-8")
    written["txt"] = out / "report.txt"
    write_json(run.results, out / "results.json")
    written["json"] = out / "results.json"
    from .findings import findings

    (out / "findings.txt").write_text("".join(f"- {line}\n" for line in findings(run.results)), encoding="utf-8")
    written["findings"] = out / "findings.txt"
    return written


__all__ = ["build_report", "collect", "RunData", "fmt", "clean", "numbers", "number_tokens"]
