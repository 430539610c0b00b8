"""Score files.

Score files are safetensors (one fp32 tensor per module, canonical names) with the metadata under the
``brittle`` key (JSON): method, model id and weight fingerprint, dataset hash, numbers of examples and tokens,
seed, max_length, definitions, package versions. No timestamp: the same inputs give a bit-identical file.
Loading works without a GPU and memory-maps the file.
"""

from __future__ import annotations

import fnmatch
import json
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.core import Example
from ..io import BrittleError, atomic_path, package_versions
from .compute import dataset_hash
from .methods import LOSS_DEFINITION, METHODS, WANDA_POSITIONS

FORMAT = "brittle-scores/1"


class ScoreMismatchError(BrittleError):
    """A score file that does not belong to the model (or module set) it is used with."""


def model_dtypes(model: nn.Module) -> str:
    """The floating-point parameter dtypes of ``model`` (``"bfloat16"``, ``"float32"``, or several joined by commas)."""
    return ",".join(sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.is_floating_point()}))


def score_metadata(
    model: nn.Module,
    examples: Sequence[Example | dict[str, torch.Tensor]],
    method: str,
    *,
    seed: int | None,
    max_length: int | None,
    stats: dict[str, Any],
    data: str | None = None,
    batch_size: int | None = None,
    modules: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The metadata written into a score file (deterministic: no time stamps, no host names)."""
    from ..models import model_id, weight_fingerprint

    return {
        "format": FORMAT,
        "method": method,
        "model": model_id(model),
        "model_hash": weight_fingerprint(model),
        "dtype": model_dtypes(model),
        "data": data,
        "dataset_hash": dataset_hash(examples),
        "n_examples": stats.get("n_examples", len(examples)),
        "n_tokens": stats.get("n_tokens"),
        "n_response_tokens": stats.get("n_response_tokens"),
        "seed": seed,
        "max_length": max_length,
        "batch_size": batch_size,
        "modules": None if modules is None else list(modules),
        "orientation": "[d_out, d_in] (nn.Linear layout; GPT-2 Conv1D transposed)",
        "accumulation": "float32",
        "definition": METHODS[method].definition,
        "loss": LOSS_DEFINITION,
        "wanda_positions": WANDA_POSITIONS,
        "versions": package_versions(),
    }


def save_scores(path: str | Path, scores: dict[str, torch.Tensor], metadata: dict[str, Any], *,
                overwrite: bool = False) -> Path:
    """Write ``scores`` (fp32 tensors) to a safetensors file with ``metadata``; atomic, no silent overwrite."""
    from safetensors.torch import save_file

    tensors = {}
    for n, t in scores.items():
        if not isinstance(t, torch.Tensor):
            raise BrittleError(f"score '{n}' is not a tensor")
        tensors[n] = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
    # One metadata key only: safetensors writes its metadata map in hash order, so several keys would make
    # the bytes of the file differ between runs.
    meta = {"brittle": json.dumps({**metadata, "format": FORMAT, "_order": list(tensors)}, sort_keys=True, default=str)}
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    if not path.is_file():
        raise BrittleError(f"score file not found: {path}")
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise BrittleError(f"{path} is not a safetensors file ({e})") from e
    return header, 8 + n


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The brittle metadata of a score file (without loading any tensor)."""
    path = Path(path)
    header, _ = _read_header(path)
    raw = (header.get("__metadata__") or {}).get("brittle")
    if raw is None:
        raise BrittleError(f"{path} is a safetensors file but not a brittle score file (no 'brittle' metadata)")
    meta = json.loads(raw)
    meta.pop("_order", None)
    return meta


def load_scores(path: str | Path, *, mmap: bool = True, modules: Iterable[str] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(scores, metadata)`` from a score file, on the CPU (works without a GPU).

    With ``mmap`` the tensors are copy-on-write views of the memory-mapped file (pages are read when
    touched; writing to a tensor never changes the file); otherwise they are read into memory (private
    copies: the file may then be replaced or deleted).
    ``modules`` restricts the tensors returned (names or fnmatch patterns).
    """
    path = Path(path)
    meta = read_metadata(path)
    header, start = _read_header(path)
    saved_order = json.loads(header["__metadata__"]["brittle"]).get("_order") or []
    names = [k for k in header if k != "__metadata__"]
    if modules is not None:
        pats = list(modules)
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]
    out: dict[str, torch.Tensor] = {}
    if mmap:
        import numpy as np

        raw = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))
        for n in names:
            info = header[n]
            dt = _ST_DTYPES.get(info["dtype"])
            if dt is None:
                raise BrittleError(f"{path}: tensor {n} has unsupported dtype {info['dtype']}")
            a, b = info["data_offsets"]
            chunk = raw[start + a:start + b]
            if (start + a) % torch.empty((), dtype=dt).element_size():
                chunk = chunk.clone()  # unaligned (old writer): copy
            out[n] = chunk.view(dt).view(info["shape"])
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            for n in names:
                out[n] = f.get_tensor(n).clone()  # get_tensor itself is backed by a mapping of the file
    rank = {n: i for i, n in enumerate(saved_order)}  # the order the scores were saved in (canonical)
    names = sorted(out, key=lambda n: (rank.get(n, len(rank)), _natural_key(n)))
    return {n: out[n] for n in names}, meta


def _natural_key(name: str) -> list:
    """``layers.2.q`` before ``layers.10.q`` (for files without a saved order)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def check_scores_match(model: nn.Module, metadata: dict[str, Any], scores: dict[str, torch.Tensor] | None = None) -> None:
    """Raise :class:`ScoreMismatchError` when the scores were not computed on ``model``'s weights (or do not fit its modules)."""
    from ..models import linear_modules, linear_weight, model_id, weight_fingerprint

    want = metadata.get("model_hash")
    have = weight_fingerprint(model)
    if want != have:
        raise ScoreMismatchError(
            f"these scores were computed on model '{metadata.get('model')}' (weights {str(want)[:12]}), not on the "
            f"loaded model '{model_id(model)}' (weights {have[:12]}); recompute them with `brittle score --model ...`"
        )
    if scores is not None:
        mods = linear_modules(model)
        for n, t in scores.items():
            if n not in mods:
                raise ScoreMismatchError(f"score '{n}' names no linear module of '{model_id(model)}'")
            shape = tuple(linear_weight(mods[n]).shape)
            if tuple(t.shape) != shape:
                raise ScoreMismatchError(f"score '{n}' has shape {tuple(t.shape)}, the module's weight {shape}")


