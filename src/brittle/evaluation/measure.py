"""The measurements behind :func:`brittle.evaluation.suite.evaluate_model`, one function each.

Each takes what it needs explicitly and returns its part of the summary; the ones that run the model
also return the seconds they took. ``evaluate_model`` only strings them together.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..data.core import Example, render_prompt
from ..io import write_json, write_jsonl, write_text
from .asr import asr_any_of_n, asr_per_sample, degenerate_shares, prompt_share, share, suffix_aggregate
from .config import EvalConfig
from .generation import GenerationConfig, generate
from .judges import explain_refusal_v1, get_judge

Verdicts = list[list[str]]  # [prompt][sample] -> verdict


# --------------------------------------------------------------------------------------------------
# Generating and judging


class Judges:
    """The primary judge plus extra ones; verdicts for [prompt][sample] responses."""

    def __init__(self, names: Sequence[str]):
        self.names = list(dict.fromkeys(names))
        self.fns = {n: get_judge(n) for n in self.names}  # fails early on an unknown / unloadable judge

    def __call__(self, prompts: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, Verdicts]:
        flat_p = [p for p, a in zip(prompts, answers, strict=True) for _ in a]
        flat_r = [r for a in answers for r in a]
        out = {}
        for name, fn in self.fns.items():
            flat = fn(flat_p, flat_r)
            it = iter(flat)
            out[name] = [[next(it) for _ in a] for a in answers]
        return out


def _rows(examples: Sequence[Example], answers, verdicts: dict[str, Verdicts], suffix: str | None = None):
    rows = []
    for i, (e, per) in enumerate(zip(examples, answers, strict=True)):
        for j, resp in enumerate(per):
            row = {"id": e.id, "prompt": e.prompt}
            if suffix is not None:
                row["suffix"] = suffix
            row.update(sample=j, response=resp, verdicts={n: v[i][j] for n, v in verdicts.items()},
                       refusal_v1_reason=explain_refusal_v1(resp)[1])
            rows.append(row)
    return rows


@dataclass(frozen=True)
class Run:
    """One generation variant: verdicts per judge, the rows of ``generations/<variant>.jsonl``, seconds taken, the
    generation batch size used (prompts)."""

    verdicts: dict[str, Verdicts]
    rows: list[dict]
    seconds: float
    batch_size: int

    @property
    def answers(self) -> list[list[str]]:
        """The answers ([prompt][sample], like the verdicts), from the rows."""
        it = iter(row["response"] for row in self.rows)
        return [[next(it) for _ in per] for per in next(iter(self.verdicts.values()))]


@dataclass(frozen=True)
class Generator:
    """Answers a prompt set with the model and judges the answers (what every generation variant does)."""

    model: Any
    tokenizer: Any
    judges: Judges
    progress: bool = True
    log: Callable[[str], None] = lambda s: None

    def run(self, variant: str, examples: list[Example], gcfg: GenerationConfig, suffix: str = "") -> Run:
        t = time.perf_counter()
        self.log(f"[{variant}] {len(examples)} prompts x {gcfg.num_samples} sample(s)")
        prompts = [e.prompt for e in examples]
        suffix_text = (" " + suffix) if suffix else ""
        sizes = [gcfg.batch_size]

        def chosen(n: int) -> None:  # batch_size "auto": the size generate chose, logged and kept for the notes
            sizes.append(n)
            self.log(f"[{variant}] generation batch size auto -> {n}")

        answers = generate(self.model, self.tokenizer, prompts, gcfg, suffix=suffix_text,
                           progress=self.progress, desc=variant, on_batch_size=chosen)
        judged_prompts = [p + suffix_text for p in prompts]
        verdicts = self.judges(judged_prompts, answers)
        rows = _rows(examples, answers, verdicts, suffix if suffix else None)
        return Run(verdicts, rows, round(time.perf_counter() - t, 1), sizes[-1])


def greedy(cfg: EvalConfig, system_prompt: str | None) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed,
                            system_prompt=system_prompt)


# --------------------------------------------------------------------------------------------------
# Generation variants (each returns {variant: Run}, in the order they ran)


def vanilla_variants(gen: Generator, harmful: list[Example], cfg: EvalConfig, nosys: str | None,
                     sys_prompt: str | None) -> tuple[dict[str, Run], list[str]]:
    """Greedy ``vanilla_nosys`` and ``vanilla_sys``, and the notes on how ``vanilla_sys`` was obtained."""
    runs = {"vanilla_nosys": gen.run("vanilla_nosys", harmful, greedy(cfg, nosys))}
    if not cfg.with_system_prompt:
        return runs, ["vanilla_sys not run (with_system_prompt=False)"]
    if sys_prompt is None and nosys is None:  # the template has no default system prompt
        runs["vanilla_sys"] = replace(runs["vanilla_nosys"], seconds=0.0)
        return runs, ["the chat template has no default system prompt and none was given: vanilla_sys = vanilla_nosys"]
    runs["vanilla_sys"] = gen.run("vanilla_sys", harmful, greedy(cfg, sys_prompt))
    return runs, []


def sampled_variant(gen: Generator, harmful: list[Example], cfg: EvalConfig, nosys: str | None) -> dict[str, Run]:
    """``sampled``: ``num_samples`` samples on the first ``n_sampled`` prompts (none if ``n_sampled`` is 0)."""
    if not cfg.n_sampled:
        return {}
    gcfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            num_samples=cfg.num_samples, batch_size=cfg.batch_size, seed=cfg.seed, system_prompt=nosys)
    return {"sampled": gen.run("sampled", harmful[: cfg.n_sampled], gcfg)}


def suffix_variants(gen: Generator, harmful: list[Example], cfg: EvalConfig, nosys: str | None) -> dict[str, Run]:
    """``suffix_<i>``: greedy with the i-th adversarial suffix appended to the user turn."""
    examples = harmful[: cfg.n_suffix_prompts] if cfg.n_suffix_prompts else harmful
    return {f"suffix_{i}": gen.run(f"suffix_{i}", examples, greedy(cfg, nosys), suffix)
            for i, suffix in enumerate(cfg.suffixes, 1)}


def refusal_variants(gen: Generator, extra_sets: Mapping[str, list[Example]], benign: list[Example],
                     edgy: list[Example], cfg: EvalConfig, nosys: str | None) -> dict[str, Run]:
    """Greedy answers to the extra harmful sets (``refusal_<name>``) and the over-refusal sets ``benign`` and
    ``edgy`` (skipped when empty)."""
    sets = {f"refusal_{name}": exs for name, exs in extra_sets.items()}
    sets |= {name: exs for name, exs in (("benign", benign), ("edgy", edgy)) if exs}
    return {name: gen.run(name, exs, greedy(cfg, nosys)) for name, exs in sets.items()}


# --------------------------------------------------------------------------------------------------
# Rates from the verdicts


def _mean(xs: Sequence[Any]) -> Any:
    """Mean of numbers, or key by key of ``{reason: share}`` dicts."""
    if isinstance(xs[0], Mapping):
        return {k: _mean([x[k] for x in xs]) for k in xs[0]}
    return sum(xs) / len(xs)


def _round4(x: Any) -> Any:
    return {k: _round4(y) for k, y in x.items()} if isinstance(x, Mapping) else round(x, 4)


def _per_variant(per_run: Mapping[str, Any], vanilla: Sequence[str], suffix_names: Sequence[str],
                 best_suffix: str | None) -> dict[str, Any]:
    """A per-run figure for each safety variant: ``sampled_*`` from the ``sampled`` run, ``suffix_any`` the mean
    over the suffixes, ``suffix_best`` that of the best suffix."""
    out = {x: per_run[x] for x in vanilla}
    if "sampled" in per_run:
        out["sampled_any_of_n"] = out["sampled_per_sample"] = per_run["sampled"]
    if suffix_names:
        out |= {n: per_run[n] for n in suffix_names}
        out["suffix_any"] = _mean([per_run[n] for n in suffix_names])
        out["suffix_best"] = per_run[best_suffix]
    return out


def asr_block(v: Mapping[str, Verdicts], suffix_names: Sequence[str],
              answers: Mapping[str, Sequence[Sequence[str]]] | None = None) -> dict[str, Any]:
    """ASR and degenerate share of each safety variant under one judge (``v``: variant -> verdicts). Given the
    answers (variant -> [prompt][sample]), also ``degenerate_reasons``: {reason: share} (see
    :func:`~brittle.evaluation.asr.degenerate_shares`) for the same variants and for every other prompt set in
    ``v`` (``benign``, ``edgy``, ``refusal_<name>``); each sums to that variant's / set's degenerate share."""
    vanilla = [x for x in ("vanilla_sys", "vanilla_nosys") if x in v]
    asr = {x: asr_any_of_n(v[x]) for x in vanilla}
    if "sampled" in v:
        asr["sampled_any_of_n"] = asr_any_of_n(v["sampled"])
        asr["sampled_per_sample"] = asr_per_sample(v["sampled"])
    best = None
    if suffix_names:
        agg = suffix_aggregate({n: v[n] for n in suffix_names})
        asr.update(agg)
        best = agg["suffix_best"]["suffix"]
    deg = _per_variant({n: share(v[n], "degenerate") for n in v}, vanilla, suffix_names, best)
    out = {"asr": asr, "degenerate": _round4(deg)}
    if answers is not None:
        per_run = {n: degenerate_shares(v[n], answers[n]) for n in v}
        reasons = _per_variant(per_run, vanilla, suffix_names, best)
        reasons |= {n: r for n, r in per_run.items() if n not in reasons and n != "sampled"}
        out["degenerate_reasons"] = _round4(reasons)
    return out


def refusal_block(v: Mapping[str, Verdicts], extra_names: Sequence[str]) -> dict[str, Any]:
    """Refusal shares (harmful, extra sets, over-refusal) and degenerate shares of the refusal sets under one judge."""
    return {
        "refusal_harmful": prompt_share(v["vanilla_nosys"], "refusal"),
        "refusal_other": {s: prompt_share(v[f"refusal_{s}"], "refusal") for s in extra_names},
        "degenerate_other": {s: share(v[f"refusal_{s}"], "degenerate") for s in extra_names},
        "over_refusal": prompt_share(v["benign"], "refusal") if "benign" in v else None,
        "over_refusal_edgy": prompt_share(v["edgy"], "refusal") if "edgy" in v else None,
        "degenerate_benign": share(v["benign"], "degenerate") if "benign" in v else None,
        "degenerate_edgy": share(v["edgy"], "degenerate") if "edgy" in v else None,
    }


def refusal_openings(answers: Sequence[Sequence[str]], verdicts: Verdicts, *, words: int = 3,
                     top: int = 5) -> dict[str, Any]:
    """How varied the refusals are: among the answers (first sample of each prompt) judged ``refusal``, the number of
    distinct openings (the first ``words`` whitespace-separated words), the ``top`` most frequent with their counts,
    and the number of distinct answers. An aligned chat model refuses in varied words; one that learnt a few
    templates opens nearly every refusal alike."""
    refusals = [a[0] for a, v in zip(answers, verdicts, strict=True) if v and v[0] == "refusal"]
    openings = Counter(" ".join(a.split()[:words]) for a in refusals)
    return {"n_refusals": len(refusals), "distinct_openings": len(openings), "distinct_answers": len(set(refusals)),
            "words": words, "most_common": [[o, c] for o, c in openings.most_common(top)]}


def safety_by_judge(runs: Mapping[str, Run], judges: Sequence[str], suffix_names: Sequence[str],
                    extra_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``by_judge``: :func:`asr_block` and :func:`refusal_block` for every judge."""
    out = {}
    answers = {name: run.answers for name, run in runs.items()}
    for judge in judges:
        v = {name: run.verdicts[judge] for name, run in runs.items()}
        out[judge] = asr_block(v, suffix_names, answers) | refusal_block(v, extra_names)
    return out


# --------------------------------------------------------------------------------------------------
# Utility


def perplexity_part(model, tokenizer, examples: list[Example], cfg: EvalConfig, *, progress: bool,
                    log: Callable[[str], None]) -> tuple[dict[str, Any], float | None]:
    """``perplexity`` and ``perplexity_detail`` of the reference answers (``None`` without examples), and seconds."""
    if not examples:
        return {"perplexity": None, "perplexity_detail": None}, None
    from .utility import perplexity

    t = time.perf_counter()
    log(f"[perplexity] {len(examples)} reference answers ({cfg.perplexity_data})")
    ppl = perplexity(model, tokenizer, examples, batch_size=8, max_length=cfg.perplexity_max_length, progress=progress)
    seconds = round(time.perf_counter() - t, 1)
    detail = dict(ppl, data=cfg.perplexity_data,
                  definition="exp(total NLL / total label tokens), labels = response + end-of-turn (encode)")
    return {"perplexity": round(ppl["value"], 4), "perplexity_detail": detail}, seconds


def accuracy_part(model, tokenizer, cfg: EvalConfig, *, log: Callable[[str], None]) -> tuple[dict[str, Any], float | None]:
    """``accuracy`` (per task and ``mean``) and ``accuracy_detail`` of the zero-shot tasks (``None`` without
    tasks), and seconds."""
    if not cfg.tasks:
        return {"accuracy": None, "accuracy_detail": None}, None
    from .zeroshot import zero_shot_accuracy

    t = time.perf_counter()
    log(f"[zero-shot] {', '.join(cfg.tasks)} (limit {cfg.limit} per task)")
    detail = zero_shot_accuracy(model, tokenizer, cfg.tasks, limit=cfg.limit, batch_size=cfg.zeroshot_batch_size,
                                task_dirs=cfg.task_dirs, seed=cfg.seed)
    accuracy = {task: round(r["acc"], 4) for task, r in detail.items()}
    accuracy["mean"] = round(sum(r["acc"] for r in detail.values()) / len(detail), 4)
    return {"accuracy": accuracy, "accuracy_detail": detail}, round(time.perf_counter() - t, 1)


# --------------------------------------------------------------------------------------------------
# Summary and outputs


def _val(x):
    return None if x is None else round(x["value"], 4)


def _round(x):
    return None if x is None else round(x, 4)


def system_prompts_part(tokenizer, sys_prompt: str | None, nosys: str | None) -> dict[str, Any]:
    """How the two system-prompt settings were realised, and the templates they render to."""
    return {
        "vanilla_sys": "<template default>" if sys_prompt is None else sys_prompt,
        "nosys": "<explicit empty system message>" if nosys == "" else "<no system message>",
        "rendered_sys": render_prompt(tokenizer, "{prompt}", sys_prompt),
        "rendered_nosys": render_prompt(tokenizer, "{prompt}", nosys),
    }


def prompt_counts(cfg: EvalConfig, harmful: list[Example], benign: list[Example], edgy: list[Example],
                  extra_sets: Mapping[str, list[Example]]) -> dict[str, int]:
    return {"harmful": len(harmful), "sampled": min(cfg.n_sampled, len(harmful)), "benign": len(benign),
            "edgy": len(edgy), **{f"refusal_{s}": len(e) for s, e in extra_sets.items()}}


def summarize(*, model: str, weights: str, cfg: EvalConfig, judges: list[str], by_judge: dict[str, dict[str, Any]],
              perplexity: dict[str, Any], accuracy: dict[str, Any], system_prompts: dict[str, Any],
              n_prompts: dict[str, int], notes: list[str], timings: dict[str, float],
              openings: dict[str, Any] | None = None) -> dict[str, Any]:
    """``summary.json``: the primary judge's numbers at the top level, then details, settings and bookkeeping."""
    main = by_judge[cfg.judge]
    return {
        "model": model,
        "weights": weights,
        "judge": cfg.judge,
        "judges": judges,
        "asr": main["asr"],
        "degenerate": main["degenerate"],
        "degenerate_reasons": main["degenerate_reasons"],
        "refusal_harmful": _val(main["refusal_harmful"]),
        "over_refusal": _val(main["over_refusal"]),
        "over_refusal_edgy": _val(main["over_refusal_edgy"]),
        "degenerate_benign": _round(main["degenerate_benign"]),
        "degenerate_edgy": _round(main["degenerate_edgy"]),
        "refusal_other": {s: _val(r) for s, r in main["refusal_other"].items()},
        "refusal_openings": openings,
        "perplexity": perplexity["perplexity"],
        "accuracy": accuracy["accuracy"],
        "intervals": {k: main[k] for k in ("refusal_harmful", "over_refusal", "over_refusal_edgy") if main[k] is not None}
        | {f"refusal_{s}": r for s, r in main["refusal_other"].items()},
        "perplexity_detail": perplexity["perplexity_detail"],
        "accuracy_detail": accuracy["accuracy_detail"],
        "by_judge": by_judge,
        "system_prompts": system_prompts,
        "n_prompts": n_prompts,
        "suffixes": {f"suffix_{i}": s for i, s in enumerate(cfg.suffixes, 1)},
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "notes": notes,
        "timings": timings,
        "torch_threads": _torch_threads(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def write_outputs(out_dir: Path, summary: dict[str, Any], generations: Mapping[str, list[dict]], *,
                  overwrite: bool) -> None:
    """Write ``generations/<variant>.jsonl``, ``summary.json`` and ``summary.md``."""
    from .report import summary_markdown

    gen_dir = out_dir / "generations"
    for variant, rows in generations.items():
        write_jsonl(gen_dir / f"{variant}.jsonl", rows, overwrite=True)
    write_json(out_dir / "summary.json", summary, overwrite=overwrite)
    write_text(out_dir / "summary.md", summary_markdown(summary) + "\n", overwrite=True)
