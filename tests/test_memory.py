"""Memory planning (brittle.memory): exact shapes from configs on the meta device (135M to 70B), the estimate's
parts, and where the scoring accumulators go."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig

from brittle.memory import (
    HEADROOM,
    GiB,
    ModelShape,
    estimate_finetune,
    estimate_generation,
    estimate_scoring,
    generation_batch_size,
    kv_cache_bytes,
    describe,
    plan_scoring,
)
from brittle.models import linear_modules, linear_weight
from brittle.scoring.compute import pack_passes
from brittle.testing import TINY_ARCHS, tiny_config, tiny_model

PUBLIC = {  # Llama-family shapes of public models and their parameter counts
    "smollm2-135m": (dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True), 134_515_008),
    "llama2-7b": (dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000), 6_738_415_616),
    "llama2-13b": (dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000), 13_015_864_320),
    "llama3-70b": (dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256), 70_553_706_496),
}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_shapes_from_the_config_equal_the_instantiated_model(arch):
    cfg = tiny_config(arch)
    model = tiny_model(arch)
    shape = ModelShape.of(cfg)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert list(shape.linear_shapes) == [tuple(linear_weight(m).shape) for m in linear_modules(model).values()]
    assert shape == ModelShape.of_model(model)


@pytest.mark.parametrize("name", list(PUBLIC))
def test_public_model_sizes(name):
    fields, params = PUBLIC[name]
    assert ModelShape.of(LlamaConfig(**fields)).params == params


def test_estimate_parts_and_plans():
    shape = ModelShape.of(LlamaConfig(**PUBLIC["llama2-7b"][0]))
    snip = estimate_scoring(shape, dtype="bfloat16", method="snip", batch_size=8, max_length=512)
    assert snip.weights == 2 * shape.params and snip.accumulators == 4 * shape.linear_params
    wanda = estimate_scoring(shape, dtype="bfloat16", method="wanda", batch_size=8, max_length=512)
    assert wanda.accumulators == 4 * sum(i for _, i in shape.linear_shapes) and wanda.logits == 0
    assert estimate_scoring(shape, dtype="bfloat16", method="snip", batch_size=8, max_length=512, fused=True).workspace == 0
    lora = estimate_finetune(shape, dtype="bfloat16", batch_size=4, max_length=512, rank=8)
    assert lora.training_state == 16 * 8 * sum(o + i for o, i in shape.linear_shapes)
    fp32 = estimate_finetune(shape, dtype="float32", batch_size=4, max_length=512, rank=8)
    casts = 4 * 4 * 512 * sum(i for _, i in shape.linear_shapes)  # PEFT's fp32 copies of a bf16 model's inputs
    assert lora.activations == fp32.activations // 2 + casts
    # the H200 measurement (random Llama-2-7B shapes, vocabulary 49152, 4 x 512): 31,495 MiB = 30.8 GiB peak
    h200 = ModelShape.of(LlamaConfig(**{**PUBLIC["llama2-7b"][0], "vocab_size": 49152}))
    assert estimate_finetune(h200, dtype="bfloat16", batch_size=4, max_length=512).total / GiB == pytest.approx(30.8, rel=0.1)
    full = estimate_finetune(shape, dtype="bfloat16", batch_size=4, max_length=512, full=True)
    assert full.training_state == 3 * 2 * shape.params

    sizes = shape.accumulator_bytes("snip")
    one = plan_scoring(snip, 80 * GiB, sizes)  # 7B bf16 SNIP, 8 x 512: fits one 80 GB GPU
    assert one.placement == "device" and one.n_passes == 1 and snip.total < 0.9 * 80 * GiB
    split = plan_scoring(snip, 48 * GiB, sizes)
    assert split.placement == "passes" and split.n_passes >= 2
    assert split.n_passes == len(pack_passes(sizes, split.max_accumulator_bytes))
    assert snip.total - snip.accumulators + split.max_accumulator_bytes <= 0.9 * 48 * GiB
    big = ModelShape.of(LlamaConfig(**PUBLIC["llama3-70b"][0]))
    est = estimate_scoring(big, dtype="bfloat16", method="snip", batch_size=8, max_length=512)
    assert plan_scoring(est, 80 * GiB, big.accumulator_bytes("snip")).placement == "does not fit"
    assert "device-map auto" in plan_scoring(est, 80 * GiB, big.accumulator_bytes("snip")).describe()


def test_host_accumulators_are_chosen_when_cheaper_than_the_extra_passes():
    """13B bf16 SNIP (47 GiB of fp32 accumulators) needs 2 passes on an 80 GB GPU and 22 on a 48 GB one; with the
    accumulators in host memory it is one pass whose cost per batch is moving them there. The plan compares
    (n - 1) pass times with that move."""
    shape = ModelShape.of(LlamaConfig(**PUBLIC["llama2-13b"][0]))
    est = estimate_scoring(shape, dtype="bfloat16", method="snip", batch_size=4, max_length=512, fused=True)
    sizes = shape.accumulator_bytes("snip")
    acc = sum(sizes)
    rates = dict(host_bytes=256 * GiB, pass_seconds_per_batch=1.5, host_bytes_per_second=25e9)  # move: ~2 s
    small_gpu = plan_scoring(est, 48 * GiB, sizes)
    assert small_gpu.placement == "passes" and small_gpu.n_passes > 10 and small_gpu.seconds_per_batch is None
    host = plan_scoring(est, 48 * GiB, sizes, **rates)
    assert host.placement == "host" and host.max_accumulator_bytes is None
    assert host.seconds_per_batch == {"passes": (small_gpu.n_passes - 1) * 1.5, "host": acc / 25e9}
    assert "CPU memory" in host.describe() and f"{small_gpu.n_passes} passes" in host.describe()
    # one extra pass (1.5 s) is cheaper than the move (~2 s): passes
    big_gpu = plan_scoring(est, 80 * GiB, sizes, **rates)
    assert big_gpu.placement == "passes" and big_gpu.n_passes == 2 and big_gpu.seconds_per_batch["host"] > 1.5
    # too little host memory, or no measurement: passes
    assert plan_scoring(est, 48 * GiB, sizes, **{**rates, "host_bytes": 48 * GiB}).placement == "passes"
    assert plan_scoring(est, 48 * GiB, sizes, host_bytes=256 * GiB).placement == "passes"
    # when everything fits, nothing is compared
    assert plan_scoring(est, 141 * GiB, sizes, **rates).placement == "device"


def test_measured_rates_are_positive_and_plausible():
    import torch

    from brittle.memory import measure_rates

    flops, host = measure_rates(torch.device("cpu"), torch.float32, repeats=1)
    assert 1e8 < flops < 1e14 and 1e7 < host < 1e12  # a CPU core does 1-100 GFLOP/s and copies GB/s


def test_scores_stage_plans_on_the_loaded_model(smol_tokenizer):
    from brittle.config import load_config
    from brittle.pipeline import scoring_memory_plan

    model = tiny_model("llama", vocab_size=len(smol_tokenizer))
    plan = scoring_memory_plan(model, load_config())
    assert plan.placement == "device" and "estimated peak memory" in plan.describe()


# --------------------------------------------------------------------------------------------------
# Generation batches sized to memory


@pytest.mark.parametrize("arch,extra", [(a, {}) for a in TINY_ARCHS] + [("llama", {"head_dim": 16})])
def test_kv_cache_estimate_equals_the_cache_a_forward_pass_keeps(arch, extra):
    """``kv_dim`` = key/value heads x head dim: the estimate equals the bytes of the cache transformers builds.
    Catches query heads counted instead of key/value heads (4 against 2 here) and a head dim taken as
    hidden / heads where the config sets its own (the ``head_dim=16`` case)."""
    model = tiny_model(arch, **extra)
    n, t = 3, 11
    cache = model(input_ids=torch.randint(3, 500, (n, t)), use_cache=True).past_key_values
    kept = sum(x.numel() * x.element_size() for layer in cache.layers for x in (layer.keys, layer.values))
    assert kept == kv_cache_bytes(ModelShape.of_model(model), dtype="float32", sequences=n, tokens=t)


def test_kv_cache_of_public_models():
    """The widely quoted figures: 0.5 MiB per token for Llama-2-7B (no GQA), 0.3125 MiB for Llama-3-70B (8 key/value
    heads of 64), in bf16."""
    per_token = {name: kv_cache_bytes(ModelShape.of(LlamaConfig(**PUBLIC[name][0])), dtype="bfloat16", sequences=1,
                                      tokens=1) for name in ("llama2-7b", "llama3-70b")}
    assert per_token == {"llama2-7b": 2**19, "llama3-70b": 320 * 2**10}


def test_generation_batch_is_the_largest_that_fits():
    shape = ModelShape.of(LlamaConfig(**PUBLIC["llama2-7b"][0]))
    kw = dict(dtype="bfloat16", prompt_length=256, max_new_tokens=64)

    def extra(b: int, samples: int = 1) -> int:
        est = estimate_generation(shape, batch_size=b, num_samples=samples, **kw)
        return est.total - est.weights

    free = 40 * GiB
    b = generation_batch_size(shape, free_bytes=free, **kw)
    assert extra(b) <= HEADROOM * free < extra(b + 1)
    assert extra(1) > kv_cache_bytes(shape, dtype="bfloat16", sequences=1, tokens=320) == 160 * 2**20
    b3 = generation_batch_size(shape, free_bytes=free, num_samples=3, **kw)
    assert extra(b3, 3) <= HEADROOM * free < extra(b3 + 1, 3) and b3 == b // 3
    assert generation_batch_size(shape, free_bytes=2**20, **kw) == 0
    assert generation_batch_size(shape, free_bytes=10**15, **kw) == 512
    assert generation_batch_size(shape, free_bytes=10**15, limit=64, **kw) == 64


def test_auto_generation_batch_size(smol_tokenizer):
    """``batch_size="auto"``: 32 off a GPU (at most the prompts), else the estimate's largest batch for the longest
    rendered prompt against the free memory (``free_bytes`` stands in for the GPU's); the answers equal those of the
    same batch size given as a number; the config accepts "auto" and numbers, refuses 0."""
    from brittle.data.core import render_prompt
    from brittle.evaluation.config import EvalConfig
    from brittle.evaluation.generation import GenerationConfig, auto_batch_size, generate

    tok = smol_tokenizer
    model = tiny_model("llama", vocab_size=len(tok))
    prompts = [f"Tell me about the number {i}." + " Please." * (3 * i) for i in range(5)]
    cfg = GenerationConfig(max_new_tokens=4, batch_size="auto", temperature=1.0, num_samples=2)
    texts = [render_prompt(tok, p, None) for p in prompts]
    assert auto_batch_size(model, tok, texts, cfg) == 5
    longest = max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    one = estimate_generation(ModelShape.of_model(model), dtype="float32", batch_size=1, prompt_length=longest,
                              max_new_tokens=4, num_samples=2)
    per_prompt = one.total - one.weights
    assert auto_batch_size(model, tok, texts, cfg, free_bytes=int(2.5 * per_prompt / HEADROOM)) == 2
    assert auto_batch_size(model, tok, texts, cfg, free_bytes=int(1.5 * per_prompt / HEADROOM)) == 1
    assert auto_batch_size(model, tok, texts, cfg, free_bytes=1) == 1  # never below one prompt
    told = []
    assert generate(model, tok, prompts, cfg, progress=False, on_batch_size=told.append) == generate(
        model, tok, prompts, replace(cfg, batch_size=5), progress=False, on_batch_size=told.append)
    assert told == [5]  # the size chosen, told once; a size given as a number is not "chosen"
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, tok, prompts, replace(cfg, batch_size=0), progress=False)
    assert [EvalConfig(batch_size=v).batch_size for v in ("auto", "64", 8)] == ["auto", 64, 8]
    with pytest.raises(ValueError, match=">= 1"):
        EvalConfig(batch_size=0)


def test_finetune_estimate_with_checkpointing_and_tracking():
    """Fine-tuning and SNIP: gradient checkpointing keeps each layer's input plus one layer's activations (and one layer's fp32 input
    casts); a drift tracker adds 20 bytes per tracked entry; a total over 90 % of the device is flagged."""
    shape = ModelShape.of(LlamaConfig(**PUBLIC["llama2-7b"][0]))
    kw = dict(dtype="bfloat16", batch_size=4, max_length=512)
    plain = estimate_finetune(shape, **kw)
    ckpt = estimate_finetune(shape, gradient_checkpointing=True, tracked_entries=10**9, **kw)
    casts = 4 * 4 * 512 * sum(i for _, i in shape.linear_shapes)
    layer = 2 * 4 * 512 * (10 * 4096 + 4 * 11008)
    assert plain.activations == 32 * layer + casts
    assert ckpt.activations == 2 * 4 * 512 * 32 * 4096 + layer + casts // 32
    assert ckpt.tracking == 20 * 10**9 and ckpt.total - ckpt.tracking < plain.total
    snip = estimate_scoring(shape, dtype="bfloat16", method="snip", batch_size=8, max_length=512)
    snip_ckpt = estimate_scoring(shape, dtype="bfloat16", method="snip", batch_size=8, max_length=512,
                                 gradient_checkpointing=True)
    assert snip_ckpt.activations == 2 * 8 * 512 * 32 * 4096 + 2 * layer and snip.activations == 64 * layer
    assert describe(plain, 80 * GiB).startswith("estimated peak memory: weights 12.55 GiB")
    assert "out-of-memory" not in describe(plain, 80 * GiB) and "out-of-memory" in describe(plain, 16 * GiB)
