"""Memory planning (brittle.memory): exact shapes from configs on the meta device (135M to 70B), the estimate's
parts, and where the scoring accumulators go."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from brittle.memory import GiB, ModelShape, estimate_finetune, estimate_scoring, plan_scoring
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
