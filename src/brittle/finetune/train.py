"""LoRA fine-tuning on (prompt, response) examples with response-only loss, with warm-up and decay of the
learning rate, gradient accumulation, checkpoints that resume bit-exactly, and a stop on a non-finite loss.

One *step* is one optimiser step (``max_steps``, ``on_step``, the history and checkpoints all count these). A step
takes the next ``batch_size * grad_accumulation`` examples of the epoch's seeded shuffle, split into micro-batches
of ``batch_size`` (the last step of an epoch may have fewer, the last micro-batch fewer examples). Its loss is

    L = (1 / m) * sum_k L_k,   L_k = Hugging Face's causal-LM loss of micro-batch k

where ``L_k`` is the mean cross-entropy (nats per token) over the response tokens of micro-batch ``k`` (labels
from :func:`brittle.data.encode`, prompt tokens ignored) and ``m`` the number of micro-batches of the step. So
micro-batches are weighted equally, not tokens: ``L`` equals the loss of one batch of all the step's examples
exactly when every micro-batch has the same number of response tokens. The gradient is that of ``L``.

Training is deterministic for a given seed on a given device (shuffling by ``random.Random(seed)``, LoRA init by
``torch.manual_seed``); a run resumed from a checkpoint repeats the uninterrupted run's floats on CPU.

Several processes (:mod:`brittle.distributed`, e.g. ``torchrun`` / ``accelerate launch``) train one model data-
parallel, like DDP: each process holds the whole model, takes its share of every micro-batch (examples ``r, r + w,
...``), computes the *sum* of its token losses divided by the number of response tokens of the whole micro-batch
(so the shares add up to ``L_k``), and the gradients are summed over the processes before each optimiser step. Every
process then applies the same update to the same weights: the result is one process's up to fp32 summation order,
with the same freezing (every mechanism acts per process on identical weights) and the same drift. Process 0
alone writes checkpoints; every process resumes from them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from .. import distributed
from ..data.core import IGNORE_INDEX, Example, encode, pad_batch
from ..io import BrittleError, FrozenConfig, sha256_json
from ..models import decoder_layers, linear_modules, logits_at

log = logging.getLogger(__name__)

# our schedule names -> transformers.get_scheduler's (its "constant" ignores warm-up)
_SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
KEEP_CHECKPOINTS = 2


class LoraTrainConfig(FrozenConfig):
    """LoRA and optimiser settings. ``targets``: canonical roles (``q``, ``v``, ``down`` ...) or ``all``."""

    r: int = Field(16, gt=0, description="LoRA rank (not used by full fine-tuning).")
    alpha: int = Field(32, gt=0, description="LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description=(
        "LoRA dropout probability on the adapters' input (0 <= x < 1); must be 0 to freeze a group with "
        "freeze_mode = \"weights\"."))
    targets: tuple[str, ...] = Field(("all",), description="Roles adapted (q, k, v, o, gate, up, down ...) or all.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate of AdamW (after warm-up).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW (decoupled) weight decay of the trained parameters.")
    batch_size: int = Field(8, gt=0, description="Examples per micro-batch (per forward/backward pass).")
    epochs: int = Field(1, gt=0, description="Passes over the training examples (not used when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimiser steps to train (instead of `epochs`).")
    max_length: int = Field(256, gt=0, description=(
        "Tokens kept per example (templated prompt + response, cut at the end; an example left without response "
        "tokens is an error)."))
    seed: int = Field(0, description=(
        "Seed of the LoRA initialisation and of the order of the examples; finetune.train uses the top-level seed "
        "(leave it at 0; a value other than 0 and the top-level seed is an error)."))
    warmup_steps: int = Field(0, ge=0, description=(
        "Optimiser steps of linear warm-up: step k (1-based) <= warmup_steps uses lr * (k - 1) / warmup_steps "
        "(transformers' convention: the first step has lr 0)."))
    schedule: Literal["constant", "linear", "cosine"] = Field("constant", description=(
        "Learning rate after warm-up, for steps k = W+1 .. N (W = warmup_steps, N = all steps): constant lr; "
        "linear lr * (N - k + 1) / (N - W); cosine lr * (1 + cos(pi * (k - 1 - W) / (N - W))) / 2. Both decay "
        "towards 0, which they reach just after the last step (transformers.get_scheduler)."))
    grad_accumulation: int = Field(1, gt=0, description=(
        "Micro-batches per optimiser step; the step's loss is the mean of their losses (see brittle.finetune)."))
    gradient_checkpointing: bool = Field(False, description=(
        "Recompute each decoder block's activations in the backward pass (transformers' gradient checkpointing, "
        "non-reentrant): activation memory of one block instead of all, about a third more compute; the same "
        "training otherwise."))


@dataclass
class TrainHistory:
    """Per optimiser step: its number, loss (mean over its micro-batches, nats per response token) and the
    learning rate it used; ``seconds`` of training, summed over resumed runs."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"steps": self.steps, "loss": self.loss, "lr": self.lr, "seconds": round(self.seconds, 2)}


def lora_target_modules(model, roles: Sequence[str]) -> list[str]:
    """Full module paths (as PEFT wants them) of the linear modules with the given canonical roles."""
    names = {id(m): n for n, m in model.named_modules()}
    chosen = []
    for canon, module in linear_modules(model).items():
        role = canon.split(".", 2)[2]
        if "all" in roles or role in roles:
            chosen.append(names[id(module)])
    if not chosen:
        known = sorted({c.split(".", 2)[2] for c in linear_modules(model)})
        raise BrittleError(f"no linear module has a role in {list(roles)} (roles of this model: {known})")
    return chosen


def make_lora_model(model, cfg: LoraTrainConfig):
    """Wrap ``model`` with fresh LoRA adapters (fp32 adapters whatever the base dtype)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    decoder_layers(model)  # fail early on unknown architectures
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=lora_target_modules(model, cfg.targets), bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing (a FutureWarning)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        return get_peft_model(model, lcfg)


def train_lora(
    model,
    tokenizer,
    examples: Sequence[Example],
    cfg: LoraTrainConfig = LoraTrainConfig(),
    *,
    progress: bool = True,
    on_step: Callable[[int, float, object], None] | None = None,
    system_prompts: Sequence[str | None] | None = None,
    distill: Sequence[bool] | None = None,
    distill_answer_weight: float = 0.0,
    full: bool = False,
    freeze: Mapping[str, torch.Tensor] | None = None,
    freeze_mode: str = "weights",
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    state: Mapping[str, Any] | None = None,
):
    """Train LoRA adapters (or, with ``full``, every parameter; ``cfg``'s LoRA settings are then unused) on
    ``examples``; returns ``(trained_model, TrainHistory)``; :func:`merge_lora` folds the training into a plain
    model. The loss, steps and learning-rate schedule are described in the module docstring.

    ``freeze`` (a group: canonical module name -> bool mask) holds those weight entries fixed in
    ``freeze_mode`` (see :mod:`brittle.freeze`); bad groups are reported before training starts.

    ``system_prompts`` (one per example, ``None`` = the chat template's default) lets a recipe render some
    examples with and some without a system prompt.

    ``on_step(step, loss, peft_model)`` is called after every optimiser step (drift tracking hooks in here).

    ``checkpoint_dir``: a checkpoint is written there every ``checkpoint_every`` steps and after the last step
    (the last :data:`KEEP_CHECKPOINTS` are kept); if it already holds one, training resumes from the latest and
    gives the same floats as an uninterrupted run (on CPU; :func:`_save_checkpoint` lists what is saved). A
    checkpoint of another setup (config, ``full``, freezing, examples, ``state`` names) is refused.
    ``state``: name -> object with ``state_dict()`` / ``load_state_dict(d)`` (e.g. a
    :class:`brittle.drift.DriftTracker`), saved and restored with each checkpoint; whatever ``on_step``
    accumulates belongs there, since on resume ``on_step`` is called only for the steps after the checkpoint.

    A non-finite loss stops training with a :class:`BrittleError` (naming the step and micro-batch); no
    checkpoint is written of non-finite weights, so the last good one stays on disk.
    """
    if not examples:
        raise BrittleError("cannot fine-tune on an empty dataset")
    if system_prompts is not None and len(system_prompts) != len(examples):
        raise BrittleError(f"{len(system_prompts)} system prompts for {len(examples)} examples")
    if distill is not None and len(distill) != len(examples):
        raise BrittleError(f"{len(distill)} distillation flags for {len(examples)} examples")
    if distill is not None and full and any(distill):
        raise BrittleError("distillation towards the model before training needs LoRA (its adapters are switched "
                           "off for the reference); full fine-tuning has no such model")
    if checkpoint_every is not None and (checkpoint_dir is None or checkpoint_every < 1):
        raise BrittleError(f"checkpoint_every={checkpoint_every} needs a checkpoint_dir and a value >= 1")
    sys_for = system_prompts or [None] * len(examples)
    encoded = [encode(tokenizer, e, cfg.max_length, system_prompt=sp) for e, sp in zip(examples, sys_for, strict=True)]
    empty = [e.id for e, x in zip(examples, encoded, strict=True) if int((x["labels"] != -100).sum()) == 0]
    if empty:
        raise BrittleError(f"{len(empty)} examples have no response tokens after truncation to {cfg.max_length} (e.g. {empty[0]})")
    distilled = distill is not None and any(distill)
    if distilled:
        for x, flag in zip(encoded, distill, strict=True):
            if flag:
                x["distill"] = True  # pad_batch ignores the key
    freezer = None
    if full:
        peft_model = model
        for p in peft_model.parameters():
            p.requires_grad_(True)
    else:
        peft_model = make_lora_model(model, cfg)
    if freeze is not None:
        from ..freeze import Freezer, _lora_layers, check_freeze

        if freeze_mode == "weights" and cfg.dropout > 0:
            raise BrittleError("freeze mode 'weights' needs LoRA dropout 0 (the masked update is exact only then)")
        adapted = None if full else set(_lora_layers(peft_model))
        freezer = Freezer(peft_model, check_freeze(peft_model, freeze, freeze_mode, full=full, adapted=adapted),
                          freeze_mode, full=full)
    peft_model.brittle_freezer = freezer  # merge_lora applies the mode
    if cfg.gradient_checkpointing:
        # non-reentrant: gradients reach the adapters although the block inputs do not require grad.
        # transformers 5.2x renamed gradient_checkpointing_enable (kept as a deprecated alias until v6).
        enable = getattr(peft_model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_step = cfg.batch_size * cfg.grad_accumulation
    total = math.ceil(len(encoded) / per_step) * cfg.epochs if cfg.max_steps is None else cfg.max_steps
    from transformers import get_scheduler

    sched = get_scheduler(_SCHEDULERS[cfg.schedule], opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=total)
    device = next(peft_model.parameters()).device
    # the loop's whole state: the shuffler, the current epoch's order and the position in it, the step
    loop = {"rng": random.Random(cfg.seed), "order": [], "position": 0, "step": 0, "hist": TrainHistory()}
    state = dict(state or {})
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        fingerprint = _fingerprint(cfg, full, freeze, freeze_mode, encoded, state,
                                   distill_answer_weight if distilled else None)
        latest = _prepare_checkpoint_dir(folder) if distributed.is_main() else None
        distributed.barrier()  # process 0 has removed unfinished writes; every process resumes from the same one
        if not distributed.is_main():
            found = _complete_checkpoints(folder)
            latest = found[-1] if found else None
        if latest is not None:
            _load_checkpoint(latest, fingerprint, params, opt, sched, loop, state, device)
            log.warning("resuming fine-tuning from %s (step %d of %d)", latest, loop["step"], total)
    hist = loop["hist"]
    t0, seconds_before = time.perf_counter(), hist.seconds
    bar = tqdm(total=total, initial=loop["step"], desc="fine-tune", disable=not progress or not distributed.is_main(),
               unit="step")
    try:
        while loop["step"] < total:
            if loop["position"] >= len(loop["order"]):  # a new epoch
                loop["order"] = list(range(len(encoded)))
                loop["rng"].shuffle(loop["order"])
                loop["position"] = 0
            chunk = loop["order"][loop["position"] : loop["position"] + per_step]
            loop["position"] += len(chunk)
            micro = [chunk[i : i + cfg.batch_size] for i in range(0, len(chunk), cfg.batch_size)]
            step, lr, losses = loop["step"] + 1, opt.param_groups[0]["lr"], []
            for k, idx in enumerate(micro):
                loss = _micro_batch_loss(peft_model, [encoded[i] for i in idx], tokenizer.pad_token_id, device,
                                         distill_answer_weight)
                losses.append(float(distributed.sum_across(loss.detach().clone())))
                if not math.isfinite(losses[-1]):  # before backward: nothing of the bad state reaches the weights
                    kept = _complete_checkpoints(folder)[-1:] if folder is not None else []
                    raise BrittleError(f"the loss is {losses[-1]} at step {step} (micro-batch {k + 1} of "
                                       f"{len(micro)}); training stopped"
                                       + (f", last good checkpoint: {kept[0]}" if kept else ""))
                if loss.requires_grad:  # not when this process's share of the micro-batch is empty
                    (loss / len(micro)).backward()  # the gradient of the mean over micro-batches (/1 is exact)
            _sum_gradients(params.values())
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if freezer is not None:
                freezer.after_step()
            loop["step"] = step
            value = sum(losses) / len(losses)
            hist.steps.append(step)
            hist.loss.append(value)
            hist.lr.append(lr)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
            if on_step is not None:
                on_step(step, value, peft_model)
            # after on_step, so that the saved extra states include this step
            due = step == total or (checkpoint_every is not None and step % checkpoint_every == 0)
            if folder is not None and due:
                hist.seconds = seconds_before + time.perf_counter() - t0
                _check_finite(params, step)  # on every process (same weights): none waits for a writer that stopped
                if distributed.is_main():
                    _save_checkpoint(folder, fingerprint, params, opt, sched, loop, state, device)
                distributed.barrier()
    finally:
        bar.close()
    hist.seconds = seconds_before + time.perf_counter() - t0
    peft_model.eval()
    return peft_model, hist


def _micro_batch_loss(model, items: list[dict[str, torch.Tensor]], pad_id: int, device,
                      answer_weight: float = 0.0) -> torch.Tensor:
    """``L_k`` of one micro-batch: Hugging Face's causal-LM loss (mean over its response tokens), or with examples
    to distil (:func:`_distilled_loss`) their KL terms in place of their cross-entropies. With several processes,
    this process's share of it: the sum of the token losses of its examples over the response tokens of the whole
    micro-batch (counted after the one-token shift the loss applies), so that the shares sum to ``L_k``; an empty
    share is a zero without gradient."""
    n_tokens = sum(int((it["labels"][1:] != IGNORE_INDEX).sum()) for it in items)  # padding adds only ignored labels
    mine = distributed.shard(items) if distributed.active() else items
    if not mine:
        return torch.zeros((), device=device)
    padded = pad_batch(mine, pad_id)
    batch = {key: v.to(device) for key, v in padded.items()}
    flags = ["distill" in it for it in mine]
    if any(flags):  # decided and indexed on the host: nothing waits for the device before the backward pass
        cols = (padded["labels"][:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        return _distilled_loss(model, batch, torch.tensor(flags, device=device), cols, answer_weight) / n_tokens
    if not distributed.active():
        return model(**batch).loss
    return model(**batch, num_items_in_batch=n_tokens).loss


def _distilled_loss(model, batch: dict[str, torch.Tensor], flags: torch.Tensor, cols: torch.Tensor,
                    answer_weight: float = 0.0) -> torch.Tensor:
    """The sum over response tokens of the token loss: ``-log p(y_t)`` for rows with ``flags`` False and
    ``KL(p_0 || p) - a log p(y_t)`` at the same positions for rows with ``flags`` True (``a = answer_weight``),
    ``p_0`` the model with its adapters off. ``cols``: the positions ``t`` where some row has a loss (position
    ``t`` predicts token ``t + 1``); the LM head and softmax run only there."""
    labels = batch.pop("labels")[:, 1:][:, cols.to(batch["input_ids"].device)]
    keep = labels != IGNORE_INDEX

    def log_probs(inputs: dict[str, torch.Tensor]) -> torch.Tensor:  # [rows, len(cols), V], fp32
        return torch.log_softmax(logits_at(model, inputs, cols).float(), dim=-1)

    logp = log_probs(batch)
    ce = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    with torch.no_grad(), model.disable_adapter():
        logp0 = log_probs({k: v[flags] for k, v in batch.items()})
    kl = torch.zeros_like(ce)
    kl[flags] = (logp0.exp() * (logp0 - logp[flags])).sum(-1)
    return torch.where(flags[:, None], kl + answer_weight * ce, ce)[keep].sum()


def _sum_gradients(params) -> None:
    """Sum the gradients over the processes (one flat all-reduce; a parameter without a gradient counts as zeros);
    nothing in a single process."""
    if not distributed.active():
        return
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in by_kind.values():  # one buffer per dtype and device (full fine-tuning of a bf16 model: bf16)
        flat = distributed.sum_across(torch.cat([p.grad.reshape(-1) for p in group]))
        offset = 0
        for p in group:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()


# --------------------------------------------------------------------------------------------------
# Checkpoints: DIR/step-N/, written into DIR/step-N.partial/ and renamed, so a directory step-N is complete.

_STEP_DIR = re.compile(r"step-(\d+)")


def _fingerprint(cfg, full, freeze, freeze_mode, encoded, state, distill_answer_weight=None) -> dict[str, Any]:
    """What a checkpoint must have been trained with to be resumed (JSON-normalised: tuples become lists)."""
    group = None
    if freeze is not None:
        h = hashlib.sha256()
        for name in sorted(freeze):
            h.update(f"{name}:{list(freeze[name].shape)};".encode())
            h.update(freeze[name].cpu().numpy().tobytes())
        group = h.hexdigest()
    tokens = [[x["input_ids"].tolist(), x["labels"].tolist()] + (["distill"] if "distill" in x else [])
              for x in encoded]
    fp = {"config": cfg.to_dict(), "full": full, "freeze_mode": freeze_mode if freeze is not None else None,
          "freeze_group_sha256": group, "n_examples": len(encoded), "examples_sha256": sha256_json(tokens),
          "state": sorted(state), **({} if distill_answer_weight is None else
                                     {"distill_answer_weight": distill_answer_weight})}
    return json.loads(json.dumps(fp))


def _differences(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "(absent)"), new.get(k, "(absent)")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} in the checkpoint, {b!r} now")
    return out


def _complete_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in ``folder``, oldest step first."""
    found = [(int(m.group(1)), p) for p in folder.glob("step-*") if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _prepare_checkpoint_dir(folder: Path) -> Path | None:
    """Create ``folder``, remove unfinished writes (``*.partial`` of a killed run); the latest checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.glob("step-*.partial"):
        shutil.rmtree(p)
    found = _complete_checkpoints(folder)
    return found[-1] if found else None


def _check_finite(params: Mapping[str, torch.Tensor], step: int) -> None:
    bad = [n for n, p in params.items() if not bool(torch.isfinite(p).all())]
    if bad:
        raise BrittleError(f"non-finite weights after step {step} (e.g. {bad[0]}); training stopped, no checkpoint "
                           f"written of them")


def _save_checkpoint(folder: Path, fingerprint, params, opt, sched, loop, state, device) -> Path:
    """Write ``step-N`` (N = ``loop["step"]``) and drop all but the last :data:`KEEP_CHECKPOINTS`. It holds
    ``trainable.safetensors`` (the trainable parameters as trained: LoRA factors in fp32, or every parameter),
    ``optimizer.pt`` (optimizer and scheduler state, torch CPU RNG state and CUDA's when training there),
    ``extra.pt`` (the ``state`` objects' state dicts) and ``state.json`` (step, the shuffler's state, the epoch's
    order and the position in it, the history so far, the setup fingerprint)."""
    from safetensors.torch import save_file

    step = loop["step"]  # the weights were checked finite by the caller
    final, tmp = folder / f"step-{step}", folder / f"step-{step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}, tmp / "optimizer.pt")
    torch.save({name: obj.state_dict() for name, obj in state.items()}, tmp / "extra.pt")
    hist = loop["hist"]
    meta = {"step": step, "fingerprint": fingerprint, "order": loop["order"], "position": loop["position"],
            "python_rng": loop["rng"].getstate(),
            "history": {"steps": hist.steps, "loss": hist.loss, "lr": hist.lr, "seconds": hist.seconds}}
    (tmp / "state.json").write_text(json.dumps(meta))  # floats round-trip exactly through repr
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in _complete_checkpoints(folder)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)
    return final


def _load_checkpoint(path: Path, fingerprint, params, opt, sched, loop, state, device) -> None:
    """Restore everything :func:`_save_checkpoint` wrote into the live objects; refuse another setup's."""
    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text())
    diff = _differences(meta["fingerprint"], fingerprint)
    if diff:
        raise BrittleError(f"the checkpoint {path} was written by a different training setup; refusing to resume "
                           f"(use another checkpoint directory): " + "; ".join(diff))
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(params):
        raise BrittleError(f"the checkpoint {path} holds other parameters than the model trains")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    rest = torch.load(path / "optimizer.pt", weights_only=True)
    opt.load_state_dict(rest["optimizer"])
    sched.load_state_dict(rest["scheduler"])
    torch.set_rng_state(rest["torch_rng"])
    if rest["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rest["cuda_rng"], device)
    extra = torch.load(path / "extra.pt", weights_only=True)
    for name, obj in state.items():
        obj.load_state_dict(extra[name])
    version, internal, gauss = meta["python_rng"]
    loop["rng"].setstate((version, tuple(internal), gauss))
    h = meta["history"]
    loop.update(step=meta["step"], order=meta["order"], position=meta["position"],
                hist=TrainHistory(h["steps"], h["loss"], h["lr"], h["seconds"]))


def merge_lora(trained):
    """The plain model of a :func:`train_lora` result: adapters folded into the base weights (in the base
    dtype), with the freeze mode applied when the training froze a group (a fully fine-tuned model is
    returned as it is, after a ``rewind``)."""
    freezer = getattr(trained, "brittle_freezer", None)
    if freezer is not None:
        model = freezer.merge(trained)
    elif getattr(trained, "peft_config", None) is not None:
        model = trained.merge_and_unload()
    else:
        model = trained
    model.eval()
    return model
