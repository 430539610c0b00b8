"""Memory planning: the estimated peak memory of scoring and fine-tuning before a stage starts, from the model's
config alone (no weights loaded), and where the scoring accumulators go.

Shapes come from the model built on the ``meta`` device (no memory), so every architecture transformers knows is
counted exactly: ``P`` parameters, ``P_lin`` parameters of the decoder's linear modules (the scored ones), the
largest linear ``max(d_out * d_in)``, the hidden size ``h``, the MLP width ``i``, ``L`` layers, vocabulary ``V``.
Bytes per element: ``w`` of the model dtype (4 fp32, 2 bf16/fp16). ``B`` examples per batch of ``T`` tokens.

* weights: ``w * P``;
* scoring accumulators (fp32): ``4 * P_lin`` for SNIP, ``4 * sum(d_in)`` for Wanda;
* SNIP workspace: ``4 * c * max(d_out * d_in)`` with ``c`` examples per chunk
  (:func:`brittle.scoring.methods.examples_per_chunk`); none on CUDA with the fused kernel;
* activations kept for the backward pass: ``w * B * T * L * (10 h + 4 i)`` -- per layer and token the residual
  stream, the norm outputs and the inputs of every linear (q/k/v/o: ~5 h, attention output and MLP input ~3 h,
  the gate/up outputs and the down input 3 i, plus ~2 h + i of temporaries); SDPA attention keeps no
  ``T x T`` matrix. A rough upper estimate: measured activations depend on the attention kernel and the
  architecture, so the planner leaves 10 % of the device free;
* logits at the loss positions: ``(w + 4) * B * T * V`` (the model dtype, then fp32 for the loss);
* LoRA fine-tuning adds the adapters ``4 * r * sum(d_in + d_out)`` times 4 (weights, gradients, AdamW's two
  moments, all fp32) and, for a bf16/fp16 model, the fp32 copy of every adapted module's input that PEFT makes
  and autograd keeps, ``4 * B * T * sum(d_in)``; full fine-tuning adds ``w * P`` gradients and ``2 * w * P``
  AdamW moments. Check on an H200 (random Llama-2-7B shapes, vocabulary 49,152, bf16, LoRA r 8 on every linear
  module, micro-batches of 4 x 512): measured peak 31,495 MiB (30.8 GiB), estimate 32.7 GiB.

:func:`plan_scoring` decides where the accumulators go: on the device with everything else when they fit, else
split over as many passes over the data as needed (``max_accumulator_bytes``, each pass one more
forward+backward), or "does not fit" when the weights and one pass's activations alone exceed the device
(then: ``--device-map auto`` over several GPUs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

GiB = 2**30
HEADROOM = 0.9  # plan within 90 % of the device: allocator fragmentation and estimates


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need of a model (see the module docstring)."""

    params: int
    linear_shapes: tuple[tuple[int, int], ...]  # [d_out, d_in] of the scored linear modules, in order
    hidden: int
    intermediate: int
    layers: int
    vocab: int

    @property
    def linear_params(self) -> int:
        return sum(o * i for o, i in self.linear_shapes)

    @property
    def max_linear(self) -> int:
        return max(o * i for o, i in self.linear_shapes)

    def accumulator_bytes(self, method: str) -> list[int]:
        """fp32 accumulator bytes per scored module: ``d_out * d_in`` (SNIP) or ``d_in`` (Wanda) floats."""
        return [4 * (i if method == "wanda" else o * i) for o, i in self.linear_shapes]

    @classmethod
    def of(cls, config: Any) -> ModelShape:
        """The shape of a transformers config (a model is built on the ``meta`` device: no memory, exact counts)."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return cls.of_model(AutoModelForCausalLM.from_config(config))

    @classmethod
    def of_model(cls, model: Any) -> ModelShape:
        """The shape of a loaded (or meta) model."""
        from .models import linear_modules, linear_weight

        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return cls(params=sum(p.numel() for p in model.parameters()),
                   linear_shapes=tuple(tuple(linear_weight(m).shape) for m in linear_modules(model).values()),
                   hidden=text.hidden_size, intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
                   layers=text.num_hidden_layers, vocab=text.vocab_size)


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype named as in the config (``float32``, ``bfloat16``, ``float16``)."""
    import torch

    return getattr(torch, dtype).itemsize


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes by part; ``total`` is their sum."""

    weights: int
    accumulators: int = 0
    workspace: int = 0
    activations: int = 0
    logits: int = 0
    training_state: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.accumulators + self.workspace + self.activations + self.logits + self.training_state

    def lines(self) -> list[str]:
        parts = {k: v for k, v in asdict(self).items() if v}
        return [f"{k} {v / GiB:.2f} GiB" for k, v in parts.items()] + [f"total {self.total / GiB:.2f} GiB"]


def _activations(shape: ModelShape, w: int, batch: int, length: int) -> int:
    return w * batch * length * shape.layers * (10 * shape.hidden + 4 * shape.intermediate)


def estimate_scoring(shape: ModelShape, *, dtype: str, method: str, batch_size: int, max_length: int,
                     fused: bool = False) -> MemoryEstimate:
    """Peak memory of :func:`brittle.scoring.compute_scores` with all modules in one pass."""
    from .scoring.methods import examples_per_chunk

    w = dtype_bytes(dtype)
    grad = method != "wanda"
    acc = sum(shape.accumulator_bytes(method))
    work = 0
    if method == "snip" and not fused:
        work = 4 * examples_per_chunk((shape.max_linear, 1), batch_size) * shape.max_linear
    return MemoryEstimate(weights=w * shape.params, accumulators=acc, workspace=work,
                          activations=_activations(shape, w, batch_size, max_length) if grad else
                          w * batch_size * max_length * (2 * shape.hidden + shape.intermediate),
                          logits=(w + 4) * batch_size * max_length * shape.vocab if grad else 0)


def estimate_finetune(shape: ModelShape, *, dtype: str, batch_size: int, max_length: int, full: bool = False,
                      rank: int = 8) -> MemoryEstimate:
    """Peak memory of one training step of :func:`brittle.finetune.train_lora`."""
    w = dtype_bytes(dtype)
    state = 3 * w * shape.params if full else 4 * 4 * rank * sum(o + i for o, i in shape.linear_shapes)
    casts = 0 if full or w == 4 else 4 * batch_size * max_length * sum(i for _, i in shape.linear_shapes)
    return MemoryEstimate(weights=w * shape.params, activations=_activations(shape, w, batch_size, max_length) + casts,
                          logits=(w + 4) * batch_size * max_length * shape.vocab, training_state=state)


@dataclass(frozen=True)
class ScoringPlan:
    """Where the scoring accumulators go on a device of ``device_bytes``: ``placement`` is ``device`` (one
    pass), ``passes`` (``n_passes`` passes with ``max_accumulator_bytes`` each) or ``does not fit``."""

    estimate: MemoryEstimate
    device_bytes: int
    placement: str
    n_passes: int
    max_accumulator_bytes: int | None

    def describe(self) -> str:
        head = f"estimated peak memory: {', '.join(self.estimate.lines())} (device {self.device_bytes / GiB:.0f} GiB)"
        if self.placement == "device":
            return f"{head}: fits in one pass"
        if self.placement == "passes":
            return (f"{head}: accumulators split over {self.n_passes} passes of at most "
                    f"{self.max_accumulator_bytes / GiB:.2f} GiB (each pass one more forward+backward)")
        return f"{head}: does not fit one device even with one module per pass; use --device-map auto over several GPUs"


def plan_scoring(estimate: MemoryEstimate, device_bytes: int, accumulator_bytes: list[int]) -> ScoringPlan:
    """Choose the accumulators' placement for ``estimate`` on a device of ``device_bytes``: one pass when all fits
    in 90 % of the device, else the modules (``accumulator_bytes`` each, in order) packed into passes as
    :func:`brittle.scoring.compute.pack_passes` does with the room left, else "does not fit"."""
    from .scoring.compute import pack_passes

    budget = int(HEADROOM * device_bytes)
    if estimate.total <= budget:
        return ScoringPlan(estimate, device_bytes, "device", 1, None)
    room = budget - (estimate.total - estimate.accumulators)
    if room >= max(accumulator_bytes):
        return ScoringPlan(estimate, device_bytes, "passes", len(pack_passes(accumulator_bytes, room)), room)
    return ScoringPlan(estimate, device_bytes, "does not fit", 0, None)
