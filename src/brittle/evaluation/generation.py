"""Batched generation with left padding, greedy or sampled, reproducible by seed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..data.core import render_prompt

#: ``batch_size = "auto"`` off a GPU: a fixed batch (a CPU's throughput barely grows with the batch, its memory is
#: rarely the limit).
CPU_AUTO_BATCH = 32


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. ``temperature == 0`` means greedy; ``num_samples`` answers per prompt."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    batch_size: int | str = 16  # prompts per batch, or "auto": sized to the free GPU memory (auto_batch_size)
    seed: int = 0
    system_prompt: str | None = None  # None: the chat template's default; "" or text: explicit

    def to_dict(self) -> dict:
        return asdict(self)


def check_batch_size(value: int | str) -> int | str:
    """``value`` when it is a generation batch size (an integer >= 1, or ``"auto"``); else a ValueError."""
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"batch_size must be an integer >= 1 or 'auto', got {value!r}")
    return value


def auto_batch_size(model, tokenizer, texts: Sequence[str], config: GenerationConfig, *,
                    free_bytes: int | None = None) -> int:
    """Prompts per batch for ``batch_size = "auto"``: :func:`brittle.memory.generation_batch_size` for the longest
    of the rendered prompts ``texts``, ``config.max_new_tokens`` and ``config.num_samples``, against the free memory
    of the model's GPU (``torch.cuda.mem_get_info``; the smallest over the GPUs it spans, a conservative choice for a
    model split over several), or ``free_bytes`` when given; :data:`CPU_AUTO_BATCH` for a model off a GPU. At least
    1, at most ``len(texts)``. Several processes take the smallest of their choices, so that they share out the same
    batches."""
    from ..memory import ModelShape, dtype_name, generation_batch_size

    devices = {p.device for p in model.parameters() if p.device.type == "cuda"}
    if free_bytes is None and devices:
        free_bytes = min(torch.cuda.mem_get_info(d)[0] for d in devices)
    if free_bytes is None:
        n = CPU_AUTO_BATCH
    else:
        longest = max((len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]), default=1)
        n = generation_batch_size(ModelShape.of_model(model), dtype=dtype_name(model), free_bytes=free_bytes,
                                  prompt_length=longest, max_new_tokens=config.max_new_tokens,
                                  num_samples=config.num_samples)
    n = max(1, min(n, len(texts)))
    return min(distributed.gather(n))  # one process: [n]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    config: GenerationConfig = GenerationConfig(),
    *,
    suffix: str = "",
    progress: bool = True,
    desc: str = "generate",
    on_batch_size: Callable[[int], None] | None = None,
) -> list[list[str]]:
    """Answer each prompt ``config.num_samples`` times; returns ``[prompt][sample] -> text``.

    Prompts are rendered with the chat template (``suffix`` is appended to the user turn, e.g. an
    adversarial suffix), batched with left padding, decoded without special tokens. Sampling is
    seeded per batch from ``config.seed`` so results do not depend on the batch schedule of other runs
    with the same settings. ``config.batch_size = "auto"`` sizes the batches to the free GPU memory
    (:func:`auto_batch_size`) and tells ``on_batch_size`` the size chosen; greedy answers can differ slightly
    between batch sizes (padding).
    Several processes (:mod:`brittle.distributed`) take whole batches each (batch ``b`` on
    process ``b mod w``, seeded as in one process) and every process returns all the answers.
    """
    if config.num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    if config.temperature == 0 and config.num_samples > 1:
        raise ValueError("num_samples > 1 needs temperature > 0 (greedy decoding gives identical samples)")
    batch_size = check_batch_size(config.batch_size)
    texts = [render_prompt(tokenizer, p + suffix, config.system_prompt) for p in prompts]
    if batch_size == "auto":
        batch_size = auto_batch_size(model, tokenizer, texts, config)
        if on_batch_size is not None:
            on_batch_size(batch_size)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    starts = list(range(0, len(texts), batch_size))
    mine = distributed.shard(starts)  # several processes: whole batches each, seeded as in one process
    answers: dict[int, list[list[str]]] = {}
    try:
        bar = tqdm(total=sum(len(texts[s : s + batch_size]) for s in mine), desc=desc,
                   disable=not progress or not distributed.is_main(), unit="prompt")
        for start in mine:
            chunk = texts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kwargs = dict(max_new_tokens=config.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            if config.temperature > 0:
                torch.manual_seed(config.seed * 1_000_003 + start)
                kwargs.update(do_sample=True, temperature=config.temperature, top_p=config.top_p,
                              num_return_sequences=config.num_samples)
            else:
                kwargs.update(do_sample=False)
            gen = model.generate(**enc, **kwargs)
            new = gen[:, enc["input_ids"].shape[1]:]
            decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
            k = config.num_samples
            answers[start] = [[d.strip() for d in decoded[i * k : (i + 1) * k]] for i in range(len(chunk))]
            bar.update(len(chunk))
        bar.close()
    finally:
        tokenizer.padding_side = old_side
    for part in distributed.gather(answers):  # the other processes' batches (in one process: its own)
        answers.update(part)
    return [a for start in starts for a in answers[start]]
