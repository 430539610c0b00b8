"""Selection math on score and weight tensors: top-k, the safety/utility set difference, random controls.

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

Cost on a 7B model (6.5e9 weights, scores in fp32 in memory): masks take 1 byte per weight per group in
memory. ``row``/``matrix`` work one matrix at a time with ``torch.kthvalue`` (O(n)) and a few boolean /
int32 temporaries of that matrix's size. ``global`` never concatenates the scores: the exact threshold is
found from a strided sample that brackets it, one counting pass over all modules and a second pass that
gathers only the scores inside the bracket (normally ~0.1 % of them), then a pass that builds the masks.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import torch

from ..io import BrittleError

SCOPES = ("row", "matrix", "global")
Scope = Literal["row", "matrix", "global"]

# global scope: below this many candidates the scores are simply concatenated (exact, fast); above it
# a sampled bracket is used. Module-level so tests can exercise the bracket path on small inputs.
_GLOBAL_CONCAT_LIMIT = 1 << 24
_GLOBAL_SAMPLE = 1 << 22
# magnitude bins: edges come from all |W| of a module up to this size, else from a strided sample
_EDGE_SAMPLE = 1 << 24


class GroupError(BrittleError):
    """Invalid selection parameters or inconsistent score / weight / group inputs."""


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
    """Return ``scope`` if it is one of :data:`SCOPES`; raise :class:`GroupError` otherwise."""
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
    """Raise :class:`GroupError` unless ``scores`` is a non-empty dict of non-empty real, NaN-free tensors."""
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
    """``top_k`` in ``global`` scope: entries ``> t`` (``t`` = k-th largest of all), then ties at ``t`` in
    :func:`module_sort_key` order, then flat index, until ``k = selection_size(fraction, sum of numel)``."""
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


def bottom_k(scores: Mapping[str, torch.Tensor], fraction: float, scope: Scope = "matrix", *,
             name: str = "fraction") -> Group:
    """Boolean masks of the bottom ``fraction`` of entries by score within ``scope``: :func:`top_k` of the negated
    scores (the same ``k`` per unit; ties: lower score first, then lower flat index). The paper's bottom-up
    pruning removes these, the weights least important to the behaviour scored."""
    return top_k({n: -_work(s) for n, s in scores.items()}, fraction, scope, name=name)


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
    """Raise :class:`GroupError` unless ``group`` is a non-empty dict of ``torch.bool`` tensors."""
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
    sample = a[::stride].numpy()
    m = sample.size
    ranks = [min(m - 1, (i * m) // bins) for i in range(1, bins)]
    # the order statistics at those ranks, by selection (O(m)) instead of a full sort: the same values
    edges = torch.from_numpy(np.partition(sample, ranks)[ranks])
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


def sweep_groups(safety: Mapping[str, torch.Tensor], utility: Mapping[str, torch.Tensor],
                 weights: Mapping[str, torch.Tensor] | None, p: float, q: float, scope: Scope, seed: int,
                 bins: int = 10, *, bottom: bool = False) -> dict[str, Group]:
    """The groups of one ablation sweep point: top-q safety, the set difference S(p, q) = top-q(safety) minus
    top-p(utility), and random / magnitude-matched random controls sized like that set difference (per module;
    the magnitude control is left out when ``weights`` is None); with ``bottom`` also ``bottom_safety``, the
    bottom-q safety entries (bottom-up pruning: as many entries as top_safety, the least important ones)."""
    check_same_modules(safety, utility)
    top_q = top_k(safety, q, scope, name="q")  # once: it is both top_safety and half of the set difference
    sd = set_difference_of(top_q, top_k(utility, p, scope, name="p"))
    out = {"top_safety": top_q, "set_difference": sd, "random": random_like(sd, seed)}
    if weights is not None:
        out["random_magnitude"] = magnitude_matched_random(sd, weights, seed, bins)
    if bottom:
        out["bottom_safety"] = bottom_k(safety, q, scope, name="q")
    return out


def point_label(kind: str, p: float, q: float) -> str:
    """File stem of one sweep group: ``<kind>-<q>`` on the diagonal (and for top_safety and bottom_safety, which
    depend on q only), ``<kind>-p<p>-q<q>`` otherwise."""
    return f"{kind}-{q:g}" if kind in Q_ONLY_KINDS or p == q else f"{kind}-p{p:g}-q{q:g}"


#: sweep kinds that depend on q only (not on the utility fraction p)
Q_ONLY_KINDS = ("top_safety", "bottom_safety")
