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
* generation (:func:`estimate_generation`): the key/value cache ``2 * L * kv_dim * w`` per token of every sequence
  at full length (``kv_dim`` = key/value heads x head dim), one layer's temporaries of the prompt pass and the last
  position's logits; :func:`generation_batch_size` sizes a batch to the free device memory (``batch_size = "auto"``);
* LoRA fine-tuning adds the adapters ``4 * r * sum(d_in + d_out)`` times 4 (weights, gradients, AdamW's two
  moments, all fp32) and, for a bf16/fp16 model, the fp32 copy of every adapted module's input that PEFT makes
  and autograd keeps, ``4 * B * T * sum(d_in)``; full fine-tuning adds ``w * P`` gradients and ``2 * w * P``
  AdamW moments. Check on an H200 (random Llama-2-7B shapes, vocabulary 49,152, bf16, LoRA r 8 on every linear
  module, micro-batches of 4 x 512): measured peak 31,495 MiB (30.8 GiB), estimate 32.7 GiB.

:func:`plan_scoring` decides where the accumulators go: on the device with everything else when they fit, else
split over as many passes ``n`` over the data as needed (``max_accumulator_bytes``, each pass one more
forward+backward), or kept in CPU memory (one pass; every batch moves ``4 * P_lin`` bytes to the host and adds them
there) when that is estimated cheaper: ``4 * P_lin / R_host < (n - 1) * 6 * P * B * T / F``, with ``R_host`` the
measured rate of copying and adding fp32 into host memory and ``F`` the measured bf16/fp32 matmul rate of the
device (a forward+backward of SNIP costs about ``6 * P`` flops per token: forward 2, input gradients 2, the
per-example outer products 2); "does not fit" when the weights, one batch's activations and one module's
accumulator alone exceed the device (then: ``--device-map auto`` over several GPUs).
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
    kv_dim: int  # key (= value) width per layer and token: key/value heads x head dim

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
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        return cls(params=sum(p.numel() for p in model.parameters()),
                   linear_shapes=tuple(tuple(linear_weight(m).shape) for m in linear_modules(model).values()),
                   hidden=text.hidden_size, intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
                   layers=text.num_hidden_layers, vocab=text.vocab_size, kv_dim=kv_heads * head_dim)


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype named as in the config (``float32``, ``bfloat16``, ``float16``)."""
    import torch

    return getattr(torch, dtype).itemsize


def dtype_name(model: Any) -> str:
    """The dtype of ``model``'s (first) parameters, named as in the config (``bfloat16``): what the estimates take."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes by part; ``total`` is their sum."""

    weights: int
    accumulators: int = 0
    workspace: int = 0
    activations: int = 0
    logits: int = 0
    training_state: int = 0
    kv_cache: int = 0
    tracking: int = 0

    @property
    def total(self) -> int:
        return (self.weights + self.accumulators + self.workspace + self.activations + self.logits
                + self.training_state + self.kv_cache + self.tracking)

    def lines(self) -> list[str]:
        parts = {k: v for k, v in asdict(self).items() if v}
        return [f"{k} {v / GiB:.2f} GiB" for k, v in parts.items()] + [f"total {self.total / GiB:.2f} GiB"]


def _activations(shape: ModelShape, w: int, batch: int, length: int) -> int:
    return w * batch * length * shape.layers * (10 * shape.hidden + 4 * shape.intermediate)


def _checkpointed_activations(shape: ModelShape, w: int, batch: int, length: int) -> int:
    """Activations kept with gradient checkpointing: each layer's input plus one layer's activations."""
    return w * batch * length * shape.layers * shape.hidden + _activations(shape, w, batch, length) // shape.layers


def estimate_scoring(shape: ModelShape, *, dtype: str, method: str, batch_size: int, max_length: int,
                     fused: bool = False, gradient_checkpointing: bool = False) -> MemoryEstimate:
    """Peak memory of :func:`brittle.scoring.compute_scores` with all modules in one pass (gradient methods with
    ``gradient_checkpointing``: each layer's input plus one layer's activations)."""
    from .scoring.methods import examples_per_chunk

    w = dtype_bytes(dtype)
    grad = method != "wanda"
    acc = sum(shape.accumulator_bytes(method))
    work = 0
    if method == "snip" and not fused:
        work = 4 * examples_per_chunk((shape.max_linear, 1), batch_size) * shape.max_linear
    acts = (_checkpointed_activations if gradient_checkpointing else _activations)(shape, w, batch_size, max_length)
    return MemoryEstimate(weights=w * shape.params, accumulators=acc, workspace=work,
                          activations=acts if grad else
                          w * batch_size * max_length * (2 * shape.hidden + shape.intermediate),
                          logits=(w + 4) * batch_size * max_length * shape.vocab if grad else 0)


def estimate_finetune(shape: ModelShape, *, dtype: str, batch_size: int, max_length: int, full: bool = False,
                      rank: int = 8, gradient_checkpointing: bool = False, tracked_entries: int = 0) -> MemoryEstimate:
    """Peak memory of one training step of :func:`brittle.finetune.train_lora`. With gradient checkpointing the
    backward pass keeps each layer's input (``w * B * T * L * h``) and recomputes one layer at a time (one layer's
    activations on top); a drift tracker (:class:`brittle.drift.DriftTracker`) on ``tracked_entries`` weight entries
    keeps 20 bytes per entry on the weights' device (``W_0``, its statistics context, the last and the next
    ``Delta``)."""
    w = dtype_bytes(dtype)
    state = 3 * w * shape.params if full else 4 * 4 * rank * sum(o + i for o, i in shape.linear_shapes)
    casts = 0 if full or w == 4 else 4 * batch_size * max_length * sum(i for _, i in shape.linear_shapes)
    acts = (_checkpointed_activations if gradient_checkpointing else _activations)(shape, w, batch_size, max_length)
    if gradient_checkpointing:
        casts //= shape.layers
    return MemoryEstimate(weights=w * shape.params, activations=acts + casts,
                          logits=(w + 4) * batch_size * max_length * shape.vocab, training_state=state,
                          tracking=20 * tracked_entries)


def device_bytes(device: Any) -> int:
    """Total memory of ``device``: the GPU's, or the machine's RAM for the CPU."""
    import os

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def describe(estimate: MemoryEstimate, total_bytes: int, *, warn: bool = True) -> str:
    """``estimated peak memory: <parts>, total <x> GiB (device <y> GiB)``, and (``warn``) a warning when the total
    is over 90 % of the device."""
    line = f"estimated peak memory: {', '.join(estimate.lines())} (device {total_bytes / GiB:.0f} GiB)"
    if warn and estimate.total > HEADROOM * total_bytes:
        line += " -- more than 90 % of the device: expect an out-of-memory error"
    return line


#: Upper bound on a generation batch chosen from memory (prompts): past it a batch gains little throughput.
MAX_GENERATION_BATCH = 512


def kv_cache_bytes(shape: ModelShape, *, dtype: str, sequences: int, tokens: int) -> int:
    """Bytes of the key/value cache of ``sequences`` sequences of ``tokens`` tokens: ``2 * L * kv_dim * w`` per
    token (keys and values of every layer, in the model dtype)."""
    return 2 * shape.layers * shape.kv_dim * dtype_bytes(dtype) * sequences * tokens


def estimate_generation(shape: ModelShape, *, dtype: str, batch_size: int, prompt_length: int, max_new_tokens: int,
                        num_samples: int = 1) -> MemoryEstimate:
    """Peak memory of :func:`brittle.evaluation.generation.generate` for one batch of ``batch_size`` prompts of at
    most ``prompt_length`` tokens, ``num_samples`` answers each (``N = batch_size * num_samples`` sequences, expanded
    before the prompt is read): the weights; the key/value cache at full length (:func:`kv_cache_bytes` of ``N``
    sequences of ``prompt_length + max_new_tokens`` tokens); the prompt pass's temporaries of one layer,
    ``w * N * prompt_length * (4 h + 3 i)`` (SDPA attention: no ``T x T`` scores); the last position's logits in fp32
    and the sampler's two copies, ``3 * 4 * N * V``."""
    w = dtype_bytes(dtype)
    n = batch_size * num_samples
    return MemoryEstimate(
        weights=w * shape.params,
        kv_cache=kv_cache_bytes(shape, dtype=dtype, sequences=n, tokens=prompt_length + max_new_tokens),
        activations=w * n * prompt_length * (4 * shape.hidden + 3 * shape.intermediate),
        logits=3 * 4 * n * shape.vocab)


def generation_batch_size(shape: ModelShape, *, dtype: str, free_bytes: int, prompt_length: int,
                          max_new_tokens: int, num_samples: int = 1, limit: int = MAX_GENERATION_BATCH) -> int:
    """The largest number of prompts per generation batch (at most ``limit``) whose :func:`estimate_generation`,
    without the weights (already loaded), fits 90 % of ``free_bytes``; 0 when not even one prompt fits. Every other
    part grows in proportion to the batch, so the answer is exact for the estimate."""
    est = estimate_generation(shape, dtype=dtype, batch_size=1, prompt_length=prompt_length,
                              max_new_tokens=max_new_tokens, num_samples=num_samples)
    return max(0, min(limit, int(HEADROOM * free_bytes) // (est.total - est.weights)))


def measure_rates(device: Any, dtype: Any, *, repeats: int = 5) -> tuple[float, float]:
    """``(F, R_host)`` measured on ``device``: the matmul rate in flops/s (square ``dtype`` products of side 4096)
    and the rate in bytes/s of copying fp32 from the device into pinned host memory and adding it to an fp32 host
    tensor (64 MiB, what host accumulators do per module and batch). Best of ``repeats``; about a second on a GPU."""
    import time

    import torch

    def best(fn) -> float:
        fn()  # warm-up (kernel selection, first-touch of host pages)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
        return min(times)

    n = 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n**3 / best(lambda: a @ b)
    del a, b
    m = 16 * 2**20  # 64 MiB of fp32
    part = torch.ones(m, device=device)
    stage = torch.empty(m, pin_memory=device.type == "cuda")
    acc = torch.zeros(m)

    def copy_add():
        stage.copy_(part)
        acc.add_(stage)

    return flops, 4 * m / best(copy_add)


@dataclass(frozen=True)
class ScoringPlan:
    """Where the scoring accumulators go on a device of ``device_bytes``: ``placement`` is ``device`` (one
    pass), ``passes`` (``n_passes`` passes with ``max_accumulator_bytes`` each), ``host`` (one pass, the
    accumulators in CPU memory) or ``does not fit``. ``seconds_per_batch``: the estimated extra time per batch of
    the options that were compared (``passes``, ``host``), when known."""

    estimate: MemoryEstimate
    device_bytes: int
    placement: str
    n_passes: int
    max_accumulator_bytes: int | None
    seconds_per_batch: dict[str, float] | None = None

    def describe(self) -> str:
        head = describe(self.estimate, self.device_bytes, warn=False)
        cost = ""
        if self.seconds_per_batch:
            cost = " (estimated extra seconds per batch: " + ", ".join(
                f"{k} {v:.2g}" for k, v in self.seconds_per_batch.items()) + ")"
        if self.placement == "device":
            return f"{head}: fits in one pass"
        if self.placement == "passes":
            return (f"{head}: accumulators split over {self.n_passes} passes of at most "
                    f"{self.max_accumulator_bytes / GiB:.2f} GiB (each pass one more forward+backward){cost}")
        if self.placement == "host":
            return (f"{head}: accumulators ({self.estimate.accumulators / GiB:.2f} GiB) in CPU memory, one pass; "
                    f"each batch's contribution is added there instead of {self.n_passes} passes{cost}")
        return f"{head}: does not fit one device even with one module per pass; use --device-map auto over several GPUs"


def plan_scoring(estimate: MemoryEstimate, device_bytes: int, accumulator_bytes: list[int], *,
                 host_bytes: int | None = None, pass_seconds_per_batch: float | None = None,
                 host_bytes_per_second: float | None = None) -> ScoringPlan:
    """Choose the accumulators' placement for ``estimate`` on a device of ``device_bytes``:

    * ``device``: everything fits in 90 % of the device;
    * else the modules (``accumulator_bytes`` each, in order) packed into ``n`` passes as
      :func:`brittle.scoring.compute.pack_passes` does with the room left (``n - 1`` extra forward+backward passes:
      ``(n - 1) * pass_seconds_per_batch`` per batch), or
    * ``host``: one pass with the accumulators in CPU memory (they must fit 90 % of ``host_bytes``), which costs
      per batch moving and adding ``sum(accumulator_bytes)`` at ``host_bytes_per_second``; the device then needs one
      buffer of the largest module's accumulator, as the passes do. Chosen when both costs are given and it is the
      cheaper one;
    * ``does not fit`` when the weights and one module's accumulator alone exceed the device."""
    from .scoring.compute import pack_passes

    budget = int(HEADROOM * device_bytes)
    if estimate.total <= budget:
        return ScoringPlan(estimate, device_bytes, "device", 1, None)
    room = budget - (estimate.total - estimate.accumulators)
    if room < max(accumulator_bytes):
        return ScoringPlan(estimate, device_bytes, "does not fit", 0, None)
    n_passes = len(pack_passes(accumulator_bytes, room))
    costs = None
    fits_host = host_bytes is not None and sum(accumulator_bytes) <= HEADROOM * host_bytes
    if fits_host and pass_seconds_per_batch is not None and host_bytes_per_second:
        costs = {"passes": (n_passes - 1) * pass_seconds_per_batch,
                 "host": sum(accumulator_bytes) / host_bytes_per_second}
        if costs["host"] < costs["passes"]:
            return ScoringPlan(estimate, device_bytes, "host", n_passes, None, costs)
    return ScoringPlan(estimate, device_bytes, "passes", n_passes, room, costs)
