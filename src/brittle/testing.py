"""Tiny randomly initialised models of several architectures, built from configs, offline.

Used by the test suite and benchmarks for speed and architecture coverage. Every config uses
grouped-query attention where the architecture has it (4 query heads, 2 key/value heads).
"""

from __future__ import annotations

import torch

TINY_ARCHS = ("llama", "qwen2", "mistral", "gemma2", "gemma3", "phi3", "gpt2")


def tiny_config(arch: str, vocab_size: int = 512, layers: int = 2, hidden: int = 32, intermediate: int = 64, **extra):
    import transformers as tf

    common = dict(vocab_size=vocab_size, num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "gemma2":
        return tf.Gemma2Config(**common, head_dim=8)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=8)
    if arch == "phi3":
        return tf.Phi3Config(**common)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_layer=layers, n_embd=hidden, n_head=4, n_positions=256,
                             n_inner=intermediate, bos_token_id=1, eos_token_id=2, **extra)
    raise ValueError(f"unknown tiny architecture '{arch}' (known: {', '.join(TINY_ARCHS)})")


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs):
    """A randomly initialised causal LM of ``arch`` in eval mode (dropout off)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **kwargs)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="eager")
    model.eval()
    model.brittle_spec = f"tiny-{arch}-seed{seed}"
    return model
