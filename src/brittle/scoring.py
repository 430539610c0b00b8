"""Importance scores (SNIP, Wanda) for every linear weight of the decoder blocks, and score files.

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
  subset. The accumulators live on the device of their weight (``device_map`` models work); finished scores
  are moved to the CPU.

Score files are safetensors (one fp32 tensor per module, canonical names) with the metadata under the
``brittle`` key (JSON): method, model id and weight fingerprint, dataset hash, numbers of examples and tokens,
seed, max_length, definitions, package versions. No timestamp: the same inputs give a bit-identical file.
Loading works without a GPU and memory-maps the file.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data.core import IGNORE_INDEX, DataError, Example, encode, pad_batch
from .io import BrittleError, atomic_path, package_versions, sha256_json

METHODS = ("snip", "wanda", "snip-summed")
FORMAT = "brittle-scores/1"
LOSS_DEFINITION = "mean cross-entropy over the positions predicting a response token (labels[t+1] != -100), per example"
WANDA_POSITIONS = "positions whose input token is a response token (labels[t] != -100)"
# Settings that must agree for a cached score file to be reused.
CACHE_KEYS = ("method", "model_hash", "dataset_hash", "n_examples", "max_length", "dtype", "modules")


class ScoreMismatchError(BrittleError):
    """A score file that does not belong to the model (or module set) it is used with."""


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


def _encode_all(tokenizer, examples, max_length: int | None, method: str) -> list[dict[str, torch.Tensor]]:
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
        scored = labels != IGNORE_INDEX if method == "wanda" else labels[1:] != IGNORE_INDEX
        if not bool(scored.any()):
            n_prompt = int((labels == IGNORE_INDEX).sum())
            raise DataError(
                f"example {_example_name(e, i)} has no response tokens after truncation to max_length={max_length} "
                f"({len(labels)} tokens kept, {n_prompt} of them prompt/unlabelled); raise --max-length, shorten "
                "the prompt or drop the example"
            )
        out.append(enc)
    return out


# --------------------------------------------------------------------------------------------------
# Module selection and passes


def select_modules(model: nn.Module, modules: Iterable[str] | str | None = None) -> dict[str, nn.Module]:
    """Canonical name -> module for ``modules`` (names or fnmatch patterns such as ``layers.3.*``; None = all)."""
    from .models import linear_modules

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


def _acc_numel(module: nn.Module, method: str) -> int:
    from .models import linear_weight

    w = linear_weight(module)
    return w.shape[1] if method == "wanda" else w.numel()


def plan_passes(mods: dict[str, nn.Module], method: str, max_accumulator_bytes: int | None) -> list[list[str]]:
    """Split the modules (in order) into passes whose fp32 accumulators fit ``max_accumulator_bytes``.

    A single module larger than the cap gets a pass of its own.
    """
    names = list(mods)
    if max_accumulator_bytes is None:
        return [names]
    if max_accumulator_bytes <= 0:
        raise BrittleError(f"max_accumulator_bytes must be positive, got {max_accumulator_bytes}")
    passes: list[list[str]] = [[]]
    used = 0
    for n in names:
        b = 4 * _acc_numel(mods[n], method)
        if passes[-1] and used + b > max_accumulator_bytes:
            passes.append([])
            used = 0
        passes[-1].append(n)
        used += b
    return passes


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


def _embedding_hook(state: dict[str, Any]):
    def hook(module, args, output):
        if state["active"] and isinstance(output, torch.Tensor) and output.is_floating_point():
            state["rooted"] = True
            return output.detach().requires_grad_(True)
        return None

    return hook


def _as_btd(t: torch.Tensor, B: int, T: int) -> torch.Tensor:
    if t.dim() == 3:
        return t
    if t.dim() == 2 and t.shape[0] == B * T:
        return t.view(B, T, t.shape[1])
    raise BrittleError(f"unexpected linear input/output shape {tuple(t.shape)} for a batch of {B}x{T}")


class _Accumulator:
    """Hooks and fp32 accumulators for one pass over the data."""

    def __init__(self, mods: dict[str, nn.Module], method: str):
        from .models import linear_weight

        self.method = method
        self.mods = mods
        self.acc: dict[str, torch.Tensor] = {}
        self.work: dict[torch.device, torch.Tensor] = {}
        self.batch: dict[str, Any] = {}
        for n, m in mods.items():
            w = linear_weight(m)
            shape = (w.shape[1],) if method == "wanda" else tuple(w.shape)
            self.acc[n] = torch.zeros(shape, dtype=torch.float32, device=w.device)
            if method == "snip":
                cur = self.work.get(w.device)
                if cur is None or cur.numel() < w.numel():
                    self.work[w.device] = torch.empty(w.numel(), dtype=torch.float32, device=w.device)
        self.handles: list[Any] = []

    def attach(self) -> None:
        for n, m in self.mods.items():
            self.handles.append(m.register_forward_hook(self._forward_hook(n)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _forward_hook(self, name: str):
        def hook(module, args, output):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
                raise BrittleError(f"{name}: cannot read the input/output of {type(module).__name__}")
            if self.method == "wanda":
                self._wanda(name, x.detach())
            elif output.requires_grad:
                xd = x.detach()
                output.register_hook(lambda g: self._grad(name, xd, g))
            return None

        return hook

    def _wanda(self, name: str, x: torch.Tensor) -> None:
        B, T = self.batch["shape"]
        x = _as_btd(x, B, T)
        mask = self.batch["wanda_mask"].to(x.device)
        xs = x[mask].to(torch.float32)  # [N, d_in]
        self.acc[name].add_((xs * xs).sum(0))

    def _grad(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        B, T = self.batch["shape"]
        x = _as_btd(x, B, T)
        g = _as_btd(g, B, T)
        acc = self.acc[name]
        d_out, d_in = g.shape[-1], x.shape[-1]
        if self.method == "snip":
            buf = self.work[acc.device][: d_out * d_in].view(d_out, d_in)
        for b, u in enumerate(self.batch["upto"]):
            if u == 0:
                continue
            gb = g[b, :u].to(device=acc.device, dtype=torch.float32)
            xb = x[b, :u].to(device=acc.device, dtype=torch.float32)
            if self.method == "snip":
                torch.mm(gb.t(), xb, out=buf)
                acc.add_(buf.abs_())
            else:  # snip-summed: signed sum
                acc.addmm_(gb.t(), xb)
        return None

    def finish(self) -> dict[str, torch.Tensor]:
        from .models import linear_weight

        to_cpu = CpuCopier(linear_weight(m) for m in self.mods.values())
        out = {}
        for n, m in self.mods.items():
            w = linear_weight(m).detach()
            acc = self.acc.pop(n)
            if self.method == "snip":
                s = acc.mul_(w.abs().to(torch.float32))
            elif self.method == "snip-summed":
                s = acc.mul_(w.to(torch.float32)).abs_()
            else:
                s = w.abs().to(torch.float32) * acc.sqrt_().unsqueeze(0)
            out[n] = to_cpu(s)  # one module at a time: the GPU copy is freed at once
        self.work.clear()
        return out


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


def _supports_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _loss(model: nn.Module, batch: dict[str, torch.Tensor], pred_mask: torch.Tensor, targets: torch.Tensor,
          inv_count: torch.Tensor, keep_logits: bool) -> torch.Tensor:
    """sum_n L_n with L_n the mean fp32 cross-entropy of example n over its loss positions."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    B, T = batch["input_ids"].shape
    N = int(pred_mask.sum())
    if keep_logits:
        kwargs["logits_to_keep"] = pred_mask
    logits = model(**kwargs).logits
    if logits.dim() == 2 and logits.shape[0] == N:
        sel = logits
    elif logits.dim() == 3 and logits.shape[:2] == (B, T):
        sel = logits[pred_mask.to(logits.device)]
    else:
        raise BrittleError(f"unexpected logits shape {tuple(logits.shape)} for a batch of {B}x{T}")
    mask = pred_mask.to(sel.device)
    tgt = targets.to(sel.device)[mask]
    ce = F.cross_entropy(sel.to(torch.float32), tgt, reduction="none")
    w = inv_count.to(sel.device)[mask.nonzero()[:, 0]]
    return (ce * w).sum()


def compute_scores(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example | dict[str, torch.Tensor]],
    method: str,
    *,
    batch_size: int = 4,
    max_length: int | None = 512,
    modules: Iterable[str] | str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    max_accumulator_bytes: int | None = None,
    stats: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Importance scores of the linear weights of the decoder blocks (see the module docstring).

    Args:
        model: a causal LM (any dtype; PEFT-wrapped models are scored on their base weights).
        tokenizer: used by :func:`brittle.data.core.encode` (may be None when ``examples`` are pre-encoded
            dicts with 1-D ``input_ids`` and ``labels``).
        examples: :class:`Example` objects or pre-encoded dicts.
        method: ``"snip"``, ``"wanda"`` or ``"snip-summed"``.
        batch_size: examples per forward/backward pass; changes the result only by fp32 rounding.
        max_length: truncation (right) of each encoded example; an example left without response tokens is
            an error naming it.
        modules: canonical names or fnmatch patterns (``"layers.0.*"``) to score; default all.
        device: run there (the model is moved); default the device the model is on.
        max_accumulator_bytes: cap on the fp32 accumulators of one pass; modules are split over several
            passes over the data when they do not fit (each pass costs a full forward+backward).
        stats: if given, filled with ``n_examples``, ``n_tokens`` (non-padding input tokens),
            ``n_response_tokens`` (positions in the loss for SNIP, activation positions for Wanda) and
            ``n_passes``.

    Returns:
        ``{canonical name: fp32 CPU tensor [d_out, d_in]}`` in ``linear_modules`` order; for GPT-2's
        ``Conv1D`` (parameter stored ``[d_in, d_out]``) the transposed, canonical ``[d_out, d_in]`` layout.
    """
    if method not in METHODS:
        raise BrittleError(f"unknown scoring method '{method}' (choose one of: {', '.join(METHODS)})")
    if batch_size < 1:
        raise BrittleError(f"batch_size must be >= 1, got {batch_size}")
    encoded = _encode_all(tokenizer, examples, max_length, method)
    mods = select_modules(model, modules)
    passes = plan_passes(mods, method, max_accumulator_bytes)
    if device is not None:
        model.to(device)
    in_device = model.get_input_embeddings().weight.device
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out_device = head.weight.device if head is not None and hasattr(head, "weight") else in_device
    pad_id = 0
    if tokenizer is not None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    # Longest first (a memory error shows up at once), ties by position: deterministic.
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]["input_ids"]), i))
    batches = [[encoded[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
    keep_logits = _supports_logits_to_keep(model)
    from .models import decoder_layers

    blocks = decoder_layers(model)
    n_tok = sum(int(len(e["input_ids"])) for e in encoded)
    n_resp = 0

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches) * len(passes), desc=f"{method} scores", unit="batch", dynamic_ncols=True)

    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    scores: dict[str, torch.Tensor] = {}
    try:
        for p, _ in saved_flags:
            p.requires_grad_(False)
        model.eval()
        for pass_names in passes:
            pass_mods = {n: mods[n] for n in pass_names}
            accum = _Accumulator(pass_mods, method)
            root_state = {"active": False, "rooted": False}
            first = min(_layer_index(n) for n in pass_names)
            root_handles = [blocks[first].register_forward_pre_hook(_hidden_pre_hook(root_state), with_kwargs=True)]
            accum.attach()
            n_resp = 0
            try:
                for items in batches:
                    batch = pad_batch(items, pad_id, side="right")
                    labels = batch["labels"]
                    B, T = labels.shape
                    batch = {k: v.to(in_device) for k, v in batch.items() if k != "labels"}
                    accum.batch = {"shape": (B, T)}
                    if method == "wanda":
                        wmask = labels != IGNORE_INDEX
                        accum.batch["wanda_mask"] = wmask
                        n_resp += int(wmask.sum())
                        with torch.no_grad():
                            kw = {"logits_to_keep": 1} if keep_logits else {}
                            model(**batch, use_cache=False, **kw)
                    else:
                        targets = torch.full_like(labels, IGNORE_INDEX)
                        targets[:, :-1] = labels[:, 1:]
                        pred_mask = targets != IGNORE_INDEX
                        counts = pred_mask.sum(1)
                        n_resp += int(counts.sum())
                        idx = torch.arange(T).expand(B, T)
                        accum.batch["upto"] = [int(v) for v in torch.where(pred_mask, idx + 1, 0).amax(1)]
                        inv_count = 1.0 / counts.to(torch.float32)
                        root_state.update(active=True, rooted=False)
                        with torch.enable_grad():
                            loss = _loss(model, batch, pred_mask.to(out_device), targets, inv_count, keep_logits)
                            if not loss.requires_grad:
                                # The block pre-hook found no hidden state to root the graph on: root it at the embeddings.
                                for h in root_handles:
                                    h.remove()
                                root_handles = [model.get_input_embeddings().register_forward_hook(_embedding_hook(root_state))]
                                loss = _loss(model, batch, pred_mask.to(out_device), targets, inv_count, keep_logits)
                                if not loss.requires_grad:
                                    raise BrittleError(f"cannot build the backward graph of {type(model).__name__}")
                            loss.backward()
                        root_state["active"] = False
                        del loss
                    if bar is not None:
                        bar.update(1)
            finally:
                accum.detach()
                for h in root_handles:
                    h.remove()
            scores.update(accum.finish())
            del accum
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        model.train(was_training)
        if bar is not None:
            bar.close()
    if stats is not None:
        stats.update(n_examples=len(encoded), n_tokens=n_tok, n_response_tokens=n_resp, n_passes=len(passes))
    return {n: scores[n] for n in mods}


# --------------------------------------------------------------------------------------------------
# Score files


def model_dtypes(model: nn.Module) -> str:
    """The floating-point parameter dtypes of ``model`` (``"bfloat16"``, ``"float32"``, or several joined by commas)."""
    return ",".join(sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.is_floating_point()}))


def score_metadata(
    model: nn.Module,
    examples: Sequence[Example | dict[str, torch.Tensor]],
    method: str,
    *,
    seed: int | None,
    max_length: int | None,
    stats: dict[str, Any],
    data: str | None = None,
    batch_size: int | None = None,
    modules: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The metadata written into a score file (deterministic: no time stamps, no host names)."""
    from .models import model_id, weight_fingerprint

    return {
        "format": FORMAT,
        "method": method,
        "model": model_id(model),
        "model_hash": weight_fingerprint(model),
        "dtype": model_dtypes(model),
        "data": data,
        "dataset_hash": dataset_hash(examples),
        "n_examples": stats.get("n_examples", len(examples)),
        "n_tokens": stats.get("n_tokens"),
        "n_response_tokens": stats.get("n_response_tokens"),
        "seed": seed,
        "max_length": max_length,
        "batch_size": batch_size,
        "modules": None if modules is None else list(modules),
        "orientation": "[d_out, d_in] (nn.Linear layout; GPT-2 Conv1D transposed)",
        "accumulation": "float32",
        "definition": {
            "snip": "|W| * sum_n |dL_n/dW|",
            "snip-summed": "|W * sum_n dL_n/dW|",
            "wanda": "|W| * sqrt(sum over response positions of x^2)",
        }[method],
        "loss": LOSS_DEFINITION,
        "wanda_positions": WANDA_POSITIONS,
        "versions": package_versions(),
    }


def save_scores(path: str | Path, scores: dict[str, torch.Tensor], metadata: dict[str, Any], *,
                overwrite: bool = False) -> Path:
    """Write ``scores`` (fp32 tensors) to a safetensors file with ``metadata``; atomic, no silent overwrite."""
    from safetensors.torch import save_file

    tensors = {}
    for n, t in scores.items():
        if not isinstance(t, torch.Tensor):
            raise BrittleError(f"score '{n}' is not a tensor")
        tensors[n] = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
    # One metadata key only: safetensors writes its metadata map in hash order, so several keys would make
    # the bytes of the file differ between runs.
    meta = {"brittle": json.dumps({**metadata, "format": FORMAT, "_order": list(tensors)}, sort_keys=True, default=str)}
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    if not path.is_file():
        raise BrittleError(f"score file not found: {path}")
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise BrittleError(f"{path} is not a safetensors file ({e})") from e
    return header, 8 + n


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The brittle metadata of a score file (without loading any tensor)."""
    path = Path(path)
    header, _ = _read_header(path)
    raw = (header.get("__metadata__") or {}).get("brittle")
    if raw is None:
        raise BrittleError(f"{path} is a safetensors file but not a brittle score file (no 'brittle' metadata)")
    meta = json.loads(raw)
    meta.pop("_order", None)
    return meta


def load_scores(path: str | Path, *, mmap: bool = True, modules: Iterable[str] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(scores, metadata)`` from a score file, on the CPU (works without a GPU).

    With ``mmap`` the tensors are copy-on-write views of the memory-mapped file (pages are read when
    touched; writing to a tensor never changes the file); otherwise they are read into memory (private
    copies: the file may then be replaced or deleted).
    ``modules`` restricts the tensors returned (names or fnmatch patterns).
    """
    path = Path(path)
    meta = read_metadata(path)
    header, start = _read_header(path)
    saved_order = json.loads(header["__metadata__"]["brittle"]).get("_order") or []
    names = [k for k in header if k != "__metadata__"]
    if modules is not None:
        pats = list(modules)
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]
    out: dict[str, torch.Tensor] = {}
    if mmap:
        import numpy as np

        raw = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))
        for n in names:
            info = header[n]
            dt = _ST_DTYPES.get(info["dtype"])
            if dt is None:
                raise BrittleError(f"{path}: tensor {n} has unsupported dtype {info['dtype']}")
            a, b = info["data_offsets"]
            chunk = raw[start + a:start + b]
            if (start + a) % torch.empty((), dtype=dt).element_size():
                chunk = chunk.clone()  # unaligned (old writer): copy
            out[n] = chunk.view(dt).view(info["shape"])
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            for n in names:
                out[n] = f.get_tensor(n).clone()  # get_tensor itself is backed by a mapping of the file
    rank = {n: i for i, n in enumerate(saved_order)}  # the order the scores were saved in (canonical)
    names = sorted(out, key=lambda n: (rank.get(n, len(rank)), _natural_key(n)))
    return {n: out[n] for n in names}, meta


def _natural_key(name: str) -> list:
    """``layers.2.q`` before ``layers.10.q`` (for files without a saved order)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def check_scores_match(model: nn.Module, metadata: dict[str, Any], scores: dict[str, torch.Tensor] | None = None) -> None:
    """Raise :class:`ScoreMismatchError` when the scores were not computed on ``model``'s weights (or do not fit its modules)."""
    from .models import linear_modules, linear_weight, model_id, weight_fingerprint

    want = metadata.get("model_hash")
    have = weight_fingerprint(model)
    if want != have:
        raise ScoreMismatchError(
            f"these scores were computed on model '{metadata.get('model')}' (weights {str(want)[:12]}), not on the "
            f"loaded model '{model_id(model)}' (weights {have[:12]}); recompute them with `brittle score --model ...`"
        )
    if scores is not None:
        mods = linear_modules(model)
        for n, t in scores.items():
            if n not in mods:
                raise ScoreMismatchError(f"score '{n}' names no linear module of '{model_id(model)}'")
            shape = tuple(linear_weight(mods[n]).shape)
            if tuple(t.shape) != shape:
                raise ScoreMismatchError(f"score '{n}' has shape {tuple(t.shape)}, the module's weight {shape}")


# --------------------------------------------------------------------------------------------------
# The `brittle score` command


def _data_label(spec: str) -> str:
    p = Path(spec)
    base = p.stem if p.suffix else spec
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("_") or "data"


def score_command(
    *,
    model: str,
    data: str,
    method: str,
    out: str | Path,
    nsamples: int | None = 128,
    seed: int = 0,
    batch_size: int = 4,
    max_length: int = 512,
    dtype: str = "float32",
    device: str | None = None,
    modules: Sequence[str] | None = None,
    max_accumulator_gb: float | None = None,
    force: bool = False,
    progress: bool = True,
    echo=print,
    model_and_tokenizer=None,
) -> Path:
    """Score ``data`` with ``method`` into ``OUT/scores/<data>-<method>.safetensors``; reuse a matching file.

    A file is reused when its model weights, dataset hash, number of examples, max_length, dtype and module
    set match (``--force`` recomputes). A file with other settings is not overwritten without ``--force``.
    """
    from .data.build import resolve_dataset
    from .data.core import sample
    from .io import manifest, write_manifest
    from .models import load_model, weight_fingerprint

    if method not in METHODS:
        raise BrittleError(f"unknown scoring method '{method}' (choose one of: {', '.join(METHODS)})")
    out = Path(out)
    path = out / "scores" / f"{_data_label(data)}-{method}.safetensors"
    if model_and_tokenizer is None:
        model_and_tokenizer = load_model(model, dtype=dtype, device=device)
    m, tok = model_and_tokenizer
    examples = sample(resolve_dataset(data, model, seed, model_and_tokenizer=(m, tok)), nsamples, seed)
    mods = None if modules is None else list(select_modules(m, modules))
    wanted = {"method": method, "model_hash": weight_fingerprint(m), "dataset_hash": dataset_hash(examples),
              "n_examples": len(examples), "max_length": max_length, "dtype": model_dtypes(m), "modules": mods}
    reused = False
    if path.exists() and not force:
        try:
            old = read_metadata(path)
        except BrittleError:
            old = {}
        diff = [k for k in CACHE_KEYS if old.get(k) != wanted[k]]
        if diff:
            raise BrittleError(f"{path} exists with different settings ({', '.join(diff)}); pass --force to recompute it")
        reused = True
        meta = old
        echo(f"reusing cached scores {path} (same model weights, data and settings; --force recomputes)")
    else:
        stats: dict[str, Any] = {}
        cap = None if max_accumulator_gb is None else int(max_accumulator_gb * 2**30)
        scores = compute_scores(m, tok, examples, method, batch_size=batch_size, max_length=max_length, modules=mods,
                                progress=progress, max_accumulator_bytes=cap, stats=stats)
        meta = score_metadata(m, examples, method, seed=seed, max_length=max_length, stats=stats, data=data,
                              batch_size=batch_size, modules=mods)
        save_scores(path, scores, meta, overwrite=force)
        echo(f"wrote {path} ({len(scores)} modules, {meta['n_examples']} examples, "
             f"{meta['n_response_tokens']} response tokens)")
    record = manifest(
        "score",
        {"model": model, "data": data, "method": method, "nsamples": nsamples, "batch_size": batch_size,
         "max_length": max_length, "dtype": dtype, "device": device, "modules": mods,
         "max_accumulator_gb": max_accumulator_gb},
        seeds={"seed": seed},
        inputs={"model_weights": wanted["model_hash"], "dataset": wanted["dataset_hash"]},
        outputs={"scores": {"file": str(path.relative_to(out)), "reused": reused,
                            "n_examples": meta.get("n_examples"), "n_tokens": meta.get("n_tokens"),
                            "n_response_tokens": meta.get("n_response_tokens")}},
    )
    write_manifest(out, record, overwrite=True)
    return path


__all__ = [
    "METHODS", "FORMAT", "ScoreMismatchError", "compute_scores", "save_scores", "load_scores", "read_metadata",
    "check_scores_match", "score_metadata", "dataset_hash", "select_modules", "plan_passes", "score_command",
]
