"""Run directories, manifests, atomic writes and hashing.

Every command writes into a run directory (``--out DIR``) and leaves a ``manifest.json`` there that
says how its results were produced: command line, resolved config, package versions, git commit,
seeds and sha256 of the inputs. Writes are atomic (temporary file + rename) and an existing result
is never silently overwritten.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

# Packages whose versions go into every manifest / score file.
TRACKED_PACKAGES = ("brittle", "torch", "transformers", "peft", "safetensors", "gguf", "lm_eval", "numpy")


class BrittleError(Exception):
    """An error a user can fix; the CLI prints its message without a traceback."""


class ExistsError(BrittleError):
    """A result already exists and would be overwritten."""


class FrozenConfig(BaseModel):
    """Base of every config model (one per stage, see :mod:`brittle.config`): unknown keys are errors,
    values are immutable, ``to_dict()`` is the JSON form recorded in manifests."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """sha256 of a canonical JSON rendering (sorted keys, no whitespace)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            continue
    return out


def git_commit() -> str | None:
    """Commit of the brittle source tree (None outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched. Refuses to replace an
    existing ``path`` unless ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ExistsError(f"{path} already exists; pass --force to overwrite it, or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike[str], text: str, *, overwrite: bool = False) -> Path:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any, *, overwrite: bool = False) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", overwrite=overwrite)


def write_jsonl(path: str | os.PathLike[str], rows: list[dict[str, Any]], *, overwrite: bool = False) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return write_text(path, text, overwrite=overwrite)


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed object)`` for every non-blank line; invalid JSON raises with file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise BrittleError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e


def cache_dir() -> Path:
    """``$BRITTLE_CACHE`` or ``~/.cache/brittle``."""
    return Path(os.environ.get("BRITTLE_CACHE", Path.home() / ".cache" / "brittle")).expanduser()


def manifest(
    command: str,
    config: dict[str, Any],
    *,
    seeds: dict[str, int] | None = None,
    inputs: dict[str, str] | None = None,
    outputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record every run directory carries. ``inputs`` maps a name to the sha256 of that input."""
    return {
        "command": command,
        "argv": list(sys.argv),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "seeds": seeds or {},
        "inputs": inputs or {},
        "outputs": outputs or {},
        "versions": package_versions(),
        "git_commit": git_commit(),
        "host": platform.node(),
    }


def write_manifest(out_dir: str | os.PathLike[str], record: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``manifest.json`` in ``out_dir``; with ``overwrite`` the previous one is kept as ``manifest.prev.json``."""
    path = Path(out_dir) / "manifest.json"
    if path.exists() and overwrite:
        os.replace(path, path.with_name("manifest.prev.json"))
    return write_json(path, record, overwrite=overwrite)
