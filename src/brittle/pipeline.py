"""The stages and the experiment runner: config -> library calls, one folder and one manifest per stage.

Each ``*_stage(ctx, cfg)`` declares its inputs (hashes of the files and weights it reads), turns its config
section into calls of the library (which takes examples, tensors and groups explicitly) and writes into its
own folder through :func:`brittle.stage.run_stage`, which applies the one reuse rule. :func:`run_experiment`
runs the config's stages in order; later stages read earlier ones' outputs from ``ctx.results``.

Stage folders in the run directory::

    align/                   the aligned model (stage "align", only when asked for)
    data/<set>.jsonl         calibration sets (stage "data")
    scores/<set>-<method>/   scores.safetensors (stage "scores", one folder per set)
    groups/                  <group>.safetensors, summary.csv/.md, sweep/<label>.safetensors (stage "groups")
    ablation/                ablation.csv/.md/.png, eval/<label>/ (stage "ablation")
    finetune/                adapter/, loss.csv/.png, drift/, eval/before|after/ (stage "finetune";
                             checkpoints of an unfinished run in checkpoints/finetune/)
    eval/                    summary.json/.md, generations/ (stage "eval")
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .config import ExperimentConfig
from .data.core import DataError
from .io import BrittleError, sha256_file, sha256_json
from .stage import RunContext, StageResult, file_outputs, run_stage

# --------------------------------------------------------------------------------------------------
# The run's model: loaded once, when the first stage needs it


def run_model_spec(ctx: RunContext, cfg: ExperimentConfig) -> str:
    """The model the run's stages work on: the aligned model when the run has an ``align`` stage."""
    if "align" in ctx.results:
        return str(ctx.results["align"].folder)
    return cfg.model


def run_model(ctx: RunContext, cfg: ExperimentConfig) -> tuple[Any, Any, str]:
    """``(model, tokenizer, weight fingerprint)`` of the run's model, loaded on first use."""
    from .models import weight_fingerprint
    from .presets import load_model

    spec = run_model_spec(ctx, cfg)
    key = ("model", spec, cfg.dtype, cfg.device)
    if key not in ctx.cache:
        ctx.log(f"[model] {spec}")
        model, tok = load_model(spec, dtype=cfg.dtype, device=cfg.device)
        ctx.cache.clear()  # one model in memory at a time
        ctx.cache[key] = (model, tok, weight_fingerprint(model))
    return ctx.cache[key]


# --------------------------------------------------------------------------------------------------
# Stages


def align_stage(ctx: RunContext, cfg: ExperimentConfig) -> StageResult:
    """Stage ``align``: the safety fine-tuning recipe on ``align.base`` -> an aligned model in ``align/``."""
    from .presets import build_aligned

    return build_aligned(ctx, cfg.align, ctx.out / "align")


def data_stage(ctx: RunContext, cfg: ExperimentConfig) -> StageResult:
    """Stage ``data``: every set of ``data.sets`` written to ``data/<name>.jsonl`` (see :class:`DataConfig`)."""
    from .data.build import BUILT_SETS, build_prompts, keep_answers, weak_alignment_note
    from .data.core import save_jsonl
    from .data.sources import load_examples

    data = cfg.data
    built = sorted({spec for spec in data.sets.values() if spec in BUILT_SETS})
    inputs: dict[str, Any] = {}
    if built:
        inputs["model_weights"] = run_model(ctx, cfg)[2]
    loaded = {name: load_examples(spec) for name, spec in data.sets.items() if spec not in BUILT_SETS}
    for name, examples in loaded.items():  # files and named sources: their content is an input
        inputs[f"set:{name}"] = sha256_json([e.to_dict() for e in examples])

    def produce(folder: Path) -> dict[str, Any]:
        from .evaluation.generation import GenerationConfig, generate
        from .evaluation.judges import get_judge

        made: dict[str, tuple[list, dict[str, int]]] = {}
        if built:
            model, tok, _ = run_model(ctx, cfg)
            judge = get_judge(data.judge)
            gen = GenerationConfig(max_new_tokens=data.max_new_tokens, batch_size=data.batch_size, seed=cfg.seed)
            sizes = {"safety": data.n_safety, "utility": data.n_utility}
            for kind in built:
                prompts = build_prompts(kind, sizes[kind], cfg.seed)
                answers = [a[0] for a in generate(model, tok, [e.prompt for e in prompts], gen,
                                                   progress=ctx.progress, desc=f"{kind} answers")]
                verdicts = judge([e.prompt for e in prompts], answers) if kind == "safety" else None
                made[kind] = keep_answers(kind, prompts, answers, verdicts)
                ctx.log(f"[data] {kind}: kept {made[kind][1]['kept']} of {made[kind][1]['generated']} answers")
                if kind == "safety" and (note := weak_alignment_note(made[kind][1])):
                    ctx.log(f"[data] {note}")
        outputs: dict[str, Any] = {}
        for name, spec in data.sets.items():
            examples, counts = made[spec] if spec in made else (loaded[name], {})
            save_jsonl(folder / f"{name}.jsonl", examples)
            outputs[name] = {**file_outputs(folder, {name: f"{name}.jsonl"})[name], "source": spec,
                             "n": len(examples), **counts}
        return outputs

    return run_stage(ctx, "data", ctx.out / "data", {"seed": cfg.seed, **data.to_dict()}, inputs, produce)


def scores_stage(ctx: RunContext, cfg: ExperimentConfig, set_name: str) -> StageResult:
    """Stage ``scores`` for one set: ``scores/<set>-<method>/scores.safetensors`` (see :mod:`brittle.scoring`)."""
    from .data.core import load_file, sample
    from .scoring import compute_scores, save_scores, score_metadata

    sc = cfg.scores
    data = ctx.results.get("data")
    if data is None or set_name not in data.outputs:
        raise BrittleError(f"scores: no set '{set_name}' in the data stage (its sets: "
                           f"{', '.join(data.outputs) if data else 'none'}); add it to data.sets")
    if not data.outputs[set_name]["n"]:
        raise DataError(f"scores: the set '{set_name}' ({data.path(set_name)}) is empty"
                        + (" -- the model refused none of the harmful prompts; score an aligned model or give a file"
                           if data.outputs[set_name]["source"] == "safety" else ""))
    model, tok, fingerprint = run_model(ctx, cfg)
    settings = {"seed": cfg.seed, "set": set_name, **sc.model_dump(exclude={"sets"})}

    def produce(folder: Path) -> dict[str, Any]:
        examples = sample(load_file(data.path(set_name), require_response=True), sc.nsamples, cfg.seed)
        stats: dict[str, Any] = {}
        cap = None if sc.max_accumulator_gb is None else int(sc.max_accumulator_gb * 2**30)
        plan = scoring_memory_plan(model, cfg)
        ctx.log(f"[scores] {plan.describe()}")
        if cap is None and plan.placement == "passes":
            cap = plan.max_accumulator_bytes
        scores = compute_scores(model, tok, examples, sc.method, batch_size=sc.batch_size, max_length=sc.max_length,
                                progress=ctx.progress, max_accumulator_bytes=cap, stats=stats)
        meta = score_metadata(model, examples, sc.method, seed=cfg.seed, max_length=sc.max_length, stats=stats,
                              data=set_name, batch_size=sc.batch_size)
        save_scores(folder / "scores.safetensors", scores, meta)
        ctx.log(f"[scores] {set_name}: {len(scores)} modules, {meta['n_examples']} examples, "
                f"{meta['n_response_tokens']} response tokens")
        return {"scores": file_outputs(folder, {"scores": "scores.safetensors"})["scores"],
                **{k: meta[k] for k in ("n_examples", "n_tokens", "n_response_tokens")}}

    inputs = {"model_weights": fingerprint, "data": data.outputs[set_name]["sha256"]}
    result = run_stage(ctx, f"scores:{set_name}", ctx.out / "scores" / f"{set_name}-{sc.method}", settings, inputs,
                       produce)
    return result


def scoring_memory_plan(model, cfg: ExperimentConfig):
    """The memory plan of the scores stage on the device of the model's first linear weight (its total memory on
    CUDA; on the CPU the machine's RAM)."""
    import os

    import torch

    from .memory import ModelShape, estimate_scoring, plan_scoring
    from .models import linear_modules, linear_weight
    from .scoring.kernels import fused_available

    sc = cfg.scores
    shape = ModelShape.of_model(model)
    w = linear_weight(next(iter(linear_modules(model).values())))
    probe = torch.empty(0, device=w.device, dtype=w.dtype)
    est = estimate_scoring(shape, dtype=cfg.dtype, method=sc.method, batch_size=sc.batch_size, max_length=sc.max_length,
                           fused=fused_available(probe.float(), probe, probe))
    total = (torch.cuda.get_device_properties(w.device).total_memory if w.device.type == "cuda"
             else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return plan_scoring(est, total, shape.accumulator_bytes(sc.method))


def _score_file(ctx: RunContext, given: Path | None, set_name: str) -> tuple[Path, str]:
    """``(path, sha256)`` of the score file the groups stage reads: a given file, or the scores stage's output
    (whose hash that stage recorded)."""
    if given is not None:
        return Path(given), sha256_file(given)
    result = ctx.results.get(f"scores:{set_name}")
    if result is None:
        raise BrittleError(f"groups: no {set_name} scores: run the scores stage or give groups.{set_name}_scores")
    return result.path("scores"), result.outputs["scores"]["sha256"]


def groups_stage(ctx: RunContext, cfg: ExperimentConfig) -> StageResult:
    """Stage ``groups``: the five standard groups and, when the run has an ablation stage, the groups of every
    sweep point (see :mod:`brittle.groups` and :func:`brittle.groups.sweep_groups`)."""
    from .groups import build_groups

    g = cfg.groups
    (safety, safety_sha), (utility, utility_sha) = (_score_file(ctx, g.safety_scores, "safety"),
                                                    _score_file(ctx, g.utility_scores, "utility"))
    points = cfg.ablation.points() if "ablation" in cfg.stages else []
    settings = {"seed": cfg.seed, **g.model_dump(exclude={"safety_scores", "utility_scores"}),
                "sweep_points": points, "sweep_kinds": cfg.ablation.kinds}
    inputs = {"safety_scores": safety_sha, "utility_scores": utility_sha}
    weights, fingerprint = None, None
    if g.magnitude or points:  # the magnitude-matched controls need |W| of the scored model
        from .models import linear_modules, linear_weight

        model, _, fingerprint = run_model(ctx, cfg)
        inputs["model_weights"] = fingerprint
        weights = {n: linear_weight(m).detach() for n, m in linear_modules(model).items()}

    def produce(folder: Path) -> dict[str, Any]:
        result = build_groups(safety, utility, folder, top=g.top, p=g.p, q=g.q, scope=g.scope, seed=cfg.seed,
                              bins=g.bins, weights=weights, model_fingerprint=fingerprint, magnitude=g.magnitude,
                              sweep=points, sweep_kinds=cfg.ablation.kinds, score_sha256=(safety_sha, utility_sha))
        result.print()
        return result.outputs

    return run_stage(ctx, "groups", ctx.out / "groups", settings, inputs, produce)


def ablation_stage(ctx: RunContext, cfg: ExperimentConfig) -> StageResult:
    """Stage ``ablation``: evaluate the dense model and the model with each sweep group removed."""
    from .ablation import SweepGroup, run_ablation
    from .groups import load_group

    groups = ctx.results.get("groups")
    if groups is None or not groups.outputs.get("sweep"):
        raise BrittleError("ablation: the groups stage built no sweep groups (run groups in the same run)")
    model, tok, fingerprint = run_model(ctx, cfg)
    eval_cfg = cfg.eval_config(cfg.ablation.eval)
    sweep = groups.outputs["sweep"]
    settings = {"seed": cfg.seed, "points": cfg.ablation.points(), "kinds": cfg.ablation.kinds,
                "eval": eval_cfg.to_dict()}
    inputs = {"model_weights": fingerprint, "groups": {s["label"]: s["sha256"] for s in sweep}}

    def produce(folder: Path) -> dict[str, Any]:
        items = [SweepGroup(s["kind"], s["p"], s["q"], s["label"], load_group(groups.folder / s["file"])[0])
                 for s in sweep]
        table = run_ablation(model, tok, items, folder, eval_config=eval_cfg, progress=ctx.progress, log=ctx.log)
        ctx.log(table.to_string(index=False))
        return {**file_outputs(folder, {"table": "ablation.csv", "markdown": "ablation.md", "figure": "ablation.png"}),
                "rows": len(table)}

    return run_stage(ctx, "ablation", ctx.out / "ablation", settings, inputs, produce)


def _run_group_files(groups: StageResult | None) -> dict[str, Path]:
    """The standard group files of the run's groups stage (not the sweep groups), by group name."""
    if groups is None:
        return {}
    return {k: groups.path(k) for k, v in groups.outputs.items()
            if isinstance(v, dict) and str(v.get("file", "")).endswith(".safetensors")}


def _group_files(specs: list[str], groups: StageResult | None, what: str) -> dict[str, Path]:
    """Group name -> file for names of the run's groups stage, group files and folders of them."""
    named = _run_group_files(groups)
    out: dict[str, Path] = {}
    for spec in specs:
        path = Path(spec)
        if spec in named:
            out[spec] = named[spec]
        elif path.is_dir():
            found = sorted(path.glob("*.safetensors"))
            if not found:
                raise BrittleError(f"{what}: the folder {path} holds no group file (*.safetensors)")
            out.update({p.stem: p for p in found})
        elif path.is_file():
            out[path.stem] = path
        else:
            known = ", ".join(named) or "none: the run has no groups stage"
            raise BrittleError(f"{what}: '{spec}' is neither a group of this run ({known}) nor a group file or folder")
    return out


def _load_run_group(path: Path, fingerprint: str, what: str) -> dict[str, Any]:
    """A group file's masks, refused when it records another model's weights."""
    from .groups import load_group

    group, meta = load_group(path)
    recorded = meta.get("model_hash") or meta.get("weights_fingerprint")  # the scored model's weight fingerprint
    if recorded and recorded != fingerprint:
        raise BrittleError(f"{what}: {path} was selected on another model (weights {recorded[:12]}, this run's model "
                           f"{fingerprint[:12]}); build the groups on the model you fine-tune")
    return group


def finetune_stage(ctx: RunContext, cfg: ExperimentConfig) -> StageResult:
    """Stage ``finetune``: fine-tune a copy of the run's model (see :mod:`brittle.finetune.job`)."""
    import copy
    import shutil

    from .finetune import finetune_examples, run_finetune

    ft = cfg.finetune
    model, tok, fingerprint = run_model(ctx, cfg)
    groups = ctx.results.get("groups")
    data = ctx.results.get("data")
    run_sets = {name: data.path(name) for name in data.outputs} if data is not None else {}
    eval_cfg = cfg.eval_config(ft.eval)
    examples, data_record = finetune_examples(ft.data, ft.n_examples, cfg.seed, run_sets=run_sets, eval_config=eval_cfg)
    freeze_file = _group_files([ft.freeze], groups, "finetune.freeze") if ft.freeze else {}
    if len(freeze_file) > 1:
        raise BrittleError(f"finetune.freeze: '{ft.freeze}' names {len(freeze_file)} group files "
                           f"({', '.join(freeze_file)}); give one group")
    track_files = _run_group_files(groups) if ft.track is None else _group_files(ft.track, groups, "finetune.track")
    freeze = {n: _load_run_group(p, fingerprint, "finetune.freeze") for n, p in freeze_file.items()}
    track = {n: _load_run_group(p, fingerprint, "finetune.track") for n, p in track_files.items()}
    if ft.full and ft.freeze_mode in ("weights", "rows") and freeze:
        raise BrittleError(f"finetune.freeze_mode = {ft.freeze_mode} is for LoRA; with full = true use full-masked or rewind")
    settings = {"seed": cfg.seed, **ft.to_dict()}
    inputs = {"model_weights": fingerprint, "data": data_record["sha256"],
              "freeze": {n: sha256_file(p) for n, p in freeze_file.items()},
              "track": {n: sha256_file(p) for n, p in track_files.items()}}
    checkpoints = ctx.out / "checkpoints" / "finetune"
    if ctx.force and checkpoints.exists():
        shutil.rmtree(checkpoints)  # --force: start over rather than resume another setup's training

    def produce(folder: Path) -> dict[str, Any]:
        ctx.log(f"[finetune] data {ft.data}: {data_record['n']} examples"
                + (f" ({data_record['excluded']} left out: the evaluation uses them)" if data_record["excluded"] else ""))
        work = copy.deepcopy(model)  # the run's model stays as loaded for the stages after this one
        outputs = run_finetune(work, tok, examples, ft, folder, train_config=ft.train.model_copy(update={"seed": cfg.seed}),
                               freeze=next(iter(freeze.values()), None), track=track, checkpoint_dir=checkpoints,
                               eval_config=eval_cfg, progress=ctx.progress, log=ctx.log)
        del work
        shutil.rmtree(checkpoints, ignore_errors=True)
        for when, figures in outputs.get("evaluation", {}).items():
            ctx.log(f"[finetune] {when}: " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items()
                                                      if k in ("refusal", "asr", "perplexity", "accuracy_mean")
                                                      and v is not None))
        return {**outputs, "data": data_record}

    return run_stage(ctx, "finetune", ctx.out / "finetune", settings, inputs, produce)


def eval_stage(ctx: RunContext, cfg: ExperimentConfig) -> StageResult:
    """Stage ``eval``: the full evaluation suite of the run's model (see :mod:`brittle.evaluation.suite`)."""
    from .evaluation.report import summary_markdown
    from .evaluation.suite import evaluate_model, prepare_inputs

    eval_cfg = cfg.eval_config(cfg.eval)
    inputs = prepare_inputs(eval_cfg)  # bad prompt files or judges fail before the model loads
    model, tok, fingerprint = run_model(ctx, cfg)

    def produce(folder: Path) -> dict[str, Any]:
        summary = evaluate_model(model, tok, folder, eval_cfg, progress=ctx.progress, log=ctx.log, _inputs=inputs)
        ctx.log(summary_markdown(summary))
        return file_outputs(folder, {"summary": "summary.json", "markdown": "summary.md"})

    return run_stage(ctx, "eval", ctx.out / "eval", eval_cfg, {"model_weights": fingerprint}, produce)


# --------------------------------------------------------------------------------------------------
# The runner


def run_experiment(cfg: ExperimentConfig, ctx: RunContext) -> dict[str, StageResult]:
    """Run (or resume) the config's stages in order; returns the results by stage name."""
    t0 = time.perf_counter()
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "config.toml").write_text(_config_text(cfg), encoding="utf-8")
    for stage in cfg.stages:
        if stage == "align":
            align_stage(ctx, cfg)
        elif stage == "data":
            data_stage(ctx, cfg)
        elif stage == "scores":
            for name in cfg.scores.sets:
                scores_stage(ctx, cfg, name)
        elif stage == "groups":
            groups_stage(ctx, cfg)
        elif stage == "ablation":
            ablation_stage(ctx, cfg)
        elif stage == "finetune":
            finetune_stage(ctx, cfg)
        elif stage == "eval":
            eval_stage(ctx, cfg)
    reused = sum(r.reused for r in ctx.results.values())
    ctx.log(f"done in {time.perf_counter() - t0:.0f} s ({reused} of {len(ctx.results)} stages reused); "
            f"run directory {ctx.out}")
    return dict(ctx.results)


def _config_text(cfg: ExperimentConfig) -> str:
    from .config import dump_toml

    return "# The resolved configuration of the last run in this directory (brittle run reads it back).\n" + dump_toml(cfg)
