"""Evaluation: batched generation, refusal judges, attack success, utility."""

from .generation import GenerationConfig, generate
from .judges import JUDGES, VERDICTS, WEI_REFUSAL_STRINGS, get_judge, keyword_wei

__all__ = ["GenerationConfig", "generate", "JUDGES", "VERDICTS", "WEI_REFUSAL_STRINGS", "get_judge", "keyword_wei"]
