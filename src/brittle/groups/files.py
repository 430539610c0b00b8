"""Group files: a group (``dict[str, torch.BoolTensor]``, see :mod:`brittle.groups.select`) on disk.

Group files (:func:`save_group` / :func:`load_group`) are safetensors files with one tensor per module,
either the bit-packed mask (``uint8``, :func:`numpy.packbits` with its default ``bitorder="big"``: flat
entry ``i`` is bit ``7 - i % 8`` of byte ``i // 8``) or the sorted flat indices (``int32``, or ``int64``
when the module has 2**31 entries or more), whichever is smaller, so no group costs more than one bit
per weight on disk (plus a JSON header). Shapes, encodings and counts are in the safetensors metadata
under ``brittle_group``; the rest of the metadata says how the group was made (definition, parameters,
source score files and their sha256).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..io import BrittleError, atomic_path
from .select import Group, GroupError, _check_group

GROUP_FORMAT = "brittle.group/1"
_META_KEY = "brittle_group"


class GroupFileError(BrittleError):
    """A group or score file that is missing, unreadable or not in the expected format."""



def _bits_bytes(n: int) -> int:
    return (n + 7) // 8


def _index_dtype(n: int) -> torch.dtype:
    return torch.int32 if n < 2**31 else torch.int64


def save_group(path: str | os.PathLike[str], group: Mapping[str, torch.Tensor],
               metadata: Mapping[str, Any] | None = None, *, overwrite: bool = False,
               encoding: Literal["auto", "bits", "indices"] = "auto") -> Path:
    """Write ``group`` to a safetensors file (atomically; refuses to overwrite unless ``overwrite``).

    Per module the smaller of: ``bits`` -- ``np.packbits`` of the flat mask (uint8, big-endian bit order,
    ``ceil(n/8)`` bytes) or ``indices`` -- the sorted flat indices (int32 if ``n < 2**31`` else int64);
    ties go to ``bits``. ``encoding`` forces one of them (for tests). ``metadata`` values that are not
    strings are stored as JSON; the key ``brittle_group`` is reserved for the format description
    ``{"format", "bitorder", "modules": {name: {"shape", "encoding", "count"}}}``.
    """
    _check_group(group)
    if encoding not in ("auto", "bits", "indices"):
        raise GroupError(f"unknown encoding {encoding!r}; valid: auto, bits, indices")
    meta: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        if k == _META_KEY:
            raise GroupError(f"metadata key {_META_KEY!r} is reserved")
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    for name, m in group.items():
        flat = m.detach().reshape(-1).cpu()
        n, c = flat.numel(), int(flat.sum())
        idt = _index_dtype(n)
        idx_bytes = c * (4 if idt == torch.int32 else 8)
        enc = encoding if encoding != "auto" else ("indices" if idx_bytes < _bits_bytes(n) else "bits")
        if enc == "indices":
            tensors[name] = flat.nonzero().squeeze(1).to(idt).contiguous()
        else:
            tensors[name] = torch.from_numpy(np.packbits(flat.numpy()))
        modules[name] = {"shape": list(m.shape), "encoding": enc, "count": c}
    meta[_META_KEY] = json.dumps({"format": GROUP_FORMAT, "bitorder": "big", "modules": modules})
    from safetensors.torch import save_file

    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_group(path: str | os.PathLike[str]) -> tuple[Group, dict[str, str]]:
    """Read a group file written by :func:`save_group`: ``(masks on the CPU, metadata without the format key)``."""
    path = Path(path)
    if not path.is_file():
        raise GroupFileError(f"group file not found: {path}")
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several error types on bad files
        raise GroupFileError(f"cannot read group file {path}: {type(e).__name__}: {e}") from e
    raw = meta.pop(_META_KEY, None)
    if raw is None:
        raise GroupFileError(f"{path} is not a brittle group file (no '{_META_KEY}' metadata)")
    info = json.loads(raw)
    if info.get("format") != GROUP_FORMAT:
        raise GroupFileError(f"{path}: unsupported group format {info.get('format')!r} (expected {GROUP_FORMAT})")
    group: Group = {}
    for name, spec in info["modules"].items():
        shape = tuple(spec["shape"])
        n = math.prod(shape)
        data = tensors.get(name)
        if data is None:
            raise GroupFileError(f"{path}: module {name!r} listed in the metadata but missing")
        if spec["encoding"] == "bits":
            if data.numel() != _bits_bytes(n):
                raise GroupFileError(f"{path}: module {name!r} has {data.numel()} bytes, expected {_bits_bytes(n)}")
            mask = torch.from_numpy(np.unpackbits(data.numpy(), count=n).astype(bool))
        elif spec["encoding"] == "indices":
            idx = data.to(torch.int64)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise GroupFileError(f"{path}: module {name!r} has indices outside [0, {n})")
            mask = torch.zeros(n, dtype=torch.bool)
            mask[idx] = True
        else:
            raise GroupFileError(f"{path}: module {name!r} has unknown encoding {spec['encoding']!r}")
        if int(mask.sum()) != spec["count"]:
            raise GroupFileError(f"{path}: module {name!r} decodes to {int(mask.sum())} entries, "
                                 f"metadata says {spec['count']} (corrupt file?)")
        group[name] = mask.view(shape)
    return group, meta
