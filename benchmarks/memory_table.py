"""The README's memory-planning table: brittle.memory's estimates for public model shapes against an 80 GB GPU
(configs built on the meta device: exact parameter counts, no weights; no GPU needed).

    .venv/bin/python benchmarks/memory_table.py

SNIP in bf16 with batches of 8 x 512 tokens, without and with gradient checkpointing; LoRA r 8 on every linear module with micro-batches of 4 x 512, without
and with gradient checkpointing; generation with batch_size="auto" for prompts of 256 tokens and 64 new tokens.
"""

from __future__ import annotations

from transformers import LlamaConfig

from brittle.memory import (
    GiB,
    ModelShape,
    estimate_finetune,
    estimate_scoring,
    generation_batch_size,
    kv_cache_bytes,
    plan_scoring,
)

SHAPES = {  # Llama-family configs of public models
    "SmolLM2-135M": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "Llama-3.2-1B": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "Llama-2-7B": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "Llama-2-13B": dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000),
    "Llama-3-70B": dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256),
}
DEVICE = 80 * GiB


def gib(x: int) -> str:
    return f"{x / GiB:.1f}"


def describe_plan(plan) -> str:
    return {"device": "one pass", "passes": f"{plan.n_passes} passes"}.get(plan.placement, plan.placement)


def main() -> None:
    print("| model | parameters | weights GiB | SNIP accumulators GiB | SNIP activations GiB | SNIP total GiB | SNIP on "
          "80 GB | with checkpointing | LoRA total GiB | with checkpointing | KV cache per token | generation batch "
          "(auto) on 80 GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, fields in SHAPES.items():
        shape = ModelShape.of(LlamaConfig(**fields))
        snip = estimate_scoring(shape, dtype="bfloat16", method="snip", batch_size=8, max_length=512)
        snip_ckpt = estimate_scoring(shape, dtype="bfloat16", method="snip", batch_size=8, max_length=512,
                                     gradient_checkpointing=True)
        fit, fit_ckpt = (describe_plan(plan_scoring(e, DEVICE, shape.accumulator_bytes("snip"))) for e in (snip, snip_ckpt))
        lora = estimate_finetune(shape, dtype="bfloat16", batch_size=4, max_length=512)
        ckpt = estimate_finetune(shape, dtype="bfloat16", batch_size=4, max_length=512, gradient_checkpointing=True)
        free = DEVICE - snip.weights
        batch = generation_batch_size(shape, dtype="bfloat16", free_bytes=free, prompt_length=256,
                                      max_new_tokens=64) if free > 0 else "weights do not fit"
        kv = kv_cache_bytes(shape, dtype="bfloat16", sequences=1, tokens=1)
        print(f"| {name} | {shape.params / 1e9:.2f} B | {gib(snip.weights)} | {gib(snip.accumulators)} | "
              f"{gib(snip.activations)} | {gib(snip.total)} | {fit} | {gib(snip_ckpt.total)}, {fit_ckpt} | {gib(lora.total)} | "
              f"{gib(ckpt.total)} | "
              f"{kv // 1024} KiB | {batch} |")


if __name__ == "__main__":
    main()
