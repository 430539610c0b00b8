"""The scoring methods: one object per method, behind the common interface of :class:`ScoreMethod`.

Definitions (``DESIGN.md``, "Definitions"; scores are fp32 tensors in the canonical ``[d_out, d_in]``
orientation of :func:`brittle.models.linear_weight`, also for GPT-2's ``Conv1D`` whose parameter is stored
``[d_in, d_out]``):

* Loss of example ``n``: ``L_n`` = mean causal-LM cross-entropy over the positions that *predict* a
  response token (``labels[t+1] != -100`` with the labels of :func:`brittle.data.core.encode`: the
  response and the end-of-turn token; the prompt is masked). Every example weighs the same.
* ``snip``:        ``S = |W| * sum_n |dL_n/dW|``  -- the absolute value is taken per example.
* ``snip-summed``: ``S = |W * sum_n dL_n/dW|``    -- the signed gradient summed first (not the paper's SNIP).
* ``wanda``:       ``S_ij = |W_ij| * sqrt(sum x_j^2)`` -- ``x`` = the input of that linear at the positions
  whose *input* token is a response token (``labels[t] != -100``), over all examples; as in the paper's
  Wanda code, whose activation mask is one position later than the SNIP loss mask.

A method's life for one module (driven by :mod:`brittle.scoring.compute`): an fp32 accumulator of
:meth:`ScoreMethod.accumulator_shape` is zeroed, :meth:`ScoreMethod.accumulate` adds each batch,
:meth:`ScoreMethod.reduce` combines the accumulators of several processes (identity for one process; it
comes *before* ``|W|`` is multiplied in), and :meth:`ScoreMethod.finish` turns it into the score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..io import BrittleError

LOSS_DEFINITION = "mean cross-entropy over the positions predicting a response token (labels[t+1] != -100), per example"
WANDA_POSITIONS = "positions whose input token is a response token (labels[t] != -100)"


@dataclass
class BatchInfo:
    """What a method may read about the current (right-padded) batch of ``B`` examples of ``T`` tokens."""

    shape: tuple[int, int]
    #: gradient methods: per example, one past its last loss position (0: no loss position).
    upto: list[int] | None = None
    #: activation methods: ``[B, T]`` bool, the positions whose input token is a response token.
    input_mask: torch.Tensor | None = None


class ScoreMethod:
    """One scoring method.

    Attributes:
        name: the name used on the command line and in score files.
        needs_grad: True when :meth:`accumulate` needs the per-example output gradients (a forward and a
            backward pass per batch); False when the layer inputs are enough (a forward pass only).
        definition: the formula, written into the score file's metadata.
    """

    name: ClassVar[str]
    needs_grad: ClassVar[bool]
    definition: ClassVar[str]

    def accumulator_shape(self, weight_shape: tuple[int, int]) -> tuple[int, ...]:
        """Shape of the fp32 accumulator of a weight of canonical shape ``[d_out, d_in]``."""
        raise NotImplementedError

    def workspace_numel(self, weight_shape: tuple[int, int]) -> int:
        """fp32 elements of scratch space :meth:`accumulate` needs (one workspace per device, reused)."""
        return 0

    def accumulate(self, acc: torch.Tensor, x: torch.Tensor, g: torch.Tensor | None, batch: BatchInfo,
                   work: torch.Tensor | None = None) -> None:
        """Add one batch to ``acc`` in place.

        ``x``: the layer input ``[B, T, d_in]``; ``g``: the gradient of ``sum_n L_n`` with respect to the
        layer output, ``[B, T, d_out]`` (None when not :attr:`needs_grad`); ``work``: a flat fp32 workspace
        of at least :meth:`workspace_numel` elements on ``acc``'s device.
        """
        raise NotImplementedError

    def reduce(self, acc: torch.Tensor) -> torch.Tensor:
        """Combine the accumulators of all processes (before ``|W|`` is multiplied in); identity for one process."""
        return acc

    def finish(self, acc: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The fp32 score ``[d_out, d_in]`` from the (reduced) accumulator and the weight; may reuse ``acc``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<score method {self.name}>"


class _PerExampleGradient(ScoreMethod):
    """Gradient methods: ``G_n = dY[n]^T X[n]`` formed one example at a time in fp32, over its positions up to
    its last loss position (padding never enters), and added by :meth:`_add`."""

    needs_grad = True

    def accumulator_shape(self, weight_shape):
        return tuple(weight_shape)

    def accumulate(self, acc, x, g, batch, work=None):
        d_out, d_in = g.shape[-1], x.shape[-1]
        buf = None if work is None else work[: d_out * d_in].view(d_out, d_in)
        for b, u in enumerate(batch.upto):
            if u == 0:
                continue
            gb = g[b, :u].to(device=acc.device, dtype=torch.float32)
            xb = x[b, :u].to(device=acc.device, dtype=torch.float32)
            self._add(acc, gb, xb, buf)

    def _add(self, acc: torch.Tensor, gb: torch.Tensor, xb: torch.Tensor, buf: torch.Tensor | None) -> None:
        raise NotImplementedError


class Snip(_PerExampleGradient):
    """``snip``: ``S = |W| * sum_n |dL_n/dW|`` -- the absolute value is taken per example (the paper's SNIP)."""

    name = "snip"
    definition = "|W| * sum_n |dL_n/dW|"

    def workspace_numel(self, weight_shape):
        return weight_shape[0] * weight_shape[1]

    def _add(self, acc, gb, xb, buf):
        torch.mm(gb.t(), xb, out=buf)
        acc.add_(buf.abs_())

    def finish(self, acc, weight):
        return acc.mul_(weight.abs().to(torch.float32))


class SnipSummed(_PerExampleGradient):
    """``snip-summed``: ``S = |W * sum_n dL_n/dW|`` -- the signed gradient summed first (not the paper's SNIP)."""

    name = "snip-summed"
    definition = "|W * sum_n dL_n/dW|"

    def _add(self, acc, gb, xb, buf):
        acc.addmm_(gb.t(), xb)

    def finish(self, acc, weight):
        return acc.mul_(weight.to(torch.float32)).abs_()


class Wanda(ScoreMethod):
    """``wanda``: ``S_ij = |W_ij| * sqrt(sum x_j^2)`` -- ``x`` = the input of that linear at the positions whose
    *input* token is a response token (``labels[t] != -100``), over all examples; as in the paper's Wanda code,
    whose activation mask is one position later than the SNIP loss mask. The accumulator is ``sum x_j^2``."""

    name = "wanda"
    needs_grad = False
    definition = "|W| * sqrt(sum over response positions of x^2)"

    def accumulator_shape(self, weight_shape):
        return (weight_shape[1],)

    def accumulate(self, acc, x, g, batch, work=None):
        xs = x[batch.input_mask.to(x.device)].to(torch.float32)  # [N, d_in]
        acc.add_((xs * xs).sum(0))

    def finish(self, acc, weight):
        return weight.abs().to(torch.float32) * acc.sqrt_().unsqueeze(0)


#: name -> method; iterating or ``in`` gives the names (``"snip"``, ``"wanda"``, ``"snip-summed"``).
METHODS: dict[str, ScoreMethod] = {m.name: m for m in (Snip(), Wanda(), SnipSummed())}


def get_method(method: str | ScoreMethod) -> ScoreMethod:
    """The method object for a name (a :class:`ScoreMethod` is returned as is)."""
    if isinstance(method, ScoreMethod):
        return method
    if method not in METHODS:
        raise BrittleError(f"unknown scoring method '{method}' (choose one of: {', '.join(METHODS)})")
    return METHODS[method]
