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
    lowrank/                 lowrank.csv/.md/.png, fractions.csv, eval/<label>/ (stage "lowrank", ActSVD)
    finetune/                adapter/, loss.csv/.png, drift/, eval/before|after/ (stage "finetune";
                             checkpoints of an unfinished run in checkpoints/finetune/)
    noise/, refit/           sub-runs (data, scores, groups) of the overlap stage: the noise floor on other
                             calibration examples, and the fine-tuned model
    overlap/                 overlap.csv/.md, summary.json (stage "overlap", Experiment 1)
    stats/                   comparisons.csv, verdict.json, over_time.csv (stage "stats", Experiment 2)
    eval/                    summary.json/.md, generations/ (stage "eval")
    report/                  report.md/.html/.txt, results.json, figures (stage "report")
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from . import distributed
from .config import ExperimentConfig
from .data.core import DataError
from .io import BrittleError, sha256_file, sha256_json, write_json
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
    """Stage ``align``: the safety fine-tuning recipe on ``align.base`` -> an aligned model in ``align/`` (in
    ``align.dtype``, on the run's ``device``)."""
    from .presets import build_aligned

    return build_aligned(ctx, cfg.align, ctx.out / "align", device=cfg.device)


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
                answers = [a[0] for a in generate(
                    model, tok, [e.prompt for e in prompts], gen, progress=ctx.progress, desc=f"{kind} answers",
                    on_batch_size=lambda n, kind=kind: ctx.log(f"[data] {kind}: generation batch size auto -> {n}"))]
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

    # shared: the model's own answers are the same in every run directory with these settings (minutes to generate)
    return run_stage(ctx, "data", ctx.out / "data", {"seed": cfg.seed, **data.to_dict()}, inputs, produce,
                     shared=bool(built))


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
    # where the accumulators live (fp32 summation order) and checkpointing (the same scores): not part of the record
    settings = {"seed": cfg.seed, "set": set_name,
                **sc.model_dump(exclude={"sets", "accumulators", "gradient_checkpointing"})}

    def produce(folder: Path) -> dict[str, Any]:
        examples = sample(load_file(data.path(set_name), require_response=True), sc.nsamples, cfg.seed)
        stats: dict[str, Any] = {}
        cap = None if sc.max_accumulator_gb is None else int(sc.max_accumulator_gb * 2**30)
        plan = scoring_memory_plan(model, cfg)
        ctx.log(f"[scores] {plan.describe()}")
        if cap is None and plan.placement == "passes":
            cap = plan.max_accumulator_bytes
        host = plan.placement == "host" and cap is None
        scores = compute_scores(model, tok, examples, sc.method, batch_size=sc.batch_size, max_length=sc.max_length,
                                progress=ctx.progress, max_accumulator_bytes=cap, host_accumulators=host,
                                gradient_checkpointing=sc.gradient_checkpointing, stats=stats)
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
    CUDA; on the CPU the machine's RAM). On a GPU, when the accumulators do not fit beside the model, the device's
    matmul rate and the host's copy-and-add rate are measured (:func:`brittle.memory.measure_rates`, a second) to
    choose between passes and host accumulators (``scores.accumulators = "auto"``), or the choice is forced."""
    import dataclasses

    import torch

    from .memory import HEADROOM, GiB, ModelShape, device_bytes, estimate_scoring, measure_rates, plan_scoring
    from .models import linear_modules, linear_weight
    from .scoring.kernels import fused_available

    sc = cfg.scores
    shape = ModelShape.of_model(model)
    w = linear_weight(next(iter(linear_modules(model).values())))
    probe = torch.empty(0, device=w.device, dtype=w.dtype)
    est = estimate_scoring(shape, dtype=cfg.dtype, method=sc.method, batch_size=sc.batch_size, max_length=sc.max_length,
                           fused=fused_available(probe.float(), probe, probe),
                           gradient_checkpointing=sc.gradient_checkpointing)
    ram = device_bytes("cpu")
    on_gpu = w.device.type == "cuda"
    total = device_bytes(w.device)
    sizes = shape.accumulator_bytes(sc.method)
    plan = plan_scoring(est, total, sizes)
    if not on_gpu or plan.placement == "does not fit" or sc.accumulators == "device":
        return plan
    if sc.accumulators == "host":
        if sum(sizes) > HEADROOM * ram:
            raise BrittleError(f"scores.accumulators = 'host': the fp32 accumulators ({sum(sizes) / GiB:.1f} GiB) do "
                               f"not fit 90 % of this machine's memory ({ram / GiB:.1f} GiB)")
        return dataclasses.replace(plan, placement="host", max_accumulator_bytes=None)
    if plan.placement != "passes":
        return plan
    flops, host_rate = measure_rates(w.device, w.dtype)
    return plan_scoring(est, total, sizes, host_bytes=ram, host_bytes_per_second=host_rate,
                        pass_seconds_per_batch=6 * shape.params * sc.batch_size * sc.max_length / flops)


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
        from .models import linear_weights

        model, _, fingerprint = run_model(ctx, cfg)
        inputs["model_weights"] = fingerprint
        weights = linear_weights(model)

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
    source, source_fingerprint = None, None
    if cfg.ablation.recover_from is not None:
        # loaded before the run's model (one model is cached at a time); only its linear weights are kept
        from .models import linear_weights, weight_fingerprint
        from .presets import load_model

        ctx.log(f"[ablation] removed entries recover their values from {cfg.ablation.recover_from}")
        other, _ = load_model(cfg.ablation.recover_from, dtype=cfg.dtype, device=cfg.device)
        source, source_fingerprint = linear_weights(other), weight_fingerprint(other)
        del other
    model, tok, fingerprint = run_model(ctx, cfg)
    if source is not None:
        from .ablation import check_source

        check_source(model, source)  # before the dense model is evaluated
    eval_cfg = cfg.eval_config(cfg.ablation.eval)
    sweep = groups.outputs["sweep"]
    settings = {"seed": cfg.seed, "points": cfg.ablation.points(), "kinds": cfg.ablation.kinds,
                **({"recover_from": cfg.ablation.recover_from} if source is not None else {}), "eval": eval_cfg.to_dict()}
    inputs = {"model_weights": fingerprint, "groups": {s["label"]: s["sha256"] for s in sweep},
              **({"recover_from_weights": source_fingerprint} if source_fingerprint else {})}

    def produce(folder: Path) -> dict[str, Any]:
        items = [SweepGroup(s["kind"], s["p"], s["q"], s["label"], load_group(groups.folder / s["file"])[0])
                 for s in sweep]
        table = run_ablation(model, tok, items, folder, eval_config=eval_cfg, progress=ctx.progress, log=ctx.log,
                             source=source)
        ctx.log(table.to_string(index=False))
        return {**file_outputs(folder, {"table": "ablation.csv", "markdown": "ablation.md", "figure": "ablation.png"}),
                "rows": len(table)}

    result = run_stage(ctx, "ablation", ctx.out / "ablation", settings, inputs, produce)
    # the dense model is the run's model as loaded: the model before any fine-tuning of the run
    _remember_evaluation(ctx, evaluation_key(fingerprint, eval_cfg), result.folder / "eval" / "dense")
    return result


def lowrank_stage(ctx: RunContext, cfg: ExperimentConfig) -> StageResult:
    """Stage ``lowrank`` (ActSVD, :mod:`brittle.lowrank`): the output covariances of the edited modules on the
    safety (and, for the orthogonal rows, utility) calibration sample of the data stage -- ``scores.nsamples``
    examples drawn with the run's seed, at the scores' batch size and length -- recorded once per set on the
    unmodified model; then the dense model and every sweep point (top_safety and random per rank, orthogonal per
    pair) evaluated like the ablation sweep -> ``lowrank/lowrank.csv``/``.md``/``.png``, ``eval/<label>/`` and
    ``fractions.csv`` (per point and module, the rank removed / min(d_out, d_in))."""
    import pandas as pd

    from .ablation import run_sweep
    from .data.core import load_file, sample
    from .lowrank import (
        check_sweep_ranks,
        lowrank_layout,
        record_output_covariance,
        sweep_points,
        target_modules,
        top_directions,
    )

    lr, sc = cfg.lowrank, cfg.scores
    need = {k: v for k, v in lr.max_ranks().items() if v}  # set -> most directions needed
    data = ctx.results.get("data")
    for name in need:
        if data is None or name not in data.outputs:
            raise BrittleError(f"lowrank: no set '{name}' in the data stage (its sets: "
                               f"{', '.join(data.outputs) if data else 'none'}); add it to data.sets")
        if not data.outputs[name]["n"]:
            raise DataError(f"lowrank: the set '{name}' ({data.path(name)}) is empty")
    model, tok, fingerprint = run_model(ctx, cfg)
    modules = target_modules(model, lr.targets)  # bad roles and ranks fail before any recording or edit
    check_sweep_ranks(modules, lr.ranks, lr.orthogonal)
    examples = {name: sample(load_file(data.path(name), require_response=True), sc.nsamples, cfg.seed)
                for name in need}
    eval_cfg = cfg.eval_config(lr.eval)
    settings = {"seed": cfg.seed, **lr.model_dump(mode="json", exclude={"eval"}), "eval": eval_cfg.to_dict(),
                "calibration": {"nsamples": sc.nsamples, "batch_size": sc.batch_size, "max_length": sc.max_length}}
    inputs = {"model_weights": fingerprint, "data": {name: data.outputs[name]["sha256"] for name in need}}

    def produce(folder: Path) -> dict[str, Any]:
        directions, calibration = {}, {}
        for name, r_max in need.items():
            stats: dict[str, Any] = {}
            covs = record_output_covariance(model, tok, examples[name], batch_size=sc.batch_size,
                                            max_length=sc.max_length, modules=list(modules), progress=ctx.progress,
                                            stats=stats)
            if stats["n_response_tokens"] < r_max:
                ctx.log(f"[lowrank] warning: {stats['n_response_tokens']} response tokens of {name} < {r_max} "
                        "directions: the covariance's rank is at most the token count, the directions beyond it "
                        "are arbitrary")
            directions[name] = {n: top_directions(covs.pop(n), r_max) for n in list(covs)}  # once, at the top rank
            calibration[name] = {k: stats[k] for k in ("n_examples", "n_tokens", "n_response_tokens")}
            ctx.log(f"[lowrank] {name}: covariances of {len(directions[name])} modules from "
                    f"{stats['n_examples']} examples, {stats['n_response_tokens']} response tokens")
        points, per_module = sweep_points(model, directions["safety"], directions.get("utility"), lr.ranks,
                                          lr.orthogonal, seed=cfg.seed)
        pd.DataFrame(per_module).to_csv(folder / "fractions.csv", index=False)
        table = run_sweep(model, tok, points, folder, lowrank_layout(), eval_config=eval_cfg, progress=ctx.progress,
                          log=ctx.log)
        ctx.log(table.to_string(index=False))
        return {**file_outputs(folder, {"table": "lowrank.csv", "markdown": "lowrank.md", "figure": "lowrank.png",
                                        "fractions": "fractions.csv"}),
                "rows": len(table), "modules": len(modules), "calibration": calibration}

    return run_stage(ctx, "lowrank", ctx.out / "lowrank", settings, inputs, produce)


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


def finetune_key(name: str) -> str:
    """The name under which a fine-tuning's result is kept in ``ctx.results`` (``finetune`` or
    ``finetune:<variant>``); its folder is ``finetune/`` or ``finetune/<variant>/``."""
    return f"finetune:{name}" if name else "finetune"


def finetune_stage(ctx: RunContext, cfg: ExperimentConfig) -> dict[str, StageResult]:
    """Stage ``finetune``: each fine-tuning of ``finetune`` (one, or one per variant), in the order given. The model
    before fine-tuning is evaluated once per evaluation setting in a run: later variants (and a fine-tuning after an
    ablation with the same evaluation settings) copy that evaluation (:func:`evaluation_key`)."""
    return {name: _finetune_job(ctx, cfg, name, job) for name, job in cfg.finetune.jobs().items()}


def _selected_finetune(ctx: RunContext, cfg: ExperimentConfig, name: str | None, what: str) -> StageResult | None:
    """The result of the fine-tuning an analysis names (``None``: the only one of the run)."""
    key = finetune_key(cfg.finetune_job_name(name, what))
    return ctx.results.get(key)


def evaluation_key(fingerprint: str, eval_cfg) -> str:
    """What makes two evaluations in a run the same: the model's weights and every evaluation setting."""
    return sha256_json({"model_weights": fingerprint, "eval": eval_cfg.model_dump(mode="json")})


def _remember_evaluation(ctx: RunContext, key: str, folder: Path) -> None:
    if (folder / "summary.json").exists():
        ctx.evaluations.setdefault(key, folder)


def _finetune_job(ctx: RunContext, cfg: ExperimentConfig, name: str, ft) -> StageResult:
    """One fine-tuning: a copy of the run's model (see :mod:`brittle.finetune.job`) into ``finetune[/<name>]``."""
    import copy
    import shutil

    from .finetune import finetune_examples, run_finetune

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
    # gradient checkpointing changes memory and time, not the result: not a setting a finished stage is compared on
    settings = {"seed": cfg.seed, **({"name": name} if name else {}),
                **ft.model_dump(exclude={"variants": True, "train": {"gradient_checkpointing"}})}
    inputs = {"model_weights": fingerprint, "data": data_record["sha256"],
              "freeze": {n: sha256_file(p) for n, p in freeze_file.items()},
              "track": {n: sha256_file(p) for n, p in track_files.items()}}
    checkpoints = ctx.out / "checkpoints" / "finetune" / name if name else ctx.out / "checkpoints" / "finetune"
    folder = ctx.out / "finetune" / name if name else ctx.out / "finetune"
    tag = f"[finetune{':' + name if name else ''}]"
    if ctx.force and checkpoints.exists() and distributed.is_main():
        shutil.rmtree(checkpoints)  # --force: start over rather than resume another setup's training

    before_key = evaluation_key(fingerprint, eval_cfg)

    def produce(folder: Path) -> dict[str, Any]:
        ctx.log(f"{tag} data {ft.data}: {data_record['n']} examples"
                + (f" ({data_record['excluded']} left out: the evaluation uses them)" if data_record["excluded"] else ""))
        work = copy.deepcopy(model)  # the run's model stays as loaded for the stages after this one
        outputs = run_finetune(work, tok, examples, ft, folder, train_config=ft.train.model_copy(update={"seed": cfg.seed}),
                               freeze=next(iter(freeze.values()), None), track=track, checkpoint_dir=checkpoints,
                               eval_config=eval_cfg, progress=ctx.progress, log=ctx.log,
                               before_from=ctx.evaluations.get(before_key))
        del work
        distributed.barrier()  # every process has finished with the checkpoints
        if distributed.is_main():
            shutil.rmtree(checkpoints, ignore_errors=True)
        for when, figures in outputs.get("evaluation", {}).items():
            ctx.log(f"{tag} {when}: " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items()
                                                      if k in ("refusal", "asr", "perplexity", "accuracy_mean")
                                                      and v is not None))
        return {**outputs, "data": data_record}

    result = run_stage(ctx, "finetune", folder, settings, inputs, produce, key=finetune_key(name))
    if ft.evaluate:
        _remember_evaluation(ctx, before_key, result.folder / "eval" / "before")
    return result


def _subrun(ctx: RunContext, cfg: ExperimentConfig, name: str, model: str, sets: dict[str, Path],
            nsamples: int) -> dict[str, StageResult]:
    """Stages data, scores and groups of ``model`` on the files ``sets`` in the sub-run ``RUN/<name>/``, with the
    run's scoring and selection settings (the magnitude-matched control left out: the overlap does not use it).
    Its stages follow the same reuse rule as the run's own."""
    sub = cfg.model_copy(update={
        "model": model, "stages": ("data", "scores", "groups"),
        "data": cfg.data.model_copy(update={"sets": {k: str(v) for k, v in sets.items()}}),
        "scores": cfg.scores.model_copy(update={"nsamples": nsamples}),
        "groups": cfg.groups.model_copy(update={"magnitude": False, "safety_scores": None, "utility_scores": None})})
    sub_ctx = RunContext(out=ctx.out / name, force=ctx.force, log=lambda m: ctx.log(f"({name}) {m}"),
                         progress=ctx.progress, cache=ctx.cache)
    return run_experiment(sub, sub_ctx)


def _unused_examples(path: Path, nsamples: int, seed: int) -> list:
    """The examples of a data file that the scores stage's sample (``sample(examples, nsamples, seed)``) left out."""
    from .data.core import load_file, sample

    examples = load_file(path, require_response=True)
    used = {sha256_json(e.to_dict()) for e in sample(examples, nsamples, seed)}
    return [e for e in examples if sha256_json(e.to_dict()) not in used]


def overlap_stage(ctx: RunContext, cfg: ExperimentConfig) -> StageResult:
    """Stage ``overlap`` (Experiment 1): each of ``overlap.groups`` of the run against the same selection

    * on the unchanged model from the examples of each data set that the run's scores did not use (a disjoint
      calibration sample of the same data: the noise floor, sub-run ``noise/``), and
    * on the fine-tuned model (the finetune stage's merged weights) from the run's own calibration sample
      (sub-run ``refit/``),

    with chance levels (:func:`brittle.analysis.overlap`) and the per-module comparison of the two
    (:func:`brittle.analysis.against_noise_floor`). Writes ``overlap.csv`` (every level), ``overlap.md`` and
    ``summary.json``."""
    import pandas as pd

    from .analysis import against_noise_floor, overlap, overlap_markdown
    from .data.core import save_jsonl
    from .groups import load_group

    ov = cfg.overlap
    groups, data = ctx.results.get("groups"), ctx.results.get("data")
    if groups is None or data is None:
        raise BrittleError("overlap: needs the data, scores and groups stages in the same run")
    missing = [g for g in ov.groups if g not in _run_group_files(groups)]
    if missing:
        raise BrittleError(f"overlap.groups: {', '.join(missing)} not among the run's groups "
                           f"({', '.join(_run_group_files(groups))})")
    ft = _selected_finetune(ctx, cfg, ov.finetune, "overlap.finetune") if ov.finetuned else None
    merged = ft.outputs.get("files", {}).get("merged") if ft is not None else None
    if ov.finetuned and merged is None:
        raise BrittleError("overlap.finetuned needs the finetune stage in the same run with finetune.merge = true "
                           "(or full = true), or set overlap.finetuned = false")
    if not (ov.noise_floor or ov.finetuned):
        raise BrittleError("overlap: nothing to compare (overlap.noise_floor and overlap.finetuned are both false)")
    sc_sets = cfg.scores.sets
    others: dict[str, dict[str, StageResult]] = {}
    if ov.noise_floor:
        folder = ctx.out / "noise" / "calibration"
        folder.mkdir(parents=True, exist_ok=True)
        sizes = []
        for name in sc_sets:
            unused = _unused_examples(data.path(name), cfg.scores.nsamples, cfg.seed)
            if not unused:
                raise BrittleError(f"overlap: every example of the data set '{name}' was used by the scores stage "
                                   f"(scores.nsamples = {cfg.scores.nsamples}); the noise floor needs others: raise "
                                   f"data.n_{name} or lower scores.nsamples, or set overlap.noise_floor = false")
            # a pure function of the run's data stage (whose own record guards it) and the seed: replaced when that
            # changed, so the noise sub-run's data stage sees the change and follows the reuse rule
            save_jsonl(folder / f"{name}.jsonl", unused, overwrite=True)
            sizes.append(len(unused))
        ctx.log(f"[overlap] noise floor: the same selection from {', '.join(map(str, sizes))} other examples "
                f"({', '.join(sc_sets)}) of the unchanged model")
        others["noise_floor"] = _subrun(ctx, cfg, "noise", run_model_spec(ctx, cfg),
                                        {n: folder / f"{n}.jsonl" for n in sc_sets},
                                        min(cfg.scores.nsamples, *sizes))
    if ov.finetuned:
        ctx.log("[overlap] scoring and grouping the fine-tuned model on the run's calibration sample")
        others["finetuned"] = _subrun(ctx, cfg, "refit", str(ft.folder / merged),
                                      {n: data.path(n) for n in sc_sets}, cfg.scores.nsamples)
    mine = _run_group_files(groups)
    inputs = {"groups": {g: groups.outputs[g]["sha256"] for g in ov.groups},
              **{f"{k}_groups": {g: r["groups"].outputs[g]["sha256"] for g in ov.groups} for k, r in others.items()}}

    def produce(folder: Path) -> dict[str, Any]:
        tables, summary, md = [], {}, []
        for g in ov.groups:
            a = load_group(mine[g])[0]
            per = {}
            for k, r in others.items():
                t = overlap(a, load_group(r["groups"].path(g))[0])
                per[k] = t
                tables.append(t.rename(columns={"module": "unit", "a": "size_a", "b": "size_b"})
                              .assign(comparison=k, group=g))
                md.append(f"### {g}: run vs {k.replace('_', ' ')}\n\n" + overlap_markdown(t, names=("run", k)))
            summary[g] = {k: float(t[t["level"] == "total"]["jaccard"].iloc[0]) for k, t in per.items()}
            if len(per) == 2:
                summary[g] = against_noise_floor(per["finetuned"], per["noise_floor"], n_boot=ov.n_boot, seed=cfg.seed)
        table = pd.concat(tables, ignore_index=True)
        front = ["comparison", "group", "level", "unit"]
        table[front + [c for c in table.columns if c not in front]].to_csv(folder / "overlap.csv", index=False)
        head = _overlap_headline(summary)
        (folder / "overlap.md").write_text(head + "\n\n" + "\n".join(md), encoding="utf-8")
        write_json(folder / "summary.json", summary)
        ctx.log(head)
        return {**file_outputs(folder, {"table": "overlap.csv", "markdown": "overlap.md", "summary": "summary.json"}),
                "comparisons": list(others),
                **({"finetune": ft.folder.relative_to(ctx.out).as_posix()} if ft is not None else {})}

    return run_stage(ctx, "overlap", ctx.out / "overlap", {"seed": cfg.seed, **ov.to_dict()}, inputs, produce)


def _overlap_headline(summary: dict[str, Any]) -> str:
    lines = ["| group | Jaccard after fine-tuning | noise floor | chance | modules below the floor | median "
             "per-module difference [95 % CI] | Wilcoxon p | beyond noise |", "|" + "---|" * 8]
    for g, s in summary.items():
        if "n_modules" not in s:  # one comparison only
            lines.append(f"| {g} | {s.get('finetuned', float('nan')):.4f} | {s.get('noise_floor', float('nan')):.4f} "
                         "| | | | | |")
            continue
        lines.append(f"| {g} | {s['jaccard_finetuned']:.4f} | {s['jaccard_noise_floor']:.4f} | "
                     f"{s['chance_jaccard']:.4f} | {s['n_below']} of {s['n_modules']} | {s['median_diff']:+.4f} "
                     f"[{s['median_diff_ci_low']:+.4f}, {s['median_diff_ci_high']:+.4f}] | {s['p_value']:.2g} | "
                     f"{'yes' if s['beyond_noise'] else 'no'} |")
    return "\n".join(lines)


def stats_stage(ctx: RunContext, cfg: ExperimentConfig) -> StageResult:
    """Stage ``stats`` (Experiment 2): every (group, control, metric) comparison of the finetune stage's final
    drift over the modules the fine-tuning changed (:func:`brittle.analysis.compare_groups`), the verdict on the
    primary comparison (:func:`brittle.analysis.verdict`), and each group's median and interquartile range of
    ``|Delta|`` per recorded step from the tracker's fixed subsample. Writes ``comparisons.csv``,
    ``verdict.json`` and ``over_time.csv``."""
    import pandas as pd

    from .analysis import PRIMARY, compare_groups, load_group_drift, verdict
    from .analysis.stats import ROW_METRICS, drift_over_time

    st = cfg.stats
    ft = _selected_finetune(ctx, cfg, st.finetune, "stats.finetune")
    files = ft.outputs.get("files", {}) if ft is not None else {}
    finals = {k.removeprefix("drift:final:"): ft.folder / v for k, v in files.items() if k.startswith("drift:final:")}
    if not finals:
        raise BrittleError("stats: needs the finetune stage in the same run with tracked groups (finetune.track)")
    table_file = ft.folder / files["drift:table"]
    samples_file = ft.folder / files["drift:samples"] if "drift:samples" in files else None
    inputs = {"drift": {g: sha256_file(p) for g, p in sorted(finals.items())}, "table": sha256_file(table_file)}
    run_groups = _run_group_files(ctx.results.get("groups"))

    def produce(folder: Path) -> dict[str, Any]:
        drift = pd.read_parquet(table_file)
        last = drift[drift["step"] == drift["step"].max()]
        modules = sorted(set(last[last["adapted"]]["module"]))
        groups = {g: load_group_drift(p) for g, p in finals.items()}
        if run_groups and any(g.rows is None for g in groups.values()):
            # drift files from before they recorded d_in: the modules' input widths from the run's group files
            from .groups import load_group

            d_in = {m: mask.shape[1] for m, mask in load_group(next(iter(run_groups.values())))[0].items()}
            groups = {g: load_group_drift(p, d_in) for g, p in finals.items()}
        metrics = [m for m in st.metrics if m not in ROW_METRICS or all(g.rows is not None for g in groups.values())]
        if len(metrics) < len(st.metrics):
            ctx.log(f"[stats] left out {', '.join(sorted(set(st.metrics) - set(metrics)))}: the drift files do not "
                    "record the modules' shapes and the run has no groups stage to read them from")
        table = compare_groups(groups, modules, pairs=st.pairs, metrics=metrics, max_n=st.max_n,
                               n_boot=st.n_boot, seed=cfg.seed, progress=ctx.progress)
        table.to_csv(folder / "comparisons.csv", index=False)
        primary = table[(table["group"] == PRIMARY[0]) & (table["control"] == PRIMARY[1])
                        & (table["metric"] == PRIMARY[2]) & (table["type"] == "all")]
        record: dict[str, Any] = {"rule": {"primary": dict(zip(("group", "control", "metric"), PRIMARY, strict=True)),
                                           "margin": st.margin, "alpha": st.alpha, "max_n": st.max_n,
                                           "n_boot": st.n_boot, "seed": cfg.seed, "n_modules": len(modules)}}
        if len(primary):
            row = primary.iloc[0].to_dict()
            record["verdict"], record["reason"] = verdict(row, margin=st.margin, alpha=st.alpha)
            record["primary"] = row
        else:
            record["verdict"], record["reason"] = "none", (f"the primary comparison {PRIMARY[0]} vs {PRIMARY[1]} "
                                                           "was not tracked")
        write_json(folder / "verdict.json", record)
        ctx.log(f"[stats] verdict: {record['verdict']} -- {record['reason']}")
        outputs = file_outputs(folder, {"table": "comparisons.csv", "verdict": "verdict.json"})
        if samples_file is not None:
            from safetensors.torch import load_file

            rows = drift_over_time(load_file(str(samples_file)))
            pd.DataFrame(rows, columns=["step", "group", "n", "median", "q25", "q75"]).to_csv(
                folder / "over_time.csv", index=False)
            outputs.update(file_outputs(folder, {"over_time": "over_time.csv"}))
        return {**outputs, "outcome": record["verdict"], "finetune": ft.folder.relative_to(ctx.out).as_posix()}

    return run_stage(ctx, "stats", ctx.out / "stats", {"seed": cfg.seed, **st.to_dict()}, inputs, produce)



def report_stage(ctx: RunContext, cfg: ExperimentConfig | None = None) -> StageResult:
    """Stage ``report``: ``report/report.md``, ``report.html``, ``report.txt`` and ``results.json`` from whatever
    the run directory holds (see :mod:`brittle.report`). Its inputs are the manifests of the run's stages, so a
    changed stage makes a new report."""
    from .report import build_report

    manifests = {p.parent.relative_to(ctx.out).as_posix(): sha256_file(p)
                 for p in sorted(ctx.out.glob("**/manifest.json")) if "report" not in p.parts
                 and not any(part.endswith(".partial") for part in p.parts)}

    def produce(folder: Path) -> dict[str, Any]:
        written = build_report(ctx.out, folder)
        ctx.log(f"[report] {folder / 'report.html'}")
        return file_outputs(folder, {k: Path(v).relative_to(folder).as_posix() for k, v in written.items()
                                     if Path(v).is_file()})

    return run_stage(ctx, "report", ctx.out / "report", {}, {"manifests": manifests}, produce)


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
    if distributed.is_main():  # one writer in a multi-process run
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
        elif stage == "lowrank":
            lowrank_stage(ctx, cfg)
        elif stage == "finetune":
            finetune_stage(ctx, cfg)
        elif stage == "overlap":
            overlap_stage(ctx, cfg)
        elif stage == "stats":
            stats_stage(ctx, cfg)
        elif stage == "eval":
            eval_stage(ctx, cfg)
        elif stage == "report":
            report_stage(ctx, cfg)
    reused = sum(r.reused for r in ctx.results.values())
    ctx.log(f"done in {time.perf_counter() - t0:.0f} s ({reused} of {len(ctx.results)} stages reused); "
            f"run directory {ctx.out}")
    return dict(ctx.results)


def _config_text(cfg: ExperimentConfig) -> str:
    from .config import dump_toml

    return "# The resolved configuration of the last run in this directory (brittle run reads it back).\n" + dump_toml(cfg)
