"""The scoring engine: one forward (and, for gradient methods, one backward) pass per batch, all scored layers
at once, calling the :class:`~brittle.scoring.methods.ScoreMethod` objects for the arithmetic.

How the per-example gradients are computed (one forward and one backward pass per batch, all layers at once):

* every weight keeps ``requires_grad=False`` (no ``.grad`` is ever allocated); the graph is rooted at the
  hidden state entering the first scored decoder block (made a leaf that requires grad by a forward
  pre-hook), so the backward also skips the blocks before the scored ones;
* a forward hook on each scored linear keeps a reference to its input ``X`` ``[B, T, d_in]`` and registers a
  tensor hook on its output ``Y``; when autograd reaches ``Y`` the hook receives ``dY = d(sum_n L_n)/dY``.
  Because the batch loss is the *sum* of the per-example losses and the examples of a batch do not
  interact (right padding, attention mask, causal attention), ``dY[n]`` only carries ``dL_n``, so the
  per-example weight gradient is exactly ``G_n = dY[n]^T X[n]`` (``[d_out, d_in]``);
* ``G_n`` is formed one example at a time in fp32 into a reusable workspace (the size of the largest scored
  matrix), only over the positions up to the last loss position of that example (padding never enters),
  and ``|G_n|`` is added to an fp32 accumulator. Memory: accumulators = 4 bytes per scored weight (2x a
  bf16 model) + one workspace + the saved layer inputs of one batch; ``max_accumulator_bytes`` splits the
  modules over several passes over the data when the accumulators would not fit, ``modules=`` scores a
  subset. The accumulators live on the device of their weight (``device_map`` models work), or with
  ``host_accumulators`` in CPU memory (each batch's contribution moved there); finished scores are moved to
  the CPU.

Methods that need no gradient (Wanda) run the forward pass only, and their forward hook hands the layer input
to the method at once.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.core import IGNORE_INDEX, DataError, Example, encode, pad_batch
from ..io import BrittleError, sha256_json
from .methods import BatchInfo, ScoreMethod, activation_mask, get_method

# --------------------------------------------------------------------------------------------------
# Inputs


def dataset_hash(examples: Sequence[Example | dict[str, torch.Tensor]]) -> str:
    """sha256 over the examples (their JSON for :class:`Example`, the token ids for pre-encoded dicts), in order."""
    rows = []
    for e in examples:
        if isinstance(e, Example):
            rows.append(e.to_dict())
        else:
            rows.append({k: v.tolist() for k, v in sorted(e.items()) if k in ("input_ids", "labels")})
    return sha256_json(rows)


def _example_name(e: Any, i: int) -> str:
    return f"#{i} ({e.id})" if isinstance(e, Example) else f"#{i}"


def _encode_all(tokenizer, examples, max_length: int | None, method: ScoreMethod) -> list[dict[str, torch.Tensor]]:
    """Encode and check that every example keeps at least one scored position after truncation."""
    if len(examples) == 0:
        raise DataError("no examples to score")
    out = []
    for i, e in enumerate(examples):
        if isinstance(e, Example):
            if not e.response.strip():
                raise DataError(f"example {_example_name(e, i)} has an empty response; scoring needs (prompt, response) "
                                "pairs (a prompt-only source? use the built safety/utility sets or a file with responses)")
            if tokenizer is None:
                raise BrittleError("a tokenizer is needed to encode Example objects")
            enc = encode(tokenizer, e, max_length)
        elif isinstance(e, dict) and "input_ids" in e and "labels" in e:
            enc = {"input_ids": torch.as_tensor(e["input_ids"]).long().reshape(-1),
                   "labels": torch.as_tensor(e["labels"]).long().reshape(-1)}
            if max_length is not None:
                enc = {k: v[:max_length] for k, v in enc.items()}
        else:
            raise BrittleError(f"example {i}: expected a brittle Example or a dict with input_ids and labels")
        labels = enc["labels"]
        scored = labels[1:] != IGNORE_INDEX if method.needs_grad else activation_mask(labels)
        if not bool(scored.any()):
            n_prompt = int((labels == IGNORE_INDEX).sum())
            raise DataError(
                f"example {_example_name(e, i)} has no response tokens after truncation to max_length={max_length} "
                f"({len(labels)} tokens kept, {n_prompt} of them prompt/unlabelled); raise --max-length, shorten "
                "the prompt or drop the example"
            )
        out.append(enc)
    return out


def calibration_batches(tokenizer, encoded: Sequence[dict[str, torch.Tensor]],
                        batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches (:func:`pad_batch`: ``input_ids``, ``attention_mask``, ``labels``) of encoded examples,
    longest first (a memory error shows up at once), ties by position: deterministic. Padding uses the tokenizer's
    pad token (else eos, else 0); shared by the scorer and :mod:`brittle.lowrank`."""
    pad_id = 0
    if tokenizer is not None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]["input_ids"]), i))
    return [pad_batch([encoded[i] for i in order[s:s + batch_size]], pad_id, side="right")
            for s in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------------------------------
# Module selection and passes


def select_modules(model: nn.Module, modules: Iterable[str] | str | None = None) -> dict[str, nn.Module]:
    """Canonical name -> module for ``modules`` (names or fnmatch patterns such as ``layers.3.*``; None = all)."""
    from ..models import linear_modules

    everything = linear_modules(model)
    if modules is None:
        return everything
    patterns = [modules] if isinstance(modules, str) else list(modules)
    chosen: dict[str, nn.Module] = {}
    for p in patterns:
        hits = [n for n in everything if fnmatch.fnmatchcase(n, p)]
        if not hits:
            examples = ", ".join(list(everything)[:8])
            raise BrittleError(f"no linear module matches '{p}' (names look like: {examples}, ...)")
        for n in hits:
            chosen[n] = everything[n]
    return {n: everything[n] for n in everything if n in chosen}  # canonical order


def _acc_numel(module: nn.Module, method: ScoreMethod) -> int:
    from ..models import linear_weight

    return math.prod(method.accumulator_shape(tuple(linear_weight(module).shape)))


def pack_passes(sizes: Sequence[int], max_bytes: int | None) -> list[list[int]]:
    """Indices of ``sizes`` (accumulator bytes, in module order) split greedily into passes of at most
    ``max_bytes``; a single size above the cap gets a pass of its own."""
    if max_bytes is None:
        return [list(range(len(sizes)))]
    if max_bytes <= 0:
        raise BrittleError(f"max_accumulator_bytes must be positive, got {max_bytes}")
    passes: list[list[int]] = [[]]
    used = 0
    for i, b in enumerate(sizes):
        if passes[-1] and used + b > max_bytes:
            passes.append([])
            used = 0
        passes[-1].append(i)
        used += b
    return passes


def plan_passes(mods: dict[str, nn.Module], method: str | ScoreMethod,
                max_accumulator_bytes: int | None) -> list[list[str]]:
    """Split the modules (in order) into passes whose fp32 accumulators fit ``max_accumulator_bytes``
    (:func:`pack_passes`)."""
    names = list(mods)
    method = get_method(method)
    packed = pack_passes([4 * _acc_numel(mods[n], method) for n in names], max_accumulator_bytes)
    return [[names[i] for i in p] for p in packed]


# --------------------------------------------------------------------------------------------------
# Computation


def _layer_index(name: str) -> int:
    return int(name.split(".")[1])


def _hidden_pre_hook(state: dict[str, Any]):
    """Forward pre-hook on a decoder block: make its incoming hidden state a leaf that requires grad."""

    def hook(module, args, kwargs):
        if not state["active"]:
            return None
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            state["rooted"] = True
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        h = kwargs.get("hidden_states")
        if isinstance(h, torch.Tensor) and h.is_floating_point():
            state["rooted"] = True
            return args, {**kwargs, "hidden_states": h.detach().requires_grad_(True)}
        return None

    return hook


@contextlib.contextmanager
def _checkpointed(blocks: Sequence[nn.Module]):
    """Run each block's forward under ``torch.utils.checkpoint`` (non-reentrant): its activations are dropped after
    the forward pass and recomputed when the backward pass reaches the block. Early stop is off, so that the
    recomputation runs the whole block and every scored module's forward hook sees its input again."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    # the block's forward as it is, which may be an instance attribute already (accelerate's device_map hooks wrap
    # forward that way to move inputs between devices): wrapped, and put back exactly as it was
    saved = [(block, vars(block).get("forward")) for block in blocks]
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        with set_checkpoint_early_stop(False):
            yield
    finally:
        for block, own in saved:
            if own is None:
                del block.forward  # the class's forward again
            else:
                block.forward = own


def _embedding_hook(state: dict[str, Any]):
    def hook(module, args, output):
        if state["active"] and isinstance(output, torch.Tensor) and output.is_floating_point():
            state["rooted"] = True
            return output.detach().requires_grad_(True)
        return None

    return hook


class _GraphRoot:
    """Where the backward graph of a gradient method starts (the weights need no gradient): the hidden state
    entering the first scored block, made a leaf that requires grad by a pre-hook; for a model whose blocks take it
    in a way the pre-hook does not recognise, the embeddings' output, from the first batch that needs it on."""

    def __init__(self, model: nn.Module, block: nn.Module):
        self.model = model
        self.state = {"active": False, "rooted": False}
        self.handles = [block.register_forward_pre_hook(_hidden_pre_hook(self.state), with_kwargs=True)]

    def loss(self, forward) -> torch.Tensor:
        """``forward()`` (the loss of a batch) run with the root in place: again, rooted at the embeddings, when its
        graph did not reach the root."""
        self.state.update(active=True, rooted=False)
        loss = forward()
        if not loss.requires_grad:
            self.remove()
            self.handles = [self.model.get_input_embeddings().register_forward_hook(_embedding_hook(self.state))]
            loss = forward()
            if not loss.requires_grad:
                raise BrittleError(f"cannot build the backward graph of {type(self.model).__name__}")
        return loss

    def done(self) -> None:
        self.state["active"] = False

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _as_btd(t: torch.Tensor, B: int, T: int) -> torch.Tensor:
    if t.dim() == 3:
        return t
    if t.dim() == 2 and t.shape[0] == B * T:
        return t.view(B, T, t.shape[1])
    raise BrittleError(f"unexpected linear input/output shape {tuple(t.shape)} for a batch of {B}x{T}")


class _Accumulator:
    """Hooks and fp32 accumulators for one pass over the data; the arithmetic is the method's.

    ``host=True`` keeps the accumulators in CPU memory: each module's contribution of a batch is formed on its
    weight's device in one buffer per device (the largest module's size, reused), then added to the host
    accumulator through a pinned staging buffer (``4 * d_out * d_in`` bytes moved per module and batch)."""

    def __init__(self, mods: dict[str, nn.Module], method: ScoreMethod, batch_size: int, *, host: bool = False,
                 recomputed: bool = False):
        from ..models import linear_weight

        self.method = method
        self.mods = mods
        self.host = host
        # recomputed=True (gradient checkpointing): a module's input is taken when its block is recomputed in the
        # backward pass, not kept from the forward pass; its output gradient may arrive before or after that
        self.recomputed = recomputed
        self.inputs: dict[str, torch.Tensor] = {}  # module -> its input, waiting for the output gradient
        self.grads: dict[str, torch.Tensor] = {}  # module -> its output gradient, waiting for the recomputed input
        self.forwards: dict[str, int] = {}  # module -> forward calls in this batch (2 with checkpointing)
        self.most_inputs_held = 0  # the most module inputs held at once (a check of what checkpointing saves)
        self.acc: dict[str, torch.Tensor] = {}
        self.work: dict[torch.device, torch.Tensor] = {}
        self.part: dict[torch.device, torch.Tensor] = {}  # host=True: a batch's contribution, before the copy
        self.device: dict[str, torch.device] = {}
        self.batch: BatchInfo | None = None
        for n, m in mods.items():
            w = linear_weight(m)
            self.device[n] = w.device
            shape = method.accumulator_shape(tuple(w.shape))
            self.acc[n] = torch.zeros(shape, dtype=torch.float32, device="cpu" if host else w.device)
            if host:
                _grow(self.part, w.device, math.prod(shape))
            _grow(self.work, w.device, method.workspace_numel(tuple(w.shape), batch_size))
        self.stage = None
        if host and any(d.type == "cuda" for d in self.part):
            self.stage = torch.empty(max(b.numel() for b in self.part.values()), dtype=torch.float32, pin_memory=True)
        self.handles: list[Any] = []

    def attach(self) -> None:
        for n, m in self.mods.items():
            self.handles.append(m.register_forward_hook(self._forward_hook(n)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def start_batch(self, batch: BatchInfo) -> None:
        self._check_paired()
        self.batch = batch
        self.forwards.clear()

    def _check_paired(self) -> None:
        """Every module input of the last batch met its output gradient (a recomputation stopped early would not)."""
        if self.inputs or self.grads:
            raise BrittleError(f"scoring: {len(self.inputs) + len(self.grads)} module(s) got an input or an output "
                               "gradient without the other in the last batch")

    def _forward_hook(self, name: str):
        def hook(module, args, output):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
                raise BrittleError(f"{name}: cannot read the input/output of {type(module).__name__}")
            if not self.method.needs_grad:
                self._add(name, x.detach(), None)
                return None
            if not output.requires_grad:  # no gradient will come (the graph is rooted further on: compute_scores)
                return None
            calls = self.forwards[name] = self.forwards.get(name, 0) + 1
            if calls == 1:  # the forward pass: the gradient will come to this output
                output.register_hook(lambda g: self._pair(name, g=g))
            if calls == 2 or not self.recomputed:  # the input: from the recomputation, or kept from the forward
                self._pair(name, x=x.detach())
            return None

        return hook

    def _pair(self, name: str, x: torch.Tensor | None = None, g: torch.Tensor | None = None) -> None:
        """Add a module's contribution once both its input and its output gradient are there."""
        if x is not None:
            self.inputs[name] = x
            self.most_inputs_held = max(self.most_inputs_held, len(self.inputs))
        if g is not None:
            self.grads[name] = g
        if name in self.inputs and name in self.grads:
            self._add(name, self.inputs.pop(name), self.grads.pop(name))
        return None  # a tensor hook that returns None leaves the gradient unchanged

    def _add(self, name: str, x: torch.Tensor, g: torch.Tensor | None) -> None:
        B, T = self.batch.shape
        acc = self.acc[name]
        target = acc
        if self.host:  # host accumulators: this batch's contribution first, on the weight's device
            target = self.part[self.device[name]][: acc.numel()].view(acc.shape).zero_()
        self.method.accumulate(target, _as_btd(x, B, T), None if g is None else _as_btd(g, B, T), self.batch,
                               self.work.get(target.device))
        if target is not acc:
            if self.stage is not None and target.device.type == "cuda":
                staged = self.stage[: acc.numel()].view(acc.shape)
                staged.copy_(target)  # synchronous: the buffers are reused by the next module
                acc.add_(staged)
            else:
                acc.add_(target.to(acc.device))
        return None  # a tensor hook that returns None leaves the gradient unchanged

    def finish(self) -> dict[str, torch.Tensor]:
        from ..models import linear_weight

        self._check_paired()

        to_cpu = CpuCopier(() if self.host else (linear_weight(m) for m in self.mods.values()))
        out = {}
        for n, m in self.mods.items():
            acc = self.method.reduce(self.acc.pop(n))
            w = linear_weight(m).detach().to(acc.device)  # host accumulators: the weight's copy, one at a time
            s = self.method.finish(acc, w)
            out[n] = to_cpu(s)  # one module at a time: the GPU copy is freed at once
        self.work.clear()
        self.part.clear()
        return out


def _grow(buffers: dict[torch.device, torch.Tensor], device: torch.device, numel: int) -> None:
    """Make ``buffers[device]`` a flat fp32 buffer of at least ``numel`` elements (none for 0)."""
    cur = buffers.get(device)
    if numel and (cur is None or cur.numel() < numel):
        buffers[device] = torch.empty(numel, dtype=torch.float32, device=device)


class CpuCopier:
    """Copies tensors to the CPU. GPU fp32 tensors go through one pinned staging buffer sized for the largest
    of ``like``: on an H200 that moved 3.6 GiB of fp32 scores in 0.34 s, against 2.6 s for ``.cpu()`` into
    pageable memory, which dominated the scoring time of a 1B model."""

    def __init__(self, like: Iterable[torch.Tensor]):
        sizes = [t.numel() for t in like if t.device.type == "cuda"]
        self.stage = torch.empty(max(sizes), dtype=torch.float32, pin_memory=True) if sizes else None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.stage is None or t.device.type != "cuda" or t.dtype != torch.float32 or t.numel() > self.stage.numel():
            return t.cpu().contiguous()
        view = self.stage[: t.numel()].view(t.shape)
        view.copy_(t)  # synchronous: the buffer is reused for the next tensor
        return view.clone()


def _loss(model: nn.Module, batch: dict[str, torch.Tensor], pred_mask: torch.Tensor, targets: torch.Tensor,
          inv_count: torch.Tensor, out_device: torch.device) -> torch.Tensor:
    """sum_n L_n with L_n the mean fp32 cross-entropy of example n over its loss positions.

    ``pred_mask``, ``targets`` (``[B, T]``) and ``inv_count`` (``[B]``) are host tensors: the loss positions are
    found on the host and their indices copied to the devices before the forward pass, so that nothing here waits
    for the device (a boolean-mask index of the logits would, between the forward and the backward pass). The
    logits are formed only at the positions where some example has a loss (:func:`brittle.models.logits_at`)."""
    from ..models import logits_at

    B, T = pred_mask.shape
    cols = pred_mask.any(0).nonzero().squeeze(1)
    pred_mask, targets = pred_mask[:, cols], targets[:, cols]
    rows, pos = pred_mask.nonzero(as_tuple=True)
    rows_d, pos_d, tgt, w = (t.to(out_device) for t in (rows, pos, targets[rows, pos], inv_count[rows]))
    logits = logits_at(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                               "use_cache": False}, cols)
    if logits.dim() != 3 or logits.shape[:2] != (B, len(cols)):
        raise BrittleError(f"unexpected logits shape {tuple(logits.shape)} for a batch of {B}x{T} "
                           f"({len(cols)} positions kept)")
    sel = logits[rows_d.to(logits.device), pos_d.to(logits.device)]  # no copy: the head's device is out_device
    ce = F.cross_entropy(sel.to(torch.float32), tgt.to(sel.device), reduction="none")
    return (ce * w.to(sel.device)).sum()


def _gradient_batch(model: nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor, accum: _Accumulator,
                    root: _GraphRoot, out_device: torch.device) -> int:
    """One forward+backward pass of a gradient method over a batch (``labels`` on the host): the accumulator's hooks
    add the batch. Returns the number of loss positions."""
    B, T = labels.shape
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    pred_mask = targets != IGNORE_INDEX
    counts = pred_mask.sum(1)
    upto = [int(v) for v in torch.where(pred_mask, torch.arange(T).expand(B, T) + 1, 0).amax(1)]
    accum.start_batch(BatchInfo((B, T), upto=upto))
    inv_count = 1.0 / counts.to(torch.float32)
    with torch.enable_grad():
        loss = root.loss(lambda: _loss(model, batch, pred_mask, targets, inv_count, out_device))
        loss.backward()
    root.done()
    return int(counts.sum())


def compute_scores(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example | dict[str, torch.Tensor]],
    method: str | ScoreMethod,
    *,
    batch_size: int,
    max_length: int | None,
    modules: Iterable[str] | str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    max_accumulator_bytes: int | None = None,
    host_accumulators: bool = False,
    gradient_checkpointing: bool = False,
    stats: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Importance scores of the linear weights of the decoder blocks (see the module docstring).

    Args:
        model: a causal LM (any dtype; PEFT-wrapped models are scored on their base weights).
        tokenizer: used by :func:`brittle.data.core.encode` (may be None when ``examples`` are pre-encoded
            dicts with 1-D ``input_ids`` and ``labels``).
        examples: :class:`Example` objects or pre-encoded dicts.
        method: ``"snip"``, ``"wanda"`` or ``"snip-summed"`` (or a :class:`ScoreMethod`).
        batch_size: examples per forward/backward pass; changes the result only by fp32 rounding.
        max_length: truncation (right) of each encoded example; an example left without response tokens is
            an error naming it.
        modules: canonical names or fnmatch patterns (``"layers.0.*"``) to score; default all.
        device: run there (the model is moved); default the device the model is on.
        max_accumulator_bytes: cap on the fp32 accumulators of one pass; modules are split over several
            passes over the data when they do not fit (each pass costs a full forward+backward).
        host_accumulators: keep the fp32 accumulators in CPU memory instead of on the weights' devices: the
            device then holds one buffer of the largest module's accumulator, and every batch moves 4 bytes per
            scored weight to the host and adds them there (:class:`_Accumulator`); the scores differ from the
            default only by fp32 summation order.
        gradient_checkpointing: (gradient methods) keep only each decoder block's input from the forward pass and
            recompute the block when the backward pass reaches it, taking the scored modules' inputs then: the
            activations of one block instead of all (about a third more compute); the same scores.
        stats: if given, filled with ``n_examples``, ``n_tokens`` (non-padding input tokens),
            ``n_response_tokens`` (positions in the loss for SNIP, activation positions for Wanda) and
            ``n_passes``.

    Returns:
        ``{canonical name: fp32 CPU tensor [d_out, d_in]}`` in ``linear_modules`` order; for GPT-2's
        ``Conv1D`` (parameter stored ``[d_in, d_out]``) the transposed, canonical ``[d_out, d_in]`` layout.
    """
    from .. import distributed
    from ..models import decoder_layers, supports_logits_to_keep

    method = get_method(method)
    if batch_size < 1:
        raise BrittleError(f"batch_size must be >= 1, got {batch_size}")
    encoded = _encode_all(tokenizer, examples, max_length, method)  # all of them: every process checks every example
    n_examples = len(encoded)
    encoded = distributed.shard(encoded)  # this process's share (all of them in a single process)
    mods = select_modules(model, modules)
    passes = plan_passes(mods, method, max_accumulator_bytes)
    if device is not None:
        model.to(device)
    in_device = model.get_input_embeddings().weight.device
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out_device = head.weight.device if head is not None and hasattr(head, "weight") else in_device
    batches = calibration_batches(tokenizer, encoded, batch_size)
    keep_logits = supports_logits_to_keep(model)
    blocks = decoder_layers(model)
    n_tok = sum(int(len(e["input_ids"])) for e in encoded)
    n_resp = 0

    bar = None
    if progress and distributed.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches) * len(passes), desc=f"{method.name} scores", unit="batch", dynamic_ncols=True)

    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    scores: dict[str, torch.Tensor] = {}
    try:
        for p, _ in saved_flags:
            p.requires_grad_(False)
        model.eval()
        for pass_names in passes:
            pass_mods = {n: mods[n] for n in pass_names}
            recomputed = gradient_checkpointing and method.needs_grad
            accum = _Accumulator(pass_mods, method, batch_size, host=host_accumulators, recomputed=recomputed)
            first = min(_layer_index(n) for n in pass_names)
            root = _GraphRoot(model, blocks[first])
            accum.attach()
            n_resp = 0
            try:
                with _checkpointed(blocks[first:]) if recomputed else contextlib.nullcontext():
                    for batch in batches:
                        labels = batch["labels"]
                        batch = {k: v.to(in_device) for k, v in batch.items() if k != "labels"}
                        if method.needs_grad:
                            n_resp += _gradient_batch(model, batch, labels, accum, root, out_device)
                        else:  # activations only: a forward pass
                            wmask = activation_mask(labels)
                            accum.start_batch(BatchInfo(tuple(labels.shape), input_mask=wmask))
                            n_resp += int(wmask.sum())
                            with torch.no_grad():
                                model(**batch, use_cache=False, **({"logits_to_keep": 1} if keep_logits else {}))
                        if bar is not None:
                            bar.update(1)
            finally:
                accum.detach()
                root.remove()
            scores.update(accum.finish())
            del accum
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        model.train(was_training)
        if bar is not None:
            bar.close()
    if distributed.active():  # the counts of all processes' shares
        n_tok, n_resp = (int(v) for v in distributed.sum_across(torch.tensor([n_tok, n_resp], dtype=torch.int64)))
    if stats is not None:
        stats.update(n_examples=n_examples, n_tokens=n_tok, n_response_tokens=n_resp, n_passes=len(passes))
    return {n: scores[n] for n in mods}


