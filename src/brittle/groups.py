"""Weight groups: top-k selections, the safety/utility set difference, random controls, group files.

A *group* is a ``dict[str, torch.BoolTensor]``: for every canonical module name (``layers.3.q``) a
boolean mask shaped like that module's weight ``[d_out, d_in]``; ``True`` = the weight entry W[row, col]
belongs to the group ("neuron" in the seed study means one such entry). Score dicts have the same keys
and shapes (fp32 importance scores, larger = more important).

Definitions (all exact and tested in ``tests/test_groups.py``):

* **Size.** A fraction ``f`` (0 < f <= 1) of ``n`` candidates selects ``k = max(1, floor(f * n))``
  entries -- the paper's convention, with at least one entry. ``f * n`` is computed exactly from the
  decimal form of ``f`` (``0.29`` of ``100`` is ``29``, not the ``28`` binary floating point gives).
* **Scope** (where the ``n`` candidates come from):
  ``row``    -- every output row of every matrix separately, ``n = d_in`` (the paper's Wanda/SNIP pruning);
  ``matrix`` -- every weight matrix separately, ``n = d_out * d_in`` (the paper's set-difference code and
  the seed study); ``global`` -- all weights of all modules together, ``n = sum of numel``.
* **Ranking and ties.** ``top_k`` keeps the ``k`` entries with the highest score; among equal scores the
  *lower flat index* wins (flat index = ``row * d_in + col`` within a matrix; for ``row`` scope this is
  the lower column). For ``global`` scope modules are ordered by :func:`module_sort_key` (layer number
  numerically -- ``layers.2`` before ``layers.10`` -- then the module name alphabetically), and ties are
  broken by that module order first, then the flat index. Equivalently, the selection is the first ``k``
  elements of ``sorted(candidates, key=lambda c: (-score, position))``. NaN scores are rejected;
  ``-0.0 == 0.0`` (IEEE comparison).
* **Set difference** ``S(p, q) = top_q(safety) AND NOT top_p(utility)``, both within the same scope.
  Its size is data dependent, between ``max(0, k_q - k_p)`` and ``k_q`` per scope unit.
* **Random control** (:func:`random_like`): in every module exactly as many entries as the group,
  uniformly at random among all entries of that module (not per row).
* **Magnitude-matched random control** (:func:`magnitude_matched_random`): per module, |W| is cut into
  ``bins`` quantile bins (deciles by default); in every bin exactly as many entries are drawn uniformly
  at random as the group has in that bin. Both controls may overlap the group they imitate (they are
  drawn among all entries, as a random control should be).

Randomness is deterministic: every module gets its own ``torch.Generator`` seeded from
``sha256(f"{seed}:{kind}:{module name}")``, so the result for a module depends only on the seed, the
module's name and its mask -- not on the dict order or which other modules are present.

Group files (:func:`save_group` / :func:`load_group`) are safetensors files with one tensor per module,
either the bit-packed mask (``uint8``, :func:`numpy.packbits` with its default ``bitorder="big"``: flat
entry ``i`` is bit ``7 - i % 8`` of byte ``i // 8``) or the sorted flat indices (``int32``, or ``int64``
when the module has 2**31 entries or more), whichever is smaller, so no group costs more than one bit
per weight on disk (plus a JSON header). Shapes, encodings and counts are in the safetensors metadata
under ``brittle_group``; the rest of the metadata says how the group was made (definition, parameters,
source score files and their sha256).

Cost on a 7B model (6.5e9 weights, scores in fp32 in memory): masks take 1 byte per weight per group in
memory. ``row``/``matrix`` work one matrix at a time with ``torch.kthvalue`` (O(n)) and a few boolean /
int32 temporaries of that matrix's size. ``global`` never concatenates the scores: the exact threshold is
found from a strided sample that brackets it, one counting pass over all modules and a second pass that
gathers only the scores inside the bracket (normally ~0.1 % of them), then a pass that builds the masks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .io import BrittleError, ExistsError, atomic_path, sha256_file

SCOPES = ("row", "matrix", "global")
Scope = Literal["row", "matrix", "global"]
GROUP_NAMES = ("top_safety", "top_utility", "set_difference", "random", "random_magnitude")
GROUP_FORMAT = "brittle.group/1"
_META_KEY = "brittle_group"

# global scope: below this many candidates the scores are simply concatenated (exact, fast); above it
# a sampled bracket is used. Module-level so tests can exercise the bracket path on small inputs.
_GLOBAL_CONCAT_LIMIT = 1 << 24
_GLOBAL_SAMPLE = 1 << 22
# magnitude bins: edges come from all |W| of a module up to this size, else from a strided sample
_EDGE_SAMPLE = 1 << 24


class GroupError(BrittleError):
    """Invalid selection parameters or inconsistent score / weight / group inputs."""


class GroupFileError(BrittleError):
    """A group or score file that is missing, unreadable or not in the expected format."""


Group = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Validation helpers


def check_fraction(value: Any, name: str = "fraction") -> float:
    """Return ``value`` as float if ``0 < value <= 1``; raise :class:`GroupError` saying what is wrong."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GroupError(f"{name} must be a number with 0 < {name} <= 1, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v <= 0 or v > 1:
        hint = f" (a fraction, not a percentage: did you mean {v / 100:g}?)" if 1 < v <= 100 else ""
        raise GroupError(f"{name} must satisfy 0 < {name} <= 1, got {value!r}{hint}")
    return v


def check_scope(scope: Any) -> str:
    if scope not in SCOPES:
        raise GroupError(f"unknown scope {scope!r}; valid scopes: {', '.join(SCOPES)}")
    return scope


def selection_size(fraction: float, n: int) -> int:
    """``k = max(1, floor(fraction * n))``, with ``fraction * n`` computed exactly from ``repr(fraction)``."""
    if n <= 0:
        return 0
    k = math.floor(Fraction(repr(float(fraction))) * n)
    return min(n, max(1, k))


_NUM = re.compile(r"(\d+)")


def module_sort_key(name: str) -> tuple:
    """Natural order of module names: numbers compare as numbers (``layers.2.q`` < ``layers.10.q``)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in _NUM.split(name) if t != "")


def _check_scores(scores: Mapping[str, torch.Tensor], what: str = "scores") -> None:
    if not isinstance(scores, Mapping) or not scores:
        raise GroupError(f"{what}: expected a non-empty dict of module name -> score tensor")
    for name, s in scores.items():
        if not isinstance(s, torch.Tensor):
            raise GroupError(f"{what}[{name!r}] is {type(s).__name__}, not a torch.Tensor")
        if s.numel() == 0:
            raise GroupError(f"{what}[{name!r}] is empty (shape {tuple(s.shape)})")
        if s.dtype == torch.bool or s.is_complex():
            raise GroupError(f"{what}[{name!r}] has dtype {s.dtype}; scores must be real numbers")
        if s.is_floating_point() and bool(torch.isnan(s).any()):
            raise GroupError(f"{what}[{name!r}] contains NaN scores; fix the scoring run (NaN cannot be ranked)")


def check_same_modules(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                       names: tuple[str, str] = ("safety", "utility")) -> None:
    """Raise :class:`GroupError` naming the first module missing on one side or with different shapes."""
    only_a = [k for k in a if k not in b]
    only_b = [k for k in b if k not in a]
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"only in {names[0]}: {', '.join(sorted(only_a, key=module_sort_key)[:5])}"
                         + (f" (+{len(only_a) - 5} more)" if len(only_a) > 5 else ""))
        if only_b:
            parts.append(f"only in {names[1]}: {', '.join(sorted(only_b, key=module_sort_key)[:5])}"
                         + (f" (+{len(only_b) - 5} more)" if len(only_b) > 5 else ""))
        raise GroupError(f"{names[0]} and {names[1]} have different modules ({'; '.join(parts)})")
    for k in a:
        if tuple(a[k].shape) != tuple(b[k].shape):
            raise GroupError(f"module {k!r}: {names[0]} has shape {tuple(a[k].shape)} but {names[1]} has "
                             f"{tuple(b[k].shape)}")


def _work(x: torch.Tensor) -> torch.Tensor:
    """Scores in a dtype where comparisons are exact: fp16/bf16 -> fp32, integers -> fp64."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    if not x.is_floating_point():
        return x.double()
    return x


# --------------------------------------------------------------------------------------------------
# Top-k


def _top_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the top ``k`` per row of a 2-D tensor; ties -> lower column first. O(numel)."""
    n = x.shape[1]
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    t = torch.kthvalue(x, n - k + 1, dim=1).values.unsqueeze(1)  # k-th largest of every row
    mask = x > t
    need = k - mask.sum(dim=1, keepdim=True)  # >= 1: entries equal to t still to take
    eq = x == t
    cdt = torch.int32 if n < 2**31 else torch.int64
    mask |= eq & (eq.cumsum(dim=1, dtype=cdt) <= need)
    return mask


def _kth_largest(xs: list[torch.Tensor], k: int, stats: dict[str, int] | None = None) -> float:
    """Exact k-th largest value over several flat tensors without concatenating them (when large).

    A strided sample of ``_GLOBAL_SAMPLE`` entries gives a bracket ``[lo, hi]`` around the k-th largest
    (sample ranks ``k/n * m -+ (8 sd + 32)``); one counting pass checks ``#(x > hi) < k <= #(x >= lo)``
    (else the bracket is widened 4x and checked again), a second pass gathers the entries inside it.
    """
    total = sum(x.numel() for x in xs)
    if total <= _GLOBAL_CONCAT_LIMIT:
        return torch.cat(xs).kthvalue(total - k + 1).values.item()
    stride = max(1, math.ceil(total / _GLOBAL_SAMPLE))
    sample = torch.sort(torch.cat([x[::stride] for x in xs]), descending=True).values
    m = sample.numel()
    r = k / total
    delta = math.ceil(8 * math.sqrt(m * r * (1 - r))) + 32
    while True:
        if stats is not None:
            stats["rounds"] = stats.get("rounds", 0) + 1
        hi_rank = math.floor(r * m) - delta  # 1-based ranks from the top of the sample
        lo_rank = math.ceil(r * m) + delta
        hi = math.inf if hi_rank < 1 else sample[hi_rank - 1].item()
        lo = -math.inf if lo_rank > m else sample[lo_rank - 1].item()
        n_above = sum(int((x > hi).sum()) for x in xs)
        n_atleast = sum(int((x >= lo).sum()) for x in xs)
        if n_above < k <= n_atleast:  # the k-th largest lies in [lo, hi]
            if lo == hi:
                return lo
            cand = torch.cat([x[(x >= lo) & (x <= hi)] for x in xs])
            return torch.kthvalue(cand, cand.numel() - (k - n_above) + 1).values.item()
        delta *= 4  # unlucky sample: widen the bracket (terminates at [-inf, inf])


def _top_global(scores: Mapping[str, torch.Tensor], fraction: float) -> Group:
    names = sorted(scores, key=module_sort_key)
    xs = [_work(scores[n]).reshape(-1) for n in names]
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    xs = [x.to(dtype) for x in xs]
    k = selection_size(fraction, sum(x.numel() for x in xs))
    t = _kth_largest(xs, k)
    flat = {n: x > t for n, x in zip(names, xs, strict=True)}
    need = k - sum(int(m.sum()) for m in flat.values())
    for n, x in zip(names, xs, strict=True):  # ties at the threshold: module order, then flat index
        if need <= 0:
            break
        eq = x == t
        c = int(eq.sum())
        if c == 0:
            continue
        if c <= need:
            flat[n] |= eq
        else:
            cdt = torch.int32 if x.numel() < 2**31 else torch.int64
            flat[n] |= eq & (eq.cumsum(0, dtype=cdt) <= need)
        need -= min(c, need)
    return {n: flat[n].view(scores[n].shape) for n in scores}


def top_k(scores: Mapping[str, torch.Tensor], fraction: float, scope: Scope = "matrix", *,
          name: str = "fraction") -> Group:
    """Boolean masks of the top ``fraction`` of entries by score within ``scope``.

    For each scope unit with ``n`` candidates (a row: ``n = d_in``; a matrix: ``n = numel``; ``global``:
    all entries of all modules) the ``k = max(1, floor(fraction * n))`` entries with the highest score
    are selected. Ties: higher score first, then lower flat index (for ``global``: modules in
    :func:`module_sort_key` order, then flat index) -- i.e. the first ``k`` of
    ``sorted(candidates, key=(-score, position))``.

    Scores keep their dtype for the comparison (fp16/bf16 are widened to fp32, integers to fp64);
    masks are returned on the scores' device with the scores' shapes, in the input's key order.
    ``row`` scope needs 2-D scores ``[d_out, d_in]``.
    """
    fraction = check_fraction(fraction, name)
    check_scope(scope)
    _check_scores(scores)
    if scope == "global":
        return _top_global(scores, fraction)
    out: Group = {}
    for mod, s in scores.items():
        x = _work(s)
        if scope == "row":
            if x.dim() != 2:
                raise GroupError(f"scope 'row' needs 2-D scores [d_out, d_in]; {mod!r} has shape {tuple(s.shape)}")
            out[mod] = _top_rows(x, selection_size(fraction, x.shape[1]))
        else:
            flat = x.reshape(1, -1)
            out[mod] = _top_rows(flat, selection_size(fraction, flat.shape[1])).view(s.shape)
    return out


def set_difference(safety: Mapping[str, torch.Tensor], utility: Mapping[str, torch.Tensor], p: float, q: float,
                   scope: Scope = "matrix") -> Group:
    """Safety-critical weights ``S(p, q) = top_k(safety, q, scope) AND NOT top_k(utility, p, scope)``.

    ``p`` (utility fraction) and ``q`` (safety fraction) satisfy ``0 < x <= 1``; both score dicts must
    have the same modules and shapes. The selected fraction is at most ``q`` (see :func:`group_summary`).
    """
    q = check_fraction(q, "q")
    p = check_fraction(p, "p")
    check_scope(scope)
    _check_scores(safety, "safety")
    _check_scores(utility, "utility")
    check_same_modules(safety, utility)
    top_s = top_k(safety, q, scope, name="q")
    top_u = top_k(utility, p, scope, name="p")
    return {m: top_s[m] & ~top_u[m].to(top_s[m].device) for m in top_s}


def set_difference_of(top_safety: Mapping[str, torch.Tensor], top_utility: Mapping[str, torch.Tensor]) -> Group:
    """``A AND NOT B`` for two already computed groups (same modules and shapes)."""
    check_same_modules(top_safety, top_utility, ("top_safety", "top_utility"))
    return {m: top_safety[m] & ~top_utility[m].to(top_safety[m].device) for m in top_safety}


# --------------------------------------------------------------------------------------------------
# Random controls


def module_seed(seed: int, name: str, kind: str) -> int:
    """63-bit seed of one module's generator: ``sha256(f"{seed}:{kind}:{name}")``."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{kind}:{name}".encode()).digest()[:8], "little") >> 1


def _check_group(group: Mapping[str, torch.Tensor], what: str = "group") -> None:
    if not isinstance(group, Mapping) or not group:
        raise GroupError(f"{what}: expected a non-empty dict of module name -> boolean mask")
    for name, m in group.items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise GroupError(f"{what}[{name!r}] must be a torch.bool tensor, got "
                             f"{getattr(m, 'dtype', type(m).__name__)}")


def random_like(group: Mapping[str, torch.Tensor], seed: int) -> Group:
    """Uniformly random masks with exactly the group's count in every module (not per row).

    Module ``m`` with ``c`` selected of ``n`` entries gets ``c`` distinct positions drawn uniformly
    (``torch.randperm(n)[:c]`` with a CPU generator seeded by :func:`module_seed`), so the result is
    the same on any device, in any dict order and for any subset of modules. May overlap ``group``.
    """
    _check_group(group)
    out: Group = {}
    for name, m in group.items():
        n, c = m.numel(), int(m.sum())
        flat = torch.zeros(n, dtype=torch.bool)
        if c:
            g = torch.Generator().manual_seed(module_seed(seed, name, "random"))
            flat[torch.randperm(n, generator=g)[:c]] = True
        out[name] = flat.view(m.shape).to(m.device)
    return out


def magnitude_bin_ids(weight: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Bin index (0..bins-1) of every entry of ``|weight|`` (flat, int64, on the CPU).

    Edges are the ``i/bins`` quantiles (i = 1..bins-1, "lower" order statistics) of the module's |W|
    (from a strided sample of 2**24 entries for larger modules); entry ``j`` is in bin ``b`` = the number
    of edges ``<= |W_j|``. With distinct values the bins hold equally many entries; tied values at an edge
    share one bin (a bin may then be empty -- the matching stays exact, since group and control are
    binned identically).
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise GroupError(f"bins must be a positive integer, got {bins!r}")
    a = weight.detach().reshape(-1).to("cpu", torch.float32).abs()
    if bool(torch.isnan(a).any()):
        raise GroupError("weights contain NaN; cannot bin by magnitude")
    if bins == 1:
        return torch.zeros(a.numel(), dtype=torch.int64)
    stride = max(1, math.ceil(a.numel() / _EDGE_SAMPLE))
    s = torch.sort(a[::stride]).values
    m = s.numel()
    edges = s[[min(m - 1, (i * m) // bins) for i in range(1, bins)]].contiguous()
    return torch.bucketize(a, edges, right=True)


def magnitude_matched_random(group: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], seed: int,
                             bins: int = 10) -> Group:
    """Random masks matching the group's count *and* |W| distribution in every module.

    Per module: ``b = magnitude_bin_ids(W, bins)`` (quantile bins of |W|, deciles by default); if the
    group has ``c_j`` entries in bin ``j``, ``c_j`` entries are drawn uniformly without replacement from
    all entries of bin ``j`` (CPU generator seeded by :func:`module_seed`). Hence per module and per bin
    the counts equal the group's. Entries of the group itself may be drawn (overlap is allowed).
    ``weights`` maps the same module names to ``[d_out, d_in]`` tensors (any dtype/device).
    """
    _check_group(group)
    out: Group = {}
    for name, m in group.items():
        if name not in weights:
            raise GroupError(f"no weight for module {name!r} (weights have {len(weights)} modules, e.g. "
                             f"{', '.join(list(weights)[:3])})")
        w = weights[name]
        if tuple(w.shape) != tuple(m.shape):
            raise GroupError(f"module {name!r}: weight shape {tuple(w.shape)} differs from group shape {tuple(m.shape)}")
        b = magnitude_bin_ids(w, bins)
        sel = m.detach().reshape(-1).cpu()
        counts = torch.bincount(b[sel], minlength=bins).tolist()
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        g = torch.Generator().manual_seed(module_seed(seed, name, "magnitude"))
        for j, c in enumerate(counts):
            if c == 0:
                continue
            members = (b == j).nonzero().squeeze(1)
            flat[members[torch.randperm(members.numel(), generator=g)[:c]]] = True
        out[name] = flat.view(m.shape).to(m.device)
    return out


# --------------------------------------------------------------------------------------------------
# Group files


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


# --------------------------------------------------------------------------------------------------
# Summaries


def _layer_and_type(name: str) -> tuple[int | None, str]:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def group_summary(groups: Mapping[str, Mapping[str, torch.Tensor]],
                  overlap: tuple[str, str] | None = ("top_safety", "top_utility")):
    """Counts and shares of several groups per module, per layer, per module type and in total.

    Returns a pandas DataFrame with one row per (``level``, unit): ``level`` is ``module``, ``layer``,
    ``type`` or ``total``; columns ``module, layer, type, numel``, then for every group ``g`` the count
    ``g`` and ``g_share = g / numel`` (for the set difference this is the actual fraction selected, which
    is smaller than q). If both groups named in ``overlap`` are present: ``intersection``, ``union`` and
    ``jaccard = intersection / union`` of those two (NaN when both are empty). All groups must cover the
    same modules with the same shapes.
    """
    import pandas as pd

    if not groups:
        raise GroupError("group_summary needs at least one group")
    names = list(groups)
    first = groups[names[0]]
    for g in names[1:]:
        check_same_modules(first, groups[g], (names[0], g))
    pair = overlap if overlap and all(o in groups for o in overlap) else None
    rows = []
    for mod, mask in first.items():
        layer, typ = _layer_and_type(mod)
        row: dict[str, Any] = {"level": "module", "module": mod, "layer": layer, "type": typ, "numel": mask.numel()}
        for g in names:
            row[g] = int(groups[g][mod].sum())
        if pair:
            a, b = groups[pair[0]][mod], groups[pair[1]][mod].to(groups[pair[0]][mod].device)
            row["intersection"] = int((a & b).sum())
            row["union"] = int((a | b).sum())
        rows.append(row)
    df = pd.DataFrame(rows)
    counts = ["numel", *names] + (["intersection", "union"] if pair else [])
    parts = [df]
    if df["layer"].notna().any():
        by_layer = df[df["layer"].notna()].groupby("layer", sort=True)[counts].sum().reset_index()
        by_layer.insert(0, "level", "layer")
        by_layer.insert(1, "module", [f"layers.{int(i)}" for i in by_layer["layer"]])
        by_layer.insert(3, "type", "*")
        parts.append(by_layer)
    by_type = df.groupby("type", sort=False)[counts].sum().reset_index()
    by_type.insert(0, "level", "type")
    by_type.insert(1, "module", [f"*.{t}" for t in by_type["type"]])
    by_type.insert(2, "layer", None)
    parts.append(by_type)
    total = {"level": "total", "module": "all", "layer": None, "type": "*", **{c: int(df[c].sum()) for c in counts}}
    parts.append(pd.DataFrame([total]))
    out = pd.concat(parts, ignore_index=True)
    out["layer"] = out["layer"].astype("Int64")
    for g in names:
        out[f"{g}_share"] = out[g] / out["numel"]
    if pair:
        out["jaccard"] = (out["intersection"] / out["union"].where(out["union"] > 0)).astype(float)
    cols = ["level", "module", "layer", "type", "numel"]
    for g in names:
        cols += [g, f"{g}_share"]
    if pair:
        cols += ["intersection", "union", "jaccard"]
    return out[cols]


def _fmt(value: Any, share: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        import pandas as pd

        if value is pd.NA:
            return "-"
    except ImportError:  # pragma: no cover
        pass
    if share:
        return f"{100 * float(value):.3f}%"
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{int(value):,}" if isinstance(value, (int, np.integer)) else str(value)


def _table_columns(df) -> list[tuple[str, str, bool]]:
    """(column, header, is_share) for display: counts and shares of each group, then Jaccard."""
    cols: list[tuple[str, str, bool]] = [("module", "unit", False), ("numel", "weights", False)]
    for c in df.columns:
        if c.endswith("_share"):
            g = c[: -len("_share")]
            cols += [(g, g, False), (c, "share", True)]
    if "jaccard" in df.columns:
        cols.append(("jaccard", "jaccard(S,U)", False))
    return cols


def summary_markdown(df, levels: Iterable[str] = ("total", "type", "layer", "module")) -> str:
    """Markdown tables of a :func:`group_summary` frame, one section per level."""
    cols = _table_columns(df)
    out = []
    for level in levels:
        part = df[df["level"] == level]
        if part.empty:
            continue
        out.append(f"### {level}\n")
        out.append("| " + " | ".join(h for _, h, _ in cols) + " |")
        out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
        for _, r in part.iterrows():
            out.append("| " + " | ".join(_fmt(r[c], s) for c, _, s in cols) + " |")
        out.append("")
    return "\n".join(out)


_SHORT = {"set_difference": "set diff", "random_magnitude": "random |W|"}


def print_summary(df, levels: Iterable[str] = ("type", "layer", "total"), console=None) -> None:
    """Print rich tables of a :func:`group_summary` frame (by default: per module type, per layer, total).

    Every group cell shows the count and, below it, the share of that unit's weights.
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    groups = [c[: -len("_share")] for c in df.columns if c.endswith("_share")]
    for level in levels:
        part = df[df["level"] == level]
        if part.empty:
            continue
        table = Table(title=f"weight groups per {level}" if level != "total" else "weight groups in total")
        table.add_column("unit", justify="left", no_wrap=True)
        table.add_column("weights", justify="right")
        for g in groups:
            table.add_column(_SHORT.get(g, g.replace("_", " ")), justify="right", overflow="fold")
        if "jaccard" in df.columns:
            table.add_column("jaccard top S/U", justify="right", overflow="fold")
        for _, r in part.iterrows():
            cells = [str(r["module"]), _fmt(r["numel"], False)]
            cells += [f"{_fmt(r[g], False)}\n{_fmt(r[g + '_share'], True)}" for g in groups]
            if "jaccard" in df.columns:
                cells.append(_fmt(r["jaccard"], False))
            table.add_row(*cells)
        console.print(table)


# --------------------------------------------------------------------------------------------------
# The `brittle groups` stage


def read_score_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(scores, metadata)`` of a score file written by ``brittle score`` (read into memory)."""
    from .scoring import load_scores

    path = Path(path)
    if not path.is_file():
        raise GroupFileError(f"score file not found: {path}")
    scores, meta = load_scores(path, mmap=False)
    if not scores:
        raise GroupFileError(f"score file {path} holds no tensors")
    return scores, meta


def score_model_hash(meta: Mapping[str, Any]) -> str | None:
    """Weight fingerprint of the model a score file was computed on."""
    h = meta.get("model_hash")
    return str(h) if h else None


def load_linear_weights(spec: str) -> tuple[dict[str, torch.Tensor], str]:
    """``({canonical name: weight [d_out, d_in]}, weight fingerprint)`` of a model, no tokenizer needed.

    ``spec`` is anything :func:`brittle.models.resolve_model_path` takes (preset, local HF directory,
    ``.gguf``, Hub id). The checkpoint's own dtype is kept (``dtype="auto"``).
    """
    from transformers import AutoModelForCausalLM

    from .models import linear_modules, linear_weight, resolve_model_path, weight_fingerprint

    path = resolve_model_path(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    except OSError as e:
        raise BrittleError(f"cannot load model '{spec}' ({path}) for the magnitude-matched control: {e}") from e
    weights = {n: linear_weight(m).detach() for n, m in linear_modules(model).items()}
    return weights, weight_fingerprint(model)


@dataclass
class GroupsResult:
    """What :func:`build_groups` produced."""

    out: Path
    files: dict[str, Path]
    summary: Any  # pandas.DataFrame from group_summary
    notes: list[str] = field(default_factory=list)

    def print(self, console=None) -> None:
        from rich.console import Console

        console = console or Console()
        print_summary(self.summary, console=console)
        for note in self.notes:
            console.print(note)
        for name, path in self.files.items():
            console.print(f"{name:18s} {path}")
        console.print(f"{'summary':18s} {self.out / 'groups' / 'summary.csv'} (and summary.md)")


def build_groups(safety: str | os.PathLike[str], utility: str | os.PathLike[str], out: str | os.PathLike[str], *,
                 top: float = 0.01, p: float = 0.05, q: float = 0.05, scope: Scope = "matrix", seed: int = 0,
                 model: str | None = None, bins: int = 10, magnitude: bool = True,
                 overwrite: bool = False) -> GroupsResult:
    """Compute and write the five standard groups of a pair of score files into the run directory ``out``.

    ``top_safety = top_k(safety, top)``, ``top_utility = top_k(utility, top)``,
    ``set_difference = set_difference(safety, utility, p, q)``, ``random = random_like(set_difference,
    seed)`` and ``random_magnitude = magnitude_matched_random(set_difference, W, seed, bins)`` (skipped
    with ``magnitude=False``), all in ``scope``. ``W`` are the linear weights of ``model`` (default: the
    ``model`` named in the safety score file's metadata); their fingerprint must equal the scores'
    ``model_hash`` when the score files carry one.

    Writes ``out/groups/<name>.safetensors``, ``out/groups/summary.csv`` and ``summary.md`` (refused if
    any exists, unless ``overwrite``) and ``out/manifest.json`` (the run directory's latest command; the
    previous one is kept as ``manifest.prev.json``, as ``brittle score`` does in a shared run directory).
    The scores are freed before the model is loaded: peak memory is about 2 x 4 bytes per weight (scores)
    + 1 byte per weight per group, then the model's weights + the groups.
    """
    from .io import manifest, write_manifest, write_text

    top = check_fraction(top, "top")
    p = check_fraction(p, "p")
    q = check_fraction(q, "q")
    check_scope(scope)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise GroupError(f"bins must be a positive integer, got {bins!r}")
    out = Path(out)
    names = [n for n in GROUP_NAMES if magnitude or n != "random_magnitude"]
    gdir = out / "groups"
    files = {n: gdir / f"{n}.safetensors" for n in names}
    targets = [*files.values(), gdir / "summary.csv", gdir / "summary.md"]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ExistsError(f"{existing[0]} already exists{more}; pass --force to overwrite, or choose another --out")

    s_scores, s_meta = read_score_file(safety)
    u_scores, u_meta = read_score_file(utility)
    notes: list[str] = []
    hs, hu = score_model_hash(s_meta), score_model_hash(u_meta)
    if hs and hu and hs != hu:
        raise GroupError(
            f"the safety and utility scores come from different models: {safety} was computed on model "
            f"{s_meta.get('model', '?')!r} (weights {hs[:12]}) but {utility} on {u_meta.get('model', '?')!r} "
            f"(weights {hu[:12]}); score both datasets on the same model")
    if s_meta.get("model") and u_meta.get("model") and s_meta["model"] != u_meta["model"] and not (hs and hu):
        notes.append(f"[yellow]note: the score files name different models ({s_meta['model']!r} vs "
                     f"{u_meta['model']!r}) and carry no weight fingerprint to check they are the same[/yellow]")
    _check_scores(s_scores, "safety")
    _check_scores(u_scores, "utility")
    check_same_modules(s_scores, u_scores, (f"safety ({safety})", f"utility ({utility})"))

    sources = {"safety": {"path": str(safety), "sha256": sha256_file(safety)},
               "utility": {"path": str(utility), "sha256": sha256_file(utility)}}
    groups: dict[str, Group] = {}
    groups["top_safety"] = top_k(s_scores, top, scope, name="top")
    groups["top_utility"] = top_k(u_scores, top, scope, name="top")
    top_q = groups["top_safety"] if q == top else top_k(s_scores, q, scope, name="q")
    top_p = groups["top_utility"] if p == top else top_k(u_scores, p, scope, name="p")
    groups["set_difference"] = set_difference_of(top_q, top_p)
    del top_q, top_p, s_scores, u_scores  # free the scores before a model is loaded
    groups["random"] = random_like(groups["set_difference"], seed)
    fingerprint = None
    model_spec = None
    if magnitude:
        model_spec = model or s_meta.get("model") or u_meta.get("model")
        if not model_spec:
            raise GroupError("random_magnitude needs the model's weights and the score files do not name the model: "
                             "pass --model (preset, HF directory or .gguf), or --no-magnitude to skip that control")
        try:
            weights, fingerprint = load_linear_weights(str(model_spec))
        except BrittleError as e:
            how = "given by --model" if model else "named in the score file's metadata"
            raise GroupError(f"cannot load the model {how} for the magnitude-matched control: {e}. Pass --model "
                             "with the scored model, or --no-magnitude to skip that control") from e
        if hs and fingerprint != hs:
            raise GroupError(f"model {model_spec!r} (weights {fingerprint[:12]}) is not the model the scores were "
                             f"computed on (weights {hs[:12]}); pass --model with the scored model, or --no-magnitude")
        check_same_modules(groups["set_difference"], weights, ("scores", f"model {model_spec!r}"))
        groups["random_magnitude"] = magnitude_matched_random(groups["set_difference"], weights, seed, bins)
        del weights

    sd_params = {"p": p, "q": q, "scope": scope}
    params = {
        "top_safety": ("top_k", {"fraction": top, "scope": scope, "scores": "safety"}, {"safety": sources["safety"]}),
        "top_utility": ("top_k", {"fraction": top, "scope": scope, "scores": "utility"}, {"utility": sources["utility"]}),
        "set_difference": ("set_difference", sd_params, sources),
        "random": ("random_like", {"like": "set_difference", "seed": seed, **sd_params}, sources),
        "random_magnitude": ("magnitude_matched_random",
                             {"like": "set_difference", "seed": seed, "bins": bins, "weights": model_spec,
                              "weights_fingerprint": fingerprint, **sd_params}, sources),
    }
    base_meta = {k: str(v) for k, v in (("model", s_meta.get("model")), ("model_hash", hs)) if v}
    summary = group_summary(groups)
    total = summary[summary["level"] == "total"].iloc[0]
    outputs: dict[str, Any] = {}
    for name in names:
        definition, prm, src = params[name]
        meta = {"definition": definition, "params": prm, "sources": src, **base_meta,
                "selected": str(int(total[name])), "total": str(int(total["numel"]))}
        save_group(files[name], groups[name], meta, overwrite=overwrite)
        outputs[name] = {"file": str(files[name].relative_to(out)), "count": int(total[name]),
                         "fraction": float(total[f"{name}_share"]), "sha256": sha256_file(files[name])}
    sd_share = float(total["set_difference_share"])
    notes.insert(0, f"set_difference selects {int(total['set_difference']):,} of {int(total['numel']):,} weights "
                    f"= {100 * sd_share:.4f}% (q = {100 * q:g}%, p = {100 * p:g}%, scope {scope})")
    write_text(gdir / "summary.csv", summary.to_csv(index=False), overwrite=overwrite)
    write_text(gdir / "summary.md", f"# Weight groups\n\n{notes[0]}\n\n" + summary_markdown(summary),
               overwrite=overwrite)
    outputs["summary"] = {"file": str((gdir / "summary.csv").relative_to(out))}
    inputs = {"safety_scores": sources["safety"]["sha256"], "utility_scores": sources["utility"]["sha256"]}
    if fingerprint:
        inputs["model_weights"] = fingerprint
    record = manifest("groups", {"safety": str(safety), "utility": str(utility), "top": top, "p": p, "q": q,
                                 "scope": scope, "seed": seed, "model": model_spec, "bins": bins,
                                 "magnitude": magnitude}, seeds={"seed": seed}, inputs=inputs, outputs=outputs)
    write_manifest(out, record, overwrite=True)
    return GroupsResult(out=out, files=files, summary=summary, notes=notes)


__all__ = [
    "SCOPES", "GROUP_NAMES", "GROUP_FORMAT", "GroupError", "GroupFileError", "check_fraction", "check_scope",
    "selection_size", "module_sort_key", "check_same_modules", "top_k", "set_difference", "set_difference_of",
    "module_seed", "random_like", "magnitude_bin_ids", "magnitude_matched_random", "save_group", "load_group",
    "group_summary", "summary_markdown", "print_summary", "read_score_file", "score_model_hash",
    "load_linear_weights", "GroupsResult", "build_groups",
]
