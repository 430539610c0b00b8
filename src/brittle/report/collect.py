"""Read a run directory into plain results (what the report shows) and the tables its figures draw.

Only what exists is read; a missing part becomes a line in ``missing`` (and in its section's ``missing``), never
an error. A part that exists but cannot be read becomes such a line too, naming the error.

Inputs (relative to the run directory; every stage folder holds a ``manifest.json``):

* ``*/manifest.json``, ``scores/*/manifest.json``, ``config.toml`` -- model, seed, stages;
* ``groups/summary.csv`` (``level, module, layer, type, numel, <group>, <group>_share, ..., intersection, union,
  jaccard``) and ``groups/manifest.json`` (config ``top, p, q, scope, seed, bins, magnitude``; outputs
  ``<group>: {count, fraction}``);
* ``ablation/ablation.csv`` (``group, sparsity, p, q, fraction_removed, asr_wei, asr, asr_ci95_low,
  asr_ci95_high, degenerate, refusal, over_refusal, degenerate_benign, perplexity, accuracy_mean, n_harmful``,
  optionally ``degenerate_empty, degenerate_lone_opening, degenerate_looping, degenerate_gibberish,
  degenerate_other``) and ``ablation/manifest.json`` (``config.eval``: the evaluation's sizes);
* per fine-tuning (folder ``F`` below, see "Several fine-tunings"): ``F/manifest.json``, ``F/loss.csv``
  (``step, loss, lr``), ``F/eval/{before,after}/summary.json``;
* ``F/drift/drift.parquet`` (one row per step, group, module), ``F/drift/samples.safetensors``
  (per group a float32 ``[n_records, n_sample]`` tensor of |Delta| of a fixed seeded subsample, ``steps``
  int64 ``[n_records]``; metadata ``n_sample``, ``seed``), ``F/drift/final/<group>.safetensors``
  (``<module>.delta``, ``<module>.w0``, ``<module>.index``);
* ``stats/comparisons.csv`` (``group, control, metric, type, n_group, n_control, median_group, median_control,
  median_diff, mean_diff, cliffs_delta, cohens_d, p_value, <effect>_ci_low, <effect>_ci_high, p_adjusted``),
  ``stats/verdict.json`` (``verdict, reason, rule, primary``) and ``stats/manifest.json`` (``outputs.finetune``:
  the fine-tuning folder it analysed); without a stats stage, ``F/drift/comparisons.csv`` of the (first)
  fine-tuning with drift, if there is one;
* ``overlap/overlap.csv`` (``comparison`` = ``noise_floor`` | ``finetuned``, ``group, unit, size_a, size_b,
  intersection, share_a, share_b, jaccard, chance_jaccard, enrichment, p_value``; ``unit`` = ``all``, ``*.<type>``,
  ``layers.<i>`` or a module name), ``overlap/summary.json`` and ``overlap/manifest.json`` (``outputs.finetune``:
  the fine-tuning folder whose merged model the ``finetuned`` comparison re-scored; absent without one).

Several fine-tunings
--------------------
A run holds its fine-tunings (:func:`finetunes`) either as one folder ``finetune/`` (``finetune/manifest.json``;
name ``""``) or, with ``finetune.variants``, as ``finetune/<name>/`` (``finetune/<name>/manifest.json`` with stage
``finetune``; ``finetune/`` itself has no manifest), in the config's variant order (``config.toml``), else by
creation time and name. ``results.json`` then holds:

* ``finetune`` -- with at most one fine-tuning, today's dict (``settings``, ``train``, ``loss``, ``evaluation``,
  ``notes``, ``missing``), plus ``name`` and ``folder`` when the fine-tuning is a named variant. With several::

      {"runs": {<name>: <that dict, with "name" and "folder">, ...},   # in the order above
       "comparison": [{"name", "folder", "data", "n_examples", "full", "r", "freeze", "freeze_mode", "steps",
                       "metrics": {<metric>: {"before_value", "before_ci95_low", "before_ci95_high",
                                              "after_value", "after_ci95_low", "after_ci95_high", "change"}}}, ...],
       "missing": [...]}   # only when there are run-level lines (unfinished variants: finetune/<name>.partial)

  ``<metric>`` in :data:`COMPARE_METRICS` (refusal, asr, degenerate, perplexity, accuracy_mean), intervals the
  same 95 % Wilson intervals as the before / after table.
* ``drift`` -- the drift of the fine-tuning(s) :func:`drift_finetunes` picks: the one the stats stage analysed
  (``stats/manifest.json`` ``outputs.finetune``), else every fine-tuning with a ``drift/`` folder. One: today's
  dict, plus ``finetune`` (name), ``folder``, ``chosen_by`` and ``not_shown`` (the other fine-tunings:
  ``finetune, folder, has_drift``) when the fine-tuning is named. Several:
  ``{"runs": {<name>: <that dict>}, "chosen_by": ..., "missing": [...]}``.
* ``statistics`` -- as before, plus ``finetune`` and ``folder`` (which fine-tuning) when it is a named variant.
* ``overlap`` -- as before, plus ``finetune`` (the folder, from ``overlap/manifest.json``) and ``finetune_name``
  when the overlap stage recorded it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GROUP_ORDER = ("top_safety", "set_difference", "top_utility", "random", "random_magnitude")
DEGENERATE_KINDS = ("degenerate_empty", "degenerate_lone_opening", "degenerate_looping", "degenerate_gibberish",
                    "degenerate_other")
FINAL_SAMPLE = 20000  # entries per group and module type in the final-drift figure
REL_THRESHOLD = 1e-6  # |w0| below this: no relative change (as brittle.drift / brittle.analysis.stats)


@dataclass
class RunData:
    """``results``: the JSON-able numbers and texts the report shows, by section; ``tables``: DataFrames and arrays
    the figures draw (not written to ``results.json``)."""

    run_dir: Path
    results: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)

    def missing(self, section: str, line: str) -> None:
        self.results.setdefault(section, {}).setdefault("missing", []).append(line)
        self.results.setdefault("missing", []).append(line)


def group_sort_key(name: str) -> tuple[int, str]:
    return (GROUP_ORDER.index(name) if name in GROUP_ORDER else len(GROUP_ORDER), str(name))


def _lacks(run: RunData, section: str, df, cols: tuple[str, ...], name: str) -> bool:
    """True (and a missing line) when table ``name`` lacks one of ``cols``."""
    absent = [c for c in cols if c not in df.columns]
    if absent:
        run.missing(section, f"{name} lacks the column(s) {', '.join(absent)}; left out")
    return bool(absent)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _rel(run: RunData, path: Path) -> str:
    try:
        return str(path.relative_to(run.run_dir))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------------
# Run: manifests, model, seed


def read_manifests(run_dir: Path) -> dict[str, dict]:
    """``{folder relative to run_dir: manifest}`` for every ``*/manifest.json`` and ``*/*/manifest.json`` (score
    folders), skipping unfinished ``*.partial`` folders, the report's own folder and unreadable files."""
    out: dict[str, dict] = {}
    for pattern in ("*/manifest.json", "*/*/manifest.json"):
        for p in sorted(run_dir.glob(pattern)):
            folder = p.parent.relative_to(run_dir).as_posix()
            if any(part.endswith(".partial") for part in folder.split("/")) or folder.split("/")[0] in ("report", "checkpoints"):
                continue
            try:
                m = _read_json(p)
            except (OSError, ValueError):
                continue
            if isinstance(m, dict) and m.get("stage") != "report":
                out[folder] = m
    return out


@dataclass
class FineTuning:
    """One fine-tuning of the run: ``name`` (``""`` without variants), ``folder`` relative to the run directory
    (``finetune`` or ``finetune/<name>``) and its manifest."""

    name: str
    folder: str
    manifest: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How the report names it: the variant name, or ``finetune`` for the single unnamed one."""
        return self.name or "finetune"


def finetunes(run: RunData) -> list[FineTuning]:
    """The run's fine-tunings (see "Several fine-tunings" above), found once and kept in ``run.tables``."""
    if "finetunes" in run.tables:
        return run.tables["finetunes"]
    manifests = run.tables.get("manifests", {})
    found: list[FineTuning] = []
    if "finetune" in manifests:
        found.append(FineTuning("", "finetune", manifests["finetune"]))
    named = [FineTuning(folder.split("/", 1)[1], folder, m) for folder, m in manifests.items()
             if folder.startswith("finetune/") and folder.count("/") == 1 and m.get("stage") == "finetune"]
    variants = ((run.tables.get("config") or {}).get("finetune") or {}).get("variants") or {}
    order = list(variants) if isinstance(variants, dict) else []
    named.sort(key=lambda ft: (order.index(ft.name) if ft.name in order else len(order),
                               str(ft.manifest.get("created") or ""), ft.name))
    run.tables["finetunes"] = found + named
    return run.tables["finetunes"]


def finetune_by_folder(run: RunData, folder: Any) -> FineTuning | None:
    """The fine-tuning whose folder (relative to the run directory) is ``folder``, if the run holds it."""
    want = str(folder or "").strip().rstrip("/")
    return next((ft for ft in finetunes(run) if ft.folder == want), None)


def _argv_option(argv: list, name: str) -> str | None:
    for i, a in enumerate(argv or []):
        if a == name and i + 1 < len(argv):
            return str(argv[i + 1])
        if isinstance(a, str) and a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def collect_run(run: RunData) -> None:
    run_dir = run.run_dir
    manifests = read_manifests(run_dir)
    run.tables["manifests"] = manifests
    config: dict[str, Any] = {}
    cfg_path = run_dir / "config.toml"
    if cfg_path.is_file():
        try:
            import tomllib

            config = tomllib.loads(cfg_path.read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001 - a broken config.toml only loses its facts
            config = {}
    run.tables["config"] = config
    model, source = None, None
    if config.get("model"):
        model, source = str(config["model"]), "config.toml"
    if model is None:
        evals = [f"{ft.folder}/eval/before/summary.json" for ft in finetunes(run)] or ["finetune/eval/before/summary.json"]
        for rel in (*evals, "eval/summary.json", "ablation/eval/dense/summary.json"):
            p = run_dir / rel
            if p.is_file():
                try:
                    model, source = str(_read_json(p)["model"]), rel
                    break
                except Exception:  # noqa: BLE001
                    continue
    if model is None:
        for folder, m in manifests.items():
            v = _argv_option(m.get("argv", []), "--model")
            if v:
                model, source = v, f"{folder}/manifest.json (command line)"
                break
    weights = next((m.get("inputs", {}).get("model_weights") for m in manifests.values()
                    if isinstance(m.get("inputs"), dict) and m["inputs"].get("model_weights")), None)
    seed = config.get("seed")
    if seed is None:
        seed = next((m.get("config", {}).get("seed") for m in manifests.values()
                     if isinstance(m.get("config"), dict) and m["config"].get("seed") is not None), None)
    stages = [{"folder": f, "stage": m.get("stage", f), "created": m.get("created"), "seconds": m.get("seconds"),
               "git_commit": (m.get("git_commit") or "")[:12] or None} for f, m in manifests.items()]
    stages.sort(key=lambda s: (s["created"] or "", s["folder"]))
    r = {"run_dir": str(run_dir), "model": model, "model_source": source,
         "weights": weights[:12] if isinstance(weights, str) else None, "seed": seed,
         "dtype": config.get("dtype"), "stages": stages}
    run.results.setdefault("run", {}).update(r)
    if not manifests:
        run.missing("run", "No stage manifests in this run directory (no */manifest.json)")


# --------------------------------------------------------------------------------------------------
# Groups


def _group_definitions(cfg: dict) -> dict[str, Any]:
    keys = ("top", "p", "q", "scope", "seed", "bins", "magnitude")
    return {k: cfg.get(k) for k in keys if k in cfg}


def _tracked_groups_manifest(run: RunData) -> tuple[dict | None, str | None]:
    """The groups stage a fine-tuning run tracked, when it lives in another run directory (``track`` entries
    that are folders with a groups manifest, resolved from the working directory or the run directory)."""
    tracks = [t for ft in finetunes(run) for t in (ft.manifest.get("config", {}) or {}).get("track") or []]
    for t in dict.fromkeys(str(t) for t in tracks):
        t = str(t)
        for base in (Path.cwd(), run.run_dir, run.run_dir.parent, run.run_dir.parent.parent):
            p = (base / t) if not Path(t).is_absolute() else Path(t)
            if p.is_file() and p.suffix == ".safetensors":
                p = p.parent
            m = p / "manifest.json"
            if m.is_file():
                try:
                    d = _read_json(m)
                except (OSError, ValueError):
                    continue
                if d.get("stage") == "groups":
                    return d, str(m)
    return None, None


def collect_groups(run: RunData) -> None:
    import pandas as pd

    g: dict[str, Any] = {}
    run.results["groups"] = g
    man = run.tables["manifests"].get("groups")
    if man is None:
        other, where = _tracked_groups_manifest(run)
        if other is not None:
            g["definitions"] = _group_definitions(other.get("config", {}))
            g["definitions_source"] = where
            g["counts"] = [{"group": k, "count": v.get("count"), "fraction": v.get("fraction")}
                           for k, v in sorted(other.get("outputs", {}).items(), key=lambda kv: group_sort_key(kv[0]))
                           if isinstance(v, dict) and "count" in v]
        run.missing("groups", "No weight groups in this run (no groups/manifest.json)"
                    + (f"; group definitions from the tracked groups' stage {where}" if where else ""))
        return
    g["definitions"] = _group_definitions(man.get("config", {}))
    g["definitions_source"] = "groups/manifest.json"
    g["counts"] = [{"group": k, "count": v.get("count"), "fraction": v.get("fraction")}
                   for k, v in sorted(man.get("outputs", {}).items(), key=lambda kv: group_sort_key(kv[0]))
                   if isinstance(v, dict) and "count" in v]
    scoring = []
    for folder, m in sorted(run.tables["manifests"].items()):
        if folder.startswith("scores/"):
            c, o = m.get("config", {}), m.get("outputs", {})
            scoring.append({"folder": folder, "set": c.get("set"), "method": c.get("method"), "nsamples": c.get("nsamples"),
                            "n_examples": o.get("n_examples"), "n_response_tokens": o.get("n_response_tokens"),
                            "max_length": c.get("max_length")})
    data_man = run.tables["manifests"].get("data")
    if data_man:
        for s in scoring:
            o = data_man.get("outputs", {}).get(s["set"])
            if isinstance(o, dict) and "n" in o:
                s["set_size"] = o["n"]
    g["scoring"] = scoring
    path = run.run_dir / "groups" / "summary.csv"
    if not path.is_file():
        run.missing("groups", "No group summary table (no groups/summary.csv)")
        return
    df = pd.read_csv(path)
    if _lacks(run, "groups", df, ("level", "module", "numel"), "groups/summary.csv"):
        return
    groups = [c[: -len("_share")] for c in df.columns if c.endswith("_share") and c[: -len("_share")] in df.columns]
    g["groups"] = groups
    cols = ["module", "numel"] + [x for grp in groups for x in (grp, f"{grp}_share")]
    cols += [c for c in ("intersection", "union", "jaccard") if c in df.columns]
    for level, key in (("total", "total"), ("type", "by_type")):
        sub = df[df["level"] == level]
        g[key] = [{c: r[c] for c in cols if c in sub.columns} for _, r in sub.iterrows()]
    run.tables["groups_summary"] = df


# --------------------------------------------------------------------------------------------------
# Ablation


def _wilson(share: Any, n: Any) -> tuple[float | None, float | None]:
    from ..evaluation.stats import wilson_interval

    try:
        share, n = float(share), int(n)
    except (TypeError, ValueError):
        return None, None
    if not n or share != share:
        return None, None
    k = min(n, max(0, round(share * n)))
    lo, hi = wilson_interval(k, n)
    return round(lo, 4), round(hi, 4)  # as brittle.evaluation.stats.rate


def collect_ablation(run: RunData) -> None:
    import pandas as pd

    a: dict[str, Any] = {}
    run.results["ablation"] = a
    path = run.run_dir / "ablation" / "ablation.csv"
    if not path.is_file():
        run.missing("ablation", "No ablation in this run (no ablation/ablation.csv)")
        return
    man = run.tables["manifests"].get("ablation") or {}
    cfg = man.get("config", {}) or {}
    ev = cfg.get("eval", {}) or {}
    settings = {k: ev.get(k) for k in ("judge", "n_harmful", "n_benign", "max_new_tokens", "perplexity_data",
                                       "n_perplexity", "tasks", "limit", "seed") if k in ev}
    if "kinds" in cfg:
        settings["kinds"] = cfg["kinds"]
    if not man:
        run.missing("ablation", "No ablation manifest (no ablation/manifest.json): evaluation sizes unknown")
    a["settings"] = settings
    df = pd.read_csv(path)
    if _lacks(run, "ablation", df, ("group", "fraction_removed"), "ablation/ablation.csv"):
        return
    n_benign = ev.get("n_benign")
    if "n_harmful" in df.columns:
        nh = df["n_harmful"]
    else:
        nh = pd.Series([ev.get("n_harmful")] * len(df))
    lows: dict[str, list] = {}
    for col, ns in (("refusal", nh), ("degenerate", nh), ("over_refusal", [n_benign] * len(df)),
                    ("degenerate_benign", [n_benign] * len(df))):
        if col not in df.columns:
            continue
        ci = [_wilson(s, n) for s, n in zip(df[col], ns, strict=True)]
        lows[col] = ci
        df[f"{col}_ci95_low"] = [c[0] for c in ci]
        df[f"{col}_ci95_high"] = [c[1] for c in ci]
    a["degenerate_kinds"] = [c for c in DEGENERATE_KINDS if c in df.columns]
    a["rows"] = [{k: (None if (isinstance(v, float) and v != v) else v) for k, v in r.items()}
                 for r in df.to_dict(orient="records")]
    run.tables["ablation"] = df


# --------------------------------------------------------------------------------------------------
# Fine-tuning


EVAL_METRICS = (  # key of headline(), label, interval source, n source
    ("refusal", "refusal, held-out harmful"),
    ("asr", "ASR (default judge)"),
    ("asr_wei", "ASR (keyword-wei, the paper's judge)"),
    ("degenerate", "degenerate share, harmful answers"),
    ("over_refusal", "over-refusal, benign instructions"),
    ("degenerate_benign", "degenerate share, benign answers"),
    ("perplexity", "perplexity, benign reference answers"),
    ("accuracy_mean", "mean zero-shot accuracy"),
)


def _eval_metrics(head: dict) -> list[tuple[str, str]]:
    """:data:`EVAL_METRICS`, with the degenerate share split by reason (``degenerate_<reason>`` of
    :func:`brittle.evaluation.report.headline`) after the degenerate share when the summary has reasons."""
    out = []
    for key, label in EVAL_METRICS:
        out.append((key, label))
        if key == "degenerate":
            out += [(k, f"degenerate share, harmful answers: {k[len('degenerate_'):].replace('_', ' ')}")
                    for k in head if k.startswith("degenerate_") and k != "degenerate_benign" and head[k] is not None]
    return out


def _eval_side(summary: dict | None, head: dict) -> dict[str, dict[str, Any]]:
    """Per metric ``{value, ci95_low, ci95_high, n}`` of one side (before / after)."""
    out: dict[str, dict[str, Any]] = {}
    s = summary or {}
    npr = s.get("n_prompts", {}) or {}
    iv = s.get("intervals", {}) or {}
    n_h = head.get("n_harmful") or npr.get("harmful")
    n_b = npr.get("benign") or ((s.get("config") or {}).get("n_benign") if s else None)
    for key, _label in _eval_metrics(head):
        v = head.get(key)
        lo = hi = n = None
        if key == "asr":
            lo, hi, n = head.get("asr_ci95_low"), head.get("asr_ci95_high"), n_h
        elif key in ("asr_wei", "degenerate") or key.startswith("degenerate_") and key != "degenerate_benign":
            n = n_h
            lo, hi = _wilson(v, n)
        elif key == "refusal":
            n = n_h
            r = iv.get("refusal_harmful")
            lo, hi = (r["ci95"][0], r["ci95"][1]) if r else _wilson(v, n)
        elif key == "over_refusal":
            r = iv.get("over_refusal")
            n = (r or {}).get("n") or n_b
            lo, hi = (r["ci95"][0], r["ci95"][1]) if r else _wilson(v, n)
        elif key == "degenerate_benign":
            n = n_b
            lo, hi = _wilson(v, n)
        elif key == "perplexity":
            n = (s.get("perplexity_detail") or {}).get("n")
        elif key == "accuracy_mean":
            det = s.get("accuracy_detail") or {}
            ns = [d.get("n") for d in det.values() if isinstance(d, dict) and d.get("n")]
            n = sum(ns) if ns else None
        out[key] = {"value": v, "ci95_low": lo, "ci95_high": hi, "n": n, "label": _label}
    return out


def _miss(run: RunData, d: dict, line: str) -> None:
    """A missing line in the part ``d`` (one fine-tuning's dict) and in the run's ``missing``."""
    d.setdefault("missing", []).append(line)
    run.results.setdefault("missing", []).append(line)


def _ft_tables(run: RunData, ft: FineTuning) -> dict[str, Any]:
    """The tables (loss, evaluation, drift, ...) of one fine-tuning, by its name."""
    return run.tables.setdefault("ft", {}).setdefault(ft.name, {})


def _unfinished_finetunes(run: RunData) -> list[str]:
    fdir = run.run_dir / "finetune"
    return sorted(_rel(run, p) for p in fdir.glob("*.partial") if p.is_dir()) if fdir.is_dir() else []


def collect_finetune(run: RunData) -> None:
    fts = finetunes(run)
    partial = _unfinished_finetunes(run)
    if len(fts) <= 1:
        f: dict[str, Any] = {}
        run.results["finetune"] = f
        if not fts:
            run.missing("finetune", "No fine-tuning in this run (no finetune/manifest.json)")
            if partial:
                run.missing("finetune", "Unfinished fine-tuning(s) (no manifest yet): " + ", ".join(partial))
            fdir = run.run_dir / "finetune"
            if not fdir.is_dir() or (partial and not any((fdir / x).exists() for x in ("loss.csv", "eval", "drift"))):
                return
            ft = FineTuning("", "finetune", {})  # a finetune/ folder without its manifest: read what it has
        else:
            ft = fts[0]
            if ft.name:
                f.update({"name": ft.name, "folder": ft.folder})
            if partial:
                run.missing("finetune", "Unfinished fine-tuning(s) (no manifest yet): " + ", ".join(partial))
        _collect_one_finetune(run, ft, f)
        return
    runs: dict[str, Any] = {}
    top: dict[str, Any] = {"runs": runs, "comparison": []}
    run.results["finetune"] = top
    if partial:
        run.missing("finetune", "Unfinished fine-tuning(s) (no manifest yet): " + ", ".join(partial))
    for ft in fts:
        f = {"name": ft.name, "folder": ft.folder}
        runs[ft.label] = f
        try:
            _collect_one_finetune(run, ft, f)
        except Exception as e:  # noqa: BLE001 - one broken fine-tuning must not hide the others
            _miss(run, f, f"Could not read the fine-tuning {ft.folder}: {type(e).__name__}: {e}")
    top["comparison"] = [_comparison_row(ft, runs[ft.label]) for ft in fts]


COMPARE_METRICS = ("refusal", "asr", "degenerate", "perplexity", "accuracy_mean")
_COMPARE_KEYS = ("before_value", "before_ci95_low", "before_ci95_high", "after_value", "after_ci95_low",
                 "after_ci95_high", "change")


def _comparison_row(ft: FineTuning, f: dict) -> dict[str, Any]:
    """One fine-tuning's line of the comparison table (several fine-tunings)."""
    st = f.get("settings") or {}
    steps = (f.get("train") or {}).get("steps")
    if steps is None:
        steps = (f.get("loss") or {}).get("steps", st.get("max_steps"))
    ev = {r["metric"]: r for r in f.get("evaluation") or []}
    return {"name": ft.label, "folder": ft.folder, "data": st.get("data"), "n_examples": st.get("n_examples"),
            "full": st.get("full"), "r": None if st.get("full") else st.get("r"), "freeze": st.get("freeze"),
            "freeze_mode": st.get("freeze_mode"), "steps": steps,
            "metrics": {m: {k: ev[m].get(k) for k in _COMPARE_KEYS} for m in COMPARE_METRICS if m in ev}}


def _collect_one_finetune(run: RunData, ft: FineTuning, f: dict[str, Any]) -> None:
    """Settings, training, loss and before / after evaluation of one fine-tuning into ``f``."""
    import pandas as pd

    fdir = run.run_dir / ft.folder
    fo = ft.folder
    tables = _ft_tables(run, ft)
    man = ft.manifest
    cfg = man.get("config", {}) or {}
    tr = cfg.get("train", {}) or {}
    out = man.get("outputs", {}) or {}
    settings: dict[str, Any] = {"data": cfg.get("data"), "n_examples": (out.get("data") or {}).get("n"),
                                "full": cfg.get("full"), "freeze": cfg.get("freeze"),
                                "freeze_mode": cfg.get("freeze_mode") if cfg.get("freeze") else None}
    for k in ("r", "alpha", "dropout", "targets", "lr", "schedule", "warmup_steps", "batch_size",
              "grad_accumulation", "epochs", "max_steps", "max_length", "seed"):
        if k in tr:
            settings[k] = tr[k]
    settings["drift_every"] = cfg.get("drift_every")
    settings["track"] = cfg.get("track")
    f["settings"] = {k: v for k, v in settings.items() if k in ("freeze", "freeze_mode", "track") or v is not None}
    if out.get("train"):
        f["train"] = {k: out["train"].get(k) for k in ("steps", "seconds", "first_loss", "final_loss")}
    loss_path = fdir / "loss.csv"
    if loss_path.is_file():
        loss = pd.read_csv(loss_path)
        if len(loss):
            tail = loss["loss"].tail(10)
            f["loss"] = {"steps": int(loss["step"].max()), "first": float(loss["loss"].iloc[0]),
                         "last": float(loss["loss"].iloc[-1]), "min": float(loss["loss"].min()),
                         "mean_last_10": float(tail.mean())}
            tables["loss"] = loss
    else:
        _miss(run, f, f"No loss curve (no {fo}/loss.csv)")
    sides: dict[str, dict] = {}
    for side in ("before", "after"):
        p = fdir / "eval" / side / "summary.json"
        if p.is_file():
            from ..evaluation.report import headline

            s = _read_json(p)
            sides[side] = _eval_side(s, headline(s))
        elif isinstance(out.get("evaluation"), dict) and isinstance(out["evaluation"].get(side), dict):
            sides[side] = _eval_side(None, out["evaluation"][side])
            f.setdefault("notes", []).append(f"{side}: headline figures from {fo}/manifest.json "
                                             f"(no {fo}/eval/{side}/summary.json)")
    if sides:
        rows = []
        labels: dict[str, str] = {}
        for side in sides.values():
            labels.update({k: v.get("label", k) for k, v in side.items()})
        base = [k for k, _ in EVAL_METRICS]

        def rank(k: str) -> float:
            return base.index(k) if k in base else base.index("degenerate") + 0.5

        for key, label in sorted(labels.items(), key=lambda kv: rank(kv[0])):
            row: dict[str, Any] = {"metric": key, "label": label}
            for side in ("before", "after"):
                for k, v in (sides.get(side, {}).get(key) or {}).items():
                    if k != "label":
                        row[f"{side}_{k}"] = v
            b, a = row.get("before_value"), row.get("after_value")
            row["change"] = (a - b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
            if any(row.get(f"{s}_value") is not None for s in ("before", "after")):
                rows.append(row)
        f["evaluation"] = rows
        tables["evaluation"] = rows
    if len(sides) < 2:
        miss = [s for s in ("before", "after") if s not in sides]
        _miss(run, f, "No evaluation " + " / ".join(miss) + " fine-tuning (no "
              + ", ".join(f"{fo}/eval/{s}/summary.json" for s in miss) + ")")


# --------------------------------------------------------------------------------------------------
# Drift


def _load_safetensors_np(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="np") as fh:
        meta = fh.metadata() or {}
        for k in fh.keys():
            tensors[k] = fh.get_tensor(k)
    return tensors, meta


def _quartiles(x) -> tuple[float, float, float]:
    import numpy as np

    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    q = np.quantile(np.asarray(x, dtype=np.float64), [0.25, 0.5, 0.75])
    return float(q[1]), float(q[0]), float(q[2])


def _module_type(m: str) -> str:
    return m.split(".", 2)[2] if m.count(".") >= 2 else m


def _samples_over_training(path: Path, source: str = "finetune/drift/samples.safetensors") -> dict[str, Any]:
    """Median and quartiles of |Delta| per group and recorded step from ``samples.safetensors``
    (:func:`brittle.analysis.stats.drift_over_time`, as the stats stage's ``over_time.csv``)."""
    import torch

    from ..analysis.stats import drift_over_time

    t, meta = _load_safetensors_np(path)
    if "steps" not in t:
        raise ValueError("no 'steps' tensor")
    rows = drift_over_time({k: torch.as_tensor(v) for k, v in t.items()})
    rows.sort(key=lambda r: group_sort_key(r["group"]))  # stable: steps stay in order within a group
    n_sample, seed = meta.get("n_sample", ""), meta.get("seed", "")
    return {"source": source,
            "definition": "median and interquartile range of |Delta| over a fixed seeded subsample of each group's "
                          "entries in adapted modules",
            "n_sample": int(n_sample) if str(n_sample).isdigit() else None,
            "sample_seed": int(seed) if str(seed).lstrip("-").isdigit() else None,
            "rows": rows}


def drift_finetunes(run: RunData) -> tuple[list[FineTuning], str]:
    """The fine-tuning(s) whose drift the report shows, and why: the one the stats stage analysed
    (``stats/manifest.json`` ``outputs.finetune``), else every fine-tuning with a ``drift/`` folder (a
    ``finetune/drift/`` without a manifest counts as the unnamed one)."""
    stats = run.tables.get("manifests", {}).get("stats") or {}
    chosen = (stats.get("outputs") or {}).get("finetune")
    if chosen:
        ft = finetune_by_folder(run, chosen)
        if ft is not None:
            return [ft], "the fine-tuning the stats stage analysed (stats/manifest.json outputs.finetune)"
    fts = [ft for ft in finetunes(run) if (run.run_dir / ft.folder / "drift").is_dir()]
    if not finetunes(run) and (run.run_dir / "finetune" / "drift").is_dir():
        fts = [FineTuning("", "finetune", {})]
    return fts, ("every fine-tuning with a drift/ folder" if len(fts) > 1 else "the only fine-tuning with a drift/ folder")


def _ft_settings(run: RunData, ft: FineTuning) -> dict[str, Any]:
    f = run.results.get("finetune", {}) or {}
    if "runs" in f:
        f = f["runs"].get(ft.label, {})
    return f.get("settings", {}) or {}


def collect_drift(run: RunData) -> None:
    d: dict[str, Any] = {}
    run.results["drift"] = d
    stats = run.tables.get("manifests", {}).get("stats") or {}
    chosen = (stats.get("outputs") or {}).get("finetune")
    fts, why = drift_finetunes(run)
    if chosen and finetune_by_folder(run, chosen) is None:
        run.missing("drift", f"The stats stage analysed {chosen}, which this run does not hold (no "
                             f"{str(chosen).rstrip('/')}/manifest.json)" + ("; showing " + why if fts else ""))
    named = any(ft.name for ft in finetunes(run))
    if not fts:
        if not named:
            run.missing("drift", "No drift tracking in this run (no finetune/drift/)")
        else:
            run.missing("drift", "No drift tracking in this run (no drift/ in "
                        + ", ".join(f"{ft.folder}/" for ft in finetunes(run)) + ")")
        return
    if len(fts) == 1:
        ft = fts[0]
        if ft.name:
            d.update({"finetune": ft.name, "folder": ft.folder, "chosen_by": why})
            others = [o for o in finetunes(run) if o.folder != ft.folder]
            if others:
                d["not_shown"] = [{"finetune": o.label, "folder": o.folder,
                                   "has_drift": (run.run_dir / o.folder / "drift").is_dir()} for o in others]
        _collect_one_drift(run, ft, d)
        run.tables["drift_finetunes"] = [ft]
        return
    d["chosen_by"] = why
    d["runs"] = {}
    for ft in fts:
        one = {"finetune": ft.label, "folder": ft.folder}
        d["runs"][ft.label] = one
        try:
            _collect_one_drift(run, ft, one)
        except Exception as e:  # noqa: BLE001 - one broken drift folder must not hide the others
            _miss(run, one, f"Could not read the drift of {ft.folder}: {type(e).__name__}: {e}")
    run.tables["drift_finetunes"] = fts


def _collect_one_drift(run: RunData, ft: FineTuning, d: dict[str, Any]) -> None:
    import numpy as np
    import pandas as pd

    fo = ft.folder
    tables = _ft_tables(run, ft)
    ddir = run.run_dir / fo / "drift"
    if not ddir.is_dir():
        _miss(run, d, f"No drift tracking in this run (no {fo}/drift/)")
        return
    seed = _ft_settings(run, ft).get("seed")
    seed = 0 if seed is None else int(seed)
    table = None
    adapted: set[str] | None = None
    pq = ddir / "drift.parquet"
    if pq.is_file():
        table = pd.read_parquet(pq)
        tables["drift"] = table
        last = table[table["step"] == table["step"].max()]
        adapted = set(last.loc[last["adapted"].astype(bool), "module"]) if "adapted" in last.columns else None
        mods = table[["module", "adapted"]].drop_duplicates("module") if "adapted" in table.columns else None
        d["records"] = {"steps": [int(s) for s in sorted(table["step"].unique())],
                        "groups": sorted(table["group"].unique(), key=group_sort_key),
                        "modules": int(table["module"].nunique()),
                        "modules_adapted": int(mods["adapted"].astype(bool).sum()) if mods is not None else None}
    else:
        _miss(run, d, f"No drift log (no {fo}/drift/drift.parquet)")
    # drift over training
    sp = ddir / "samples.safetensors"
    if sp.is_file():
        try:
            d["over_training"] = _samples_over_training(sp, f"{fo}/drift/samples.safetensors")
        except Exception as e:  # noqa: BLE001
            _miss(run, d, f"Could not read {fo}/drift/samples.safetensors ({type(e).__name__}: {e}); "
                             "drift over training from drift.parquet instead")
    if not d.get("over_training") and table is not None:
        sub = table[table["adapted"].astype(bool)] if "adapted" in table.columns else table
        rows = []
        for (grp, step), s in sub.groupby(["group", "step"], sort=False):
            w = s["n"].astype(float)
            tot = float(w.sum())
            if tot <= 0:
                continue
            rows.append({"group": grp, "step": int(step), "median": float((w * s["abs_median"]).sum() / tot),
                         "q25": float((w * s["abs_q25"]).sum() / tot), "q75": float((w * s["abs_q75"]).sum() / tot),
                         "n": int(tot)})
        rows.sort(key=lambda r: (group_sort_key(r["group"]), r["step"]))
        d["over_training"] = {"source": f"{fo}/drift/drift.parquet",
                              "definition": "entry-weighted mean (weights: entries per module) of the per-module medians "
                                            "and quartiles of |Delta| over adapted modules -- not the median of the "
                                            f"group's entries (no readable {fo}/drift/samples.safetensors)",
                              "rows": rows}
    if d.get("over_training"):
        tables["over_training"] = pd.DataFrame(d["over_training"]["rows"])
    # final drift
    fdir = ddir / "final"
    files = sorted(fdir.glob("*.safetensors"), key=lambda p: group_sort_key(p.stem)) if fdir.is_dir() else []
    if not files:
        _miss(run, d, f"No final drift per entry (no {fo}/drift/final/<group>.safetensors)")
        return
    by_group, by_type, samples = [], [], {}
    step = None
    for p in files:
        try:
            t, meta = _load_safetensors_np(p)
        except Exception as e:  # noqa: BLE001
            _miss(run, d, f"Could not read {_rel(run, p)} ({type(e).__name__}: {e}); group left out")
            continue
        step = meta.get("step", step)
        mods = sorted({k.rsplit(".", 1)[0] for k in t if k.endswith(".delta")})
        if adapted is not None:
            mods = [m for m in mods if m in adapted]
        grp = p.stem
        per_type: dict[str, list] = {}
        per_type_w: dict[str, list] = {}
        for m in mods:
            per_type.setdefault(_module_type(m), []).append(np.abs(t[f"{m}.delta"].astype(np.float64)))
            per_type_w.setdefault(_module_type(m), []).append(np.abs(t[f"{m}.w0"].astype(np.float64))
                                                              if f"{m}.w0" in t else None)
        absd = {ty: np.concatenate(v) for ty, v in per_type.items()}
        relv = {}
        for ty, parts in per_type.items():
            ws = per_type_w[ty]
            if all(w is not None for w in ws):
                w = np.concatenate(ws)
                keep = w >= REL_THRESHOLD
                relv[ty] = absd[ty][keep] / w[keep]
        all_abs = np.concatenate(list(absd.values())) if absd else np.zeros(0)
        all_rel = np.concatenate(list(relv.values())) if relv else np.zeros(0)
        for metric, vals in (("abs", all_abs), ("rel", all_rel)):
            med, q25, q75 = _quartiles(vals)
            row = {"group": grp, "metric": metric, "n": int(len(vals)), "median": med,
                   "mean": float(vals.mean()) if len(vals) else None, "q25": q25, "q75": q75,
                   "share_zero": float((vals == 0).mean()) if len(vals) else None}
            if metric == "rel":
                row["n_excluded"] = int(len(all_abs) - len(all_rel))
            by_group.append(row)
        samples[grp] = {}
        for k, ty in enumerate(sorted(absd)):
            vals = absd[ty]
            med, q25, q75 = _quartiles(vals)
            by_type.append({"group": grp, "type": ty, "n": int(len(vals)), "median": med, "q25": q25, "q75": q75,
                            "share_zero": float((vals == 0).mean()) if len(vals) else None})
            rng = np.random.default_rng([seed, k, len(vals)])
            pick = vals if len(vals) <= FINAL_SAMPLE else vals[rng.permutation(len(vals))[:FINAL_SAMPLE]]
            samples[grp][ty] = pick
    d["final"] = {"source": f"{fo}/drift/final/<group>.safetensors", "step": int(step) if str(step).isdigit() else None,
                  "modules": "adapted modules only (from drift.parquet)" if adapted is not None else
                             "every module in the files (no drift.parquet to say which were adapted)",
                  "rel_threshold": REL_THRESHOLD, "by_group": by_group, "by_type": by_type,
                  "sample_per_type": FINAL_SAMPLE, "sample_seed": seed}
    tables["final_samples"] = samples


# --------------------------------------------------------------------------------------------------
# Statistics


def collect_statistics(run: RunData) -> None:
    import pandas as pd

    s: dict[str, Any] = {}
    run.results["statistics"] = s
    path = run.run_dir / "stats" / "comparisons.csv"
    stats_man = run.tables.get("manifests", {}).get("stats") or {}
    chosen = (stats_man.get("outputs") or {}).get("finetune")
    if path.is_file():
        ft = finetune_by_folder(run, chosen) if chosen else None
        if ft is not None and ft.name:
            s.update({"finetune": ft.name, "folder": ft.folder})
        elif chosen and ft is None:
            s.update({"folder": str(chosen)})
        elif not chosen and len(finetunes(run)) > 1:
            s.setdefault("notes", []).append("stats/manifest.json does not say which fine-tuning it analysed "
                                             "(no outputs.finetune)")
    else:
        fts = [ft for ft in drift_finetunes(run)[0] if (run.run_dir / ft.folder / "drift" / "comparisons.csv").is_file()]
        if fts:
            ft = fts[0]
            path = run.run_dir / ft.folder / "drift" / "comparisons.csv"
            if ft.name:
                s.update({"finetune": ft.name, "folder": ft.folder})
            s.setdefault("notes", []).append(f"No stats stage in this run: comparisons from {ft.folder}/drift/comparisons.csv")
        else:
            run.missing("statistics", "No drift statistics in this run (no stats/comparisons.csv)")
    df = None
    if path.is_file():
        df = pd.read_csv(path)
    if df is not None and _lacks(run, "statistics", df, ("group", "control", "metric", "type"), _rel(run, path)):
        df = None
    if df is not None:
        order = {t: i for i, t in enumerate(["all"] + sorted(t for t in df["type"].unique() if t != "all"))}
        df = df.assign(_o=df["type"].map(order), _i=range(len(df))).sort_values(["_o", "_i"]).drop(columns=["_o", "_i"])
        s["source"] = _rel(run, path)
        s["effects"] = [c[: -len("_ci_low")] for c in df.columns if c.endswith("_ci_low")]
        s["comparisons"] = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
                            for r in df.to_dict(orient="records")]
        run.tables["comparisons"] = df
    vpath = run.run_dir / "stats" / "verdict.json"
    if vpath.is_file():
        v = _read_json(vpath)
        s["verdict"] = {"source": "stats/verdict.json", "verdict": v.get("verdict"), "reason": v.get("reason"),
                        "rule": v.get("rule"), "primary": v.get("primary")}
    elif df is not None:
        run.missing("statistics", "No verdict (no stats/verdict.json)")
        try:
            from ..analysis.stats import ALPHA, MARGIN, PRIMARY, verdict

            g, c, m = PRIMARY
            prim = df[(df["group"] == g) & (df["control"] == c) & (df["metric"] == m) & (df["type"] == "all")]
            if len(prim):
                row = prim.iloc[0].to_dict()
                name, reason = verdict(row)
                s["verdict"] = {"source": "computed by the report with brittle.analysis.stats.verdict",
                                "verdict": name, "reason": reason,
                                "rule": {"primary": {"group": g, "control": c, "metric": m, "type": "all"},
                                         "alpha": ALPHA, "margin": MARGIN,
                                         "H1": "adjusted p < alpha, Cliff's delta interval above 0, delta >= margin",
                                         "H2": "Cliff's delta interval inside (-margin, +margin)",
                                         "inconclusive": "otherwise"},
                                "primary": row}
        except Exception as e:  # noqa: BLE001 - the verdict is optional here
            s.setdefault("notes", []).append(f"verdict not computed: {type(e).__name__}: {e}")


# --------------------------------------------------------------------------------------------------
# Overlap


def unit_level(unit: str) -> str:
    if unit == "all":
        return "total"
    if unit.startswith("*."):
        return "type"
    if re.fullmatch(r"layers\.\d+", unit):
        return "layer"
    return "module"


def collect_overlap(run: RunData) -> None:
    import pandas as pd

    o: dict[str, Any] = {}
    run.results["overlap"] = o
    path = run.run_dir / "overlap" / "overlap.csv"
    if not path.is_file():
        run.missing("overlap", "No overlap analysis in this run (no overlap/overlap.csv)")
        return
    df = pd.read_csv(path)
    if _lacks(run, "overlap", df, ("comparison", "group", "unit", "jaccard"), "overlap/overlap.csv"):
        return
    if "level" not in df:  # the overlap stage writes it; older or hand-made tables: inferred from the unit
        df["level"] = [unit_level(str(u)) for u in df["unit"]]
    run.tables["overlap"] = df
    cols = [c for c in ("size_a", "size_b", "intersection", "share_a", "share_b", "jaccard", "chance_jaccard",
                        "enrichment", "p_value") if c in df.columns]
    groups = sorted(df["group"].unique(), key=group_sort_key)
    o["comparisons"] = sorted(df["comparison"].unique())
    o["groups"] = groups
    summary = []
    for grp in groups:
        row: dict[str, Any] = {"group": grp}
        for comp in ("finetuned", "noise_floor"):
            r = df[(df["group"] == grp) & (df["comparison"] == comp) & (df["level"] == "total")]
            if len(r):
                r = r.iloc[0]
                for c in cols:
                    row[f"{comp}_{c}"] = r[c]
        summary.append(row)
    o["summary_table"] = summary

    def rows(level: str) -> list[dict]:
        sub = df[df["level"] == level]
        return [{"comparison": r["comparison"], "group": r["group"], "unit": r["unit"],
                 **{c: r[c] for c in cols}} for _, r in sub.iterrows()]

    o["by_type"] = rows("type")
    o["by_layer"] = [{"comparison": r["comparison"], "group": r["group"], "unit": r["unit"], "jaccard": r["jaccard"]}
                     for r in rows("layer")]
    ov_man = run.tables.get("manifests", {}).get("overlap") or {}
    rescored = (ov_man.get("outputs") or {}).get("finetune")
    if rescored:
        o["finetune"] = str(rescored)
        ft = finetune_by_folder(run, rescored)
        if ft is not None and ft.name:
            o["finetune_name"] = ft.name
    sp = run.run_dir / "overlap" / "summary.json"
    if sp.is_file():
        o["summary"] = _read_json(sp)
    else:
        run.missing("overlap", "No overlap summary (no overlap/summary.json)")


COLLECTORS = (("run", collect_run), ("groups", collect_groups), ("ablation", collect_ablation),
              ("finetune", collect_finetune), ("drift", collect_drift), ("statistics", collect_statistics),
              ("overlap", collect_overlap))


def collect(run_dir: str | Path) -> RunData:
    """Read ``run_dir`` into :class:`RunData`. Never raises for missing or unreadable parts: each becomes a
    line in ``results["missing"]`` (and in its section's ``missing``)."""
    run = RunData(Path(run_dir))
    run.results["missing"] = []
    run.tables["manifests"] = {}
    if not run.run_dir.is_dir():
        run.missing("run", f"The run directory {run_dir} does not exist")
    for name, fn in COLLECTORS:
        try:
            fn(run)
        except Exception as e:  # noqa: BLE001 - a broken part must not stop the report
            run.missing(name, f"Could not read the {name} part: {type(e).__name__}: {e}")
    return run
