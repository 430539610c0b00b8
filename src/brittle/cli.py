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
    judge: Annotated[str, typer.Option(help="Refusal judge that filters the safety set.")] = "keyword-wei",
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


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
