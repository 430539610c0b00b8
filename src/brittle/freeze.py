"""Holding weight groups fixed while fine-tuning (four modes), exactly and per module.

A *group* is ``{canonical module name: bool mask [d_out, d_in]}`` (see :mod:`brittle.groups`); ``True`` = the
entry is frozen. With LoRA the effective weight of an adapted module is ``W + D`` with ``D = s * B @ A``
(``s = alpha / r``); the modes differ in what happens to ``D`` at the frozen entries:

* ``weights`` (default): the effective update is ``D * (1 - M)``. The forward pass adds the LoRA output as
  usual and subtracts the frozen entries' share, ``y -= sum_{(i, j) in M} D_ij x_j``, computed from the
  nnz frozen entries only (``O(nnz * (r + tokens))``, a CSR product and a sampled dense product, no dense
  ``d_out x d_in`` tensor per step); the merge
  adds ``D * (1 - M)``, so frozen entries keep their exact original bits.
* ``rows``: the seed study's row-level freezing done right: every output row that holds a frozen entry gets
  ``B[i, :] = 0`` and a zero gradient there, so ``D[i, :] = 0`` and the whole row keeps its bits. It freezes
  more than the group (:func:`rows_frozen_beyond_group` counts how much).
* ``rewind``: the paper's section 4.4 method: train freely, then write the original values back into the
  frozen entries of the merged (or fully fine-tuned) weights.
* ``full-masked``: full fine-tuning with the frozen entries' gradients zeroed, and their values restored after
  every optimiser step (AdamW's decoupled weight decay would move them otherwise).

Each hook is bound to its own module's mask (``functools.partial``), never to a loop variable: the earlier
code's hooks all closed over the last module's rows.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import nn

from .io import BrittleError
from .models import check_masks, linear_modules, linear_weight

FREEZE_MODES = ("weights", "rows", "rewind", "full-masked")


def check_freeze(model: nn.Module, group: Mapping[str, torch.Tensor], mode: str, *, full: bool,
                 adapted: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The non-empty masks of ``group`` after checking them against ``model`` (names, shapes, dtype), the mode
    against the kind of training, and (for LoRA) that every frozen module is adapted. Raises BrittleError."""
    if mode not in FREEZE_MODES:
        raise BrittleError(f"unknown freeze mode '{mode}' (known: {', '.join(FREEZE_MODES)})")
    if mode == "full-masked" and not full:
        raise BrittleError("freeze mode 'full-masked' is for full fine-tuning (give full=True / --full)")
    if full and mode in ("weights", "rows"):
        raise BrittleError(f"freeze mode '{mode}' is for LoRA; with full fine-tuning use 'full-masked' or 'rewind'")
    check_masks(linear_modules(model), group, "freeze group")
    masks = {name: mask for name, mask in group.items() if bool(mask.any())}
    if not masks:
        raise BrittleError("the freeze group selects no weight (empty group)")
    if adapted is not None and mode != "rewind":
        missing = sorted(set(masks) - adapted)
        if missing:
            raise BrittleError(f"the freeze group has entries in {len(missing)} module(s) that the LoRA targets do not "
                               f"adapt (e.g. {missing[0]}); add their roles to the targets or use --freeze-mode rewind")
    return masks


def rows_frozen_beyond_group(group: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """``(entries frozen by rows mode, entries of the group)``: rows mode freezes every entry of a row that
    holds a frozen entry."""
    rows = sum(int(m.any(dim=1).sum()) * m.shape[1] for m in group.values())
    return rows, sum(int(m.sum()) for m in group.values())


def _lora_layers(peft_model) -> dict[str, nn.Module]:
    """Canonical name -> the PEFT LoRA layer wrapping that linear module."""
    from peft.tuners.lora import LoraLayer

    by_base = {id(m.get_base_layer()): m for m in peft_model.modules() if isinstance(m, LoraLayer)}
    return {n: by_base[id(m)] for n, m in linear_modules(peft_model).items() if id(m) in by_base}


def _masked_delta_values(layer, adapter: str, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``D[rows, cols]`` of a LoRA layer (``D = s * B @ A`` in ``[d_out, d_in]``), from the factors only."""
    a = layer.lora_A[adapter].weight  # [r, d_in]
    b = layer.lora_B[adapter].weight  # [d_out, r]
    return layer.scaling[adapter] * (b[rows] * a[:, cols].t()).sum(-1)


def _csr(crow: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():  # "sparse CSR support is in beta": the three operations used here are tested
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, vals, shape, check_invariants=False)


class _Pattern:
    """The frozen entries of one ``[d_out, d_in]`` module as CSR index arrays of ``S`` and of ``S^T`` (computed once
    at install): ``rows``/``cols`` in row-major order (``mask.nonzero()``), ``crow`` their CSR row pointers;
    ``perm`` orders them column-major, ``crow_t`` and ``rows[perm]`` are then the CSR of ``S^T``."""

    def __init__(self, mask: torch.Tensor, device: torch.device):
        rows, cols = mask.nonzero(as_tuple=True)  # row-major: rows sorted, as CSR needs
        self.shape = tuple(mask.shape)
        self.rows, self.cols = rows.to(device), cols.to(device)
        self.crow = torch._convert_indices_from_coo_to_csr(self.rows, self.shape[0])
        self.perm = torch.argsort(self.cols * self.shape[0] + self.rows)
        self.crow_t = torch._convert_indices_from_coo_to_csr(self.cols[self.perm], self.shape[1])
        self.rows_t = self.rows[self.perm]

    def matrix(self, vals: torch.Tensor) -> torch.Tensor:
        return _csr(self.crow, self.cols, vals, self.shape)

    def transposed(self, vals: torch.Tensor) -> torch.Tensor:
        return _csr(self.crow_t, self.rows_t, vals[self.perm], (self.shape[1], self.shape[0]))


class _FrozenShare(torch.autograd.Function):
    """``y = x S^T`` for the sparse ``S`` (values ``vals`` at the entries of ``pattern``, ``[d_out, d_in]``) and
    its gradients: ``dx = dy S`` and ``dvals_k = sum_t dy[t, i_k] x[t, j_k]``, a sampled dense product
    (``torch.sparse.sampled_addmm``) that never forms ``dy^T x``. Every product is CSR x contiguous dense
    (``S x^T``, ``S^T dy^T`` with the CSR of ``S^T`` precomputed): on a CPU (one thread, a 576 x 1536 module with
    3,000 frozen entries, 640 tokens) ``S @ x^T`` took 1.0 ms with ``x^T`` strided and 0.26 ms contiguous, and
    ``S^T @ dy^T`` 5.2 ms through a transposed CSR against 0.4 ms with the CSR of ``S^T``; a whole LoRA step of the
    organism with 2.9 % of its entries frozen costs 1.47x an unfrozen one, 1.60x before (benchmarks/bench_freeze.py)."""

    @staticmethod
    def forward(ctx, vals, x, pattern):
        ctx.save_for_backward(vals, x)
        ctx.pattern = pattern
        return (pattern.matrix(vals) @ x.t().contiguous()).t()

    @staticmethod
    def backward(ctx, gy):
        vals, x = ctx.saved_tensors
        pattern = ctx.pattern
        gy_t = gy.t().contiguous()
        gx = (pattern.transposed(vals) @ gy_t).t() if ctx.needs_input_grad[1] else None
        gv = None
        if ctx.needs_input_grad[0]:
            gv = torch.sparse.sampled_addmm(pattern.matrix(torch.zeros_like(vals)), gy_t, x.contiguous(),
                                            beta=0.0).values()
        return gv, gx, None


def _weights_hook(layer, adapter: str, pattern: _Pattern, module, args, output):
    """Subtract the frozen entries' share of the LoRA update from the layer output (forward hook):
    ``y -= x S^T`` with ``S`` the sparse ``[d_out, d_in]`` matrix of the update at the frozen entries
    (:class:`_FrozenShare`): ``O(nnz * tokens)``, no dense ``d_out x d_in`` tensor and no ``[tokens, nnz]`` one."""
    if layer.disable_adapters or adapter not in layer.active_adapters or layer.merged:
        return output
    x = args[0]
    vals = _masked_delta_values(layer, adapter, pattern.rows, pattern.cols)  # [nnz], fp32, carries the gradient
    flat = x.reshape(-1, pattern.shape[1]).to(vals.dtype)
    correction = _FrozenShare.apply(vals, flat, pattern).reshape(*x.shape[:-1], pattern.shape[0])
    return output - correction.to(output.dtype)


def _masked_grad(keep: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A tensor hook: the gradient with the frozen part (``keep == 0``) zeroed."""
    return grad * keep


class Freezer:
    """Installs one mode's mechanism on a model being fine-tuned, and applies it at merge time.

    ``model`` is the PEFT model (LoRA) or the plain model (full fine-tuning); ``group`` the checked masks.
    """

    def __init__(self, model: nn.Module, group: Mapping[str, torch.Tensor], mode: str, *, full: bool):
        self.mode, self.full = mode, full
        self.group = dict(group)
        self.handles: list = []
        mods = linear_modules(model)
        # originals of the frozen entries (fp32 copies, for rewind / full-masked and for checks)
        self.original = {n: linear_weight(mods[n]).detach()[m].clone() for n, m in self.group.items()}
        self.model = model
        self._install()

    def _install(self) -> None:
        if self.mode == "weights":
            layers = _lora_layers(self.model)
            for name, mask in self.group.items():
                layer = layers[name]
                adapter = layer.active_adapters[0]
                pattern = _Pattern(mask, layer.lora_B[adapter].weight.device)
                hook = functools.partial(_weights_hook, layer, adapter, pattern)
                self.handles.append(layer.register_forward_hook(hook))
        elif self.mode == "rows":
            layers = _lora_layers(self.model)
            for name, mask in self.group.items():
                layer = layers[name]
                b = layer.lora_B[layer.active_adapters[0]].weight  # [d_out, r]
                keep = (~mask.any(dim=1)).to(b.dtype).to(b.device)[:, None]
                with torch.no_grad():
                    b.mul_(keep)  # zero already (peft's init), made explicit
                self.handles.append(b.register_hook(functools.partial(_masked_grad, keep)))
        elif self.mode == "full-masked":
            mods = linear_modules(self.model)
            for name, mask in self.group.items():
                w = linear_weight(mods[name])
                keep = (~mask).to(w.dtype).to(w.device)
                self.handles.append(w.register_hook(functools.partial(_masked_grad, keep)))

    def after_step(self) -> None:
        """After every optimiser step: full-masked mode writes the frozen entries back (exact under weight decay)."""
        if self.mode == "full-masked":
            self._restore(self.model)

    def _restore(self, model: nn.Module) -> None:
        mods = linear_modules(model)
        with torch.no_grad():
            for name, mask in self.group.items():
                w = linear_weight(mods[name])
                w[mask.to(w.device)] = self.original[name].to(w.device, w.dtype)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def merge(self, trained: nn.Module) -> nn.Module:
        """The plain model with the training folded in and the mode applied: LoRA factors merged in fp32 with
        the frozen entries masked (``weights``), merged as they are (``rows``: those rows of B are zero), or
        merged then the frozen entries written back (``rewind``; also for full fine-tuning)."""
        self.remove()
        if self.full:
            model = trained
        elif self.mode == "weights":
            model = merge_masked(trained, self.group)
        else:
            model = trained.merge_and_unload()
        if self.mode in ("rewind", "full-masked"):
            self._restore(model)
        return model


def merge_masked(peft_model, group: Mapping[str, torch.Tensor]):
    """Fold every LoRA adapter into its base weight as ``W + D * (1 - M)`` (``M`` = the module's frozen mask,
    none for modules outside ``group``), computed in fp32 and cast once; return the plain model."""
    from .models import is_conv1d

    layers = _lora_layers(peft_model)
    with torch.no_grad():
        for name, layer in layers.items():
            base = layer.get_base_layer()
            w = linear_weight(base)  # [d_out, d_in] view (GPT-2 Conv1D transposed)
            delta = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            for adapter in layer.active_adapters:
                d = layer.get_delta_weight(adapter).to(torch.float32)
                delta += d.t() if is_conv1d(base) and d.shape != w.shape else d
            merged = (w.to(torch.float32) + delta).to(w.dtype)
            if name in group:  # the original bits, not W + 0.0 (which turns -0.0 into +0.0)
                mask = group[name].to(w.device)
                merged[mask] = w[mask]
            w.copy_(merged)
    return peft_model.unload()
