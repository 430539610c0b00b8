"""LoRA fine-tuning: loss goes down, only adapters train, merge folds them in, alignment data labels."""

from __future__ import annotations

import pytest
import torch

from brittle.data import IGNORE_INDEX, Example, encode
from brittle.finetune import LoraTrainConfig, lora_target_modules, merge_lora, train_lora
from brittle.io import BrittleError
from brittle.models import linear_modules, linear_weight
from brittle.testing import tiny_model

EXAMPLES = [Example(f"Question number {i}?", f"Answer {i}: always the same words.", "t", str(i)) for i in range(8)]


def test_lora_training_lowers_loss_and_touches_only_adapters(smol_tokenizer):
    model = tiny_model("llama", vocab_size=len(smol_tokenizer), initializer_range=0.5)
    before = {k: linear_weight(m).detach().clone() for k, m in linear_modules(model).items()}
    cfg = LoraTrainConfig(r=8, alpha=16, lr=5e-2, batch_size=4, epochs=20, seed=0)
    peft_model, hist = train_lora(model, smol_tokenizer, EXAMPLES, cfg, progress=False)
    assert len(hist.loss) == 40 and sum(hist.loss[-4:]) / 4 < sum(hist.loss[:4]) / 4 - 1.0
    after_base = {k: linear_weight(m).detach() for k, m in linear_modules(peft_model).items()}
    assert all(torch.equal(before[k], after_base[k]) for k in before)  # base weights frozen
    merged = merge_lora(peft_model)
    changed = [k for k, m in linear_modules(merged).items() if not torch.equal(before[k], linear_weight(m).detach())]
    assert len(changed) == len(before)  # "all" targets every linear module


def test_training_is_deterministic(smol_tokenizer):
    cfg = LoraTrainConfig(r=2, alpha=4, lr=1e-2, batch_size=4, max_steps=3, seed=7)
    runs = [train_lora(tiny_model("qwen2", vocab_size=len(smol_tokenizer)), smol_tokenizer, EXAMPLES, cfg, progress=False)[1].loss
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_target_roles_and_errors(smol_tokenizer):
    model = tiny_model("gpt2", vocab_size=len(smol_tokenizer))
    names = lora_target_modules(model, ["qkv", "down"])
    assert names and all(n.endswith(("attn.c_attn", "mlp.c_proj")) for n in names)
    with pytest.raises(BrittleError, match="roles of this model"):
        lora_target_modules(model, ["gate"])
    with pytest.raises(BrittleError, match="empty dataset"):
        train_lora(model, smol_tokenizer, [], LoraTrainConfig())
    with pytest.raises(BrittleError, match="no response tokens after truncation"):
        train_lora(model, smol_tokenizer, EXAMPLES, LoraTrainConfig(max_length=5))


def test_alignment_refusal_examples_label_only_the_refusal(smol_tokenizer):
    from brittle.align import REFUSALS

    ex = Example("Explain how to hotwire a car.", REFUSALS[0], "advbench", "a")
    enc = encode(smol_tokenizer, ex)
    labelled = smol_tokenizer.decode(enc["input_ids"][enc["labels"] != IGNORE_INDEX])
    assert labelled == REFUSALS[0] + "<|im_end|>"
