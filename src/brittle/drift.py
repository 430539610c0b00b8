"""Drift of tracked weight groups during fine-tuning, measured live from the fp32 training state.

At step t the drift of a tracked entry ``(i, j)`` of module ``W`` is ``Delta_ij = W_t[i, j] - W_0[i, j]``:

* LoRA: ``Delta = s * B_t @ A_t`` (``s = alpha / r``), times ``(1 - M)`` for entries frozen in ``weights``
  mode; only the tracked entries are formed, from the factors (``O(nnz * r)``), never from a merged copy;
* full fine-tuning: ``W_t - W_0`` of the fp32 parameters (``W_0`` of the tracked entries kept from step 0),
  differenced in float64 and rounded once.

With ``rows`` freezing the frozen rows of ``B`` stay zero, so their drift is 0; with ``rewind`` the log shows the
free training (the frozen entries are written back only into the merged model, after the last step).

Per (step, group, module) a row of :attr:`DriftTracker.rows` reports, over the group's ``n`` entries in that module:

* entry level: mean, median, 5/25/75/95 % quantiles and max of ``|Delta|``; the same of ``|Delta| / |w0|``
  over the entries with ``|w0| >= rel_threshold`` (``n_rel_excluded`` counts the others: never silently
  zeroed);
* row ("neuron") level, for every output row ``i`` holding ``k_i >= 1`` of the group's entries ``J_i``:
  ``cosine(W_0[i, J_i], W_t[i, J_i])``, ``||Delta[i, J_i]||_2`` and ``||Delta[i, J_i]|| / ||W_0[i, J_i]||``,
  reported as the mean and median over those rows (``n_rows``);
* over time, per group: ``|Delta|`` of a fixed seeded subsample of the group's entries (``n_sample``, default
  20,000, drawn uniformly over all its entries) at every recorded step, so that each group's median and
  interquartile band per step are exact for the subsample (module-level quantiles do not combine);
* ``adapted``: whether the fine-tuning can change the module at all (a LoRA target, or full fine-tuning); a
  module it cannot change has ``Delta = 0`` by construction and is marked, so analyses can leave it out.

Where the statistics are computed: on a CUDA model, on the module's device (``W_0`` of the tracked entries, the
statistics context and the last Delta stay there; a record moves only its scalars and the subsample to the CPU,
in two transfers); on the CPU, with ``numpy.partition`` for the order statistics, in a thread pool. Both give
the same order statistics exactly, and the same means and row statistics up to float64 summation order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .io import BrittleError
from .models import linear_modules, linear_weight

QUANTILES = (0.05, 0.25, 0.75, 0.95)
REL_THRESHOLD = 1e-6  # |w0| below this: |Delta|/|w0| is not reported for the entry (counted in n_rel_excluded)
N_SAMPLE = 20_000  # entries per group whose |Delta| is kept at every record (the over-time figures)
_NAMES = ("mean", "median", *[f"q{int(q * 100):02d}" for q in QUANTILES], "max")
_ROW_NAMES = ("row_cosine_mean", "row_cosine_median", "row_l2_mean", "row_l2_median", "row_rel_l2_mean",
              "row_rel_l2_median")


def _ranks(n: int) -> list[int]:
    """The distinct 0-based ranks (ascending order) whose values :func:`_summary_dict` reads among ``n`` values:
    the median's ``(n - 1) // 2`` and, per quantile ``q`` at position ``p = (n - 1) q``, ``floor(p)`` and
    ``min(floor(p) + 1, n - 1)``; none for ``n = 0``."""
    if n == 0:
        return []
    positions = [(n - 1) * q for q in QUANTILES]
    return sorted({(n - 1) // 2, *(int(p) for p in positions), *(min(int(p) + 1, n - 1) for p in positions)})


def _summary_dict(vals: Sequence[float], n: int, prefix: str) -> dict[str, float]:
    """``{prefix}_mean, _median, _q05, _q25, _q75, _q95, _max`` from ``vals = [mean, max, *the values at
    _ranks(n)]`` (all NaN for ``n = 0``): the median is the lower middle value (as ``torch.median``), quantile
    ``q`` is ``v[lo] + (v[hi] - v[lo]) (p - lo)`` with ``p = (n - 1) q``, ``lo = floor(p)``, ``hi =
    min(lo + 1, n - 1)`` (linear interpolation, as ``torch.quantile``), computed in float64."""
    if n == 0:
        return {f"{prefix}_{k}": float("nan") for k in _NAMES}
    at = dict(zip(_ranks(n), vals[2:], strict=True))
    out = {f"{prefix}_mean": vals[0], f"{prefix}_median": at[(n - 1) // 2]}
    for q in QUANTILES:
        pos = (n - 1) * q
        lo, hi = int(pos), min(int(pos) + 1, n - 1)
        out[f"{prefix}_q{int(q * 100):02d}"] = at[lo] + (at[hi] - at[lo]) * (pos - lo)
    out[f"{prefix}_max"] = vals[1]
    return out


def _summary_numpy(values: torch.Tensor) -> torch.Tensor:
    """``[mean, max, *the values at _ranks(n)]`` (float64, CPU) of ``n`` fp32 CPU ``values``; empty for ``n = 0``.
    The mean is accumulated in float64; the order statistics come from one partial sort (``numpy.partition`` at
    the needed ranks: O(n), 5x faster than ``torch.sort`` on 2M entries on 2 CPU cores), of the fp32 values as
    they are (order statistics are exact in any precision). All-zero values (step 0, a frozen or unadapted
    module) skip the sort."""
    import numpy as np

    n = values.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    v = values.float().numpy()
    top = v.max()
    if top == 0.0 and v.min() == 0.0:
        return torch.zeros(2 + len(_ranks(n)), dtype=torch.float64)
    ranks = _ranks(n)
    part = np.partition(v, ranks)
    return torch.tensor([float(v.mean(dtype=np.float64)), float(top), *part[ranks].tolist()], dtype=torch.float64)


def _summary_torch(values: torch.Tensor, n: int, ranks: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
    """``[mean, max, *the values at ranks]`` (float64, on ``values``' device, no host synchronisation) of the
    ``n`` fp32 values ``>= 0`` of ``values`` not in the boolean mask ``drop`` (``ranks`` = :func:`_ranks` of
    ``n``, as a tensor on that device; ``n >= 1``). One ``torch.sort``: the dropped entries sort last as
    ``+inf``, so ranks ``< n`` read only the others; mean accumulated in float64."""
    if drop is None:
        kept, ordered = values, values
    else:
        kept, ordered = values.masked_fill(drop, 0.0), values.masked_fill(drop, float("inf"))  # 0: no sum, no max
    head = torch.stack([kept.sum(dtype=torch.float64) / n, kept.max().double()])
    return torch.cat([head, torch.sort(ordered).values.index_select(0, ranks).double()])


def stats_context(w0: torch.Tensor, rows: torch.Tensor, rel_threshold: float = REL_THRESHOLD, *,
                  _torch: bool | None = None) -> dict[str, Any]:
    """What :func:`entry_stats` needs of ``W_0`` (fp32 ``[n]``) and the rows, computed once per tracked module
    (it does not change during training): each entry's row among the ``n_rows`` distinct rows (``inv``), the
    rows' ``||W_0[i, J_i]||^2`` (``n0sq``, float64) and the number ``n_kept`` of entries with ``|w0| >=
    rel_threshold``.

    Two forms, by where ``w0`` lives (``_torch`` forces one, for tests):

    * CPU (numpy order statistics): float64 ``w``, the mask ``keep`` and fp32 ``abs_w_kept`` of the kept entries,
      int64 ``inv``: 21 bytes per entry, plus ``w0``, which host memory affords and saves casts at every record;
    * torch (a CUDA ``w0``): ``w0`` itself (not copied), int32 ``inv``, and the ranks as device tensors: 4 bytes
      per entry plus 8 per row; the float64 ``w0`` and the kept mask are recomputed per record on the fly."""
    use_torch = w0.device.type != "cpu" if _torch is None else _torch
    w0 = w0.float()
    w = w0.double()
    keep = w.abs() >= rel_threshold
    uniq, inv = torch.unique(rows.to(w0.device), return_inverse=True)
    n0sq = torch.zeros(len(uniq), dtype=torch.float64, device=w0.device).index_add_(0, inv, w * w)
    n_kept = int(keep.sum())
    ctx: dict[str, Any] = {"torch": use_torch, "n": w0.numel(), "n_kept": n_kept, "n_rows": len(uniq),
                           "n0sq": n0sq, "rel_threshold": rel_threshold}
    if use_torch:
        ctx.update(w0=w0, inv=inv.to(torch.int32),
                   ranks=torch.tensor(_ranks(w0.numel()), dtype=torch.int64, device=w0.device),
                   ranks_kept=torch.tensor(_ranks(n_kept), dtype=torch.int64, device=w0.device))
    else:
        ctx.update(w=w, keep=keep, abs_w_kept=w0.abs()[keep], inv=inv)
    return ctx


def _row_summary(n0sq: torch.Tensor, wd: torch.Tensor, dd: torch.Tensor) -> torch.Tensor:
    """``[mean, median]`` of the rows' cosine, L2 and relative L2 drift (float64, on the inputs' device), from
    per-row ``||w||^2``, ``w.d`` and ``||d||^2``: ``cos = (||w||^2 + w.d) / (||w|| ||w + d||)`` with
    ``||w + d||^2 = ||w||^2 + 2 w.d + ||d||^2``."""
    n0, nt, nd = n0sq.sqrt(), (n0sq + 2 * wd + dd).clamp_min(0).sqrt(), dd.sqrt()
    cos = (n0sq + wd) / (n0 * nt).clamp_min(1e-300)
    rel = nd / n0.clamp_min(1e-300)
    return torch.stack([cos.mean(), cos.median(), nd.mean(), nd.median(), rel.mean(), rel.median()])


def _entry_vector(delta: torch.Tensor, ctx: Mapping[str, Any]) -> torch.Tensor:
    """Every statistic of :func:`entry_stats` as one float64 vector on ``delta``'s device (read by
    :func:`_entry_dict`): ``|Delta|``'s :func:`_summary_numpy` layout, then ``|Delta| / |w0|``'s, then
    :func:`_row_summary`; on the torch path without a host synchronisation, so that a record's statistics cross to
    the CPU in one transfer. A Delta whose ``max |Delta|`` is 0 has relative changes 0 (also where ``|w0| = 0``
    passes a threshold of 0); a NaN maximum counts as moved and propagates."""
    n, n_kept = ctx["n"], ctx["n_kept"]
    if n == 0:
        return torch.zeros(0, dtype=torch.float64, device=delta.device)
    absd = delta.float().abs()
    zeros = torch.zeros(ctx["n_rows"], dtype=torch.float64, device=delta.device)
    if not ctx["torch"]:
        abs_part = _summary_numpy(absd)
        moved = bool(abs_part[1] != 0)  # else an all-zero Delta (step 0, frozen, not adapted): nothing to sort
        rel = absd[ctx["keep"]] / ctx["abs_w_kept"] if moved else torch.zeros(n_kept)  # fp32: 1 ulp, as Delta itself
        d = delta.double() if moved else None
        wd = zeros.index_add(0, ctx["inv"], ctx["w"] * d) if moved else zeros
        dd = zeros.index_add(0, ctx["inv"], d * d) if moved else zeros
        return torch.cat([abs_part, _summary_numpy(rel), _row_summary(ctx["n0sq"], wd, dd)])
    abs_part = _summary_torch(absd, n, ctx["ranks"])
    w0 = ctx["w0"]
    w = w0.double()
    parts = [abs_part]
    if n_kept:
        drop = ~(w.abs() >= ctx["rel_threshold"])  # as the CPU form's mask (a NaN w0 is dropped)
        rel = torch.where(abs_part[1] != 0, absd / w0.abs(), 0.0)  # fp32, the same division as the CPU form
        parts.append(_summary_torch(rel, n_kept, ctx["ranks_kept"], drop))
    # float64 index_add_ on CUDA adds in no fixed order: the last bits of a row sum may vary between runs
    d = delta.double()
    wd = zeros.index_add(0, ctx["inv"], w * d)
    dd = zeros.index_add(0, ctx["inv"], d * d)
    return torch.cat([*parts, _row_summary(ctx["n0sq"], wd, dd)])


def _entry_dict(vals: Sequence[float], ctx: Mapping[str, Any]) -> dict[str, float]:
    """:func:`entry_stats`'s dictionary from :func:`_entry_vector`'s values."""
    n, n_kept = ctx["n"], ctx["n_kept"]
    k_abs = 2 + len(_ranks(n)) if n else 0
    k_rel = 2 + len(_ranks(n_kept)) if n_kept else 0
    out: dict[str, float] = {"n": n, "n_rel_excluded": n - n_kept}
    out.update(_summary_dict(vals[:k_abs], n, "abs"))
    out.update(_summary_dict(vals[k_abs:k_abs + k_rel], n_kept, "rel"))
    if n:
        out.update({"n_rows": ctx["n_rows"], **dict(zip(_ROW_NAMES, vals[k_abs + k_rel:], strict=True))})
    else:
        out.update({"n_rows": 0, **{k: float("nan") for k in _ROW_NAMES}})
    return out


def entry_stats(delta: torch.Tensor, w0: torch.Tensor, rows: torch.Tensor, rel_threshold: float = REL_THRESHOLD,
                context: dict[str, Any] | None = None, *, _torch: bool | None = None) -> dict[str, float]:
    """Statistics of one module's tracked entries: ``delta`` and ``w0`` are ``[n]`` (the entries in flat index
    order), ``rows`` their output row indices (see the module docstring for the definitions); ``context`` =
    :func:`stats_context` of ``w0`` and ``rows`` when precomputed (its form decides the path; else ``_torch``
    forces the torch path on CPU tensors, for tests). Row level, per row ``i``:
    ``cos = (||w||^2 + w.d) / (||w|| ||w + d||)`` with ``||w + d||^2 = ||w||^2 + 2 w.d + ||d||^2``."""
    ctx = context if context is not None else stats_context(w0, rows, rel_threshold, _torch=_torch)
    return _entry_dict(_entry_vector(delta, ctx).tolist(), ctx)


def _dense_delta(layer) -> torch.Tensor:
    """``D = sum over active adapters of s * B @ A`` of a LoRA layer, fp32 on the layer's device, ``[d_out, d_in]``:
    one product per module and record, cheaper than gathering ``B[i] . A[:, j]`` entry by entry for every group
    (the groups share modules). It stays on that device, as do the tracked entries gathered from it."""
    total = None
    for a in layer.active_adapters:
        d = layer.scaling[a] * (layer.lora_B[a].weight.float() @ layer.lora_A[a].weight.float())
        total = d if total is None else total + d
    return total


def _gather(weight: torch.Tensor, flat: torch.Tensor, d_in: int) -> torch.Tensor:
    """``weight[i, j]`` at the flat indices ``i * d_in + j`` of a ``[d_out, d_in]`` weight, on its device, without
    a contiguous copy of a transposed view (GPT-2's Conv1D)."""
    if weight.is_contiguous():
        return weight.view(-1).index_select(0, flat)
    if weight.t().is_contiguous():
        return weight.t().view(-1).index_select(0, (flat % d_in) * weight.shape[0] + flat // d_in)
    return weight.reshape(-1).index_select(0, flat)


def _to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """CPU copies of same-dtype 1-d ``tensors``, in one device-to-host transfer (each one waits for the device)."""
    if not tensors:
        return []
    dev = tensors[0].device
    flat = torch.cat([t.to(dev) for t in tensors]).cpu()
    return list(flat.split([t.numel() for t in tensors]))


class DriftTracker:
    """Records the drift of tracked groups while :func:`brittle.finetune.train_lora` runs.

    Create it on the model *before* training (step 0 is recorded then: Delta = 0, and ``W_0`` of the tracked
    entries is kept), pass :meth:`on_step` as ``train_lora``'s ``on_step``; every ``every`` optimiser steps (and
    at :meth:`finish`) a row per (group, module) is added to :attr:`rows`.

    On a CUDA model the tracker keeps on each module's device, per tracked entry: ``W_0`` (fp32, 4 bytes), the
    flat index (int32 below 2^31 entries per module, else int64: 4 bytes), the row inverse index (int32, 4 bytes)
    and the last recorded Delta (fp32, 4 bytes): 16 bytes, 20 while a record forms the next Delta (5.2 GB, 6.5 GB
    for five 1 % groups of a 7B model), plus per-module temporaries and 1 byte for entries in a module frozen in
    ``weights`` mode. :attr:`w0` and :attr:`final` are CPU copies of the kept ones.
    """

    def __init__(self, model, groups: Mapping[str, Mapping[str, torch.Tensor]], *, every: int,
                 rel_threshold: float = REL_THRESHOLD, n_sample: int = N_SAMPLE, seed: int = 0):
        if every < 1:
            raise ValueError(f"drift must be recorded every N >= 1 steps, got {every}")
        self.every, self.rel_threshold, self.n_sample, self.seed = every, rel_threshold, n_sample, seed
        mods = linear_modules(model)
        self.index: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # CPU (rows, cols), row-major
        self._w0: dict[str, dict[str, torch.Tensor]] = {}  # fp32, on the module's device
        self.d_in = {n: linear_weight(m).shape[1] for n, m in mods.items()}
        self.context: dict[tuple[str, str], dict[str, Any]] = {}
        self._flat: dict[tuple[str, str, torch.device], torch.Tensor] = {}
        self._sample_at: dict[tuple[str, str, torch.device], torch.Tensor] = {}
        self._frozen_at: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for gname, group in groups.items():
            self.index[gname], self._w0[gname] = {}, {}
            for mname, mask in group.items():
                if mname not in mods:
                    raise ValueError(f"tracked group '{gname}' names module '{mname}', which this model does not have")
                weight = linear_weight(mods[mname]).detach()
                rows, cols = mask.nonzero(as_tuple=True)  # row-major: rows sorted; where the mask is (CUDA: ms)
                if not len(rows):
                    continue
                self.index[gname][mname] = (rows.cpu(), cols.cpu())
                flat = rows.to(weight.device) * self.d_in[mname] + cols.to(weight.device)
                flat = flat.to(torch.int32 if weight.numel() <= 2**31 else torch.int64)  # int32: half the memory
                self._flat[(gname, mname, weight.device)] = flat
                self._w0[gname][mname] = _gather(weight, flat, self.d_in[mname]).float()
                self.context[(gname, mname)] = stats_context(self._w0[gname][mname], rows, rel_threshold)
        self.sample_index = {g: self._sample_positions(g) for g in self.index}
        self.samples: dict[str, list[torch.Tensor]] = {g: [] for g in self.index}
        self.steps: list[int] = []
        self.adapted: set[str] | None = None
        self.rows: list[dict[str, Any]] = []
        self.last_step = -1
        self._w0_cpu: dict[str, dict[str, torch.Tensor]] | None = None
        self._final_cpu: dict[str, dict[str, torch.Tensor]] | None = None
        self._record(0, deltas={g: {m: torch.zeros_like(w) for m, w in ws.items()} for g, ws in self._w0.items()},
                     adapted=None)

    @property
    def w0(self) -> dict[str, dict[str, torch.Tensor]]:
        """``W_0`` of the tracked entries, ``{group: {module: fp32 [n]}}`` in flat index order, on the CPU (copied
        from the model's device on first use)."""
        if self._w0_cpu is None:
            self._w0_cpu = {g: {m: w.cpu() for m, w in ws.items()} for g, ws in self._w0.items()}
        return self._w0_cpu

    @property
    def final(self) -> dict[str, dict[str, torch.Tensor]]:
        """The last recorded Delta, ``{group: {module: fp32 [n]}}`` in flat index order, on the CPU (copied from
        the model's device once per record, on first use)."""
        if self._final_cpu is None:
            self._final_cpu = {g: {m: d.cpu() for m, d in ds.items()} for g, ds in self._final.items()}
        return self._final_cpu

    def _sample_positions(self, group: str) -> dict[str, torch.Tensor]:
        """Module -> positions (in that module's tracked entries) of the group's fixed subsample: ``n_sample``
        entries drawn without replacement over all the group's entries (seeded), or all of them if fewer."""
        sizes = {m: len(rows) for m, (rows, _) in self.index[group].items()}
        total = sum(sizes.values())
        gen = torch.Generator().manual_seed(self.seed)
        picked = torch.randperm(total, generator=gen)[: self.n_sample].sort().values
        out, start = {}, 0
        for m, n in sizes.items():
            lo, hi = torch.searchsorted(picked, torch.tensor([start, start + n])).tolist()
            if hi > lo:
                out[m] = picked[lo:hi] - start
            start += n
        return out

    def _flat_index(self, group: str, module: str, device: torch.device) -> torch.Tensor:
        """The tracked entries' flat indices into ``[d_out, d_in]`` on ``device`` (int32 or int64), made once per
        device."""
        key = (group, module, device)
        if key not in self._flat:
            self._flat[key] = next(f for (g, m, _), f in self._flat.items() if (g, m) == (group, module)).to(device)
        return self._flat[key]

    def _positions_on(self, group: str, module: str, device: torch.device) -> torch.Tensor:
        """:attr:`sample_index` ``[group][module]`` on ``device``, made once per device."""
        key = (group, module, device)
        if key not in self._sample_at:
            self._sample_at[key] = self.sample_index[group][module].to(device)
        return self._sample_at[key]

    def _frozen_entries(self, group: str, module: str, mask: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``mask`` (a ``weights``-mode frozen module's ``[d_out, d_in]``) at the group's tracked entries, on
        ``device``; gathered once per mask rather than copying the whole mask to the device at every record."""
        hit = self._frozen_at.get((group, module))
        if hit is None or hit[0] is not mask or hit[1].device != device:
            hit = (mask, mask.to(device).reshape(-1).index_select(0, self._flat_index(group, module, device)))
            self._frozen_at[(group, module)] = hit
        return hit[1]

    def deltas(self, model) -> tuple[dict[str, dict[str, torch.Tensor]], set[str]]:
        """``({group: {module: Delta of its tracked entries}}, adapted modules)`` of the model now; each Delta fp32
        ``[n]`` on the device of the tracker's ``W_0`` of the module (the module's at construction)."""
        freezer = getattr(model, "brittle_freezer", None)
        frozen = freezer.group if freezer is not None and freezer.mode == "weights" else {}
        if getattr(model, "peft_config", None) is not None:
            from .freeze import _lora_layers

            layers = _lora_layers(model)
            out: dict[str, dict[str, torch.Tensor]] = {g: {} for g in self.index}
            modules = dict.fromkeys(m for idx in self.index.values() for m in idx)
            with torch.no_grad():
                for m in modules:  # the update of a module formed once (fp32, d_out x d_in), read by every group
                    dense = _dense_delta(layers[m]) if m in layers else None
                    for g, idx in self.index.items():
                        if m not in idx:
                            continue
                        w0 = self._w0[g][m]
                        if dense is None:
                            out[g][m] = torch.zeros_like(w0)
                            continue
                        d = dense.view(-1).index_select(0, self._flat_index(g, m, dense.device))
                        if m in frozen:
                            d = d.masked_fill(self._frozen_entries(g, m, frozen[m], dense.device), 0.0)
                        out[g][m] = d.to(w0.device)
            return out, set(layers)
        mods = linear_modules(model)
        out = {}
        with torch.no_grad():
            for g, idx in self.index.items():
                out[g] = {}
                for m in idx:
                    w, w0 = linear_weight(mods[m]).detach(), self._w0[g][m]
                    wt = _gather(w, self._flat_index(g, m, w.device), self.d_in[m]).to(w0.device)
                    # the difference in float64, then rounded once: fp32 rounding relative to |Delta|, not to |W|
                    out[g][m] = (wt.double() - w0.double()).float()
        trainable = {n for n, mod in mods.items() if linear_weight(mod).requires_grad}
        return out, trainable

    def _record(self, step: int, deltas, adapted: set[str] | None) -> None:
        pairs = [(g, m, d) for g, per_module in deltas.items() for m, d in per_module.items()]
        if all(not self.context[(g, m)]["torch"] for g, m, _ in pairs):
            from concurrent.futures import ThreadPoolExecutor

            def stats(pair):
                g, m, d = pair
                return entry_stats(d, self._w0[g][m], self.index[g][m][0], self.rel_threshold, self.context[(g, m)])

            # training waits while a record is taken, so its cores are free: the partial sorts (numpy releases the
            # GIL) of different modules run side by side, in the order of `pairs` (the rows' order does not depend
            # on it)
            if adapted is None:  # step 0: every Delta is zero, nothing to sort; threads would cost more than they save
                results = [stats(p) for p in pairs]
            else:
                with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
                    results = list(pool.map(stats, pairs))
        else:  # on the device, one module after the other (its kernels run in order anyway), then one transfer
            vectors = [_entry_vector(d.to(self.context[(g, m)]["n0sq"].device), self.context[(g, m)])
                       for g, m, d in pairs]
            results = [_entry_dict(v.tolist(), self.context[(g, m)])
                       for (g, m, _), v in zip(pairs, _to_host(vectors), strict=True)]
        for (g, m, _), result in zip(pairs, results, strict=True):
            self.rows.append({"step": step, "group": g, "module": m, "layer": int(m.split(".")[1]),
                              "type": m.split(".", 2)[2], "adapted": True if adapted is None else m in adapted, **result})
        sampled = {g: [deltas[g][m].index_select(0, self._positions_on(g, m, deltas[g][m].device)).abs()
                       for m in positions] for g, positions in self.sample_index.items()}
        groups = [g for g, parts in sampled.items() if parts]
        for g, values in zip(groups, _to_host([torch.cat([p.to(sampled[g][0].device) for p in sampled[g]])
                                               for g in groups]), strict=True):
            self.samples[g].append(values)
        for g in sampled.keys() - set(groups):
            self.samples[g].append(torch.zeros(0))
        self.steps.append(step)
        if adapted is not None:
            self.adapted = set(adapted)
        self.last_step = step
        self._final, self._final_cpu = deltas, None

    def on_step(self, step: int, loss: float, model) -> None:
        if step % self.every == 0:
            self._record(step, *self.deltas(model))

    def finish(self, step: int, model) -> None:
        """Record the last step (if it was not just recorded): the final per-entry drift is :attr:`final`."""
        if step != self.last_step:
            self._record(step, *self.deltas(model))

    def state_dict(self) -> dict[str, Any]:
        """The log so far, for a training checkpoint (``train_lora(state={"drift": tracker})``): the rows, the last
        recorded step and its Delta (:attr:`final`, on the CPU), and the settings they were recorded with (checked
        on load). ``W_0`` is not in it: it is read from the unchanged base weights when the tracker is built."""
        return {"settings": self._settings(), "rows": [dict(r) for r in self.rows], "last_step": self.last_step,
                "final": self.final, "samples": {g: list(v) for g, v in self.samples.items()}, "steps": list(self.steps),
                "adapted": None if self.adapted is None else sorted(self.adapted)}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Continue the log of :meth:`state_dict` ``d`` (replacing the rows recorded so far)."""
        mine = self._settings()
        differ = [k for k in mine if d["settings"][k] != mine[k]]
        if differ:
            raise BrittleError(f"the saved drift log differs from this tracker in {', '.join(differ)} (entries: the "
                               f"number tracked per group and module); cannot continue it")
        self.rows = [dict(r) for r in d["rows"]]
        self.last_step, self._final, self._final_cpu = d["last_step"], d["final"], None
        self.samples, self.steps = {g: list(v) for g, v in d["samples"].items()}, list(d["steps"])
        self.adapted = None if d["adapted"] is None else set(d["adapted"])

    def _settings(self) -> dict[str, Any]:
        entries = {g: {m: len(rows) for m, (rows, _) in idx.items()} for g, idx in self.index.items()}
        return {"every": self.every, "rel_threshold": self.rel_threshold, "entries": entries,
                "n_sample": self.n_sample, "seed": self.seed}

    def table(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def save(self, folder: str | Path) -> dict[str, str]:
        """``drift.parquet`` (one row per step, group, module), ``final/<group>.safetensors`` (per module the
        final Delta of the group's entries, fp32, in the group's flat index order, with their flat indices) and
        ``samples.safetensors`` (per group ``[n_records, n]`` fp32 ``|Delta|`` of its fixed subsample restricted to
        modules the fine-tuning changes, ``steps`` ``[n_records]``; metadata ``n_sample``, ``seed``)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        (folder / "final").mkdir(parents=True, exist_ok=True)
        self.table().to_parquet(folder / "drift.parquet", index=False)
        files = {"table": "drift.parquet"}
        for g, per_module in self.final.items():
            tensors = {}
            for m, d in per_module.items():
                rows, cols = self.index[g][m]
                tensors[f"{m}.delta"] = d.contiguous()
                tensors[f"{m}.w0"] = self.w0[g][m].contiguous()
                tensors[f"{m}.index"] = (rows.to(torch.int64) * self.d_in[m] + cols).contiguous()  # flat, [d_out, d_in]
            save_file(tensors, str(folder / "final" / f"{g}.safetensors"),
                      metadata={"step": str(self.last_step), "d_in": json.dumps({m: self.d_in[m] for m in per_module})})
            files[f"final:{g}"] = f"final/{g}.safetensors"
        save_file(self.sample_table(), str(folder / "samples.safetensors"),
                  metadata={"n_sample": str(self.n_sample), "seed": str(self.seed)})
        files["samples"] = "samples.safetensors"
        return files

    def sample_table(self) -> dict[str, torch.Tensor]:
        """``{group: [n_records, n] |Delta| of its subsample in adapted modules, "steps": [n_records]}``."""
        out = {"steps": torch.tensor(self.steps, dtype=torch.int64)}
        for g, positions in self.sample_index.items():
            keep = torch.cat([torch.full((len(pos),), self.adapted is None or m in self.adapted)
                              for m, pos in positions.items()]) if positions else torch.zeros(0, dtype=torch.bool)
            out[g] = torch.stack(self.samples[g])[:, keep].contiguous()
        return out

