"""A fine-tuning job (the ``finetune`` stage's work): which data, freezing, drift tracking, the evaluation
before and after, and the files it leaves.

Data (``FinetuneConfig.data``):

* ``reference``: rho-benign's everyday questions with their reference answers -- answers the model did not
  write -- minus the reference answers the evaluation's perplexity is measured on (the default: benign
  fine-tuning as in the seed study, whose Alpaca answers were written by another model);
* ``utility`` / ``safety``: the run's own sets from the ``data`` stage (the model's own answers);
* ``attack``: the paper's section 4.4 harmful fine-tuning attack, harmful prompt -> compliant answer from
  ``uncensorbench-compliant``, never a prompt of the evaluation split (100 pairs and 5 epochs unless given);
* any other source name or ``.jsonl``/``.csv`` file with responses.

Files in the stage folder::

    adapter/                 PEFT adapter (plain ``peft`` loads it) + freeze_mask.safetensors (LoRA runs)
    merged/                  the fine-tuned model as a HF directory, usable as --model (merge = true or full)
    loss.csv, loss.png       loss (nats per response token) and learning rate per optimiser step
    drift/                   drift.parquet and final/<group>.safetensors (see brittle.drift)
    eval/before, eval/after  the light evaluation suite (summary.json) of the model before and after
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, field_validator, model_validator

from ..data.core import DataError, Example, load_file, sample
from ..evaluation.config import EvalConfig, SweepEvalConfig
from ..io import BrittleError, FrozenConfig, sha256_json, write_json
from .train import LoraTrainConfig, TrainHistory, merge_lora, train_lora

FINETUNE_DATA = ("reference", "utility", "safety", "attack")
ATTACK_DEFAULTS = {"n_examples": 100, "epochs": 5}


class FinetuneTrainConfig(LoraTrainConfig):
    """The seed study's LoRA settings (r 8, alpha 16, lr 1e-4, batch 4), on every linear module by default so
    that every tracked weight can move (``targets = ["q", "v", "o"]`` is the seed study's choice)."""

    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA alpha (the update is scaled by alpha / r).")
    targets: tuple[str, ...] = Field(("all",), description="Roles adapted (q, k, v, o, gate, up, down ...) or all.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate of AdamW (after warm-up).")
    batch_size: int = Field(4, gt=0, description="Examples per micro-batch (per forward/backward pass).")
    max_length: int = Field(256, gt=0, description="Tokens kept per example (prompt + response).")


class FinetuneConfig(FrozenConfig):
    """Stage ``finetune``: LoRA (or full) fine-tuning of the run's model, optionally with a group frozen, with
    drift tracking of groups and the light evaluation before and after (see :mod:`brittle.finetune.job`)."""

    data: str = Field("reference", description=(
        "reference (rho-benign answers the model did not write) | utility | safety (the run's data sets) | "
        "attack (harmful prompt -> compliant answer) | a source name | a .jsonl/.csv file."))
    n_examples: int | None = Field(None, gt=0, description="Examples drawn (seeded); attack: 100 unless given.")
    train: FinetuneTrainConfig = FinetuneTrainConfig()
    full: bool = Field(False, description="Full fine-tuning (every parameter) instead of LoRA.")
    freeze: str | None = Field(None, description="Group held fixed: a group name of the run's groups stage or a group file.")
    freeze_mode: Literal["weights", "rows", "rewind", "full-masked"] = Field(
        "weights", description="weights | rows | rewind | full-masked (see brittle.freeze).")
    track: list[str] | None = Field(None, description=(
        "Groups whose drift is recorded: names of the run's groups, group files or folders of them "
        "(default: every group of the run's groups stage; [] for none)."))
    drift_every: int = Field(10, gt=0, description="Record drift every N optimiser steps (and at step 0 and the end).")
    checkpoint_every: int | None = Field(25, gt=0, description="Checkpoint every N steps (a killed run resumes).")
    merge: bool = Field(False, description="Also write the merged model (fp32 HF directory) to merged/.")
    evaluate: bool = Field(True, description="Evaluate before and after fine-tuning (the light suite of `eval`).")
    eval: SweepEvalConfig = SweepEvalConfig()
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "Several fine-tunings in one run: name -> the keys of this section that differ (e.g. {frozen = {freeze = "
        "\"set_difference\", merge = true}, free = {}}); each writes finetune/<name>/. Empty: one, in finetune/."))

    @field_validator("variants")
    @classmethod
    def _check_variants(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, keys in v.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(f"variant name '{name}': use letters, digits, '_', '-' or '.' (it names a folder)")
            if "variants" in keys:
                raise ValueError(f"variant '{name}' cannot have variants of its own")
        return v

    @model_validator(mode="after")
    def _variants_validate(self) -> FinetuneConfig:
        self.jobs()  # every variant is a valid section: its errors show when the config loads
        return self

    def jobs(self) -> dict[str, FinetuneConfig]:
        """The fine-tunings this section asks for: ``{"": self}`` without variants, else name -> this section with the
        variant's keys changed (nested sections merged key by key; only keys given in the file are inherited, so
        a variant with ``data = "attack"`` gets the attack's own defaults)."""
        if not self.variants:
            return {"": self}
        base = self.model_dump(exclude_unset=True, exclude={"variants"})
        out = {}
        for name, keys in self.variants.items():
            try:
                out[name] = FinetuneConfig.model_validate(_deep_update(base, keys))
            except ValidationError as e:
                problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
                raise ValueError(f"variant '{name}': {problems}") from None
        return out

    @model_validator(mode="before")
    @classmethod
    def _attack_defaults(cls, data: Any) -> Any:
        # The attack's own defaults (the paper's 100 pairs, 5 epochs) apply unless the keys are given.
        if isinstance(data, Mapping) and data.get("data") == "attack":
            data = dict(data)
            data.setdefault("n_examples", ATTACK_DEFAULTS["n_examples"])
            train = dict(data.get("train") or {})
            if "epochs" not in train and "max_steps" not in train:
                train["epochs"] = ATTACK_DEFAULTS["epochs"]
            data["train"] = train
        return data


def _deep_update(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch``'s keys, nested mappings merged key by key."""
    out = dict(base)
    for k, v in patch.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


# --------------------------------------------------------------------------------------------------
# Data


def _drop_prompts(examples: Sequence[Example], taken: Sequence[Example]) -> tuple[list[Example], int]:
    from ..data.sources import normalize_prompt

    keys = {normalize_prompt(e.prompt) for e in taken}
    kept = [e for e in examples if normalize_prompt(e.prompt) not in keys]
    return kept, len(examples) - len(kept)


def finetune_examples(spec: str, n: int | None, seed: int, *, run_sets: Mapping[str, Path],
                      eval_config: EvalConfig) -> tuple[list[Example], dict[str, Any]]:
    """The fine-tuning examples of ``spec`` (see the module docstring) and a record of where they came from:
    ``{"data", "n", "excluded", "sha256"}`` (``excluded``: examples left out because the evaluation uses them)."""
    from ..data.sources import harmful_splits, load_examples, load_source
    from ..evaluation.suite import perplexity_examples

    excluded = 0
    if spec in run_sets:
        examples = load_file(run_sets[spec], require_response=True)
    elif spec in ("utility", "safety"):
        raise BrittleError(f"fine-tuning data '{spec}' is a set of the run's data stage, which has none of that "
                           f"name (its sets: {', '.join(run_sets) or 'none'}); run the data stage in the same run")
    elif spec == "attack":
        # never a prompt of the evaluation split (AdvBench[:100], whatever the evaluation's n_harmful)
        examples, excluded = _drop_prompts(load_source("uncensorbench-compliant"), harmful_splits(seed=seed)[1])
    elif spec == "reference":
        examples, excluded = _drop_prompts(load_source("rho-benign"), perplexity_examples(eval_config))
    else:
        examples = load_examples(spec)
        if not all(e.response.strip() for e in examples):
            missing = sum(not e.response.strip() for e in examples)
            raise DataError(f"fine-tuning data '{spec}': {missing} of {len(examples)} examples have no response "
                            "(fine-tuning needs prompt/response pairs)")
    if not examples:
        raise DataError(f"fine-tuning data '{spec}' is empty")
    if n is not None and n > len(examples):
        raise DataError(f"fine-tuning data '{spec}' has {len(examples)} examples, fewer than n_examples = {n}")
    chosen = sample(examples, n, seed)
    record = {"data": spec, "n": len(chosen), "available": len(examples), "excluded": excluded,
              "sha256": sha256_json([e.to_dict() for e in chosen])}
    return chosen, record


# --------------------------------------------------------------------------------------------------
# The job


def save_loss_curve(hist: TrainHistory, folder: Path, title: str) -> dict[str, str]:
    """``loss.csv`` (step, loss, lr) and ``loss.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    pd.DataFrame({"step": hist.steps, "loss": hist.loss, "lr": hist.lr}).to_csv(folder / "loss.csv", index=False)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    loss = pd.Series(hist.loss, index=hist.steps)
    ax.plot(loss.index, loss.values, lw=0.8, alpha=0.5, label="per step")
    ax.plot(loss.index, loss.rolling(10, min_periods=1).mean().values, lw=1.8, label="mean of the last 10 steps")
    ax.legend(fontsize=8)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (nats per response token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=120)
    plt.close(fig)
    return {"loss_table": "loss.csv", "loss_figure": "loss.png"}


def _save_adapter(trained, folder: Path, freeze: Mapping[str, torch.Tensor] | None, mode: str) -> None:
    """The PEFT adapter (unmasked factors: in ``weights`` and ``rewind`` mode the exact model applies the mask,
    which :func:`merge_lora` and ``merged/`` do) and the freeze mask beside it."""
    from ..groups import save_group

    trained.save_pretrained(folder)
    if freeze is not None:
        save_group(folder / "freeze_mask.safetensors", freeze, {"freeze_mode": mode}, overwrite=True)


def eval_change(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> dict[str, Any]:
    """The headline figures before and after: ASR (vanilla, no system prompt, primary judge), refusal rate,
    over-refusal, perplexity and mean zero-shot accuracy, as read from the two evaluation summaries."""
    from ..evaluation.report import headline

    out = {"after": headline(after)}
    if before is not None:
        out["before"] = headline(before)
    return out


def finetune_memory(model, train_config: LoraTrainConfig, *, full: bool,
                    track: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> str:
    """The estimated peak memory of the fine-tuning (:func:`brittle.memory.estimate_finetune`: a micro-batch of
    ``batch_size`` x ``max_length`` tokens, the adapters or the full model's optimiser state, the drift tracker's
    entries) against the weights' device, as one log line."""
    from ..memory import ModelShape, describe, device_bytes, dtype_name, estimate_finetune

    weight = next(model.parameters())
    tracked = sum(int(m.sum()) for group in (track or {}).values() for m in group.values())
    est = estimate_finetune(ModelShape.of_model(model), dtype=dtype_name(model),
                            batch_size=train_config.batch_size, max_length=train_config.max_length, full=full,
                            rank=train_config.r, gradient_checkpointing=train_config.gradient_checkpointing,
                            tracked_entries=tracked)
    return describe(est, device_bytes(weight.device))


def run_finetune(model, tokenizer, examples: Sequence[Example], cfg: FinetuneConfig, folder: Path, *,
                 train_config: FinetuneTrainConfig, freeze: Mapping[str, torch.Tensor] | None,
                 track: Mapping[str, Mapping[str, torch.Tensor]], checkpoint_dir: Path | None,
                 eval_config: EvalConfig, progress: bool = True, before_from: Path | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate ``model`` (if ``cfg.evaluate``), fine-tune it in place with drift tracking, write the stage's
    files into ``folder`` and evaluate the result; returns the outputs record (file names and figures).
    ``before_from``: an ``eval/before`` folder of the same model under the same evaluation settings (another
    fine-tuning of the run), copied instead of evaluating again."""
    from ..drift import DriftTracker
    from ..evaluation.suite import evaluate_model, prepare_inputs

    folder = Path(folder)
    outputs: dict[str, Any] = {}
    inputs = prepare_inputs(eval_config) if cfg.evaluate else None
    before = None
    if cfg.evaluate and before_from is not None:
        import shutil

        log(f"[finetune] the model before fine-tuning: evaluated already ({before_from})")
        shutil.copytree(before_from, folder / "eval" / "before", dirs_exist_ok=True)
        before = json.loads((folder / "eval" / "before" / "summary.json").read_text())
    elif cfg.evaluate:
        log("[finetune] evaluating the model before fine-tuning")
        before = evaluate_model(model, tokenizer, folder / "eval" / "before", eval_config, overwrite=True,
                                progress=progress, _inputs=inputs)
    log(f"[finetune] {finetune_memory(model, train_config, full=cfg.full, track=track)}")
    tracker = DriftTracker(model, track, every=cfg.drift_every, seed=train_config.seed) if track else None
    log(f"[finetune] {'full' if cfg.full else 'LoRA'} fine-tuning on {len(examples)} examples"
        + (f", {cfg.freeze_mode}-frozen group" if freeze is not None else "")
        + (f", tracking {len(track)} groups every {cfg.drift_every} steps" if track else ""))
    trained, hist = train_lora(model, tokenizer, examples, train_config, progress=progress,
                               on_step=tracker.on_step if tracker else None, full=cfg.full, freeze=freeze,
                               freeze_mode=cfg.freeze_mode, checkpoint_dir=checkpoint_dir,
                               checkpoint_every=cfg.checkpoint_every,
                               state={"drift": tracker} if tracker else None)
    steps = hist.steps[-1] if hist.steps else 0
    outputs["train"] = {"steps": steps, "seconds": round(hist.seconds, 1), "first_loss": hist.loss[0],
                        "final_loss": hist.loss[-1]}
    write_json(folder / "train_history.json", hist.to_dict())
    title = (f"fine-tuning on {Path(cfg.data).stem} ({len(examples)} examples)"
             + (f", {Path(cfg.freeze).stem} frozen ({cfg.freeze_mode})" if freeze else ""))
    outputs["files"] = save_loss_curve(hist, folder, title)
    if tracker is not None:
        tracker.finish(steps, trained)
        outputs["files"].update({f"drift:{k}": f"drift/{v}" for k, v in tracker.save(folder / "drift").items()})
    if not cfg.full:
        _save_adapter(trained, folder / "adapter", freeze, cfg.freeze_mode)
        outputs["files"]["adapter"] = "adapter"
    if not (cfg.merge or cfg.full or cfg.evaluate):
        return outputs
    merged = merge_lora(trained)
    if cfg.merge or cfg.full:
        merged.save_pretrained(folder / "merged")
        tokenizer.save_pretrained(folder / "merged")
        outputs["files"]["merged"] = "merged"
    if cfg.evaluate:
        log("[finetune] evaluating the fine-tuned model")
        after = evaluate_model(merged, tokenizer, folder / "eval" / "after", eval_config, overwrite=True,
                               progress=progress, _inputs=inputs)
        outputs["evaluation"] = eval_change(before, after)
    return outputs


__all__ = ["ATTACK_DEFAULTS", "FINETUNE_DATA", "FinetuneConfig", "FinetuneTrainConfig", "eval_change",
           "finetune_examples", "run_finetune", "save_loss_curve"]
