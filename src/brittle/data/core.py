"""The record type, chat formatting with response-only labels, file loaders and deterministic splits.

``encode`` is the one place where an (prompt, response) example becomes model input for the whole
toolkit (scoring, alignment, fine-tuning, perplexity): same template, same label mask everywhere.
"""

from __future__ import annotations

import csv
import hashlib
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..io import BrittleError, iter_jsonl

IGNORE_INDEX = -100

# Used only when a tokenizer has no chat template (base models, GPT-2): an Alpaca-style layout.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n### Response:\n' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


class DataError(BrittleError):
    """Bad or empty input data; the message names the file and line where there is one."""


@dataclass(frozen=True)
class Example:
    """One (prompt, response) pair. ``response`` may be empty for prompt-only sets (evaluation)."""

    prompt: str
    response: str
    source: str
    id: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def example_id(source: str, prompt: str) -> str:
    """Stable id from the source name and the prompt text."""
    return f"{source}:{hashlib.sha256(prompt.encode()).hexdigest()[:12]}"


def make_examples(source: str, prompts: Iterable[str], responses: Iterable[str] | None = None) -> list[Example]:
    prompts = list(prompts)
    responses = list(responses) if responses is not None else [""] * len(prompts)
    return [Example(p, r, source, example_id(source, p)) for p, r in zip(prompts, responses, strict=True)]


# --------------------------------------------------------------------------------------------------
# Chat formatting


def _messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    msgs = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return msgs + [{"role": "user", "content": prompt}]


def _template_kwargs(tokenizer) -> dict[str, Any]:
    return {} if getattr(tokenizer, "chat_template", None) else {"chat_template": FALLBACK_TEMPLATE}


def render_prompt(tokenizer, prompt: str, system_prompt: str | None = None) -> str:
    """The prompt as text, up to and including the assistant header (generation starts right after).

    ``system_prompt=None`` keeps the chat template's own default (some templates insert one).
    """
    return tokenizer.apply_chat_template(
        _messages(prompt, system_prompt), tokenize=False, add_generation_prompt=True, **_template_kwargs(tokenizer)
    )


def render_example(tokenizer, example: Example, system_prompt: str | None = None) -> tuple[str, str]:
    """``(prompt_text, full_text)`` where ``full_text`` = prompt_text + rendered response + end of turn.

    Surrounding whitespace of the response is dropped (most templates trim it anyway, and a leading space
    would merge with the template's last prompt token in BPE vocabularies).
    """
    prompt_text = render_prompt(tokenizer, example.prompt, system_prompt)
    full_text = tokenizer.apply_chat_template(
        _messages(example.prompt, system_prompt) + [{"role": "assistant", "content": example.response.strip()}],
        tokenize=False,
        **_template_kwargs(tokenizer),
    )
    if not full_text.startswith(prompt_text):
        # Templates that rewrite earlier turns once an answer exists (rare); labelling would be ambiguous.
        raise DataError(
            f"the chat template of {type(tokenizer).__name__} does not render the prompt as a prefix of the "
            f"conversation (example {example.id}); cannot locate the response tokens"
        )
    return prompt_text, full_text


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    return ids


def encode(
    tokenizer,
    example: Example,
    max_length: int | None = None,
    *,
    system_prompt: str | None = None,
    label_eot: bool = True,
) -> dict[str, torch.Tensor]:
    """Tokenise an example with the chat template; labels only on the response.

    Returns ``{"input_ids": LongTensor[T], "labels": LongTensor[T]}`` (1-D, unpadded). ``labels`` equals
    ``input_ids`` on the response tokens and, if ``label_eot``, on the end-of-turn token that closes the
    response; ``-100`` (ignored) everywhere else, including the prompt and anything after the end of turn.
    Labels are aligned with ``input_ids`` as in Hugging Face (the model shifts them). ``max_length``
    truncates on the right (the prompt is kept, the response cut).
    """
    prompt_text, full_text = render_example(tokenizer, example, system_prompt)
    enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets: list[tuple[int, int]] = enc["offset_mapping"]
    # Where the response text ends inside full_text (templates may strip surrounding whitespace).
    rest = full_text[len(prompt_text):]
    body = example.response.strip()
    pos = rest.find(body) if body else 0
    if pos < 0:
        raise DataError(f"example {example.id}: the chat template altered the response text; cannot label it")
    start_char, end_char = len(prompt_text), len(prompt_text) + pos + len(body)
    labels = [IGNORE_INDEX] * len(ids)
    specials = _special_ids(tokenizer)
    pending: list[int] = []  # whitespace between the response text and the end-of-turn token
    for t, (a, b) in enumerate(offsets):
        if b <= start_char:  # prompt tokens
            continue
        if a < end_char and ids[t] not in specials:
            labels[t] = ids[t]
        elif not label_eot:
            break
        elif ids[t] in specials:  # the end-of-turn token (<|im_end|>, </s>, <end_of_turn>, <|eot_id|> ...)
            for p in pending + [t]:
                labels[p] = ids[p]
            break
        elif full_text[a:b].strip():  # visible text after the response before any special token: stop
            break
        else:
            pending.append(t)
    input_ids = torch.tensor(ids, dtype=torch.long)
    label_t = torch.tensor(labels, dtype=torch.long)
    if max_length is not None:
        input_ids, label_t = input_ids[:max_length], label_t[:max_length]
    return {"input_ids": input_ids, "labels": label_t}


def pad_batch(items: Sequence[dict[str, torch.Tensor]], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad encoded examples to a batch: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    T = max(len(it["input_ids"]) for it in items)
    B = len(items)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        input_ids[i, sl] = it["input_ids"]
        mask[i, sl] = 1
        if "labels" in it:
            labels[i, sl] = it["labels"]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------------------------------
# User files

_INST_RE = re.compile(r"^\s*(?:<s>\s*)?\[INST\]\s*(?:<<SYS>>.*?<</SYS>>\s*)?(.*?)\s*\[/INST\]\s*$", re.S)


def strip_inst_tags(prompt: str) -> str:
    """``"[INST] question [/INST]"`` (the paper's Llama-2 CSVs, optional <<SYS>> block) -> ``"question"``."""
    m = _INST_RE.match(prompt)
    return m.group(1).strip() if m else prompt.strip()


def _row_example(row: dict[str, Any], where: str, source: str, require_response: bool) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with 'prompt' and 'response' fields, got {type(row).__name__}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: missing or empty 'prompt' (columns/fields found: {sorted(row)})")
    response = row.get("response", "")
    if response is None:
        response = ""
    if not isinstance(response, str):
        raise DataError(f"{where}: 'response' must be a string, got {type(response).__name__}")
    if require_response and not response.strip():
        raise DataError(f"{where}: missing or empty 'response'")
    prompt = strip_inst_tags(prompt)
    rid = row.get("id")
    return Example(prompt, response.strip() if response else "", str(row.get("source") or source),
                   str(rid) if rid not in (None, "") else example_id(source, prompt))


def load_file(path: str | Path, *, require_response: bool = False) -> list[Example]:
    """Read examples from a JSONL or CSV file with ``prompt`` / ``response`` columns, or a plain-text prompt list
    (``.txt``: one prompt per line, blank lines skipped, no responses -- the paper's ``advbench.txt``).

    The paper's CSV format (``[INST] ... [/INST]`` prompts, extra ``text``/index columns) is accepted:
    the tags are stripped so the prompt can be re-templated for the model being studied. Errors name
    the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    source = path.stem
    out: list[Example] = []
    if path.suffix.lower() in {".jsonl", ".json"}:
        try:
            for lineno, row in iter_jsonl(path):
                out.append(_row_example(row, f"{path}:{lineno}", source, require_response))
        except DataError:
            raise
        except BrittleError as e:  # invalid JSON: same message, data error type
            raise DataError(str(e)) from e
    elif path.suffix.lower() in {".csv", ".tsv"}:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            if reader.fieldnames is None or "prompt" not in reader.fieldnames:
                raise DataError(f"{path}:1: header must contain a 'prompt' column (found {reader.fieldnames})")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:
                    raise DataError(f"{where}: more fields than the header has columns")
                out.append(_row_example(row, where, source, require_response))
    elif path.suffix.lower() == ".txt":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    out.append(_row_example({"prompt": line.strip()}, f"{path}:{lineno}", source, require_response))
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (expected .jsonl, .json, .csv or .txt)")
    if not out:
        raise DataError(f"{path}: no examples (empty file)")
    return out


def save_jsonl(path: str | Path, examples: Sequence[Example], *, overwrite: bool = False) -> Path:
    from ..io import write_jsonl

    return write_jsonl(path, [e.to_dict() for e in examples], overwrite=overwrite)


# --------------------------------------------------------------------------------------------------
# Splits


def dedupe(examples: Iterable[Example]) -> list[Example]:
    """Drop repeated prompts (case- and whitespace-insensitive), keeping the first occurrence."""
    seen: set[str] = set()
    out = []
    for e in examples:
        key = " ".join(e.prompt.lower().split())
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def split_examples(examples: Sequence[Example], n_eval: int | float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Deterministic ``(train, eval)`` split by seed; the two share no prompt.

    ``n_eval`` is a count or a fraction in (0, 1). Duplicated prompts are dropped first so that a prompt
    cannot land on both sides.
    """
    items = dedupe(examples)
    k = int(round(n_eval * len(items))) if isinstance(n_eval, float) and n_eval < 1 else int(n_eval)
    if not 0 <= k <= len(items):
        raise DataError(f"cannot hold out {k} of {len(items)} examples")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:k])
    train = [e for i, e in enumerate(items) if i not in eval_idx]
    held = [e for i, e in enumerate(items) if i in eval_idx]
    return train, held


def sample(examples: Sequence[Example], n: int | None, seed: int = 0) -> list[Example]:
    """``n`` examples drawn without replacement by a seeded shuffle (all of them, shuffled, if n is None)."""
    if not examples:
        raise DataError("cannot sample from an empty dataset")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    if n is not None:
        if n <= 0:
            raise DataError(f"number of samples must be positive, got {n}")
        order = order[: min(n, len(order))]
    return [examples[i] for i in order]
