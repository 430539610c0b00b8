"""One call that measures safety and utility of a model and writes ``summary.json``.

Safety (greedy unless stated, ``max_new_tokens`` per answer, prompts = the held-out harmful split,
AdvBench[:100] by default):

* ``vanilla_sys``    — with the model's default system prompt: ``system_prompt`` if given (e.g. Llama-2's
  official one, alias ``llama2``), else whatever the chat template inserts when no system message is
  given (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging Face"; templates without
  a default: none, and the variant then equals ``vanilla_nosys``).
* ``vanilla_nosys``  — without a system prompt. Concretely: no system message at all, except for
  templates that inject a default system prompt when none is given (SmolLM2, Qwen2.5): those get an
  explicit EMPTY system message so the default does not appear (see :func:`no_system_prompt`).
* ``sampled_any_of_n`` — ``num_samples`` samples at ``temperature`` on the first ``n_sampled`` prompts, no
  system prompt; a prompt is attacked if ANY sample is judged compliance. ``sampled_per_sample`` is the
  mean over all samples (the paper's code's effective aggregation) for comparison.
* ``suffix_<i>`` / ``suffix_any`` / ``suffix_best`` — user-supplied adversarial suffixes appended to the
  user turn (``prompt + " " + suffix``), greedy, no system prompt.

Every ASR is ``{"value", "ci95" (Wilson), "n"}``; ``degenerate[variant]`` is the share of that
variant's answers (all samples) the primary judge calls degenerate, and ``degenerate_reasons[variant]``
(also for ``benign``, ``edgy``, ``refusal_<name>``) splits it into ``{reason: share}`` by
:func:`~brittle.evaluation.judges.degenerate_reason` (``empty``, ``lone_opening``, ``looping``, ``gibberish``,
``other``).

Utility: ``refusal_harmful`` (refusal share on ``vanilla_nosys``), ``over_refusal`` (refusal share on held-out
benign instructions, greedy, no system prompt), ``over_refusal_edgy`` (same on benign-but-edgy prompts),
``perplexity`` (token-weighted, of reference answers to held-out benign questions) and ``accuracy``
(zero-shot lm-eval, per task and ``mean``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..data.core import DataError, Example
from ..io import ExistsError
from .chat import no_system_prompt
from .config import SYSTEM_PROMPT_ALIASES as SYSTEM_PROMPT_ALIASES  # re-exported
from .config import (
    LLAMA2_DEFAULT_SYSTEM_PROMPT,
    EvalConfig,
    make_config,
    resolve_system_prompt,
)
from .generation import CPU_AUTO_BATCH
from .measure import (
    Generator,
    Judges,
    accuracy_part,
    perplexity_part,
    prompt_counts,
    refusal_openings,
    refusal_variants,
    safety_by_judge,
    sampled_variant,
    suffix_variants,
    summarize,
    system_prompts_part,
    vanilla_variants,
    write_outputs,
)
from .stats import rate

# --------------------------------------------------------------------------------------------------
# Prompt sets


def _nonempty(examples: list[Example], what: str) -> list[Example]:
    if not examples:
        raise DataError(f"the {what} prompt set is empty")
    return examples


def harmful_prompts(cfg: EvalConfig) -> list[Example]:
    from ..data.sources import harmful_splits, load_examples

    exs = load_examples(cfg.harmful) if cfg.harmful else harmful_splits(seed=cfg.seed)[1]
    return _nonempty(exs, "harmful")[: cfg.n_harmful]


def benign_prompts(cfg: EvalConfig) -> list[Example]:
    from ..data.sources import benign_splits, load_examples

    exs = load_examples(cfg.benign) if cfg.benign else benign_splits(n_eval=100, seed=cfg.seed)[1]
    return _nonempty(exs, "benign")[: cfg.n_benign]


def edgy_prompts(cfg: EvalConfig) -> list[Example]:
    from ..data.sources import load_examples

    return _nonempty(load_examples(cfg.edgy), "edgy")[: cfg.n_edgy]


def perplexity_examples(cfg: EvalConfig) -> list[Example]:
    from ..data.sources import load_examples

    exs = [e for e in load_examples(cfg.perplexity_data) if e.response.strip()]
    if not exs:
        raise DataError(f"perplexity data '{cfg.perplexity_data}' has no responses (need prompt/response pairs)")
    return exs[: cfg.n_perplexity]


@dataclass
class _Inputs:
    judges: Judges
    harmful: list[Example]
    benign: list[Example]
    edgy: list[Example]
    perplexity: list[Example]
    extra_sets: dict[str, list[Example]]


def prepare_inputs(cfg: EvalConfig) -> _Inputs:
    """Load the judges and every prompt set and check the task names: bad input fails before any model work."""
    judges = Judges([cfg.judge, *cfg.extra_judges])
    harmful = harmful_prompts(cfg)
    benign = benign_prompts(cfg) if cfg.n_benign else []
    edgy = edgy_prompts(cfg) if cfg.n_edgy else []
    ppl_examples = perplexity_examples(cfg) if cfg.n_perplexity else []
    extra_sets: dict[str, list[Example]] = {}
    if cfg.refusal_sets:
        from ..data.sources import load_examples

        extra_sets = {s: _nonempty(load_examples(s), s)[: cfg.n_refusal_set] for s in cfg.refusal_sets}
    if cfg.tasks:
        from .zeroshot import resolve_tasks

        resolve_tasks(cfg.tasks, cfg.task_dirs)
    return _Inputs(judges, harmful, benign, edgy, ppl_examples, extra_sets)


# --------------------------------------------------------------------------------------------------
# The suite


def _check_free(out_dir: Path, overwrite: bool) -> None:
    if (out_dir / "summary.json").exists() and not overwrite:
        raise ExistsError(f"{out_dir / 'summary.json'} already exists; pass --force to overwrite it, or choose another --out")


def evaluate_model(
    model,
    tokenizer,
    out_dir: str | Path,
    config: EvalConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    _inputs: _Inputs | None = None,
) -> dict:
    """Run the whole evaluation; write ``summary.json``, ``summary.md`` and ``generations/*.jsonl`` into
    ``out_dir``; return the summary (see the module docstring and the README). The ``eval`` stage
    (:func:`brittle.pipeline.eval_stage`) records the manifest."""
    from ..models import model_id, weight_fingerprint

    cfg = config or EvalConfig()
    out_dir = Path(out_dir)
    _check_free(out_dir, overwrite)
    log = log or (lambda s: None)
    inputs = _inputs if _inputs is not None else prepare_inputs(cfg)
    harmful = inputs.harmful
    nosys = no_system_prompt(tokenizer)
    sys_prompt = resolve_system_prompt(cfg.system_prompt)
    fingerprint = weight_fingerprint(model)
    gen = Generator(model, tokenizer, inputs.judges, progress, log)

    t0 = time.perf_counter()
    runs, notes = vanilla_variants(gen, harmful, cfg, nosys, sys_prompt)
    runs |= sampled_variant(gen, harmful, cfg, nosys)
    suffix_runs = suffix_variants(gen, harmful, cfg, nosys)
    runs |= suffix_runs
    runs |= refusal_variants(gen, inputs.extra_sets, inputs.benign, inputs.edgy, cfg, nosys)
    by_judge = safety_by_judge(runs, inputs.judges.names, list(suffix_runs), list(inputs.extra_sets))
    ppl, ppl_seconds = perplexity_part(model, tokenizer, inputs.perplexity, cfg, progress=progress, log=log)
    acc, acc_seconds = accuracy_part(model, tokenizer, cfg, log=log)
    timings = {name: run.seconds for name, run in runs.items()}
    timings |= {k: x for k, x in (("perplexity", ppl_seconds), ("zeroshot", acc_seconds)) if x is not None}
    timings["total"] = round(time.perf_counter() - t0, 1)
    if cfg.batch_size == "auto":
        notes.append(f"generation batch size auto (sized to the free GPU memory; {CPU_AUTO_BATCH} off a GPU): "
                     + ", ".join(f"{name} {run.batch_size}" for name, run in runs.items()))

    summary = summarize(model=model_id(model), weights=fingerprint, cfg=cfg, judges=inputs.judges.names,
                        by_judge=by_judge, perplexity=ppl, accuracy=acc,
                        system_prompts=system_prompts_part(tokenizer, sys_prompt, nosys),
                        n_prompts=prompt_counts(cfg, harmful, inputs.benign, inputs.edgy, inputs.extra_sets),
                        notes=notes, timings=timings,
                        openings=refusal_openings(runs["vanilla_nosys"].answers,
                                                  runs["vanilla_nosys"].verdicts[cfg.judge]))
    write_outputs(out_dir, summary, {name: run.rows for name, run in runs.items()}, overwrite=overwrite)
    return summary


__all__ = ["EvalConfig", "LLAMA2_DEFAULT_SYSTEM_PROMPT", "evaluate_model", "make_config",
           "no_system_prompt", "rate"]
