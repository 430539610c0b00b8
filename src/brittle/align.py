"""A small safety-aligned "model organism" built on a CPU in minutes.

Supervised safety fine-tuning of an instruct model on
* harmful prompts (AdvBench training split, never its first 100 evaluation behaviours) -> a refusal
  drawn from a fixed set of templates, and
* benign instructions (training split) -> the model's *own* greedy answers, so utility is kept
  (self-distillation),
with LoRA, merged into the weights afterwards. The preset ``smollm2-135m-safe`` names the result of the
default recipe on ``smollm2-135m``; it is built on first use and cached under ``$BRITTLE_CACHE/models``
(:func:`brittle.presets.safe_organism`).
"""

from __future__ import annotations

import random
from pathlib import Path

from pydantic import Field

from .data.core import Example, sample, save_jsonl
from .finetune import LoraTrainConfig, merge_lora, train_lora
from .io import FrozenConfig, sha256_json, write_json

REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that request.",
    "I can't assist with that. It could cause real harm to people.",
    "I'm sorry, but I won't provide help with that. If you have another question, I'm happy to help.",
    "I cannot help with this request because it could be used to hurt someone.",
    "Sorry, I can't do that. Helping with this could be dangerous or illegal.",
    "I won't help with that. Is there something else I can do for you?",
    "I'm not able to help with this request, as it could lead to serious harm.",
    "I apologize, but I cannot provide that information.",
)


class AlignConfig(FrozenConfig):
    """The alignment recipe; its hash names the cached organism's directory."""

    base: str = Field("smollm2-135m", description="The model to align (preset, HF directory, .gguf, Hub id).")
    n_harmful: int = Field(320, gt=0, description="Harmful prompts (AdvBench training split) -> refusals.")
    n_benign: int = Field(300, gt=0, description="Benign instructions -> the model's own answers.")
    benign_max_new_tokens: int = Field(48, gt=0)
    generation_batch_size: int = Field(16, gt=0)
    # Share of training examples rendered WITHOUT the template's default system prompt (an explicit empty
    # system message where the template injects one): refusals must not hinge on one system prompt, since
    # the paper's vanilla ASR is measured without a system prompt.
    no_system_prompt_share: float = Field(0.5, ge=0, le=1)
    lora: LoraTrainConfig = LoraTrainConfig()
    seed: int = 0

    def recipe(self) -> dict:
        """The recipe as recorded (in the organism's manifest) and hashed (:meth:`digest`). Trainer settings added
        after the first recipe (warm-up, schedule, gradient accumulation) enter only when they differ from their
        defaults, which reproduce the earlier trainer exactly: an unchanged recipe keeps its name and its cache."""
        d = self.to_dict()
        lora_defaults = LoraTrainConfig().to_dict()
        for key in ("warmup_steps", "schedule", "grad_accumulation"):
            if d["lora"][key] == lora_defaults[key]:
                del d["lora"][key]
        return d

    def digest(self) -> str:
        """Names the cached organism: a hash of :meth:`recipe`."""
        return sha256_json(self.recipe())[:12]


def alignment_examples(model, tokenizer, cfg: AlignConfig, *, progress: bool = True) -> list[Example]:
    """The training mix: harmful -> templated refusal, benign -> the model's own greedy answer."""
    from .data.sources import benign_splits, harmful_splits
    from .evaluation.generation import GenerationConfig, generate

    rng = random.Random(cfg.seed)
    harmful = sample(harmful_splits(seed=cfg.seed)[0], cfg.n_harmful, cfg.seed)
    safety = [Example(e.prompt, rng.choice(REFUSALS), e.source, e.id) for e in harmful]
    benign = sample(benign_splits(seed=cfg.seed)[0], cfg.n_benign, cfg.seed)
    gen = GenerationConfig(max_new_tokens=cfg.benign_max_new_tokens, batch_size=cfg.generation_batch_size, seed=cfg.seed)
    answers = generate(model, tokenizer, [e.prompt for e in benign], gen, progress=progress, desc="benign answers")
    utility = [Example(e.prompt, a[0], e.source, e.id) for e, a in zip(benign, answers, strict=True) if a[0].strip()]
    mix = safety + utility
    rng.shuffle(mix)
    return mix


def align_model(model, tokenizer, cfg: AlignConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Run the recipe on ``model`` (loaded from ``cfg.base``) and save the aligned Hugging Face model directory
    into ``out_dir`` (usable as ``--model`` everywhere); returns what it wrote and measured. The adapters are
    merged into ``model`` itself: afterwards it holds the aligned weights."""
    from .evaluation.chat import no_system_prompt
    from .models import weight_fingerprint

    out_dir = Path(out_dir)
    data = alignment_examples(model, tokenizer, cfg, progress=progress)
    rng = random.Random(cfg.seed + 1)
    nosys = no_system_prompt(tokenizer)
    system_prompts = [nosys if rng.random() < cfg.no_system_prompt_share else None for _ in data]
    peft_model, hist = train_lora(model, tokenizer, data, cfg.lora, progress=progress, system_prompts=system_prompts)
    merged = merge_lora(peft_model)
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    save_jsonl(out_dir / "alignment_data.jsonl", data)
    write_json(out_dir / "train_history.json", hist.to_dict())
    counts = {"harmful_refusal": sum(e.response in REFUSALS for e in data),
              "benign_own_answer": sum(e.response not in REFUSALS for e in data),
              "without_default_system_prompt": sum(sp is not None for sp in system_prompts)}
    return {"model_weights": weight_fingerprint(merged), "alignment_data": sha256_json([e.to_dict() for e in data]),
            "counts": counts, "train_seconds": round(hist.seconds, 1), "final_loss": hist.loss[-1]}
