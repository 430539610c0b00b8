"""Datasets: the Example record, chat encoding with response-only labels, sources, splits, builds."""

from .core import (
    FALLBACK_TEMPLATE,
    IGNORE_INDEX,
    DataError,
    Example,
    dedupe,
    encode,
    example_id,
    load_file,
    make_examples,
    pad_batch,
    render_example,
    render_prompt,
    sample,
    save_jsonl,
    split_examples,
    strip_inst_tags,
)
from .sources import (
    HARMFUL_EVAL,
    SOURCES,
    SourceInfo,
    benign_splits,
    harmful_splits,
    load_examples,
    load_source,
)

__all__ = [
    "FALLBACK_TEMPLATE", "IGNORE_INDEX", "DataError", "Example", "dedupe", "encode", "example_id", "load_file",
    "make_examples", "pad_batch", "render_example", "render_prompt", "sample", "save_jsonl", "split_examples",
    "strip_inst_tags",
    "HARMFUL_EVAL", "SOURCES", "SourceInfo", "benign_splits", "harmful_splits", "load_examples", "load_source",
]
