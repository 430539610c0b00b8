"""LoRA fine-tuning on (prompt, response) examples with response-only loss.

The loss is Hugging Face's causal-LM loss on the labels from :func:`brittle.data.encode` (prompt tokens
ignored), i.e. the mean cross-entropy over all response tokens of a batch. Training is deterministic for
a given seed on a given device (shuffling by ``random.Random(seed)``, LoRA init by ``torch.manual_seed``).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import Field
from tqdm.auto import tqdm

from .data.core import Example, encode, pad_batch
from .io import BrittleError, FrozenConfig
from .models import decoder_layers, linear_modules


class LoraTrainConfig(FrozenConfig):
    """LoRA and optimiser settings. ``targets``: canonical roles (``q``, ``v``, ``down`` ...) or ``all``."""

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: tuple[str, ...] = ("all",)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    max_length: int = Field(256, gt=0)
    seed: int = 0


@dataclass
class TrainHistory:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"steps": self.steps, "loss": self.loss, "seconds": round(self.seconds, 2)}


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
    full: bool = False,
    freeze: Mapping[str, torch.Tensor] | None = None,
    freeze_mode: str = "weights",
):
    """Train LoRA adapters (or, with ``full``, every parameter; ``cfg``'s LoRA settings are then unused) on
    ``examples``; returns ``(trained_model, TrainHistory)``; :func:`merge_lora` folds the training into a plain
    model.

    ``freeze`` (a group: canonical module name -> bool mask) holds those weight entries fixed in
    ``freeze_mode`` (see :mod:`brittle.freeze`); bad groups are reported before training starts.

    ``system_prompts`` (one per example, ``None`` = the chat template's default) lets a recipe render some
    examples with and some without a system prompt.

    ``on_step(step, loss, peft_model)`` is called after every optimiser step (drift tracking hooks in here).
    """
    if not examples:
        raise BrittleError("cannot fine-tune on an empty dataset")
    if system_prompts is not None and len(system_prompts) != len(examples):
        raise BrittleError(f"{len(system_prompts)} system prompts for {len(examples)} examples")
    sys_for = system_prompts or [None] * len(examples)
    encoded = [encode(tokenizer, e, cfg.max_length, system_prompt=sp) for e, sp in zip(examples, sys_for, strict=True)]
    empty = [e.id for e, x in zip(examples, encoded, strict=True) if int((x["labels"] != -100).sum()) == 0]
    if empty:
        raise BrittleError(f"{len(empty)} examples have no response tokens after truncation to {cfg.max_length} (e.g. {empty[0]})")
    freezer = None
    if full:
        peft_model = model
        for p in peft_model.parameters():
            p.requires_grad_(True)
    else:
        peft_model = make_lora_model(model, cfg)
    if freeze is not None:
        from .freeze import Freezer, _lora_layers, check_freeze

        if freeze_mode == "weights" and cfg.dropout > 0:
            raise BrittleError("freeze mode 'weights' needs LoRA dropout 0 (the masked update is exact only then)")
        adapted = None if full else set(_lora_layers(peft_model))
        freezer = Freezer(peft_model, check_freeze(peft_model, freeze, freeze_mode, full=full, adapted=adapted),
                          freeze_mode, full=full)
    peft_model.brittle_freezer = freezer  # merge_lora applies the mode
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else cfg.max_steps
    rng = random.Random(cfg.seed)
    device = next(peft_model.parameters()).device
    hist = TrainHistory()
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="fine-tune", disable=not progress, unit="step")
    step = 0
    while step < total:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for start in range(0, len(order), cfg.batch_size):
            if step >= total:
                break
            batch = pad_batch([encoded[i] for i in order[start : start + cfg.batch_size]], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = peft_model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if freezer is not None:
                freezer.after_step()
            step += 1
            hist.steps.append(step)
            value = float(loss.detach())
            hist.loss.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
            if on_step is not None:
                on_step(step, value, peft_model)
    bar.close()
    hist.seconds = time.perf_counter() - t0
    peft_model.eval()
    return peft_model, hist


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
