"""brittle.report: a synthetic run directory (every stage's files written directly, no model) rendered into
report.md / report.html / report.txt / results.json; partial and empty run directories render too."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import save_file

from brittle.report import build_report
from brittle.report.fmt import fmt, number_tokens, numbers

GROUPS = ("top_safety", "set_difference", "top_utility", "random", "random_magnitude")
MODULES = ("layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v")
NUMEL = {"layers.0.q": 64, "layers.0.v": 32, "layers.1.q": 64, "layers.1.v": 32}


def _manifest(folder: Path, stage: str, config: dict, outputs: dict | None = None, argv=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    m = {"stage": stage, "command": stage, "argv": argv or ["brittle", "run"], "created": "2026-11-28T10:00:00+00:00",
         "config": config, "seeds": {"seed": config.get("seed", 0)},
         "inputs": {"model_weights": "ab" * 32}, "outputs": outputs or {}, "versions": {"python": "3.11"},
         "git_commit": "0123456789abcdef", "host": "test", "seconds": 12.5}
    (folder / "manifest.json").write_text(json.dumps(m), encoding="utf-8")


def write_groups(run: Path) -> None:
    counts = {"top_safety": 2, "top_utility": 2, "set_difference": 3, "random": 3, "random_magnitude": 3}
    _manifest(run / "groups", "groups", {"seed": 0, "top": 0.01, "p": 0.05, "q": 0.05, "scope": "matrix", "bins": 10,
                                         "magnitude": True},
              {g: {"file": f"{g}.safetensors", "count": 4 * c, "fraction": 4 * c / 192, "sha256": "x"}
               for g, c in counts.items()} | {"summary": {"file": "summary.csv", "sha256": "y"}})
    _manifest(run / "scores" / "safety-snip", "scores:safety", {"seed": 0, "set": "safety", "method": "snip",
                                                                "nsamples": 16, "batch_size": 4, "max_length": 256},
              {"n_examples": 16, "n_response_tokens": 321})
    rows = []

    def row(level, module, layer, typ, numel, k):
        r = {"level": level, "module": module, "layer": layer, "type": typ, "numel": numel}
        for g, c in counts.items():
            r[g] = c * k
            r[f"{g}_share"] = c * k / numel
        r.update({"intersection": k, "union": 3 * k, "jaccard": 1 / 3})
        return r

    for m in MODULES:
        rows.append(row("module", m, int(m.split(".")[1]), m.split(".")[2], NUMEL[m], 1))
    for t in ("q", "v"):
        rows.append(row("type", f"*.{t}", "", t, 128 if t == "q" else 64, 2))
    for i in (0, 1):
        rows.append(row("layer", f"layers.{i}", i, "*", 96, 2))
    rows.append(row("total", "all", "", "*", 192, 4))
    pd.DataFrame(rows).to_csv(run / "groups" / "summary.csv", index=False)


def write_ablation(run: Path) -> None:
    _manifest(run / "ablation", "ablation", {"seed": 0, "kinds": ["top_safety", "set_difference", "random"],
                                             "eval": {"judge": "refusal-v1", "n_harmful": 20, "n_benign": 10,
                                                      "n_perplexity": 10, "perplexity_data": "rho-benign",
                                                      "tasks": ["arc_easy"], "limit": 5, "seed": 0}})
    rows = [{"group": "dense", "sparsity": None, "p": None, "q": None, "fraction_removed": 0.0}]
    for s in (0.01, 0.02):
        for g in ("top_safety", "set_difference", "random"):
            rows.append({"group": g, "sparsity": s, "p": None if g == "top_safety" else s, "q": s,
                         "fraction_removed": s * (1 if g == "top_safety" else 0.63)})
    rng = np.random.default_rng(0)
    for r in rows:
        r.update({"asr_wei": 0.05, "asr": float(rng.integers(0, 20)) / 20, "asr_ci95_low": 0.01, "asr_ci95_high": 0.4,
                  "degenerate": 0.15, "refusal": 0.8, "over_refusal": 0.1, "degenerate_benign": 0.0,
                  "perplexity": float(rng.uniform(20, 2e6)), "accuracy_mean": 0.55, "n_harmful": 20,
                  "degenerate_empty": 0.05, "degenerate_lone_opening": 0.0, "degenerate_looping": 0.1,
                  "degenerate_gibberish": 0.0, "degenerate_other": 0.0})
    pd.DataFrame(rows).to_csv(run / "ablation" / "ablation.csv", index=False)


def _summary(refusal: float, asr: float, ppl: float) -> dict:
    return {"model": "tiny-test-model", "judge": "refusal-v1",
            "asr": {"vanilla_nosys": {"value": asr, "ci95": [max(0.0, asr - 0.2), min(1.0, asr + 0.2)], "n": 20}},
            "by_judge": {"keyword-wei": {"asr": {"vanilla_nosys": {"value": asr / 2}}}},
            "degenerate": {"vanilla_nosys": 0.05}, "refusal_harmful": refusal, "over_refusal": 0.1,
            "degenerate_benign": 0.0, "perplexity": ppl, "accuracy": {"arc_easy": 0.6, "mean": 0.6},
            "intervals": {"refusal_harmful": {"value": refusal, "ci95": [max(0.0, refusal - 0.2), min(1.0, refusal + 0.1)], "n": 20},
                          "over_refusal": {"value": 0.1, "ci95": [0.02, 0.4], "n": 10}},
            "n_prompts": {"harmful": 20, "benign": 10}, "perplexity_detail": {"n": 10, "data": "rho-benign"},
            "accuracy_detail": {"arc_easy": {"acc": 0.6, "n": 5}}}


def write_finetune(run: Path, *, eval_=True, drift=True, samples=True, final=True, name: str = "",
                   freeze: str | None = "set_difference", after_refusal: float = 0.35, loss_slope: float = 0.0625) -> None:
    """One fine-tuning: ``finetune/`` or, with ``name``, the variant ``finetune/<name>/``."""
    ft = run / "finetune" / name if name else run / "finetune"
    _manifest(ft, "finetune", {"seed": 0, **({"name": name} if name else {}), "data": "reference", "n_examples": None,
                               "train": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["all"], "lr": 1e-4,
                                         "batch_size": 4, "epochs": 1, "max_steps": 20, "max_length": 256, "seed": 0,
                                         "warmup_steps": 0, "schedule": "constant", "grad_accumulation": 1},
                               "full": False, "freeze": freeze, "freeze_mode": "weights",
                               "track": ["groups"], "drift_every": 10},
              {"train": {"steps": 20, "seconds": 33.3, "first_loss": 3.5, "final_loss": 2.25},
               "data": {"data": "reference", "n": 40}})
    steps = np.arange(1, 21)
    pd.DataFrame({"step": steps, "loss": 3.5 - steps * loss_slope, "lr": 1e-4}).to_csv(ft / "loss.csv", index=False)
    if eval_:
        after = _summary(after_refusal, 0.55, 12.25) | {"degenerate_reasons": {"vanilla_nosys": {"empty": 0.0, "looping": 0.05}}}
        for side, s in (("before", _summary(1.0, 0.0, 29.5)), ("after", after)):
            (ft / "eval" / side).mkdir(parents=True)
            (ft / "eval" / side / "summary.json").write_text(json.dumps(s), encoding="utf-8")
    if not drift:
        return
    dd = ft / "drift"
    dd.mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for step in (0, 10, 20):
        for g in GROUPS:
            for m in MODULES:
                scale = 0.0 if (step == 0 or g == "set_difference") else 1e-4 * step / 10
                rows.append({"step": step, "group": g, "module": m, "layer": int(m.split(".")[1]), "type": m.split(".")[2],
                             "adapted": m != "layers.1.v", "n": 5, "n_rel_excluded": 0,
                             **{f"abs_{k}": scale * f for k, f in (("mean", 1.1), ("median", 1.0), ("q05", 0.2),
                                                                    ("q25", 0.5), ("q75", 1.6), ("q95", 2.5), ("max", 3.0))},
                             "rel_median": scale * 10, "n_rows": 3, "row_cosine_mean": 1.0})
    pd.DataFrame(rows).to_parquet(dd / "drift.parquet")
    if samples:
        t = {g: (np.abs(rng.normal(size=(3, 50))) * np.array([[0], [1e-4], [2e-4]]) * (g != "set_difference")).astype(np.float32)
             for g in GROUPS}
        t["steps"] = np.array([0, 10, 20], dtype=np.int64)
        save_file(t, str(dd / "samples.safetensors"), metadata={"n_sample": "50", "seed": "0"})
    if final:
        (dd / "final").mkdir()
        for g in GROUPS:
            t = {}
            for m in MODULES:
                n = 5
                delta = rng.normal(scale=2e-4, size=n).astype(np.float32)
                if g == "set_difference":
                    delta[:] = 0.0  # frozen: no drift at all (exact zeros on a log scale)
                w0 = rng.normal(scale=0.05, size=n).astype(np.float32)
                w0[0] = 0.0 if g == "random" else w0[0]  # one |w0| below the threshold: excluded from rel
                t[f"{m}.delta"], t[f"{m}.w0"] = delta, w0
                t[f"{m}.index"] = np.sort(rng.choice(NUMEL[m], n, replace=False)).astype(np.int64)
            save_file(t, str(dd / "final" / f"{g}.safetensors"), metadata={"step": "20"})


COMPARISON_COLS = ["group", "control", "metric", "type", "n_group", "n_control", "median_group", "median_control",
                   "median_diff", "mean_diff", "cliffs_delta", "cohens_d", "p_value", "median_diff_ci_low",
                   "median_diff_ci_high", "mean_diff_ci_low", "mean_diff_ci_high", "cliffs_delta_ci_low",
                   "cliffs_delta_ci_high", "cohens_d_ci_low", "cohens_d_ci_high", "p_adjusted"]


def write_stats(run: Path, verdict: bool = True, finetune: str | None = None) -> None:
    """``stats/``; with ``finetune``, also its manifest naming the analysed fine-tuning folder."""
    (run / "stats").mkdir()
    if finetune is not None:
        _manifest(run / "stats", "stats", {"seed": 0}, {"finetune": finetune})
    rng = np.random.default_rng(2)
    rows = []
    for t in ("q", "all", "v"):  # 'all' not first on purpose: the report puts it first
        for g, c in (("set_difference", "random_magnitude"), ("top_safety", "random")):
            for metric in ("abs", "rel"):
                d = float(rng.uniform(-0.1, 0.1))
                rows.append({"group": g, "control": c, "metric": metric, "type": t, "n_group": 15, "n_control": 15,
                             "median_group": 2.05e-4, "median_control": 1.98e-4, "median_diff": 7e-6, "mean_diff": 9e-6,
                             "cliffs_delta": d, "cohens_d": 0.034, "p_value": 3.4e-4, "median_diff_ci_low": 1.6e-6,
                             "median_diff_ci_high": 1.1e-5, "mean_diff_ci_low": 3.9e-6, "mean_diff_ci_high": 1.4e-5,
                             "cliffs_delta_ci_low": d - 0.01, "cliffs_delta_ci_high": d + 0.012, "cohens_d_ci_low": 0.0147,
                             "cohens_d_ci_high": 0.0543, "p_adjusted": 4.5e-4})
    pd.DataFrame(rows, columns=COMPARISON_COLS).to_csv(run / "stats" / "comparisons.csv", index=False)
    if verdict:
        primary = next(r for r in rows if r["type"] == "all" and r["metric"] == "abs" and r["group"] == "set_difference")
        (run / "stats" / "verdict.json").write_text(json.dumps({
            "verdict": "H2", "reason": "Cliff's delta inside +/-0.147 (H2: no meaningful difference)",
            "rule": {"primary": ["set_difference", "random_magnitude", "abs", "all"], "alpha": 0.05, "margin": 0.147},
            "primary": primary}), encoding="utf-8")


def write_overlap(run: Path, finetune: str | None = None, layers: bool = True) -> None:
    """``overlap/``; with ``finetune``, also its manifest naming the re-scored fine-tuning folder; without
    ``layers``, no per-layer rows (no heatmaps: faster)."""
    (run / "overlap").mkdir()
    if finetune is not None:
        _manifest(run / "overlap", "overlap", {"seed": 0}, {"comparisons": ["noise_floor", "finetuned"],
                                                            "finetune": finetune})
    rows = []
    for comp, base in (("noise_floor", 0.9), ("finetuned", 0.6)):
        for k, g in enumerate(("top_safety", "top_utility", "set_difference")):
            for unit in ("all", "*.q", "*.v", "layers.0", "layers.1", "layers.0.q")[: None if layers else 3]:
                j = base - 0.05 * k - (0.01 if unit != "all" else 0.0)
                rows.append({"comparison": comp, "group": g, "unit": unit, "size_a": 100, "size_b": 104,
                             "intersection": 80, "share_a": 0.8, "share_b": 0.7692, "jaccard": j,
                             "chance_jaccard": 0.005, "enrichment": 35.25, "p_value": 1e-30})
    pd.DataFrame(rows).to_csv(run / "overlap" / "overlap.csv", index=False)
    vs_floor = {"jaccard_finetuned": 0.151, "jaccard_noise_floor": 0.749, "chance_jaccard": 0.0135, "n_modules": 4,
                "n_below": 4, "alpha": 0.05, "n_boot": 200, "seed": 0, "median_diff": -0.61, "median_diff_ci_low": -0.64,
                "median_diff_ci_high": -0.58, "p_value": 0.125, "beyond_noise": False}
    (run / "overlap" / "summary.json").write_text(json.dumps({"set_difference": vs_floor}))  # as against_noise_floor


def full_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('model = "tiny-test-model"\nseed = 0\ndtype = "float32"\n', encoding="utf-8")
    write_groups(run)
    write_ablation(run)
    write_finetune(run)
    write_stats(run)
    write_overlap(run)
    return run


def check_numbers_shown(out: Path) -> None:
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    tokens = number_tokens((out / "report.md").read_text(encoding="utf-8"))
    absent = [(p, v, fmt(v)) for p, v in numbers(results) if fmt(v) not in tokens]
    assert not absent, f"numbers in results.json that report.md does not show: {absent[:10]}"


def check_html_self_contained(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert "<link" not in text.lower()
    assert "<script" not in text.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text, re.I)
    assert "@import" not in text and "url(" not in text
    imgs = re.findall(r"<img\b[^>]*>", text)
    for img in imgs:
        assert re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', img), img[:200]
    return imgs


def test_full_run(tmp_path):
    run = full_run(tmp_path)
    out = tmp_path / "report"
    files = build_report(run, out)
    for key, name in (("md", "report.md"), ("html", "report.html"), ("txt", "report.txt"), ("json", "results.json")):
        assert files[key] == out / name and files[key].is_file() and files[key].stat().st_size > 0
    figs = {k.split(":", 1)[1] for k in files if k.startswith("figure:")}
    assert {"ablation", "loss", "before_after", "drift_over_training", "final_drift", "overlap",
            "overlap_layers_finetuned", "overlap_layers_noise_floor"} <= figs
    md = files["md"].read_text(encoding="utf-8")
    for name in figs:
        assert f"]({name}.png)" in md and (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    check_numbers_shown(out)
    imgs = check_html_self_contained(files["html"])
    assert len(imgs) == len(figs)
    results = json.loads(files["json"].read_text(encoding="utf-8"))
    assert set(results) >= {"run", "groups", "ablation", "finetune", "drift", "statistics", "overlap", "missing"}
    assert results["run"]["model"] == "tiny-test-model" and results["run"]["seed"] == 0
    assert results["missing"] == []
    # model, seed and group definitions in every table caption
    captions = re.findall(r"^\*(.+)\*$", md, re.M)
    assert captions and all("tiny-test-model" in c and "seed 0" in c for c in captions)
    assert all("set difference" in c and "; data: " in c and "; n: " in c for c in captions)
    # drift over training from the samples file; final drift leaves out unadapted modules (layers.1.v)
    assert results["drift"]["over_training"]["source"].endswith("samples.safetensors")
    fin = {(r["group"], r["metric"]): r for r in results["drift"]["final"]["by_group"]}
    assert fin[("top_safety", "abs")]["n"] == 15 and fin[("set_difference", "abs")]["share_zero"] == 1.0
    assert fin[("random", "rel")]["n_excluded"] == 3
    # statistics: 'all' stratum first, the verdict with its rule
    assert [c["type"] for c in results["statistics"]["comparisons"]][:4] == ["all"] * 4
    assert results["statistics"]["verdict"]["verdict"] == "H2"
    assert '"margin": 0.147' in md
    # before / after: the degenerate share split by reason where the summary has reasons
    ev = {r["metric"]: r for r in results["finetune"]["evaluation"]}
    assert ev["degenerate_looping"]["after_value"] == 0.05 and ev["degenerate_looping"].get("before_value") is None
    assert [r["metric"] for r in results["finetune"]["evaluation"]][3:5] == ["degenerate", "degenerate_empty"]
    # ablation: the degenerate breakdown and Wilson intervals
    assert "degenerate_looping" in md and results["ablation"]["rows"][0]["refusal_ci95_low"] is not None
    # overlap: seed-style summary
    summ = {r["group"]: r for r in results["overlap"]["summary_table"]}
    assert summ["top_safety"]["finetuned_jaccard"] == 0.6 and summ["top_safety"]["noise_floor_jaccard"] == 0.9
    assert "| set_difference | 0.151 | 0.749 | 0.0135 | 4 | 4 | -0.61 | -0.64 | -0.58 | 0.125 | no |" in md
    txt = files["txt"].read_text(encoding="utf-8")
    for head in ("FINAL DRIFT BY GROUP", "COMPARISONS", "HYPOTHESIS EVALUATION", "VERDICT: H2"):
        assert head in txt
    # rendering again into the same folder works and gives the same results
    build_report(run, out)
    assert json.loads(files["json"].read_text(encoding="utf-8")) == results


def test_partial_run(tmp_path):
    """Groups and a fine-tuning run without evaluation, drift samples or stats: those parts are named as missing."""
    run = tmp_path / "run"
    run.mkdir()
    write_groups(run)
    write_finetune(run, eval_=False, samples=False)
    files = build_report(run)  # default: run / "report"
    assert files["md"] == run / "report" / "report.md"
    md = files["md"].read_text(encoding="utf-8")
    for line in ("No ablation in this run (no ablation/ablation.csv)",
                 "No drift statistics in this run (no stats/comparisons.csv)",
                 "No overlap analysis in this run (no overlap/overlap.csv)",
                 "finetune/eval/before/summary.json"):
        assert line in md
    results = json.loads(files["json"].read_text(encoding="utf-8"))
    assert results["drift"]["over_training"]["source"] == "finetune/drift/drift.parquet"
    assert "entry-weighted mean" in md
    assert "figure:ablation" not in files and "figure:drift_over_training" in files
    check_numbers_shown(run / "report")
    check_html_self_contained(files["html"])
    assert "No drift statistics" in files["txt"].read_text(encoding="utf-8")
    # the report's own folder is not read as a stage of the run
    assert all(s["folder"] != "report" for s in results["run"]["stages"])


def test_only_finetune_without_drift(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_finetune(run, drift=False)
    files = build_report(run, tmp_path / "out")
    md = files["md"].read_text(encoding="utf-8")
    assert "No drift tracking in this run (no finetune/drift/)" in md
    assert "No weight groups in this run (no groups/manifest.json)" in md
    check_numbers_shown(tmp_path / "out")


@pytest.mark.parametrize("kind", ["empty", "absent"])
def test_empty_run_directory(tmp_path, kind):
    run = tmp_path / "run"
    if kind == "empty":
        run.mkdir()
    files = build_report(run, tmp_path / "out")
    for key in ("md", "html", "txt", "json"):
        assert files[key].is_file()
    md = files["md"].read_text(encoding="utf-8")
    assert "No stage manifests in this run directory" in md
    assert "No fine-tuning in this run (no finetune/manifest.json)" in md
    check_html_self_contained(files["html"])
    check_numbers_shown(tmp_path / "out")
    assert files["findings"].read_text(encoding="utf-8") == ""  # nothing found, nothing claimed


def test_findings_of_a_partial_run_name_only_what_it_has(tmp_path):
    """A run with a fine-tuning but no ablation, overlap or stats: one fine-tuning line with its numbers from
    results.json, no line for the parts it lacks."""
    run = tmp_path / "run"
    run.mkdir()
    write_groups(run)
    write_finetune(run)
    files = build_report(run)
    lines = files["findings"].read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and lines[0].startswith("- Fine-tuning (") and "refusal" in lines[0]
    ev = {m["metric"]: m for m in json.loads(files["json"].read_text())["finetune"]["evaluation"]}
    assert f"refusal {ev['refusal']['before_value']:.2f} -> {ev['refusal']['after_value']:.2f}" in lines[0]


def test_broken_file_is_a_missing_line(tmp_path):
    run = full_run(tmp_path)
    (run / "ablation" / "ablation.csv").write_text("not,a\ncsv of the ablation", encoding="utf-8")
    (run / "finetune" / "drift" / "samples.safetensors").write_bytes(b"garbage")
    files = build_report(run, tmp_path / "out")
    md = files["md"].read_text(encoding="utf-8")
    assert "ablation/ablation.csv lacks the column(s) group, fraction_removed" in md
    assert "Could not read finetune/drift/samples.safetensors" in md
    results = json.loads(files["json"].read_text(encoding="utf-8"))
    assert results["drift"]["over_training"]["source"] == "finetune/drift/drift.parquet"  # the fallback
    assert results["drift"]["final"]["by_group"]  # the rest of the drift section is still there
    check_numbers_shown(tmp_path / "out")


VARIANTS_CONFIG = ('model = "tiny-test-model"\nseed = 0\ndtype = "float32"\n\n[finetune]\ndata = "reference"\n\n'
                   '[finetune.variants.frozen]\nfreeze = "set_difference"\n\n[finetune.variants.free]\n')


def variants_run(tmp_path: Path) -> Path:
    """Two fine-tunings: ``frozen`` (set difference frozen, no drift) and ``free`` (drift); stats of free,
    overlap re-scored frozen."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(VARIANTS_CONFIG, encoding="utf-8")
    write_groups(run)
    write_finetune(run, name="frozen", drift=False, after_refusal=0.85, loss_slope=0.05)
    write_finetune(run, name="free", freeze=None)
    write_stats(run, finetune="finetune/free")
    write_overlap(run, finetune="finetune/frozen", layers=False)
    return run


def test_several_finetunes(tmp_path):
    run = variants_run(tmp_path)
    out = tmp_path / "report"
    files = build_report(run, out)
    md = files["md"].read_text(encoding="utf-8")
    results = json.loads(files["json"].read_text(encoding="utf-8"))
    assert results["missing"] == ["No ablation in this run (no ablation/ablation.csv)"]
    check_numbers_shown(out)
    imgs = check_html_self_contained(files["html"])
    figs = {k.split(":", 1)[1] for k in files if k.startswith("figure:")}
    assert figs == {"loss", "before_after_frozen", "before_after_free", "drift_over_training", "final_drift", "overlap"}
    assert len(imgs) == len(figs)
    captions = re.findall(r"^\*(.+)\*$", md, re.M)
    assert captions and all("tiny-test-model" in c and "seed 0" in c and "; data: " in c and "; n: " in c for c in captions)
    # both fine-tunings, in the config's order, each with its own subsection; the comparison table first
    ft = results["finetune"]
    assert list(ft["runs"]) == ["frozen", "free"] and [c["name"] for c in ft["comparison"]] == ["frozen", "free"]
    assert ft["runs"]["free"]["folder"] == "finetune/free" and ft["runs"]["frozen"]["settings"]["freeze"] == "set_difference"
    comp = {c["name"]: c for c in ft["comparison"]}
    assert comp["frozen"]["freeze"] == "set_difference" and comp["frozen"]["freeze_mode"] == "weights"
    assert comp["free"]["freeze"] is None and comp["free"]["steps"] == 20
    assert set(comp["free"]["metrics"]) == {"refusal", "asr", "degenerate", "perplexity", "accuracy_mean"}
    assert comp["frozen"]["metrics"]["refusal"]["after_value"] == 0.85
    assert comp["free"]["metrics"]["refusal"]["after_value"] == 0.35
    assert comp["free"]["metrics"]["refusal"]["after_ci95_low"] is not None
    assert md.index("Fine-tunings compared") < md.index("### 4.1 Fine-tuning `frozen` (finetune/frozen/)") \
        < md.index("### 4.2 Fine-tuning `free` (finetune/free/)")
    assert "set_difference (weights)" in md and "Settings (finetune/free/manifest.json)" in md
    # drift and statistics of free (stats' manifest), overlap of frozen (overlap's manifest)
    assert results["drift"]["finetune"] == "free" and results["drift"]["folder"] == "finetune/free"
    assert results["drift"]["over_training"]["source"] == "finetune/free/drift/samples.safetensors"
    assert "Drift of the fine-tuning `free` (finetune/free/): the fine-tuning the stats stage analysed" in md
    assert "Not shown: the fine-tuning `frozen` (finetune/frozen/), which has no drift/ folder." in md
    assert results["statistics"]["finetune"] == "free" and "Statistics of the fine-tuning `free`" in md
    assert results["overlap"]["finetune"] == "finetune/frozen" and results["overlap"]["finetune_name"] == "frozen"
    assert "re-scored the merged model of the fine-tuning `frozen` (finetune/frozen/)" in md
    # the stage table lists both fine-tunings
    assert {s["folder"] for s in results["run"]["stages"]} >= {"finetune/frozen", "finetune/free"}
    txt = files["txt"].read_text(encoding="utf-8")
    assert "Fine-tuning frozen (finetune/frozen)" in txt and "Fine-tuning free (finetune/free):" in txt
    assert "VERDICT: H2" in txt


def test_several_finetunes_without_stats(tmp_path):
    """No stats stage: every fine-tuning with drift gets its own drift subsection; an unfinished variant is named;
    a re-rendering removes the figures of the earlier one that no longer apply."""
    run = tmp_path / "run"
    run.mkdir()
    write_finetune(run, name="b", drift=True, samples=False, final=False, eval_=False)
    write_finetune(run, name="a", drift=True, final=False, eval_=False)
    (run / "finetune" / "c.partial").mkdir()
    out = tmp_path / "out"
    (out).mkdir()
    (out / "before_after_old.png").write_bytes(b"stale")
    files = build_report(run, out)
    results = json.loads(files["json"].read_text(encoding="utf-8"))
    assert list(results["finetune"]["runs"]) == ["a", "b"]  # no config: creation time, then name
    assert "Unfinished fine-tuning(s) (no manifest yet): finetune/c.partial" in results["missing"]
    d = results["drift"]
    assert list(d["runs"]) == ["a", "b"] and d["chosen_by"] == "every fine-tuning with a drift/ folder"
    assert d["runs"]["b"]["over_training"]["source"] == "finetune/b/drift/drift.parquet"
    assert d["runs"]["a"]["over_training"]["source"] == "finetune/a/drift/samples.safetensors"
    assert "No final drift per entry (no finetune/a/drift/final/<group>.safetensors)" in d["runs"]["a"]["missing"]
    figs = {k.split(":", 1)[1] for k in files if k.startswith("figure:")}
    assert figs == {"loss", "drift_over_training_a", "drift_over_training_b"}
    assert not (out / "before_after_old.png").exists()
    md = files["md"].read_text(encoding="utf-8")
    assert "### 5.1 Drift of the fine-tuning `a` (finetune/a/)" in md and "### 5.2 Drift of the fine-tuning `b`" in md
    check_numbers_shown(out)
    check_html_self_contained(files["html"])


def test_fmt():
    assert fmt(1061550) == "1,061,550"
    assert fmt(0.58333) == "0.5833" and fmt(29.5081) == "29.51" and fmt(1.0) == "1" and fmt(0.0) == "0"
    assert fmt(14269716.6553) == "1.43e+07" and fmt(2.047e-4) == "0.000205" and fmt(6.9e-6) == "6.9e-06"
    assert fmt(-0.3171) == "-0.3171" and fmt(None) == "—" and fmt(float("nan")) == "—"
    assert number_tokens("| 1,061,550 | [0.58, -0.83] | 1.43e+07 |") >= {"1,061,550", "0.58", "-0.83", "1.43e+07"}
