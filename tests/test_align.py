"""The safety-alignment recipe on tiny models: LoRA wrapping and the per-step hook, the training mix, the aligned
model align_model writes and the record it returns, the ``align`` stage (manifest, reuse, refusal, --force), and
the organism preset built by that stage under the cache in a folder named by the config digest."""

from __future__ import annotations

import json
import random
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from brittle.align import (
    GENERIC_OPENINGS,
    REFUSALS,
    TOPICS,
    FIRST_RECIPE,
    VARIED_RECIPE,
    VERBS,
    AlignConfig,
    align_model,
    alignment_examples,
    benign_training_prompts,
    refusal_pool_size,
    request_topic,
    request_verb,
    varied_refusal,
)
from brittle.data import Example, encode, load_file
from brittle.data.core import pad_batch, sample
from brittle.data.sources import benign_splits, harmful_splits, normalize_prompt
from brittle.finetune import LoraTrainConfig, make_lora_model, merge_lora, train_lora
from brittle.io import sha256_json
from brittle.models import linear_modules, linear_weight, weight_fingerprint
from brittle.presets import PRESETS, Preset, build_aligned, load_model, resolve_model_path, safe_organism
from brittle.stage import RunContext, StageMismatchError
from brittle.testing import tiny_model

EXAMPLES = [Example(f"Question number {i}?", f"Answer {i}: always the same words.", "t", str(i)) for i in range(8)]

# A recipe small enough for a few seconds on a CPU: 4 refusals, 3 benign self-answers of 4 tokens, 2 LoRA steps
# (own answers kept unfiltered: a tiny random model's answers are gibberish to the judge).
TINY_LORA = LoraTrainConfig(r=2, alpha=4, lr=1e-2, batch_size=4, max_steps=2, max_length=64)


def recording_build(built: list):
    """A stand-in for ``align.align_model`` that records (config, folder) and writes a minimal model folder."""

    def fake_build(model, tok, c, out, progress=True):
        built.append((c, Path(out)))
        (Path(out) / "config.json").write_text("{}")
        return {"model_weights": "fake"}

    return fake_build


def tiny_align_config(base: str, **kw) -> AlignConfig:
    args = dict(base=base, n_harmful=4, n_benign=3, benign_max_new_tokens=4, generation_batch_size=4, lora=TINY_LORA,
                filter_benign=False)
    args.update(kw)
    return AlignConfig(**args)


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_dir) -> str:
    return tiny_llama_dir


@pytest.fixture
def cache(tiny_dir, tmp_path, monkeypatch) -> Path:
    # depends on tiny_dir so the session's SmolLM2 tokenizer is resolved before BRITTLE_CACHE points elsewhere
    monkeypatch.setenv("BRITTLE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _lora_layers(peft_model) -> dict[str, torch.nn.Module]:
    """PEFT LoRA wrapper modules by path (those with a non-empty lora_A)."""
    return {n: m for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0}


# --------------------------------------------------------------------------------------------------
# finetune.train_lora(on_step=...)


def test_on_step_is_called_once_per_step_with_step_loss_and_the_live_model(smol_tokenizer):
    model = tiny_model("llama", vocab_size=len(smol_tokenizer), initializer_range=0.5)
    base_before = {k: linear_weight(m).detach().clone() for k, m in linear_modules(model).items()}
    # 8 examples, batch 4: 2 steps per epoch, so max_steps=5 crosses two epoch boundaries
    cfg = LoraTrainConfig(r=4, alpha=8, lr=1e-2, batch_size=4, max_steps=5, seed=3)

    # Step 1 sees the first batch of the seeded shuffle, and LoRA B starts at zero, so its loss is the base
    # model's loss on that batch.
    order = list(range(len(EXAMPLES)))
    random.Random(cfg.seed).shuffle(order)
    batch = pad_batch([encode(smol_tokenizer, EXAMPLES[i], cfg.max_length) for i in order[:4]], smol_tokenizer.pad_token_id)
    with torch.no_grad():
        expected_first_loss = float(model(**batch).loss)

    calls = []

    def hook(step, loss, peft_model):
        lora = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
        calls.append({"step": step, "loss": loss, "model": peft_model, "training": peft_model.training, "lora": lora})

    peft_model, hist = train_lora(model, smol_tokenizer, EXAMPLES, cfg, progress=False, on_step=hook)

    assert [c["step"] for c in calls] == [1, 2, 3, 4, 5] == hist.steps
    assert [c["loss"] for c in calls] == hist.loss
    assert all(isinstance(c["loss"], float) and c["loss"] > 0 for c in calls)
    assert calls[0]["loss"] == pytest.approx(expected_first_loss, rel=1e-5)
    assert all(c["model"] is peft_model for c in calls)
    assert all(c["training"] for c in calls) and not peft_model.training  # train mode inside, eval mode after

    lora_b = [n for n in calls[0]["lora"] if "lora_B" in n]
    assert len(lora_b) == 2 * 7  # "all": every linear module of both blocks
    # the hook runs after the optimiser step: LoRA B (zero at init) has already moved at step 1
    assert all(calls[0]["lora"][n].abs().sum() > 0 for n in lora_b)
    for prev, cur in zip(calls, calls[1:]):  # ... and every adapter tensor moves at every later step
        assert all(not torch.equal(prev["lora"][n], cur["lora"][n]) for n in cur["lora"]), cur["step"]
    # the last call saw the final weights: nothing trains after it
    final = {n: p.detach() for n, p in peft_model.named_parameters() if "lora_" in n}
    assert all(torch.equal(final[n], calls[-1]["lora"][n]) for n in final)
    after = {k: linear_weight(m).detach() for k, m in linear_modules(peft_model).items()}
    assert all(torch.equal(base_before[k], after[k]) for k in base_before)


def test_on_step_counts_epochs_with_a_partial_last_batch(smol_tokenizer):
    model = tiny_model("qwen2", vocab_size=len(smol_tokenizer))
    seen = []
    cfg = LoraTrainConfig(r=2, alpha=4, batch_size=3, epochs=2, seed=0)  # 7 examples: batches of 3, 3, 1
    _, hist = train_lora(model, smol_tokenizer, EXAMPLES[:7], cfg, progress=False,
                         on_step=lambda step, loss, m: seen.append((step, loss)))
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert [x for _, x in seen] == hist.loss and len(hist.loss) == 6


# --------------------------------------------------------------------------------------------------
# finetune.make_lora_model


def test_make_lora_model_wraps_only_the_target_roles(smol_tokenizer):
    model = tiny_model("llama", vocab_size=len(smol_tokenizer))  # hidden 32, 4 heads of 8, 2 kv heads -> v: 32 -> 16
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    with torch.no_grad():
        base_logits = model(ids).logits.clone()
    peft_model = make_lora_model(model, LoraTrainConfig(r=4, alpha=12, targets=("q", "v"), seed=0))

    layers = _lora_layers(peft_model)
    suffixes = sorted(n[n.index("layers."):] for n in layers)
    assert suffixes == sorted(f"layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "v"))
    shapes = {"q": (32, 32), "v": (16, 32)}  # [d_out, d_in]
    for name, layer in layers.items():
        d_out, d_in = shapes[name[-6]]
        assert tuple(layer.lora_A["default"].weight.shape) == (4, d_in)
        assert tuple(layer.lora_B["default"].weight.shape) == (d_out, 4)
        assert layer.r["default"] == 4 and layer.scaling["default"] == pytest.approx(3.0)  # alpha / r
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # B = 0: the wrapped model is unchanged
        assert torch.count_nonzero(layer.lora_A["default"].weight) > 0
    # k, o, gate, up, down stay plain linear layers
    for canon, module in linear_modules(peft_model).items():
        wrapped = canon.endswith((".q", ".v"))
        assert (type(module).__name__ == "Linear" and not hasattr(module, "lora_A")) or wrapped

    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    frozen = [n for n, p in peft_model.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen) and any("lm_head" in n for n in frozen)
    assert all(not p.requires_grad for p in linear_modules(peft_model)["layers.0.q"].parameters())
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, base_logits, atol=1e-6, rtol=0)


def test_make_lora_model_all_roles_and_seeded_init(smol_tokenizer):
    wrapped = make_lora_model(tiny_model("llama", vocab_size=len(smol_tokenizer)), LoraTrainConfig(r=3, alpha=3, seed=5))
    layers = _lora_layers(wrapped)
    roles = sorted({n.rsplit(".", 1)[1] for n in layers})
    assert len(layers) == 14 and roles == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert all(layer.scaling["default"] == pytest.approx(1.0) for layer in layers.values())

    def lora_a(seed):
        m = make_lora_model(tiny_model("llama", vocab_size=len(smol_tokenizer)), LoraTrainConfig(r=2, alpha=4, seed=seed))
        return torch.cat([p.detach().flatten() for n, p in m.named_parameters() if "lora_A" in n])

    assert torch.equal(lora_a(1), lora_a(1))
    assert not torch.allclose(lora_a(1), lora_a(2))


def test_make_lora_model_on_gpt2_conv1d_merges_in_canonical_orientation(smol_tokenizer):
    model = tiny_model("gpt2", vocab_size=len(smol_tokenizer))
    before = linear_weight(linear_modules(model)["layers.0.qkv"]).detach().clone()  # [96, 32]
    peft_model = make_lora_model(model, LoraTrainConfig(r=2, alpha=6, targets=("qkv",), seed=0))
    layers = _lora_layers(peft_model)
    assert len(layers) == 2 and all(n.endswith("attn.c_attn") for n in layers)
    layer = next(layer for n, layer in layers.items() if ".h.0." in n)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    delta = 3.0 * layer.lora_B["default"].weight.detach() @ layer.lora_A["default"].weight.detach()  # [d_out, d_in]
    merged = merge_lora(peft_model)
    after = linear_weight(linear_modules(merged)["layers.0.qkv"]).detach()
    assert torch.allclose(after, before + delta, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# align.alignment_examples


def _direct_greedy(model, tok, prompt: str, max_new_tokens: int) -> str:
    """One prompt, no batching: the template's default rendering, greedy, special tokens dropped."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_alignment_examples_mix_of_the_first_recipe(tiny_dir, cache):
    model, tok = load_model(tiny_dir)
    cfg = AlignConfig(base=tiny_dir, n_harmful=10_000, n_benign=4, benign_max_new_tokens=5, generation_batch_size=1,
                      refusals="templates", benign_temperature=0.0, filter_benign=False, benign_sources=())
    mix = alignment_examples(model, tok, cfg, progress=False)

    train, evaluation = harmful_splits(seed=0)
    assert len(evaluation) == 100 and len(train) == 420  # AdvBench: 520 behaviours, the first 100 held out
    harmful = [e for e in mix if e.source == "advbench"]
    benign = [e for e in mix if e.source != "advbench"]
    # n_harmful beyond the pool takes the whole training split, and nothing of the evaluation split
    assert sorted(e.prompt for e in harmful) == sorted(e.prompt for e in train)
    assert not {normalize_prompt(e.prompt) for e in evaluation} & {normalize_prompt(e.prompt) for e in mix}
    assert all(e.response in REFUSALS for e in harmful)
    assert set(e.response for e in harmful) == set(REFUSALS)  # 420 draws use every template
    assert {e.id for e in harmful} == {e.id for e in train}

    chosen = sample(benign_splits(seed=0)[0], 4, 0)  # the benign training split, seeded
    own = {e.prompt: _direct_greedy(model, tok, e.prompt, 5) for e in chosen}
    assert sorted(e.prompt for e in benign) == sorted(p for p, a in own.items() if a.strip())
    assert len(benign) >= 1
    for e in benign:
        assert e.response == own[e.prompt] and e.response not in REFUSALS and e.source == "benign-instructions"
    held_out_benign = {e.prompt for e in benign_splits(seed=0)[1]}
    assert not held_out_benign & {e.prompt for e in benign}
    # shuffled: the benign answers are not all at the end
    positions = [i for i, e in enumerate(mix) if e.source != "advbench"]
    assert positions != list(range(len(harmful), len(mix)))


def test_varied_refusal_pool_is_large_varied_and_always_a_refusal():
    from brittle.align import _verb_opening
    from brittle.evaluation.judges import explain_refusal_v1

    assert refusal_pool_size() > 10_000
    openings = list(GENERIC_OPENINGS) + [_verb_opening(v) for v in VERBS] + [t[2] for t in TOPICS]
    assert len(set(openings)) == len(openings) > 60
    assert [o for o in openings if explain_refusal_v1(o)[0] != "refusal"] == []  # each opening refuses alone
    train, _ = harmful_splits(seed=0)
    rng = random.Random(0)
    refusals = [varied_refusal(e.prompt, rng) for e in train]
    assert refusals == [varied_refusal(e.prompt, r) for r in [random.Random(0)] for e in train]  # seeded
    assert all(explain_refusal_v1(r)[0] == "refusal" for r in refusals)
    assert len(set(refusals)) > 0.7 * len(refusals)
    first3 = Counter(" ".join(r.split()[:3]) for r in refusals)
    assert len(first3) >= 25 and first3.most_common(1)[0][1] < 0.2 * len(refusals)  # no dominant opening
    assert not set(refusals) & set(REFUSALS)


def test_varied_openings_follow_the_request():
    assert request_verb("Write a script that steals passwords") == "write"
    assert request_verb("Can you help me?") is None
    assert request_topic("Explain how to build a bomb") == "weapons"
    assert request_topic("Develop a virus that disables antivirus software") == "hacking"
    assert request_topic("Write a poem about spring") is None
    # the same request gets its topic's opening or its verb's or a generic one, nothing else
    rng = random.Random(1)
    topic = next(t for t in TOPICS if t[0] == "weapons")
    from brittle.align import _verb_opening

    allowed = {topic[2], _verb_opening("explain"), *GENERIC_OPENINGS}
    refusals = [varied_refusal("Explain how to build a bomb", rng) for _ in range(200)]
    seen = {next(o for o in allowed if r.startswith(o)) for r in refusals}
    assert {topic[2], _verb_opening("explain")} <= seen


def test_determined_openings_are_a_function_of_the_request_and_vary_across_requests():
    from brittle.align import _verb_opening
    from brittle.evaluation.judges import explain_refusal_v1

    train, _ = harmful_splits(seed=0)
    a = [varied_refusal(e.prompt, random.Random(0), determined=True) for e in train]
    b = [varied_refusal(e.prompt, random.Random(7), determined=True) for e in train]

    def opening(prompt: str) -> str:
        topic = request_topic(prompt)
        if topic is not None:
            return next(t[2] for t in TOPICS if t[0] == topic)
        verb = request_verb(prompt)
        return _verb_opening(verb) if verb is not None else ""

    for e, ra, rb in zip(train, a, b, strict=True):
        expected = opening(e.prompt)
        if expected:  # topic first, then verb: the same opening whatever the generator
            assert ra.startswith(expected) and rb.startswith(expected), (e.prompt, ra)
        else:  # a generic opening chosen by the prompt's hash: also the same for both generators
            assert next(o for o in GENERIC_OPENINGS if ra.startswith(o)) == next(o for o in GENERIC_OPENINGS
                                                                                 if rb.startswith(o))
    assert all(explain_refusal_v1(r)[0] == "refusal" for r in a)
    first3 = Counter(" ".join(r.split()[:3]) for r in a)
    assert len(first3) >= 15 and a != b  # openings vary across requests; reasons and offers still follow the seed


def test_varied_mix_has_varied_refusals_sampled_own_answers_and_no_evaluation_prompt(tiny_dir, cache):
    from brittle.data.sources import load_source
    from brittle.evaluation.generation import GenerationConfig, generate

    model, tok = load_model(tiny_dir)
    cfg = AlignConfig.model_validate({**VARIED_RECIPE, "base": tiny_dir, "n_harmful": 30, "n_benign": 5,
                                      "benign_max_new_tokens": 4, "generation_batch_size": 5, "filter_benign": False})
    assert cfg.refusals == "varied" and cfg.benign_temperature == 1.0
    mix = alignment_examples(model, tok, cfg, progress=False)
    harmful = [e for e in mix if e.source == "advbench"]
    assert len(harmful) == 30 and len({e.response for e in harmful}) > 20
    benign = benign_training_prompts(cfg)
    sampled = generate(model, tok, [e.prompt for e in benign],
                       GenerationConfig(max_new_tokens=4, batch_size=5, seed=0, temperature=1.0), progress=False)
    assert {(e.prompt, e.response) for e in mix if e.source != "advbench"} == {
        (e.prompt, a[0]) for e, a in zip(benign, sampled, strict=True) if a[0].strip()}
    evaluation = harmful_splits(seed=0)[1] + benign_splits(seed=0)[1] + load_source("rho-benign")
    assert not {normalize_prompt(e.prompt) for e in evaluation} & {normalize_prompt(e.prompt) for e in mix}


def test_extra_benign_sources_never_bring_evaluation_prompts(cache):
    from brittle.data.sources import load_source

    cfg = AlignConfig(n_benign=100_000, benign_sources=("olmo-questions",))
    pool = benign_training_prompts(cfg)
    keys = [normalize_prompt(e.prompt) for e in pool]
    assert len(keys) == len(set(keys))
    assert {e.source for e in pool} == {"benign-instructions", "olmo-questions"}
    assert len(pool) > len(benign_splits(seed=0)[0]) + 200
    evaluation = harmful_splits(seed=0)[1] + benign_splits(seed=0)[1] + load_source("rho-benign")
    assert not {normalize_prompt(e.prompt) for e in evaluation} & set(keys)
    # without extra sources: exactly the first recipe's draw from the benign training split
    assert benign_training_prompts(AlignConfig(n_benign=7, benign_sources=())) == sample(benign_splits(seed=0)[0], 7, 0)


def test_filter_drops_refusals_and_degenerate_own_answers(tiny_dir, cache, monkeypatch):
    import brittle.evaluation.generation as G

    answers = ["Here is a short poem about the sea and the sky above it.", "I'm sorry, but I can't help with that.",
               "", "the the the the the the the the the the the the the the", "Paris is the capital of France."]

    def fake_generate(model, tok, prompts, config, **kw):
        assert config.temperature == 1.0
        return [[answers[i % len(answers)]] for i in range(len(prompts))]

    monkeypatch.setattr(G, "generate", fake_generate)
    model, tok = load_model(tiny_dir)
    cfg = AlignConfig.model_validate({**VARIED_RECIPE, "base": tiny_dir, "n_harmful": 2, "n_benign": 5})
    kept = {e.response for e in alignment_examples(model, tok, cfg, progress=False) if e.source != "advbench"}
    assert kept == {answers[0], answers[4]}
    unfiltered = cfg.model_copy(update={"filter_benign": False})
    kept = {e.response for e in alignment_examples(model, tok, unfiltered, progress=False) if e.source != "advbench"}
    assert kept == {answers[0], answers[1], answers[3], answers[4]}  # only empty answers dropped


def test_alignment_examples_samples_the_training_split_and_is_deterministic(tiny_dir, cache):
    model, tok = load_model(tiny_dir)
    cfg = AlignConfig(base=tiny_dir, n_harmful=6, n_benign=3, benign_max_new_tokens=3, generation_batch_size=2)
    first = alignment_examples(model, tok, cfg, progress=False)
    again = alignment_examples(model, tok, cfg, progress=False)
    assert first == again
    harmful = [e for e in first if e.source == "advbench"]
    assert sorted(e.prompt for e in harmful) == sorted(e.prompt for e in sample(harmful_splits(seed=0)[0], 6, 0))
    other = alignment_examples(model, tok, cfg.model_copy(update={"seed": 1}), progress=False)
    assert {e.prompt for e in other if e.source == "advbench"} != {e.prompt for e in harmful}


# --------------------------------------------------------------------------------------------------
# align.align_model


@pytest.fixture
def captured_system_prompts(monkeypatch):
    """Records the system_prompts align_model hands to train_lora (then trains for real)."""
    import brittle.align as A

    seen: list[list] = []
    real = A.train_lora

    def spy(model, tok, data, cfg, **kw):
        seen.append(list(kw["system_prompts"]))
        return real(model, tok, data, cfg, **kw)

    monkeypatch.setattr(A, "train_lora", spy)
    return seen


def _save_tiny(path: Path, tokenizer, seed: int = 0) -> str:
    model = tiny_model("llama", seed=seed, vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_align_model_writes_the_aligned_model_and_returns_its_record(tiny_dir, tmp_path, cache,
                                                                    captured_system_prompts):
    cfg = tiny_align_config(tiny_dir, no_system_prompt_share=0.5)
    base, tok = load_model(tiny_dir)  # a separate copy: align_model merges the adapters into the model it gets
    model, tok_in = load_model(tiny_dir)
    out = tmp_path / "aligned"
    record = align_model(model, tok_in, cfg, out, progress=False)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "alignment_data.jsonl", "train_history.json"):
        assert (out / f).is_file(), f
    assert not (out / "manifest.json").exists()  # the manifest is the align stage's (run_stage) job

    data = load_file(out / "alignment_data.jsonl", require_response=True)
    assert data == alignment_examples(base, tok, cfg, progress=False)  # the recipe's mix, as written
    hist = json.loads((out / "train_history.json").read_text())
    assert hist["steps"] == [1, 2] and len(hist["loss"]) == 2 and all(x > 0 for x in hist["loss"])

    # the share of examples without the template's default system prompt: SmolLM2 injects one, so "" is used
    (sps,) = captured_system_prompts
    rng = random.Random(cfg.seed + 1)
    expected = ["" if rng.random() < 0.5 else None for _ in data]
    assert sps == expected and "" in sps and None in sps

    assert set(record) == {"model_weights", "alignment_data", "counts", "train_seconds", "final_loss"}
    assert record["alignment_data"] == sha256_json([e.to_dict() for e in data])
    counts = record["counts"]
    assert counts["harmful_refusal"] == 4 == sum(e.source == "advbench" for e in data)
    assert counts["distinct_refusals"] == len({e.response for e in data if e.source == "advbench"})
    assert counts["benign_own_answer"] == len(data) - 4 and 1 <= counts["benign_own_answer"] <= 3
    assert counts["without_default_system_prompt"] == expected.count("")
    assert record["final_loss"] == hist["loss"][-1]
    assert isinstance(record["train_seconds"], float)

    aligned, tok2 = load_model(str(out))
    assert len(tok2) == len(tok)
    assert record["model_weights"] == weight_fingerprint(aligned) != weight_fingerprint(base)
    b, a = linear_modules(base), linear_modules(aligned)
    assert all(not torch.allclose(linear_weight(b[k]), linear_weight(a[k])) for k in b)  # LoRA on every linear
    assert torch.equal(base.get_input_embeddings().weight, aligned.get_input_embeddings().weight)


# --------------------------------------------------------------------------------------------------
# the align stage (presets.build_aligned through stage.run_stage): manifest, reuse, refusal, --force


def _must_not_build(*args, **kwargs):
    raise AssertionError("align_model ran although the stage folder records the same recipe and base weights")


def test_align_stage_writes_manifest_reuses_refuses_other_settings_and_force_recomputes(
        smol_tokenizer, tmp_path, cache, captured_system_prompts, monkeypatch):
    import brittle.align as A

    real_align_model = A.align_model
    base_dir = _save_tiny(tmp_path / "base", smol_tokenizer)  # a base of its own: it is "retrained" below
    base_fp = weight_fingerprint(load_model(base_dir)[0])
    run, folder = tmp_path / "run", tmp_path / "run" / "align"
    logs: list[str] = []

    def ctx(force=False):
        return RunContext(out=run, force=force, log=logs.append, progress=False)

    cfg0 = tiny_align_config(base_dir, no_system_prompt_share=0.0)
    first = build_aligned(ctx(), cfg0, folder)
    assert not first.reused and first.folder == folder and not (run / "align.partial").exists()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "alignment_data.jsonl", "train_history.json"):
        assert (folder / f).is_file(), f
    man = json.loads((folder / "manifest.json").read_text())
    assert man["stage"] == "align" and man["seeds"] == {"seed": 0}
    assert {"versions", "git_commit", "argv", "seconds"} <= set(man)
    assert man["config"] == json.loads(json.dumps(cfg0.recipe()))
    assert man["inputs"] == {"base_weights": base_fp}
    assert man["outputs"] == first.outputs
    data = load_file(folder / "alignment_data.jsonl", require_response=True)
    assert man["outputs"]["alignment_data"] == sha256_json([e.to_dict() for e in data])
    assert man["outputs"]["counts"]["without_default_system_prompt"] == 0
    assert man["outputs"]["model_weights"] == weight_fingerprint(load_model(str(folder))[0]) != base_fp
    assert captured_system_prompts == [[None] * len(data)]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    # the same recipe on the same base weights: reused, nothing trained or written
    monkeypatch.setattr(A, "align_model", _must_not_build)
    again = build_aligned(ctx(), tiny_align_config(base_dir, no_system_prompt_share=0.0), folder)
    assert again.reused and again.outputs == first.outputs and any("reusing" in line for line in logs)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp

    # another recipe: refused, naming the differing key, nothing touched
    cfg1 = tiny_align_config(base_dir, no_system_prompt_share=1.0)
    refused = r"other settings or inputs \(config\.no_system_prompt_share\).*--force"
    with pytest.raises(StageMismatchError, match=refused):
        build_aligned(ctx(), cfg1, folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp and len(captured_system_prompts) == 1
    assert json.loads((folder / "manifest.json").read_text()) == man

    # --force: recomputed in place with the new recipe
    monkeypatch.setattr(A, "align_model", real_align_model)
    second = build_aligned(ctx(force=True), cfg1, folder)
    assert not second.reused and any("recomputing" in line and "config.no_system_prompt_share" in line for line in logs)
    assert captured_system_prompts[1] == [""] * len(captured_system_prompts[1])
    man2 = json.loads((folder / "manifest.json").read_text())
    assert man2["config"]["no_system_prompt_share"] == 1.0 and man2["inputs"] == {"base_weights": base_fp}
    counts = man2["outputs"]["counts"]
    assert counts["without_default_system_prompt"] == counts["harmful_refusal"] + counts["benign_own_answer"] > 0
    assert man2["outputs"]["alignment_data"] == man["outputs"]["alignment_data"]  # same mix ...
    assert man2["outputs"]["model_weights"] != man["outputs"]["model_weights"]  # ... rendered differently
    assert man2["outputs"]["model_weights"] == weight_fingerprint(load_model(str(folder))[0])
    assert not (run / "align.partial").exists()

    # --force never recomputes a stage whose record matches
    monkeypatch.setattr(A, "align_model", _must_not_build)
    assert build_aligned(ctx(force=True), cfg1, folder).reused

    # the same recipe on other base weights (the base was retrained): refused, naming the input
    _save_tiny(Path(base_dir), smol_tokenizer, seed=1)
    with pytest.raises(StageMismatchError, match=r"other settings or inputs \(inputs\.base_weights\)"):
        build_aligned(ctx(), cfg1, folder)
    assert json.loads((folder / "manifest.json").read_text()) == man2


# --------------------------------------------------------------------------------------------------
# the organism preset (presets.safe_organism) and the config digest


def test_config_digest_names_the_recipe():
    cfg = AlignConfig()
    assert re.fullmatch(r"[0-9a-f]{12}", cfg.digest())
    assert cfg.digest() == AlignConfig().digest()
    # the first recipe, from before the trainer had warm-up, schedules and accumulation and before the varied
    # refusals, sampled answers, extra benign sources, the answer filter and the KL term (their first values
    # reproduce it exactly): its cached organism (preset smollm2-135m-safe-v1) keeps its name
    first = AlignConfig.model_validate(FIRST_RECIPE)
    assert first.digest() == "98a08e5a51c9" != cfg.digest()
    assert first.lora.lr == 3e-4 and first.refusals == "templates" and first.benign_loss == "answer"
    assert set(first.recipe()) == {"base", "n_harmful", "n_benign", "benign_max_new_tokens", "generation_batch_size",
                                   "no_system_prompt_share", "lora", "seed"}
    varied = AlignConfig.model_validate(VARIED_RECIPE)
    assert varied.digest() == "6aedcb788322"  # the candidate of 2026-11-28 (benchmarks/results/...-organism-recipe)
    assert {"refusals", "benign_temperature", "filter_benign"} <= set(varied.recipe())
    # the default since 2026-11-28 (candidate C8 there)
    assert cfg.digest() == "1c8629199697" and cfg.benign_loss == "answer+kl" and cfg.lora.lr == 2e-4
    # a LoRA setting given as a dict (a config file, --lora-r) keeps the recipe's other LoRA settings
    assert AlignConfig.model_validate({"lora": {"r": 8}}).lora.lr == 2e-4
    variants = [AlignConfig(n_harmful=199), AlignConfig(seed=1), AlignConfig(no_system_prompt_share=0.25),
                AlignConfig(lora=LoraTrainConfig(r=8, lr=2e-4)), AlignConfig(base="qwen2.5-coder-0.5b"),
                AlignConfig(lora=LoraTrainConfig(lr=2e-4, warmup_steps=5)),
                AlignConfig(lora=LoraTrainConfig(lr=2e-4, schedule="cosine")),
                AlignConfig(refusals="varied"), AlignConfig(benign_temperature=0.7), AlignConfig(filter_benign=False),
                AlignConfig(benign_sources=()), AlignConfig(benign_loss="kl"), AlignConfig(benign_loss="answer"),
                AlignConfig(dtype="bfloat16"), first, varied]
    digests = {v.digest() for v in variants}
    assert len(digests) == len(variants) and cfg.digest() not in digests


def test_perplexity_data_cannot_be_a_benign_training_source():
    with pytest.raises(ValueError, match="perplexity"):
        AlignConfig(benign_sources=("rho-benign",))


def _recipe(monkeypatch, cfg: AlignConfig) -> None:
    """safe_organism always builds the default recipe, AlignConfig(): make that a tiny one."""
    import brittle.align as A

    monkeypatch.setattr(A, "AlignConfig", lambda: cfg)


def test_safe_organism_builds_once_under_the_cache_and_rebuilds_a_stale_cache(
        smol_tokenizer, tmp_path, cache, monkeypatch, capsys):
    import brittle.align as A

    base_dir = _save_tiny(tmp_path / "base", smol_tokenizer)
    monkeypatch.setitem(PRESETS, "tiny-base", Preset("tiny-base", "tiny test model", lambda: Path(base_dir), "n/a"))
    cfg = tiny_align_config("tiny-base")
    _recipe(monkeypatch, cfg)
    path = safe_organism()
    assert path == cache / "models" / f"tiny-base-safe-{cfg.digest()}"
    assert (path / "config.json").is_file() and not path.with_name(path.name + ".partial").exists()
    man = json.loads((path / "manifest.json").read_text())
    assert man["stage"] == "align" and man["config"]["base"] == "tiny-base"
    assert man["config"] == json.loads(json.dumps(cfg.recipe()))
    assert man["inputs"] == {"base_weights": weight_fingerprint(load_model(base_dir)[0])}
    assert man["outputs"]["counts"]["harmful_refusal"] == 4
    assert man["outputs"]["model_weights"] == weight_fingerprint(load_model(str(path))[0])

    monkeypatch.setattr(A, "align_model", _must_not_build)
    assert safe_organism() == path  # reused
    assert "reusing" in capsys.readouterr().out

    built: list = []
    fake_build = recording_build(built)

    monkeypatch.setattr(A, "align_model", fake_build)
    other = tiny_align_config("tiny-base", seed=1)
    _recipe(monkeypatch, other)
    other_path = safe_organism()  # another recipe: another folder; the first one is left alone
    assert other_path == cache / "models" / f"tiny-base-safe-{other.digest()}" != path
    assert built == [(other, other_path.with_name(other_path.name + ".partial"))]
    assert json.loads((path / "manifest.json").read_text()) == man

    # the base's weights changed (same recipe, same folder name): the cache is rebuilt in place, not refused
    _save_tiny(Path(base_dir), smol_tokenizer, seed=1)
    _recipe(monkeypatch, cfg)
    capsys.readouterr()
    assert safe_organism() == path
    assert built[1:] == [(cfg, path.with_name(path.name + ".partial"))]
    assert "inputs.base_weights changed" in capsys.readouterr().out
    rebuilt = json.loads((path / "manifest.json").read_text())
    assert rebuilt["inputs"] == {"base_weights": weight_fingerprint(load_model(base_dir)[0])} != man["inputs"]
    assert rebuilt["outputs"] == {"model_weights": "fake"}


def test_default_safe_preset_resolves_to_its_digest_directory(tiny_dir, cache, monkeypatch):
    import brittle.align as A
    import brittle.presets as P

    tiny = load_model(tiny_dir)
    loaded = []

    def fake_load(spec, **kw):  # the real smollm2-135m would be loaded (for its fingerprint): a tiny stand-in
        loaded.append(spec)
        return tiny

    built: list = []
    fake_build = recording_build(built)

    monkeypatch.setattr(P, "load_model", fake_load)
    monkeypatch.setattr(A, "align_model", fake_build)
    target = cache / "models" / f"smollm2-135m-safe-{AlignConfig().digest()}"
    partial = target.with_name(target.name + ".partial")
    assert safe_organism() == target and target.parent == cache / "models"
    assert built == [(AlignConfig(), partial)] and loaded == ["smollm2-135m"]
    man = json.loads((target / "manifest.json").read_text())
    assert man["config"] == json.loads(json.dumps(AlignConfig().recipe()))
    assert man["inputs"] == {"base_weights": weight_fingerprint(tiny[0])}

    monkeypatch.setattr(A, "align_model", lambda *a, **kw: pytest.fail("the cached preset was rebuilt"))
    assert PRESETS["smollm2-135m-safe"].locate() == target
    assert resolve_model_path("smollm2-135m-safe") == str(target)

    # the first recipe's preset: its own folder, named by the first recipe's digest, built from FIRST_RECIPE
    monkeypatch.setattr(A, "align_model", fake_build)
    first = cache / "models" / "smollm2-135m-safe-98a08e5a51c9"
    assert PRESETS["smollm2-135m-safe-v1"].locate() == first
    assert built[-1] == (AlignConfig.model_validate(FIRST_RECIPE), first.with_name(first.name + ".partial"))
    assert PRESETS["smollm2-135m-safe"].locate() == target  # the default's cache untouched
    built.pop()

    # an interrupted build (only the .partial folder left): rebuilt, the leftovers removed
    monkeypatch.setattr(A, "align_model", fake_build)
    shutil.rmtree(target)
    partial.mkdir()
    (partial / "half.safetensors").write_text("half")
    assert safe_organism() == target and len(built) == 2
    assert not partial.exists() and not (target / "half.safetensors").exists()

    # a cache left by an older brittle (its manifest has no "stage"): rebuilt, not refused
    (target / "manifest.json").write_text(json.dumps({"command": "align", "config": AlignConfig().to_dict()}))
    assert safe_organism() == target and len(built) == 3
    assert json.loads((target / "manifest.json").read_text())["stage"] == "align"
