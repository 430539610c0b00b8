"""Ablation: zero a group of weights in place, measure, restore the exact original values.

A group is ``dict[str, BoolTensor]`` keyed by canonical module name (see :mod:`brittle.groups`), masks in
the canonical ``[d_out, d_in]`` orientation. :func:`ablated` saves only the selected entries (so its
memory cost is proportional to the group, not the model) and writes them back bit-exactly on exit, also
when the body raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

from .io import BrittleError
from .models import linear_modules, linear_weight


def _check_group(modules: Mapping[str, torch.nn.Module], group: Mapping[str, torch.Tensor]) -> None:
    for name, mask in group.items():
        if name not in modules:
            raise BrittleError(f"group module '{name}' does not exist in this model (e.g. {next(iter(modules))})")
        shape = tuple(linear_weight(modules[name]).shape)
        if tuple(mask.shape) != shape or mask.dtype != torch.bool:
            raise BrittleError(f"group mask for '{name}' is {mask.dtype}{tuple(mask.shape)}, expected torch.bool{shape}")


@contextlib.contextmanager
def ablated(model: torch.nn.Module, group: Mapping[str, torch.Tensor], value: float = 0.0) -> Iterator[torch.nn.Module]:
    """Set the weights selected by ``group`` to ``value`` (0: the paper's pruning) inside the block."""
    modules = linear_modules(model)
    _check_group(modules, group)
    saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for name, mask in group.items():
                w = linear_weight(modules[name])
                m = mask.to(w.device)
                saved[name] = (m, w[m].clone())
                w[m] = value
        yield model
    finally:
        with torch.no_grad():
            for name, (m, values) in saved.items():
                linear_weight(modules[name])[m] = values


def fraction_removed(model: torch.nn.Module, group: Mapping[str, torch.Tensor]) -> float:
    """Selected entries / all entries of the model's canonical linear modules (the scored weights)."""
    total = sum(linear_weight(m).numel() for m in linear_modules(model).values())
    return sum(int(m.sum()) for m in group.values()) / total
