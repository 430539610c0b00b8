"""The run protocol: how every stage runs, records what it did, and is reused.

A stage has a name, a folder of its own, a config (a pydantic model) and declared inputs (hashes of the
files and weights it reads). :func:`run_stage` gives it a fresh ``<folder>.partial`` directory to write into,
then writes ``manifest.json`` there (stage, command line, config, inputs, seeds, outputs with their sha256,
package versions, git commit, seconds) and renames the directory onto ``folder``: a folder with a manifest
is complete; an interrupted stage leaves only ``<folder>.partial``, which the next run removes.

The one reuse rule: a stage whose folder holds a manifest recording *exactly* the same config and inputs is
reused (not run). A recorded manifest that differs is refused, naming the keys that differ, unless the run
context has ``force``: then the stage is recomputed, and since its outputs' hashes are inputs of the stages
after it, those are recomputed too when its outputs changed. Identical recorded inputs mean identical
results, so ``force`` never recomputes a stage whose record matches (delete its folder to redo it anyway).

A stage run with ``shared=True`` (the ``data`` stage: a model's own answers, minutes of generation that every run
directory of that model and settings repeats) also keeps a copy of its folder in ``$BRITTLE_CACHE/stages/``, named by
a hash of its record; a later run in another directory with exactly the same record copies that folder instead of
computing it (its manifest then says ``copied_from``). ``BRITTLE_SHARED_STAGES=0`` turns this off.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .io import BrittleError, cache_dir, manifest, sha256_file, sha256_json, write_manifest

MANIFEST = "manifest.json"


class StageMismatchError(BrittleError):
    """A stage folder made from other settings or inputs than the ones asked for."""


def log_to_stdout(message: str) -> None:
    print(message, flush=True)


@dataclass
class RunContext:
    """What every stage gets besides its config: the run directory, one logger, progress bars, ``force``."""

    out: Path
    force: bool = False
    log: Callable[[str], None] = log_to_stdout
    progress: bool = True
    # filled by the stages as they finish: stage name -> its StageResult (later stages read earlier outputs)
    results: dict[str, StageResult] = field(default_factory=dict)
    # objects the stages share within one run (the loaded model), never written anywhere
    cache: dict[Any, Any] = field(default_factory=dict)
    # evaluations already written in this run: key (model weights + evaluation settings) -> their folder, so that a
    # later stage evaluating the same model the same way copies them (the ablation's dense model is the model
    # before fine-tuning)
    evaluations: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)


@dataclass(frozen=True)
class StageResult:
    name: str
    folder: Path
    manifest: dict[str, Any]
    reused: bool

    @property
    def outputs(self) -> dict[str, Any]:
        return self.manifest.get("outputs", {})

    def path(self, key: str) -> Path:
        """Absolute path of the output file recorded under ``outputs[key]["file"]``."""
        return self.folder / self.outputs[key]["file"]


def jsonable(obj: Any) -> Any:
    """Configs and inputs as they read back from a manifest (tuples become lists, paths strings)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.loads(json.dumps(obj, default=str))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: obj}


def differing_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two records (``config.p``, ``inputs.safety_scores``)."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BrittleError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); delete the folder to recompute it") from e


def file_outputs(folder: Path, files: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``{key: {"file": relative name, "sha256": ...}}`` for files a stage wrote into ``folder``."""
    return {k: {"file": name, "sha256": sha256_file(Path(folder) / name)} for k, name in files.items()}


def run_stage(ctx: RunContext, name: str, folder: Path, config: BaseModel | Mapping[str, Any],
              inputs: Mapping[str, Any], produce: Callable[[Path], Mapping[str, Any]], *,
              seeds: Mapping[str, int] | None = None, key: str | None = None, shared: bool = False) -> StageResult:
    """Run ``produce(partial_folder) -> outputs`` unless ``folder`` holds a matching record (see module doc).

    ``inputs`` are what the results depend on besides ``config``: sha256 of input files, weight fingerprints,
    earlier stages' output hashes. ``outputs`` are JSON-able; a file output is ``{"file": relative name,
    "sha256": ...}`` (see :func:`file_outputs`). The result is kept in ``ctx.results`` under ``key`` (default: the
    stage's name; e.g. one key per fine-tuning variant of the one stage ``finetune``). ``shared``: look the record
    up in, and add the result to, the shared cache of finished stages (see module doc).
    """
    from . import distributed

    folder = Path(folder)
    record = {"config": jsonable(config), "inputs": jsonable(dict(inputs))}
    distributed.barrier()  # every process decides reuse on the same state of the folder
    old = read_manifest(folder)
    if old is not None:
        if _matches(old, name, record):
            ctx.log(f"[{name}] reusing {folder}")
            result = StageResult(name, folder, old, reused=True)
            ctx.results[key or name] = result
            return result
        old_record = {"config": old.get("config"), "inputs": old.get("inputs")}
        diff = differing_keys(old_record, record) if old.get("stage") == name else ["stage"]
        if not ctx.force:
            raise StageMismatchError(
                f"{folder} was made with other settings or inputs ({', '.join(diff)}); pass --force to recompute "
                f"it and the stages after it, or choose another --out")
        ctx.log(f"[{name}] recomputing {folder} ({', '.join(diff)} changed)")
    elif folder.exists() and any(folder.iterdir()):
        raise StageMismatchError(f"{folder} exists but holds no {MANIFEST} (not written by this stage of brittle?); "
                                 "move it away or choose another --out")
    cached = shared_stage_folder(name, record) if shared else None
    hit = cached is not None and _matches(read_manifest(cached), name, record)
    if not distributed.is_main():
        return _follow_main(ctx, name, folder, None if hit else produce, key)
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        ctx.log(f"[{name}] removing {partial} left by an interrupted run")
        shutil.rmtree(partial)
    if hit:
        shutil.copytree(cached, partial, ignore=shutil.ignore_patterns(MANIFEST))
        man = {**read_manifest(cached), "copied_from": str(cached)}
        write_manifest(partial, man)
        ctx.log(f"[{name}] copied from the shared cache {cached}")
        return _finish(ctx, name, folder, partial, man, key, reused=True)
    partial.mkdir(parents=True)
    t0 = time.perf_counter()
    outputs = dict(produce(partial))
    seconds = round(time.perf_counter() - t0, 1)
    if seeds is None:  # the stage's seed, when its config has one
        seeds = {"seed": record["config"]["seed"]} if "seed" in record["config"] else {}
    man = manifest(name, record["config"], seeds=dict(seeds), inputs=record["inputs"], outputs=jsonable(outputs))
    man = {"stage": name, **man, "seconds": seconds}
    write_manifest(partial, man)
    if cached is not None:
        _add_to_shared_cache(ctx, partial, cached)
    ctx.log(f"[{name}] done in {seconds:.0f} s -> {folder}")
    return _finish(ctx, name, folder, partial, man, key, reused=False)


def _finish(ctx: RunContext, name: str, folder: Path, partial: Path, man: dict[str, Any], key: str | None, *,
            reused: bool) -> StageResult:
    """Move the finished ``partial`` folder onto ``folder`` and record the result."""
    from . import distributed

    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(folder)
    distributed.barrier()  # the other processes read the folder now
    result = StageResult(name, folder, man, reused=reused)
    ctx.results[key or name] = result
    return result


def _matches(man: Mapping[str, Any] | None, name: str, record: Mapping[str, Any]) -> bool:
    return man is not None and man.get("stage") == name and \
        {"config": man.get("config"), "inputs": man.get("inputs")} == record


def shared_stage_folder(name: str, record: Mapping[str, Any]) -> Path | None:
    """Where the shared cache keeps the stage ``name`` of this record (``None`` when ``BRITTLE_SHARED_STAGES=0``)."""
    if os.environ.get("BRITTLE_SHARED_STAGES", "1") == "0":
        return None
    return cache_dir() / "stages" / f"{name.replace(':', '-')}-{sha256_json({'stage': name, **record})[:16]}"


def _add_to_shared_cache(ctx: RunContext, partial: Path, cached: Path) -> None:
    """Copy a finished stage folder into the shared cache (atomically: a private folder, then a rename); a cache that
    cannot be written costs only the copy, never the run."""
    tmp = cached.with_name(f"{cached.name}.partial.{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(partial, tmp)
        if cached.exists():
            shutil.rmtree(cached)
        tmp.rename(cached)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        ctx.log(f"[stage] could not add {partial.name} to the shared cache {cached.parent}: {e}")


def _follow_main(ctx: RunContext, name: str, folder: Path, produce: Callable[[Path], Mapping[str, Any]] | None,
                 key: str | None) -> StageResult:
    """A process other than 0 of a multi-process run (:mod:`brittle.distributed`): compute alongside process 0 (its
    collective operations need every process) into a private folder, drop it, and take process 0's record.
    ``produce=None``: process 0 copies the stage from the shared cache; only wait for it."""
    from . import distributed

    if produce is not None:
        private = folder.with_name(f"{folder.name}.partial.rank{distributed.rank()}")
        shutil.rmtree(private, ignore_errors=True)
        private.mkdir(parents=True)
        try:
            produce(private)
        finally:
            shutil.rmtree(private, ignore_errors=True)
    distributed.barrier()
    man = read_manifest(folder)
    if man is None:
        raise BrittleError(f"{folder}: process 0 wrote no {MANIFEST} for stage {name}")
    result = StageResult(name, folder, man, reused=False)
    ctx.results[key or name] = result
    return result
