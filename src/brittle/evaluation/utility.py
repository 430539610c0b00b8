"""Utility measurements that need no generation: perplexity of reference responses."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..data.core import IGNORE_INDEX, DataError, Example, encode, pad_batch


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_length: int | None = 512,
    system_prompt: str | None = None,
    progress: bool = False,
) -> dict:
    """Token-weighted perplexity of the examples' responses given their prompts.

    Each example is encoded with :func:`brittle.data.core.encode` (chat template, labels on the response
    tokens and its end-of-turn token only). The result is ``exp(sum of token NLLs / number of label
    tokens)`` over all examples together (every label token weighs the same; long answers weigh more).
    Returns ``{"value", "nll" (mean per token), "tokens", "n"}``.
    """
    examples = [e for e in examples if e.response.strip()]
    if not examples:
        raise DataError("perplexity needs examples with non-empty responses (got none)")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [encode(tokenizer, e, max_length, system_prompt=system_prompt) for e in examples]
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(encoded), batch_size), desc="perplexity", disable=not progress, unit="batch"):
            batch = pad_batch(encoded[start : start + batch_size], pad, side="right")
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            shift_logits = logits[:, :-1]
            shift_labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
            total_nll += float(nll)
            total_tokens += int((shift_labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise DataError("perplexity: no response tokens left after truncation (raise max_length)")
    mean = total_nll / total_tokens
    return {"value": math.exp(mean), "nll": mean, "tokens": total_tokens, "n": len(examples)}
