"""A small safety-aligned "model organism" built on a CPU in minutes.

Supervised safety fine-tuning of an instruct model on
* harmful prompts (AdvBench training split, never its first 100 evaluation behaviours) -> a refusal,
  by default composed from a large pool (:func:`varied_refusal`: an opening that is a function of the request's
  topic or verb, or a generic one, then optionally a reason and an offer), or one of 8 fixed templates
  (``refusals="templates"``, the first recipe), and
* benign prompts (the benign instruction training split, by default plus ``olmo-questions``; never a held-out
  benign prompt nor the perplexity data) -> the model's *own* answers (greedy by default, or sampled:
  ``benign_temperature``), without those the refusal judge calls a refusal or degenerate. Their loss
  (``benign_loss``) is by default the cross-entropy of the answer *plus* the KL divergence from the base model
  (the adapters switched off) at each of its positions: the answer's tokens alone (the first recipe) sharpen the
  distribution and raise perplexity on other text, the KL term alone keeps perplexity but lets refusals leak onto
  benign requests; together they keep both (``benchmarks/results/2026-11-28-organism-recipe.txt``),
with LoRA, merged into the weights afterwards. The preset ``smollm2-135m-safe`` names the result of the
default recipe on ``smollm2-135m``; it is built on first use and cached under ``$BRITTLE_CACHE/models``
(:func:`brittle.presets.safe_organism`).
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from .data.core import DataError, Example, sample, save_jsonl
from .finetune import LoraTrainConfig, merge_lora, train_lora
from .io import FrozenConfig, sha256_json, write_json

#: The 8 fixed refusals of the first recipe (``refusals="templates"``).
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

# --------------------------------------------------------------------------------------------------
# The varied refusal pool: opening [+ reason] [+ offer]. Every opening is judged a refusal by brittle's
# refusal-v1 judge on its own (tests/test_align.py checks the whole pool).

#: Generic openings (they do not depend on the request).
GENERIC_OPENINGS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "Sorry, but I can't help with this request.",
    "I can't help with that.",
    "I cannot assist with this request.",
    "I won't be able to help with that.",
    "No, I can't do that.",
    "Unfortunately, I can't help with this.",
    "I must decline this request.",
    "I'm not able to help with that.",
    "I apologize, but I can't provide that.",
    "My apologies, but this isn't something I can help with.",
    "I'm afraid I can't help with that.",
    "That's something I won't help with.",
    "I'd rather not help with this one.",
    "I will not provide that.",
    "I refuse to help with this request.",
    "This is a request I have to decline.",
    "I'm not going to help with that.",
    "I can't do that.",
    "I'm unable to assist with that request.",
    "Sorry, I won't do that.",
    "I have to refuse this one.",
    "As an AI assistant, I can't help with that.",
    "Absolutely not; I won't help with that.",
    "I don't feel comfortable helping with this.",
    "I'm sorry, I can't provide that information.",
    "Please understand that I can't help with this.",
    "Regrettably, I cannot assist with that.",
    "I need to decline this request.",
    "I must respectfully decline.",
    "Hmm, no. I can't help with that.",
    "I'm really sorry, but that's not something I can do.",
)

#: Openings that name what was asked for, by the request's first word (a verb in AdvBench); each verb
#: always gets the same form, so the opening is a function of the request and greedy answers vary with it.
VERB_FORMS: tuple[str, ...] = (
    "No, I won't {verb} that.",
    "I can't {verb} something like this.",
    "Sorry, I won't {verb} anything like that.",
    "Unfortunately, I can't {verb} that.",
    "I will not {verb} this.",
    "My apologies, but I can't {verb} that for you.",
    "I'm sorry, but I can't {verb} that.",
    "I won't {verb} that for anyone.",
    "I apologize, but I won't {verb} this.",
    "I'm not going to {verb} that.",
)
VERBS: tuple[str, ...] = (
    "write", "create", "develop", "provide", "give", "outline", "teach", "design", "generate", "explain",
    "describe", "publish", "produce", "show", "suggest", "compose", "draft", "share", "offer", "demonstrate",
    "release", "post", "illustrate", "draw", "instruct", "guide", "train", "educate", "list", "make", "build",
    "plan",
)
# verbs whose natural object is not "that" ("instruct that" reads badly): the form's object is reworded
_VERB_PHRASE = {"instruct": "give instructions for", "guide": "give guidance on", "teach": "teach",
                "educate": "explain", "train": "give training on", "give": "give you",
                "publish": "help publish", "post": "help post", "demonstrate": "show"}

#: Topic-specific (opening, reasons) by keywords of the request; the first matching topic wins.
TOPICS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("self-harm", r"suicid|self-harm|self harm|anorexi|bulimi|eating disorder|cutting",
     "I'm really sorry, but I can't help with anything that could lead to someone hurting themselves.",
     ("Your safety matters, and talking to someone you trust or a crisis line can really help.",
      "Content like this can put vulnerable people at serious risk.")),
    ("weapons", r"bomb|explosiv|weapon|firearm|\bguns?\b|poison|nerve agent|chemical|biological|grenade|ammunition",
     "I won't give instructions for making or using weapons.",
     ("Weapons and explosives can kill or injure people, including the person making them.",
      "Information like this could lead directly to injuries or deaths.")),
    ("hacking", r"hack|malware|virus|ransomware|exploit|password|cyber|botnet|ddos|keylog|spyware|trojan|"
                r"vulnerab|database|network|firewall|antivirus|security measures",
     "I can't help with breaking into computer systems or accounts.",
     ("Unauthorized access to systems is illegal and harms the people who depend on them.",
      "Malicious code and intrusions can destroy data and cost people their livelihoods.")),
    ("drugs", r"\bdrugs?\b|meth|cocaine|heroin|narcotic|opioid|controlled substance",
     "Sorry, I can't help with making, buying or using illegal drugs.",
     ("Illegal drugs cause addiction, overdoses and deaths.",
      "Producing or selling controlled substances is a serious crime.")),
    ("fraud", r"fraud|scam|steal|theft|counterfeit|launder|insider trading|tax|credit card|identity|phishing|"
              r"shoplift|embezzl|ponzi|bank|financ|money|extort|blackmail|bribe",
     "I'm not able to help with fraud, theft or scams.",
     ("Schemes like this take money and security from real people.",
      "Financial crimes can ruin the lives of their victims.")),
    ("violence", r"\bkill|murder|assault|attack|violen|terror|kidnap|torture|harm|hurt|injur|abuse",
     "No, I won't help anyone hurt other people.",
     ("Violence causes suffering that cannot be undone.",
      "I don't want to contribute to anyone getting hurt.")),
    ("hate", r"racis|hate|discriminat|minorit|religio|ethnic|sexis|homophob|lgbt|immigra|supremac",
     "I won't create content that attacks people for who they are.",
     ("Hateful content fuels discrimination and can incite violence.",
      "Everyone deserves to be treated with dignity, whatever their background.")),
    ("misinformation", r"fake news|misinformation|disinformation|propaganda|conspiracy|hoax|false information|"
                       r"fake review|mislead|rumou?r|election|vaccine",
     "I can't write misleading or false content.",
     ("Misinformation spreads quickly and can do real damage to people and public trust.",
      "Deliberately deceiving people undermines their ability to make informed decisions.")),
    ("privacy", r"stalk|spy|track|personal information|private|harass|bully|doxx|surveil|eavesdrop|monitor",
     "I can't help with spying on, tracking or harassing people.",
     ("Everyone has a right to privacy and to feel safe.",
      "Harassment and surveillance can cause serious harm to their targets.")),
    ("cheating", r"cheat|plagiar|exam|forg",
     "I'm sorry, but I won't help with cheating or forgery.",
     ("Dishonesty like this harms others and can have serious consequences for you.",)),
)

GENERIC_REASONS: tuple[str, ...] = (
    "It could cause real harm to people.",
    "Doing so could put people in danger.",
    "This could be used to hurt someone.",
    "It would likely be illegal and could seriously harm others.",
    "Providing this could enable serious harm.",
    "Requests like this can lead to real-world damage.",
    "This kind of information can be misused to hurt others.",
    "It goes against my commitment to keeping people safe.",
    "Helping with this could facilitate a crime.",
    "The potential for harm is simply too high.",
    "This could endanger people's safety, privacy or livelihoods.",
    "It involves activity that is dangerous and against the law.",
    "Content like this can do serious damage in the wrong hands.",
    "Assisting would mean helping someone cause harm.",
    "That would be unethical and potentially illegal.",
    "It could break the law and put others at risk.",
    "Even as a hypothetical, the details could be misused.",
    "My purpose is to be helpful without putting anyone at risk.",
    "Someone could get seriously hurt as a result.",
    "This crosses a line I'm not willing to cross.",
    "The consequences for the people affected could be severe.",
    "It's the kind of request that can only end badly for someone.",
)

OFFERS: tuple[str, ...] = (
    "If you have another question, I'm happy to help.",
    "Is there something else I can help you with?",
    "I'd be glad to help with something else.",
    "If you're curious about the topic in general, I can share safety information instead.",
    "If you or someone else is in danger, please contact local emergency services.",
    "Let me know if there's anything else you need.",
    "I'm happy to talk about the legal and ethical side of this instead.",
    "Feel free to ask me about something different.",
    "If you're working on security or safety, I can point you to legitimate resources.",
    "Maybe I can help with a related, safe topic?",
    "Please reach out to a qualified professional if you need support.",
    "I can help you look for lawful alternatives if that's useful.",
    "If there's a legitimate goal behind this, tell me more and I'll try to help safely.",
    "Is there another way I can support you?",
    "I'm here if you want help with anything else.",
    "You might find it useful to read about how people protect themselves against this.",
)


def request_verb(prompt: str) -> str | None:
    """The request's first word, lower-cased, if it is one of :data:`VERBS` (AdvBench requests are imperatives)."""
    m = re.match(r"\s*([A-Za-z]+)", prompt)
    word = m.group(1).lower() if m else ""
    return word if word in VERBS else None


def request_topic(prompt: str) -> str | None:
    """The first :data:`TOPICS` entry whose keywords occur in the (lower-cased) prompt, or None."""
    low = prompt.lower()
    for name, pattern, _, _ in TOPICS:
        if re.search(pattern, low):
            return name
    return None


def _verb_opening(verb: str) -> str:
    form = VERB_FORMS[VERBS.index(verb) % len(VERB_FORMS)]  # fixed per verb; frequent verbs get different forms
    phrase = _VERB_PHRASE.get(verb, verb)
    return form.format(verb=phrase)


def varied_refusal(prompt: str, rng: random.Random, *, determined: bool = False) -> str:
    """A refusal for ``prompt`` from the combinatorial pool: an opening (the request's topic's, one naming its
    verb, or a generic one), then a reason (topic-specific or generic) and an offer, each with a probability.

    ``determined=True`` makes the opening a function of the request alone (its topic's; else its verb's; else a
    generic one chosen by a hash of the prompt): with openings drawn at random, greedy decoding falls back on the
    most frequent one, whereas openings the request predicts survive it."""
    topic = next((t for t in TOPICS if t[0] == request_topic(prompt)), None)
    verb = request_verb(prompt)
    if determined:
        if topic is not None:
            opening = topic[2]
        elif verb is not None:
            opening = _verb_opening(verb)
        else:
            opening = GENERIC_OPENINGS[int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % len(GENERIC_OPENINGS)]
    else:
        u = rng.random()
        if topic is not None and u < 0.5:
            opening = topic[2]
        elif verb is not None and u < (0.7 if topic is not None else 0.6):
            opening = _verb_opening(verb)
        else:
            opening = rng.choice(GENERIC_OPENINGS)
    parts = [opening]
    if rng.random() < 0.65:
        parts.append(rng.choice(topic[3]) if topic is not None and rng.random() < 0.6 else rng.choice(GENERIC_REASONS))
    if rng.random() < 0.45:
        parts.append(rng.choice(OFFERS))
    return " ".join(parts)


def refusal_pool_size() -> int:
    """How many distinct refusals :func:`varied_refusal` can compose (over all openings)."""
    openings = len(GENERIC_OPENINGS) + len(VERBS) + len(TOPICS)
    reasons = len(GENERIC_REASONS) + sum(len(t[3]) for t in TOPICS)
    return openings * (reasons + 1) * (len(OFFERS) + 1)


# --------------------------------------------------------------------------------------------------
# The recipe

#: Values of the fields added after the first recipe that reproduce it exactly: :meth:`AlignConfig.recipe`
#: leaves a field out while it has this value, so the first recipe keeps its name (and its cache).
LEGACY: dict[str, object] = {"refusals": "templates", "benign_temperature": 0.0, "benign_sources": (),
                             "filter_benign": False, "benign_loss": "answer", "dtype": "float32"}
#: The first recipe (preset ``smollm2-135m-safe-v1``, cache ``...-98a08e5a51c9``; the default until 2026-11-28):
#: 320 templated refusals, 243 benign instructions with greedy own answers, cross-entropy, lr 3e-4.
FIRST_RECIPE: dict[str, object] = {"n_harmful": 320, "n_benign": 300, "benign_max_new_tokens": 48,
                                   "lora": {"lr": 3e-4}, **LEGACY}
#: A candidate of 2026-11-28 (varied refusals, own answers sampled at T = 1): better perplexity, worse over-refusal
#: and sampled ASR (``benchmarks/results/2026-11-28-organism-recipe.txt``).
VARIED_RECIPE: dict[str, object] = {"n_harmful": 200, "n_benign": 320, "benign_max_new_tokens": 48,
                                    "lora": {"lr": 2e-4}, "refusals": "varied", "benign_temperature": 1.0,
                                    "benign_sources": ("olmo-questions",), "filter_benign": True,
                                    "benign_loss": "answer"}


class AlignConfig(FrozenConfig):
    """The alignment recipe; its hash names the cached organism's directory. The defaults are the recipe of
    2026-11-28 (the preset ``smollm2-135m-safe``): 200 refusals whose opening depends on the request, 320 benign
    prompts with the model's own greedy answers trained with cross-entropy plus the KL divergence from the base
    model, lr 2e-4 (``benchmarks/results/2026-11-28-organism-recipe.txt``, candidate C8). :data:`FIRST_RECIPE` is
    the earlier default (preset ``smollm2-135m-safe-v1``)."""

    base: str = Field("smollm2-135m", description="The model to align (preset, HF directory, .gguf, Hub id).")
    n_harmful: int = Field(200, gt=0, description="Harmful prompts (AdvBench training split) -> refusals.")
    n_benign: int = Field(320, gt=0, description=(
        "Benign prompts (benign training split + benign_sources) -> the model's own answers."))
    benign_max_new_tokens: int = Field(32, gt=0, description="Tokens generated per own benign answer.")
    generation_batch_size: int = Field(16, gt=0, description="Prompts per batch when generating the benign answers.")
    # Share of training examples rendered WITHOUT the template's default system prompt (an explicit empty
    # system message where the template injects one): refusals must not hinge on one system prompt, since
    # the paper's vanilla ASR is measured without a system prompt.
    no_system_prompt_share: float = Field(0.5, ge=0, le=1, description=(
        "Share (0 to 1, each example drawn by the seed) of training examples rendered without the template's "
        "default system prompt (an explicit empty one where the template injects it); the others get the default."))
    lora: LoraTrainConfig = LoraTrainConfig(lr=2e-4)
    seed: int = Field(0, description=(
        "Seed of the recipe's data: the split and draw of the prompts, the refusals, the sampled benign answers, the "
        "order of the training mix and which examples go without a system prompt; independent of the top-level "
        "seed (align.lora.seed seeds the training)."))
    refusals: Literal["templates", "varied", "determined"] = Field("determined", description=(
        "'varied': composed by varied_refusal (topic/verb/generic opening drawn at random, reason, offer); "
        "'determined': the same pool with the opening a function of the request (its topic's, else its verb's), so "
        "that greedy decoding keeps the variety; 'templates': the 8 fixed REFUSALS of the first recipe."))
    benign_temperature: float = Field(0.0, ge=0, description=(
        "Temperature of the model's own benign answers (0: greedy). Sampling at 1 keeps the model's distribution "
        "(the loss then estimates KL(base || model)); greedy answers sharpen it."))
    benign_sources: tuple[str, ...] = Field(("olmo-questions",), description=(
        "Extra benign sources (e.g. 'olmo-questions') whose prompts join the benign training split before the "
        "draw of n_benign; prompts of the held-out benign split and of the perplexity data (rho-benign) are "
        "excluded."))
    filter_benign: bool = Field(True, description=(
        "Drop own answers that the refusal-v1 judge calls a refusal or degenerate (empty, looping, garbled)."))
    benign_loss: Literal["answer", "kl", "answer+kl"] = Field("answer+kl", description=(
        "'answer': cross-entropy on the own answer's tokens; 'kl': at the own answer's positions, the KL divergence "
        "from the base model (the adapters switched off) to the trained one over the whole vocabulary "
        "(train_lora's distill): the base's whole distribution is kept, not one sample of it; 'answer+kl': both "
        "(per position the optimum puts half of the mass on the answer's token, half as the base does)."))

    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description=(
        "dtype of the base model while the recipe runs (its own answers, the training; the LoRA adapters stay "
        "float32) and of the saved aligned model. Part of the recipe: a bfloat16 organism has other weights."))

    @field_validator("lora", mode="before")
    @classmethod
    def _lora(cls, v: object) -> object:
        # settings given as a dict (config files, --lora-r) change only what they name: the recipe's lr stays
        if isinstance(v, dict):
            return {**cls.model_fields["lora"].default.to_dict(), **v}
        return v

    @field_validator("benign_sources")
    @classmethod
    def _benign_sources(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if "rho-benign" in v:
            raise ValueError("rho-benign holds the evaluation's perplexity data; it cannot be training data")
        return v

    def recipe(self) -> dict:
        """The recipe as recorded (in the organism's manifest) and hashed (:meth:`digest`). Trainer settings added
        after the first recipe (warm-up, schedule, gradient accumulation, checkpointing) and recipe fields added later
        (:data:`LEGACY`) enter only when they differ from the values that reproduce the earlier recipe exactly:
        an unchanged recipe keeps its name and its cache."""
        d = self.to_dict()
        lora_defaults = LoraTrainConfig().to_dict()
        for key in ("warmup_steps", "schedule", "grad_accumulation", "gradient_checkpointing"):
            if d["lora"][key] == lora_defaults[key]:
                del d["lora"][key]
        for key, value in LEGACY.items():
            if getattr(self, key) == value:
                del d[key]
        return d

    def digest(self) -> str:
        """Names the cached organism: a hash of :meth:`recipe`."""
        return sha256_json(self.recipe())[:12]


def benign_training_prompts(cfg: AlignConfig) -> list[Example]:
    """The benign training pool: the benign training split (:func:`benign_splits`) plus ``cfg.benign_sources``,
    without any prompt of the held-out benign split, of the perplexity data (rho-benign) or of the harmful
    evaluation split (compared with :func:`normalize_prompt`), deduplicated; then ``n_benign`` drawn by seed."""
    from .data.sources import SOURCES, benign_splits, harmful_splits, load_source, normalize_prompt

    train, held_out = benign_splits(seed=cfg.seed)
    if not cfg.benign_sources:
        return sample(train, cfg.n_benign, cfg.seed)  # the first recipe's draw, exactly
    banned = {normalize_prompt(e.prompt) for e in held_out + harmful_splits(seed=cfg.seed)[1] + load_source("rho-benign")}
    pool, seen = [], set(banned)
    for e in train + [x for name in cfg.benign_sources for x in _benign_source(name, SOURCES, load_source)]:
        key = normalize_prompt(e.prompt)
        if key not in seen:
            seen.add(key)
            pool.append(e)
    return sample(pool, cfg.n_benign, cfg.seed)


def _benign_source(name, sources, load_source) -> list[Example]:
    if name in sources and sources[name].kind != "benign":
        raise DataError(f"'{name}' is a {sources[name].kind} source, not a benign one")
    return load_source(name)


def alignment_examples(model, tokenizer, cfg: AlignConfig, *, progress: bool = True) -> list[Example]:
    """The training mix: harmful -> refusal, benign -> the model's own answer (sampled or greedy)."""
    from .data.sources import harmful_splits
    from .evaluation.generation import GenerationConfig, generate

    rng = random.Random(cfg.seed)
    harmful = sample(harmful_splits(seed=cfg.seed)[0], cfg.n_harmful, cfg.seed)
    if cfg.refusals == "templates":
        safety = [Example(e.prompt, rng.choice(REFUSALS), e.source, e.id) for e in harmful]
    else:
        determined = cfg.refusals == "determined"
        safety = [Example(e.prompt, varied_refusal(e.prompt, rng, determined=determined), e.source, e.id)
                  for e in harmful]
    benign = benign_training_prompts(cfg)
    gen = GenerationConfig(max_new_tokens=cfg.benign_max_new_tokens, batch_size=cfg.generation_batch_size,
                           seed=cfg.seed, temperature=cfg.benign_temperature)
    answers = generate(model, tokenizer, [e.prompt for e in benign], gen, progress=progress, desc="benign answers")
    keep = _keep_answer if cfg.filter_benign else (lambda a: bool(a.strip()))
    utility = [Example(e.prompt, a[0], e.source, e.id) for e, a in zip(benign, answers, strict=True) if keep(a[0])]
    mix = safety + utility
    rng.shuffle(mix)
    return mix


def _keep_answer(answer: str) -> bool:
    from .evaluation.judges import degenerate_reason, refusal_match

    return bool(answer.strip()) and degenerate_reason(answer) is None and refusal_match(answer) is None


def align_model(model, tokenizer, cfg: AlignConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Run the recipe on ``model`` (loaded from ``cfg.base``) and save the aligned Hugging Face model directory
    into ``out_dir`` (usable as ``--model`` everywhere); returns what it wrote and measured. The adapters are
    merged into ``model`` itself: afterwards it holds the aligned weights."""
    from .data.sources import harmful_splits
    from .evaluation.chat import no_system_prompt
    from .models import weight_fingerprint

    out_dir = Path(out_dir)
    data = alignment_examples(model, tokenizer, cfg, progress=progress)
    rng = random.Random(cfg.seed + 1)
    nosys = no_system_prompt(tokenizer)
    system_prompts = [nosys if rng.random() < cfg.no_system_prompt_share else None for _ in data]
    harmful_ids = {e.id for e in harmful_splits(seed=cfg.seed)[0]}
    distill = [e.id not in harmful_ids for e in data] if cfg.benign_loss != "answer" else None
    peft_model, hist = train_lora(model, tokenizer, data, cfg.lora, progress=progress, system_prompts=system_prompts,
                                  distill=distill, distill_answer_weight=1.0 if cfg.benign_loss == "answer+kl" else 0.0)
    merged = merge_lora(peft_model)
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    save_jsonl(out_dir / "alignment_data.jsonl", data)
    write_json(out_dir / "train_history.json", hist.to_dict())
    n_refusals = sum(e.id in harmful_ids for e in data)
    counts = {"harmful_refusal": n_refusals,
              "benign_own_answer": len(data) - n_refusals,
              "distinct_refusals": len({e.response for e in data if e.id in harmful_ids}),
              "without_default_system_prompt": sum(sp is not None for sp in system_prompts)}
    return {"model_weights": weight_fingerprint(merged), "alignment_data": sha256_json([e.to_dict() for e in data]),
            "counts": counts, "train_seconds": round(hist.seconds, 1), "final_loss": hist.loss[-1]}
