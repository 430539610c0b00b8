"""A small safety-aligned "model organism" built on a CPU in minutes.

Supervised safety fine-tuning of an instruct model on
* harmful prompts (AdvBench training split, never its first 100 evaluation behaviours) -> a refusal
  drawn from a fixed set of templates, and
* benign instructions (training split) -> the model's *own* greedy answers, so utility is kept
  (self-distillation),
with LoRA, merged into the weights afterwards. The preset ``smollm2-135m-safe`` names the result of the
default recipe on ``smollm2-135m``; it is built on first use and cached under ``$BRITTLE_CACHE/models``.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .data.core import Example, sample, save_jsonl
from .finetune import LoraTrainConfig, merge_lora, train_lora
from .io import ExistsError, cache_dir, manifest, sha256_json, write_json, write_manifest

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


@dataclass(frozen=True)
class AlignConfig:
    """The alignment recipe; its hash names the cached model directory."""

    base: str = "smollm2-135m"
    n_harmful: int = 320
    n_benign: int = 300
    benign_max_new_tokens: int = 48
    generation_batch_size: int = 16
    # Share of training examples rendered WITHOUT the template's default system prompt (an explicit empty
    # system message where the template injects one): refusals must not hinge on one system prompt, since
    # the paper's vanilla ASR is measured without a system prompt.
    no_system_prompt_share: float = 0.5
    lora: LoraTrainConfig = field(default_factory=LoraTrainConfig)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        return sha256_json(self.to_dict())[:12]


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


def align_model(cfg: AlignConfig, out_dir: str | Path, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Run the recipe and save a Hugging Face model directory (usable as ``--model`` everywhere)."""
    from .models import load_model, weight_fingerprint

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and not overwrite:
        raise ExistsError(f"{out_dir} already holds a model; pass --force to rebuild it")
    model, tok = load_model(cfg.base)
    base_hash = weight_fingerprint(model)
    data = alignment_examples(model, tok, cfg, progress=progress)
    from .evaluation.suite import no_system_prompt

    rng = random.Random(cfg.seed + 1)
    nosys = no_system_prompt(tok)
    system_prompts = [nosys if rng.random() < cfg.no_system_prompt_share else None for _ in data]
    peft_model, hist = train_lora(model, tok, data, cfg.lora, progress=progress, system_prompts=system_prompts)
    merged = merge_lora(peft_model)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    merged.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    save_jsonl(tmp / "alignment_data.jsonl", data, overwrite=True)
    write_json(tmp / "train_history.json", hist.to_dict(), overwrite=True)
    counts = {"harmful_refusal": sum(e.response in REFUSALS for e in data), "benign_own_answer": sum(e.response not in REFUSALS for e in data),
              "without_default_system_prompt": sum(sp is not None for sp in system_prompts)}
    write_manifest(tmp, manifest("align", cfg.to_dict(), seeds={"seed": cfg.seed},
                                 inputs={"base_weights": base_hash, "alignment_data": sha256_json([e.to_dict() for e in data])},
                                 outputs={"model_weights": weight_fingerprint(merged), "counts": counts,
                                          "train_seconds": round(hist.seconds, 1), "final_loss": hist.loss[-1]}),
                   overwrite=True)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def safe_preset_dir(cfg: AlignConfig = AlignConfig()) -> Path:
    """Build (first use) or find the default aligned organism under ``$BRITTLE_CACHE/models``."""
    target = cache_dir() / "models" / f"{cfg.base}-safe-{cfg.digest()}"
    if not (target / "config.json").exists():
        align_model(cfg, target, overwrite=True)
    return target

