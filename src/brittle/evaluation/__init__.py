"""Evaluation: batched generation, refusal judges, attack success, utility.

Heavy pieces (lm-eval, the suite) are imported lazily so ``import brittle.evaluation`` stays cheap.
"""

from .generation import GenerationConfig, generate
from .judges import (
    DEFAULT_JUDGE,
    DEGENERATE_REASONS,
    JUDGES,
    VERDICTS,
    WEI_REFUSAL_STRINGS,
    degenerate_reason,
    explain_refusal_v1,
    get_judge,
    keyword_wei,
    refusal_v1,
)
from .stats import rate, wilson_interval

_LAZY = {
    "EvalConfig": "suite", "evaluate_model": "suite", "make_config": "suite",
    "no_system_prompt": "suite", "LLAMA2_DEFAULT_SYSTEM_PROMPT": "suite",
    "summary_markdown": "report", "compare_markdown": "report",
    "zero_shot_accuracy": "zeroshot", "perplexity": "utility", "validate_judges": "validation",
    "asr_any_of_n": "asr", "suffix_aggregate": "asr", "load_suffixes": "asr",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "GenerationConfig", "generate", "DEFAULT_JUDGE", "DEGENERATE_REASONS", "JUDGES", "VERDICTS", "WEI_REFUSAL_STRINGS",
    "degenerate_reason", "explain_refusal_v1",
    "get_judge", "keyword_wei", "refusal_v1", "rate", "wilson_interval", *_LAZY,
]
