"""Datasets built from the model itself (how the paper built its safety data from Llama-2-chat): the pure parts.

* safety set  = harmful prompts (training split: never the evaluation prompts) + the model's own greedy
  responses, keeping only those a refusal judge calls refusals;
* utility set = benign instructions (training split) + the model's own greedy responses (empty ones dropped).

This module picks the prompts and filters the answers; generating the answers and judging them is the
``data`` stage's work (:func:`brittle.pipeline.data_stage`), which passes them in.
"""

from __future__ import annotations

from collections.abc import Sequence

from .core import Example, sample

BUILT_SETS = ("safety", "utility")


def build_prompts(kind: str, n: int, seed: int = 0) -> list[Example]:
    """``n`` prompts (seeded draw) of the training split a built set of ``kind`` answers."""
    from .sources import benign_splits, harmful_splits

    if kind == "safety":
        return sample(harmful_splits(seed=seed)[0], n, seed)
    if kind == "utility":
        return sample(benign_splits(seed=seed)[0], n, seed)
    raise ValueError(f"unknown built set '{kind}' (known: {', '.join(BUILT_SETS)})")


def keep_answers(kind: str, prompts: Sequence[Example], answers: Sequence[str],
                 verdicts: Sequence[str] | None = None) -> tuple[list[Example], dict[str, int]]:
    """The examples a built set keeps, and its counts: safety keeps non-empty answers judged ``refusal``
    (``verdicts`` from the judge), utility keeps non-empty answers."""
    if kind == "safety":
        if verdicts is None:
            raise ValueError("the safety set needs the judge's verdicts")
        keep = [v == "refusal" and a.strip() != "" for v, a in zip(verdicts, answers, strict=True)]
    else:
        keep = [a.strip() != "" for a in answers]
    kept = [Example(e.prompt, a, e.source, e.id) for e, a, k in zip(prompts, answers, keep, strict=True) if k]
    return kept, {"generated": len(prompts), "kept": len(kept), "dropped": len(prompts) - len(kept)}


def weak_alignment_note(counts: dict[str, int]) -> str | None:
    """A note when the model refused few harmful prompts (its safety set is then small)."""
    if counts["kept"] < max(16, counts["generated"] // 4):
        return (f"note: the model refused only {counts['kept']}/{counts['generated']} harmful prompts; it is weakly "
                "aligned, so its safety set is small (an aligned model such as smollm2-135m-safe refuses more)")
    return None
