"""Fine-tuning with frozen weight groups: every mode keeps exactly its entries' bits, on two modules whose
frozen rows and columns differ (a hook bound to the wrong module cannot pass), and bad groups fail early."""

from __future__ import annotations

import copy

import pytest
import torch

from brittle.data import Example
from brittle.finetune import LoraTrainConfig, merge_lora, train_lora
from brittle.freeze import rows_frozen_beyond_group
from brittle.io import BrittleError
from brittle.models import linear_modules, linear_weight
from brittle.testing import tiny_model

EXAMPLES = [Example(f"Question number {i}?", f"Answer {i}: always the same words.", "t", str(i)) for i in range(8)]
CFG = LoraTrainConfig(r=4, alpha=32, lr=5e-2, batch_size=4, max_steps=6, seed=0)


def _group(model):
    """Frozen entries in two modules with different rows and columns."""
    mods = linear_modules(model)
    group = {n: torch.zeros_like(linear_weight(m), dtype=torch.bool) for n, m in mods.items()}
    group["layers.0.q"][[1, 5, 5], [2, 7, 30]] = True
    group["layers.1.down"][3, :5] = True
    group["layers.1.down"][9, 60] = True
    return group


def _weights(model):
    return {n: linear_weight(m).detach().clone() for n, m in linear_modules(model).items()}


def _train(tok, mode, full=False, weight_decay=0.0, model=None, on_step=None):
    model = model or tiny_model("llama", vocab_size=len(tok), initializer_range=0.5)
    before = _weights(model)
    group = _group(model)
    cfg = CFG.model_copy(update={"weight_decay": weight_decay, "lr": 1e-2 if full else CFG.lr})
    trained, hist = train_lora(model, tok, EXAMPLES, cfg, progress=False, full=full, freeze=group, freeze_mode=mode,
                               on_step=on_step)
    return trained, before, group, hist


def _check_frozen_exact_and_rest_moved(merged, before, frozen):
    after = _weights(merged)
    for name in ("layers.0.q", "layers.1.down"):
        mask = frozen[name]
        assert torch.equal(after[name][mask], before[name][mask]), name  # bit-identical
        moved = (after[name] != before[name]) & ~mask
        assert moved.float().mean() > 0.9, (name, moved.float().mean())  # the rest of the module trained


@pytest.mark.parametrize("mode", ["weights", "rewind"])
def test_lora_modes_keep_frozen_entries_bit_identical(smol_tokenizer, mode):
    trained, before, group, _ = _train(smol_tokenizer, mode)
    merged = merge_lora(trained)
    _check_frozen_exact_and_rest_moved(merged, before, group)


def test_weights_mode_forward_is_the_masked_update(smol_tokenizer):
    """During training the model computes with W + D * (1 - M), D = s * B @ A (float64 reference); a hook
    bound to another module's mask, or no mask, gives other logits."""
    trained, before, group, _ = _train(smol_tokenizer, "weights")
    x = torch.randint(3, 500, (2, 9))
    with torch.no_grad():
        got = trained(input_ids=x).logits.double()
    reference = copy.deepcopy(trained).double()
    unmasked = copy.deepcopy(trained).double()
    for model, masked in ((reference, True), (unmasked, False)):
        model.brittle_freezer.remove()
        mods = linear_modules(model)
        from brittle.freeze import _lora_layers

        with torch.no_grad():
            for name, layer in _lora_layers(model).items():
                d = layer.get_delta_weight("default").double()
                if masked:
                    d[group[name]] = 0
                linear_weight(mods[name]).add_(d)
                layer.lora_B["default"].weight.zero_()  # the update now lives in the base weight
    with torch.no_grad():
        want, wrong = reference(input_ids=x).logits, unmasked(input_ids=x).logits
    scale = want.abs().max()
    assert (got - want).abs().max() < 1e-5 * scale
    assert (wrong - want).abs().max() > 1e-3 * scale  # the masking is visible at this size


def test_rows_mode_freezes_exactly_the_rows_holding_a_frozen_entry(smol_tokenizer):
    trained, before, group, _ = _train(smol_tokenizer, "rows")
    merged = merge_lora(trained)
    after = _weights(merged)
    for name in ("layers.0.q", "layers.1.down"):
        rows = group[name].any(dim=1)
        assert torch.equal(after[name][rows], before[name][rows]), name
        assert (after[name][~rows] != before[name][~rows]).float().mean() > 0.9, name
    frozen, selected = rows_frozen_beyond_group(group)
    assert selected == 3 + 6 and frozen == 2 * 32 + 2 * 64  # q: rows 1 and 5 (d_in 32); down: rows 3 and 9 (d_in 64)


def test_full_masked_keeps_frozen_entries_under_weight_decay(smol_tokenizer):
    seen = []

    def frozen_entries(step, loss, model):  # after every optimiser step, not only at the end
        w = _weights(model)
        seen.append({n: w[n][m].clone() for n, m in _group(model).items() if m.any()})

    trained, before, group, hist = _train(smol_tokenizer, "full-masked", full=True, weight_decay=0.1,
                                          on_step=frozen_entries)
    assert len(hist.loss) == len(seen) == CFG.max_steps
    for entries in seen:
        assert all(torch.equal(v, before[n][group[n]]) for n, v in entries.items())
    _check_frozen_exact_and_rest_moved(merge_lora(trained), before, group)


def test_full_fine_tuning_with_rewind(smol_tokenizer):
    trained, before, group, _ = _train(smol_tokenizer, "rewind", full=True)
    _check_frozen_exact_and_rest_moved(merge_lora(trained), before, group)


def test_without_freezing_the_same_entries_move(smol_tokenizer):
    """The controls of the tests above: unfrozen training does change those entries."""
    model = tiny_model("llama", vocab_size=len(smol_tokenizer), initializer_range=0.5)
    before = _weights(model)
    trained, _ = train_lora(model, smol_tokenizer, EXAMPLES, CFG, progress=False)
    after = _weights(merge_lora(trained))
    for name, mask in _group(model).items():
        if mask.any():
            assert (after[name][mask] != before[name][mask]).all(), name


def test_bad_freeze_groups_fail_before_training(smol_tokenizer):
    model = tiny_model("llama", vocab_size=len(smol_tokenizer))
    group = _group(model)
    cases = [
        ({"layers.9.q": torch.ones(2, 2, dtype=torch.bool)}, "weights", {}, "does not exist in this model"),
        ({"layers.0.q": torch.ones(3, 3, dtype=torch.bool)}, "weights", {}, "expected torch.bool"),
        ({n: torch.zeros_like(m) for n, m in group.items()}, "weights", {}, "empty group"),
        (group, "weights", {"cfg": CFG.model_copy(update={"targets": ("q",)})}, "do not adapt"),
        (group, "columns", {}, "unknown freeze mode"),
        (group, "full-masked", {}, "for full fine-tuning"),
        (group, "weights", {"full": True}, "is for LoRA"),
        (group, "weights", {"cfg": CFG.model_copy(update={"dropout": 0.1})}, "dropout 0"),
    ]
    for g, mode, kw, msg in cases:
        cfg = kw.pop("cfg", CFG)
        with pytest.raises(BrittleError, match=msg):
            train_lora(copy.deepcopy(model), smol_tokenizer, EXAMPLES, cfg, progress=False, freeze=g, freeze_mode=mode, **kw)
    # rewind restores after training, so it also works for modules the targets do not adapt
    train_lora(copy.deepcopy(model), smol_tokenizer, EXAMPLES, CFG.model_copy(update={"targets": ("q",), "max_steps": 1}),
               progress=False, freeze=group, freeze_mode="rewind")
