"""Drift of tracked weight groups during fine-tuning, measured live from the fp32 training state.

At step t the drift of a tracked entry ``(i, j)`` of module ``W`` is ``Delta_ij = W_t[i, j] - W_0[i, j]``:

* LoRA: ``Delta = s * B_t @ A_t`` (``s = alpha / r``), times ``(1 - M)`` for entries frozen in ``weights``
  mode; only the tracked entries are formed, from the factors (``O(nnz * r)``), never from a merged copy;
* full fine-tuning: ``W_t - W_0`` of the fp32 parameters (``W_0`` of the tracked entries kept from step 0),
  differenced in float64 and rounded once.

With ``rows`` freezing the frozen rows of ``B`` stay zero, so their drift is 0; with ``rewind`` the log shows the
free training (the frozen entries are written back only into the merged model, after the last step).

Per (step, group, module) :func:`drift_rows` reports, over the group's ``n`` entries in that module:

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
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .io import BrittleError
from .models import linear_modules, linear_weight

QUANTILES = (0.05, 0.25, 0.75, 0.95)
REL_THRESHOLD = 1e-6  # |w0| below this: |Delta|/|w0| is not reported for the entry (counted in n_rel_excluded)
N_SAMPLE = 20_000  # entries per group whose |Delta| is kept at every record (the over-time figures)


def _stats(values: torch.Tensor, prefix: str) -> dict[str, float]:
    """Mean (accumulated in float64), median (the lower middle value, as ``torch.median``), quantiles (linear
    interpolation, as ``torch.quantile``) and max of fp32 ``values``, from one partial sort (``numpy.partition``
    at the needed ranks: O(n), which keeps tracking cheap on groups of millions of entries; fp32 values are
    partitioned as they are, since order statistics are exact in any precision). All-zero values (step 0, a
    frozen or unadapted module) skip the sort."""
    import numpy as np

    names = ("mean", "median", *[f"q{int(q * 100):02d}" for q in QUANTILES], "max")
    n = values.numel()
    if n == 0:
        return {f"{prefix}_{k}": float("nan") for k in names}
    v = values.float().numpy()
    top = float(v.max())
    if top == 0.0 and float(v.min()) == 0.0:
        return {f"{prefix}_{k}": 0.0 for k in names}
    positions = [(n - 1) * q for q in QUANTILES]
    ranks = sorted({(n - 1) // 2, *(int(p) for p in positions), *(min(int(p) + 1, n - 1) for p in positions)})
    part = np.partition(v, ranks)
    out = {f"{prefix}_mean": float(v.mean(dtype=np.float64)), f"{prefix}_median": float(part[(n - 1) // 2])}
    for q, pos in zip(QUANTILES, positions, strict=True):
        lo, hi = int(pos), min(int(pos) + 1, n - 1)
        out[f"{prefix}_q{int(q * 100):02d}"] = float(part[lo]) + (float(part[hi]) - float(part[lo])) * (pos - lo)
    out[f"{prefix}_max"] = top
    return out


def stats_context(w0: torch.Tensor, rows: torch.Tensor, rel_threshold: float = REL_THRESHOLD) -> dict[str, Any]:
    """What :func:`entry_stats` needs of ``W_0`` and the rows, computed once per tracked module (it does not
    change during training): float64 ``w0``, the kept entries of the relative change and their ``|w0|``, each
    entry's row among the distinct rows, and the rows' ``||W_0[i, J_i]||^2``."""
    w = w0.double()
    keep = w.abs() >= rel_threshold
    uniq, inv = torch.unique(rows, return_inverse=True)
    n0sq = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, w * w)
    return {"w": w, "keep": keep, "abs_w_kept": w0.float().abs()[keep], "inv": inv, "n_rows": len(uniq), "n0sq": n0sq}


def entry_stats(delta: torch.Tensor, w0: torch.Tensor, rows: torch.Tensor, rel_threshold: float = REL_THRESHOLD,
                context: dict[str, Any] | None = None) -> dict[str, float]:
    """Statistics of one module's tracked entries: ``delta`` and ``w0`` are ``[n]`` (the entries in flat index
    order), ``rows`` their output row indices (see the module docstring for the definitions); ``context`` =
    :func:`stats_context` of ``w0`` and ``rows`` when precomputed. Row level, per row ``i``:
    ``cos = (||w||^2 + w.d) / (||w|| ||w + d||)`` with ``||w + d||^2 = ||w||^2 + 2 w.d + ||d||^2``."""
    ctx = context if context is not None else stats_context(w0, rows, rel_threshold)
    absd = delta.float().abs()
    n_kept = int(ctx["abs_w_kept"].numel())
    out: dict[str, float] = {"n": int(absd.numel()), "n_rel_excluded": int(absd.numel()) - n_kept}
    out.update(_stats(absd, "abs"))
    moved = out["abs_max"] > 0  # else an all-zero Delta (step 0, frozen, not adapted): every statistic is known
    rel = absd[ctx["keep"]] / ctx["abs_w_kept"] if moved else torch.zeros(n_kept)  # fp32: 1 ulp, as Delta itself
    out.update(_stats(rel, "rel"))
    if absd.numel():
        zeros = torch.zeros(ctx["n_rows"], dtype=torch.float64)
        d = delta.double() if moved else None
        wd = zeros.index_add(0, ctx["inv"], ctx["w"] * d) if moved else zeros
        dd = zeros.index_add(0, ctx["inv"], d * d) if moved else zeros
        n0sq = ctx["n0sq"]
        n0, nt, nd = n0sq.sqrt(), (n0sq + 2 * wd + dd).clamp_min(0).sqrt(), dd.sqrt()
        cos = (n0sq + wd) / (n0 * nt).clamp_min(1e-300)
        rel = nd / n0.clamp_min(1e-300)
        out.update({"n_rows": ctx["n_rows"], "row_cosine_mean": cos.mean().item(),
                    "row_cosine_median": cos.median().item(), "row_l2_mean": nd.mean().item(),
                    "row_l2_median": nd.median().item(), "row_rel_l2_mean": rel.mean().item(),
                    "row_rel_l2_median": rel.median().item()})
    else:
        out.update({"n_rows": 0, **{k: float("nan") for k in ("row_cosine_mean", "row_cosine_median", "row_l2_mean",
                                                               "row_l2_median", "row_rel_l2_mean", "row_rel_l2_median")}})
    return out


def _dense_delta(layer) -> torch.Tensor:
    """``D = sum over active adapters of s * B @ A`` of a LoRA layer, fp32 on the layer's device, ``[d_out, d_in]``:
    one product per module and record, cheaper than gathering ``B[i] . A[:, j]`` entry by entry for every group
    (the groups share modules). It stays on that device: only the tracked entries travel to the CPU."""
    total = None
    for a in layer.active_adapters:
        d = layer.scaling[a] * (layer.lora_B[a].weight.float() @ layer.lora_A[a].weight.float())
        total = d if total is None else total + d
    return total


class DriftTracker:
    """Records the drift of tracked groups while :func:`brittle.finetune.train_lora` runs.

    Create it on the model *before* training (step 0 is recorded then: Delta = 0, and ``W_0`` of the tracked
    entries is kept), pass :meth:`on_step` as ``train_lora``'s ``on_step``; every ``every`` optimiser steps (and
    at :meth:`finish`) a row per (group, module) is added to :attr:`rows`.
    """

    def __init__(self, model, groups: Mapping[str, Mapping[str, torch.Tensor]], *, every: int,
                 rel_threshold: float = REL_THRESHOLD, n_sample: int = N_SAMPLE, seed: int = 0):
        if every < 1:
            raise ValueError(f"drift must be recorded every N >= 1 steps, got {every}")
        self.every, self.rel_threshold, self.n_sample, self.seed = every, rel_threshold, n_sample, seed
        mods = linear_modules(model)
        self.index: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.w0: dict[str, dict[str, torch.Tensor]] = {}
        self.d_in = {n: linear_weight(m).shape[1] for n, m in mods.items()}
        self.context: dict[tuple[str, str], dict[str, Any]] = {}
        self._flat: dict[tuple[str, str, torch.device], torch.Tensor] = {}
        for gname, group in groups.items():
            self.index[gname], self.w0[gname] = {}, {}
            for mname, mask in group.items():
                if mname not in mods:
                    raise ValueError(f"tracked group '{gname}' names module '{mname}', which this model does not have")
                rows, cols = mask.nonzero(as_tuple=True)  # row-major: rows sorted
                if not len(rows):
                    continue
                self.index[gname][mname] = (rows, cols)
                self.w0[gname][mname] = linear_weight(mods[mname]).detach()[rows, cols].to(device="cpu", dtype=torch.float32)
                self.context[(gname, mname)] = stats_context(self.w0[gname][mname], rows, rel_threshold)
        self.sample_index = {g: self._sample_positions(g) for g in self.index}
        self.samples: dict[str, list[torch.Tensor]] = {g: [] for g in self.index}
        self.steps: list[int] = []
        self.adapted: set[str] | None = None
        self.rows: list[dict[str, Any]] = []
        self.last_step = -1
        self._record(0, deltas={g: {m: torch.zeros_like(w) for m, w in ws.items()} for g, ws in self.w0.items()},
                     adapted=None)

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
        """The tracked entries' flat indices into ``[d_out, d_in]`` on ``device``, made once per device."""
        key = (group, module, device)
        if key not in self._flat:
            rows, cols = self.index[group][module]
            self._flat[key] = (rows.to(torch.int64) * self.d_in[module] + cols).to(device)
        return self._flat[key]

    def deltas(self, model) -> tuple[dict[str, dict[str, torch.Tensor]], set[str]]:
        """``({group: {module: Delta of its tracked entries}}, adapted modules)`` of the model now."""
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
                        if dense is None:
                            out[g][m] = torch.zeros(len(idx[m][0]), dtype=torch.float32)
                            continue
                        flat = self._flat_index(g, m, dense.device)
                        d = dense.view(-1)[flat]  # gathered where D was formed: 1 % of a 7B model's D, not all of it, crosses to the CPU
                        if m in frozen:
                            d = d.masked_fill(frozen[m].to(dense.device).reshape(-1)[flat], 0.0)
                        out[g][m] = d.cpu()
            return out, set(layers)
        mods = linear_modules(model)
        with torch.no_grad():
            # the difference in float64, then rounded once: fp32 rounding relative to |Delta|, not to |W|
            out = {g: {m: (linear_weight(mods[m]).detach()[rows, cols].double().cpu() - self.w0[g][m].double()).float()
                       for m, (rows, cols) in idx.items()} for g, idx in self.index.items()}
        trainable = {n for n, mod in mods.items() if linear_weight(mod).requires_grad}
        return out, trainable

    def _record(self, step: int, deltas, adapted: set[str] | None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        pairs = [(g, m, d) for g, per_module in deltas.items() for m, d in per_module.items()]

        def stats(pair):
            g, m, d = pair
            return entry_stats(d, self.w0[g][m], self.index[g][m][0], self.rel_threshold, self.context[(g, m)])

        # training waits while a record is taken, so its cores are free: the partial sorts (numpy releases the GIL)
        # of different modules run side by side, in the order of `pairs` (the rows' order does not depend on it)
        if adapted is None:  # step 0: every Delta is zero, nothing to sort; threads would cost more than they save
            results = [stats(p) for p in pairs]
        else:
            with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
                results = list(pool.map(stats, pairs))
        for (g, m, _), result in zip(pairs, results, strict=True):
            self.rows.append({"step": step, "group": g, "module": m, "layer": int(m.split(".")[1]),
                              "type": m.split(".", 2)[2], "adapted": True if adapted is None else m in adapted, **result})
        for g, positions in self.sample_index.items():
            parts = [deltas[g][m][pos].abs() for m, pos in positions.items()]
            self.samples[g].append(torch.cat(parts) if parts else torch.zeros(0))
        self.steps.append(step)
        if adapted is not None:
            self.adapted = set(adapted)
        self.last_step = step
        self.final = deltas

    def on_step(self, step: int, loss: float, model) -> None:
        if step % self.every == 0:
            self._record(step, *self.deltas(model))

    def finish(self, step: int, model) -> None:
        """Record the last step (if it was not just recorded): the final per-entry drift is :attr:`final`."""
        if step != self.last_step:
            self._record(step, *self.deltas(model))

    def state_dict(self) -> dict[str, Any]:
        """The log so far, for a training checkpoint (``train_lora(state={"drift": tracker})``): the rows, the last
        recorded step and its Delta (:attr:`final`), and the settings they were recorded with (checked on load).
        ``W_0`` is not in it: it is read from the unchanged base weights when the tracker is built."""
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
        self.last_step, self.final = d["last_step"], d["final"]
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

