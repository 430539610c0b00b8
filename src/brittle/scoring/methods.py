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

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..data.core import IGNORE_INDEX
from ..io import BrittleError

LOSS_DEFINITION = "mean cross-entropy over the positions predicting a response token (labels[t+1] != -100), per example"
WANDA_POSITIONS = "positions whose input token is a response token (labels[t] != -100)"


def activation_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` (or ``[T]``) bool: the positions whose *input* token is a response token (:data:`WANDA_POSITIONS`),
    where activation statistics are taken (Wanda here, ActSVD in :mod:`brittle.lowrank`)."""
    return labels != IGNORE_INDEX


@dataclass
class BatchInfo:
    """What a method may read about the current (right-padded) batch of ``B`` examples of ``T`` tokens.

    The per-batch index tensors a hook needs are made on the host and copied to each device once per batch
    (:meth:`upto_on`, :meth:`input_positions_on`): a host-to-device copy, a boolean-mask index or an ``.item()``
    waits for the GPU to finish its queued work, and one per module hook kept the GPU scorer CPU-bound. The
    hooks' arithmetic reads no device values (tested on PyTorch's ``meta`` device, where any such read raises)."""

    shape: tuple[int, int]
    #: gradient methods: per example, one past its last loss position (0: no loss position).
    upto: list[int] | None = None
    #: activation methods: ``[B, T]`` bool on the host, the positions whose input token is a response token.
    input_mask: torch.Tensor | None = None
    _on: dict[tuple[str, torch.device], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def _copied(self, what: str, device: torch.device, make) -> torch.Tensor:
        key = (what, torch.device(device))
        if key not in self._on:
            self._on[key] = make().to(key[1])
        return self._on[key]

    def upto_on(self, device: torch.device) -> torch.Tensor:
        """:attr:`upto` as an int32 tensor on ``device`` (copied once per batch and device)."""
        return self._copied("upto", device, lambda: torch.tensor(self.upto, dtype=torch.int32))

    def window_on(self, device: torch.device) -> torch.Tensor:
        """``[B, T', 1]`` bool on ``device``, ``T' = max(upto)``: position ``t`` of example ``n`` is in its gradient
        window (``t < upto[n]``); made once per batch and device."""
        return self._copied("window", device, lambda: (torch.arange(max(self.upto)).unsqueeze(0)
                                                       < torch.tensor(self.upto).unsqueeze(1)).unsqueeze(-1))

    def input_positions_on(self, device: torch.device) -> torch.Tensor:
        """The flat indices ``b * T + t`` of :attr:`input_mask`'s positions, int64, ascending, on ``device``
        (copied once per batch and device)."""
        return self._copied("positions", device, lambda: self.input_mask.reshape(-1).nonzero().squeeze(1))


def response_rows(x: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
    """``[N, d]``: the rows of a layer input ``x`` (``[B, T, d]``) at the batch's :attr:`BatchInfo.input_mask`
    positions, in row-major order; by an index gather, so the output size is known without reading the mask on
    the device."""
    return x.reshape(-1, x.shape[-1]).index_select(0, batch.input_positions_on(x.device))


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

    def workspace_numel(self, weight_shape: tuple[int, int], batch_size: int) -> int:
        """fp32 elements of scratch space :meth:`accumulate` needs for batches of ``batch_size`` examples (one
        workspace per device, reused)."""
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
        """Combine the accumulators of all processes (before ``|W|`` is multiplied in): their sum, since every
        accumulator is a sum over examples (:mod:`brittle.distributed`); identity for one process."""
        from ..distributed import sum_across

        return sum_across(acc)

    def finish(self, acc: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The fp32 score ``[d_out, d_in]`` from the (reduced) accumulator and the weight; may reuse ``acc``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<score method {self.name}>"


#: Cap on the per-example gradients of one module formed at once (fp32 elements; 64 Mi = 256 MiB): the
#: examples of a batch go through :meth:`Snip.accumulate` in chunks of at most this many entries.
WORKSPACE_ELEMENTS = 64 * 2**20


def examples_per_chunk(weight_shape: tuple[int, int], batch_size: int) -> int:
    """How many per-example gradients ``[d_out, d_in]`` fit :data:`WORKSPACE_ELEMENTS` (at least one)."""
    return max(1, min(batch_size, WORKSPACE_ELEMENTS // (weight_shape[0] * weight_shape[1])))


def _response_window(x: torch.Tensor, g: torch.Tensor, batch: BatchInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``g`` cut to the batch's last loss position, positions past each example's own last loss
    position zeroed. ``g`` is already zero there (a later position cannot change an earlier loss under causal
    attention); zeroing ``x`` too keeps a non-finite padding activation from turning ``0 * x`` into NaN."""
    keep = batch.window_on(x.device)
    T = keep.shape[1]
    return x[:, :T].where(keep, 0.0), g[:, :T].where(batch.window_on(g.device), 0.0)


def _fp32_products(g_t: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.bmm(g_t, x, out=out)


class Snip(ScoreMethod):
    """``snip``: ``S = |W| * sum_n |dL_n/dW|`` -- the absolute value is taken per example (the paper's SNIP).

    The per-example gradient ``G_n = dY[n]^T X[n]`` (``[d_out, d_in]``, a sum over the example's positions up
    to its last loss position) is formed for several examples at once: on CUDA with bf16/fp16 layers (unless ``BRITTLE_FUSED_SNIP=0``) by a
    fused kernel (:mod:`brittle.scoring.kernels`: product with fp32 accumulation, ``|.|`` and the sum over
    examples in registers, ``G_n`` never written to memory); elsewhere by one batched product per chunk of
    examples (:func:`examples_per_chunk`) into the fp32 workspace, then ``|.|`` and a sum over the chunk. That
    product takes the layer's bf16/fp16 factors with fp32 output on CUDA (:func:`kernels.mixed_products`), fp32
    factors elsewhere; both equal the fp32 product up to fp32 summation order."""

    name = "snip"
    needs_grad = True
    definition = "|W| * sum_n |dL_n/dW|"

    def accumulator_shape(self, weight_shape):
        return tuple(weight_shape)

    def workspace_numel(self, weight_shape, batch_size):
        return examples_per_chunk(weight_shape, batch_size) * weight_shape[0] * weight_shape[1]

    def accumulate(self, acc, x, g, batch, work=None):
        from . import kernels

        g = g.to(x.device)
        if kernels.fused_available(acc, x, g):  # the kernel reads only positions t < upto[n]: no window to cut out
            kernels.add_abs_example_grads(acc, g, x, batch.upto_on(acc.device))
            return
        x, g = _response_window(x, g, batch)
        if kernels.mixed_available(acc, x, g):  # bf16/fp16 factors, fp32 products (cuBLAS)
            product = kernels.mixed_products
        else:
            x = x.to(device=acc.device, dtype=torch.float32)
            g = g.to(device=acc.device, dtype=torch.float32)
            product = _fp32_products
        d_out, d_in = acc.shape
        chunk = examples_per_chunk((d_out, d_in), len(batch.upto))
        for s in range(0, x.shape[0], chunk):
            n = min(chunk, x.shape[0] - s)
            out = None if work is None else work[: n * d_out * d_in].view(n, d_out, d_in)
            grads = product(g[s:s + n].transpose(1, 2), x[s:s + n], out)  # G_n for the chunk's examples
            acc.add_(grads.abs_().sum(0))

    def finish(self, acc, weight):
        return acc.mul_(weight.abs().to(torch.float32))


class SnipSummed(ScoreMethod):
    """``snip-summed``: ``S = |W * sum_n dL_n/dW|`` -- the signed gradient summed first (not the paper's SNIP):
    one fp32 product over all positions of the batch, ``sum_n G_n = dY^T X``."""

    name = "snip-summed"
    needs_grad = True
    definition = "|W * sum_n dL_n/dW|"

    def accumulator_shape(self, weight_shape):
        return tuple(weight_shape)

    def accumulate(self, acc, x, g, batch, work=None):
        x, g = _response_window(x, g.to(x.device), batch)
        x = x.to(device=acc.device, dtype=torch.float32)
        g = g.to(device=acc.device, dtype=torch.float32)
        acc.addmm_(g.reshape(-1, g.shape[-1]).t(), x.reshape(-1, x.shape[-1]))

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
        xs = response_rows(x, batch).to(torch.float32)  # [N, d_in]
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
