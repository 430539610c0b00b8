"""LoRA fine-tuning: loss goes down, only adapters train, merge folds them in, alignment data labels."""

from __future__ import annotations

import math

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


# --------------------------------------------------------------------------------------------------
# learning-rate schedule, gradient accumulation, checkpoints and resume, non-finite loss


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedule_warms_up_then_decays(smol_tokenizer, schedule):
    """Step k (1-based) of N = 6 with W = 2 warm-up steps uses lr * f(k), read from the optimizer at that step:
    warm-up (k - 1) / W (the first step has lr 0, so it leaves the adapters at their init), then 1, or
    linear (N - k + 1) / (N - W), or cosine (1 + cos(pi (k - 1 - W) / (N - W))) / 2."""
    n, w, lr = 6, 2, 0.1
    after = {}
    cfg = LoraTrainConfig(r=2, alpha=4, lr=lr, batch_size=2, max_steps=n, warmup_steps=w, schedule=schedule)
    model = tiny_model("llama", vocab_size=len(smol_tokenizer))
    _, hist = train_lora(model, smol_tokenizer, EXAMPLES, cfg, progress=False,
                         on_step=lambda step, loss, m: after.setdefault(step, _trainable(m)))
    decay = {"constant": lambda k: 1.0, "linear": lambda k: (n - k + 1) / (n - w),
             "cosine": lambda k: (1 + math.cos(math.pi * (k - 1 - w) / (n - w))) / 2}[schedule]
    want = [lr * ((k - 1) / w if k <= w else decay(k)) for k in range(1, n + 1)]
    assert hist.lr == pytest.approx(want, rel=1e-12, abs=1e-15) and hist.lr[0] == 0.0
    assert all(torch.count_nonzero(v) == 0 for n_, v in after[1].items() if "lora_B" in n_)  # lr 0: B still 0
    assert any(torch.count_nonzero(v) for n_, v in after[2].items() if "lora_B" in n_)
    default = train_lora(tiny_model("llama", vocab_size=len(smol_tokenizer)), smol_tokenizer, EXAMPLES,
                         LoraTrainConfig(r=2, alpha=4, lr=lr, batch_size=2, max_steps=2), progress=False)[1]
    assert default.lr == [lr, lr]  # the default: constant, no warm-up


def test_accumulating_2_micro_batches_of_2_equals_one_batch_of_4(smol_tokenizer, monkeypatch):
    """Every example has 10 response tokens, so the mean of two micro-batch means is the mean over the batch of
    4: the gradients (recorded at each optimiser step), losses and trained adapters agree up to fp32 rounding.
    Summing the micro-batch losses instead doubles the gradients and the reported loss (AdamW alone would hide
    it in the weights: its update is invariant to the gradient's scale)."""
    assert {int((encode(smol_tokenizer, e)["labels"] != IGNORE_INDEX).sum()) for e in EXAMPLES} == {10}
    grads = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    runs = []
    for batch, accumulation in ((4, 1), (2, 2)):
        cfg = LoraTrainConfig(r=4, alpha=8, lr=1e-2, batch_size=batch, grad_accumulation=accumulation, max_steps=3)
        model, hist = train_lora(tiny_model("llama", vocab_size=len(smol_tokenizer)), smol_tokenizer, EXAMPLES, cfg,
                                 progress=False)
        runs.append((hist, _trainable(model)))
    (h4, w4), (h22, w22) = runs
    assert h4.steps == h22.steps == [1, 2, 3] and h22.loss == pytest.approx(h4.loss, rel=1e-6)
    for a, b in zip(grads[:3], grads[3:], strict=True):
        for ga, gb in zip(a, b, strict=True):
            assert (ga - gb).abs().max() <= 1e-5 * ga.abs().max()
    for name, a in w4.items():  # AdamW's update amplifies the rounding of near-zero gradients: seen up to 5e-6
        assert (a - w22[name]).abs().max() <= 1e-5 * a.abs().max(), name


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.filterwarnings("error::FutureWarning")
def test_gradient_checkpointing_trains_the_same_and_recomputes_the_blocks(smol_tokenizer, full):
    """With gradient_checkpointing every decoder block runs its forward twice per micro-batch (once more in the
    backward pass), and the losses and trained weights equal those without it up to fp32 rounding. Catches
    checkpointing that is silently not enabled (one forward per block) and a reentrant variant that leaves the
    adapters without gradients (their weights would not move). No FutureWarning either: transformers 5.2x
    deprecated gradient_checkpointing_enable and is_gradient_checkpointing (which peft reads), both gone in v6."""
    from brittle.models import decoder_layers

    runs = []
    for checkpointing in (False, True):
        model = tiny_model("llama", vocab_size=len(smol_tokenizer))
        calls = []
        decoder_layers(model)[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))  # inside the recomputed block
        cfg = LoraTrainConfig(r=4, alpha=8, lr=1e-2, batch_size=4, max_steps=2, gradient_checkpointing=checkpointing)
        trained, hist = train_lora(model, smol_tokenizer, EXAMPLES, cfg, progress=False, full=full)
        runs.append((hist.loss, _trainable(trained), len(calls)))
    (loss0, w0, calls0), (loss1, w1, calls1) = runs
    assert calls0 == 2 and calls1 == 4  # 2 steps of one micro-batch
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for name, a in w0.items():
        assert (a - w1[name]).abs().max() <= 1e-5 * a.abs().max(), name


@pytest.mark.parametrize("full", [False, True])
def test_resume_after_a_kill_repeats_the_uninterrupted_run(smol_tokenizer, tmp_path, full, caplog):
    """Killed in on_step at step 5 (checkpoints at 2 and 4), resumed in a "new process" (fresh model and drift
    tracker): the same loss floats, bit-identical trainable weights and the same drift table as without the
    kill; on_step sees only steps 5..7. Dropout, warm-up, cosine decay, accumulation and an epoch boundary
    (2 steps per epoch) are all on, so every restored piece of state matters."""
    from brittle.drift import DriftTracker

    lr = 1e-3 if full else 1e-2
    cfg = LoraTrainConfig(r=2, alpha=4, lr=lr, batch_size=2, grad_accumulation=2, max_steps=7, dropout=0.1,
                          warmup_steps=2, schedule="cosine", seed=3)

    def fresh():
        model = tiny_model("llama", vocab_size=len(smol_tokenizer), initializer_range=0.5)
        mods = linear_modules(model)
        groups = {"g": {n: torch.rand(linear_weight(m).shape, generator=torch.Generator().manual_seed(1)) < 0.1
                        for n, m in mods.items()}}
        return model, DriftTracker(model, groups, every=1)

    model, tracker = fresh()
    trained, hist = train_lora(model, smol_tokenizer, EXAMPLES, cfg, progress=False, full=full,
                               on_step=tracker.on_step)
    tracker.finish(7, trained)
    want = _trainable(trained)

    def killed(step, loss, m):
        if step == 5:
            raise KeyboardInterrupt
        tracker2.on_step(step, loss, m)

    ckpt = tmp_path / "ckpt"
    model2, tracker2 = fresh()
    with pytest.raises(KeyboardInterrupt):
        train_lora(model2, smol_tokenizer, EXAMPLES, cfg, progress=False, full=full, on_step=killed,
                   checkpoint_dir=ckpt, checkpoint_every=2, state={"drift": tracker2})
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-2", "step-4"]

    model3, tracker3 = fresh()
    seen = []
    with caplog.at_level("WARNING", logger="brittle.finetune"):
        trained3, hist3 = train_lora(model3, smol_tokenizer, EXAMPLES, cfg, progress=False, full=full,
                                     on_step=lambda s, loss, m: (seen.append(s), tracker3.on_step(s, loss, m)),
                                     checkpoint_dir=ckpt, checkpoint_every=2, state={"drift": tracker3})
    assert "resuming fine-tuning from" in caplog.text and "step-4 (step 4 of 7)" in caplog.text
    assert seen == [5, 6, 7]
    assert hist3.steps == hist.steps and hist3.loss == hist.loss and hist3.lr == hist.lr
    got = _trainable(trained3)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    tracker3.finish(7, trained3)
    assert tracker3.table().equals(tracker.table())
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-6", "step-7"]  # the last 2 (the final step included)


def test_a_checkpoint_of_another_setup_is_refused(smol_tokenizer, tmp_path):
    from brittle.drift import DriftTracker

    cfg = LoraTrainConfig(r=2, alpha=4, lr=1e-2, batch_size=4, max_steps=1)

    def run(c=cfg, examples=EXAMPLES, folder=tmp_path, every=None, **kw):
        model = tiny_model("llama", vocab_size=len(smol_tokenizer))
        if every is not None:  # a drift log saved with the checkpoint
            group = {n: torch.ones_like(linear_weight(m), dtype=torch.bool) for n, m in linear_modules(model).items()}
            kw["state"] = {"drift": DriftTracker(model, {"all": group}, every=every)}
        return train_lora(model, smol_tokenizer, examples, c, progress=False, checkpoint_dir=folder, **kw)

    run()
    with pytest.raises(BrittleError, match=r"different training setup.*config\.lr: 0\.01 in the checkpoint, 0\.02 now"):
        run(cfg.model_copy(update={"lr": 2e-2}))
    with pytest.raises(BrittleError, match=r"config\.grad_accumulation: 1 in the checkpoint, 2 now"):
        run(cfg.model_copy(update={"grad_accumulation": 2}))
    with pytest.raises(BrittleError, match=r"examples_sha256"):
        run(examples=EXAMPLES[::-1])
    with pytest.raises(BrittleError, match=r"n_examples: 8 in the checkpoint, 7 now"):
        run(examples=EXAMPLES[:7])
    with pytest.raises(BrittleError, match=r"full: False in the checkpoint, True now"):
        run(full=True)
    with pytest.raises(BrittleError, match="needs a checkpoint_dir"):
        train_lora(tiny_model("llama", vocab_size=len(smol_tokenizer)), smol_tokenizer, EXAMPLES, cfg,
                   progress=False, checkpoint_every=1)
    with pytest.raises(BrittleError, match=r"state: \[\] in the checkpoint, \['drift'\] now"):
        run(every=1)
    run(folder=tmp_path / "drift", every=1)
    with pytest.raises(BrittleError, match="the saved drift log differs from this tracker in every"):
        run(folder=tmp_path / "drift", every=2)
    assert run()[1].steps == [1]  # the same setup resumes (here: finished already)


def test_non_finite_loss_stops_naming_step_and_micro_batch_and_keeps_the_last_good_checkpoint(smol_tokenizer, tmp_path):
    """A weight set to inf by on_step after step 3 makes step 4's first micro-batch loss non-finite; the step-2
    checkpoint (checkpoints every 2 steps) stays, and resumes into the same run as one never poisoned."""
    cfg = LoraTrainConfig(r=2, alpha=4, lr=1e-2, batch_size=2, grad_accumulation=2, max_steps=6)

    def poison(step, loss, model):
        if step == 3:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n)[0, 0] = float("inf")

    def run(**kw):
        return train_lora(tiny_model("llama", vocab_size=len(smol_tokenizer)), smol_tokenizer, EXAMPLES, cfg,
                          progress=False, **kw)

    with pytest.raises(BrittleError, match=r"the loss is (nan|inf) at step 4 \(micro-batch 1 of 2\); training stopped, "
                                           r"last good checkpoint: .*step-2"):
        run(checkpoint_dir=tmp_path, checkpoint_every=2, on_step=poison)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]
    assert run(checkpoint_dir=tmp_path, checkpoint_every=2)[1].loss == run()[1].loss
    huge = tmp_path / "lr1e30"  # the other way to blow up: AdamW moves every adapter entry by ~lr at step 1
    with pytest.raises(BrittleError, match=r"the loss is (nan|inf) at step 2 \(micro-batch 1 of 2\)"):
        train_lora(tiny_model("llama", vocab_size=len(smol_tokenizer)), smol_tokenizer, EXAMPLES,
                   cfg.model_copy(update={"lr": 1e30}), progress=False, checkpoint_dir=huge, checkpoint_every=1)


def test_distilled_examples_are_trained_towards_the_model_before_training(smol_tokenizer):
    """The distilled loss equals a brute-force KL(p_0 || p) (from an untouched copy of the base model) on flagged
    rows and the cross-entropy on the others, summed over response tokens; it would catch a distillation that
    ignores the flags, compares the model with itself (adapters left on: KL 0) or uses the reverse KL."""
    import copy

    import torch.nn.functional as F

    from brittle.data.core import pad_batch
    from brittle.finetune.train import _distilled_loss, make_lora_model

    base = tiny_model("llama", vocab_size=len(smol_tokenizer), initializer_range=0.2)
    reference = copy.deepcopy(base).eval()
    peft_model = make_lora_model(base, LoraTrainConfig(r=4, alpha=8)).eval()
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a trained adapter: the model now differs from the base
    batch = pad_batch([encode(smol_tokenizer, e, 64) for e in EXAMPLES[:3]], smol_tokenizer.pad_token_id)
    flags = torch.tensor([True, False, True])
    cols = (batch["labels"][:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)  # where some row has a loss
    got = _distilled_loss(peft_model, dict(batch), flags, cols)
    with torch.no_grad():
        logp = torch.log_softmax(peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                 .logits[:, :-1].double(), -1)
        logp0 = torch.log_softmax(reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                  .logits[:, :-1].double(), -1)
    labels = batch["labels"][:, 1:]
    want, flagged_ce = 0.0, 0.0
    for row in range(3):
        for t in (labels[row] != IGNORE_INDEX).nonzero().flatten().tolist():
            ce = float(F.nll_loss(logp[row, t][None], labels[row, t][None]))
            if flags[row]:
                want += float((logp0[row, t].exp() * (logp0[row, t] - logp[row, t])).sum())
                flagged_ce += ce
            else:
                want += ce
    assert want > 1.0 and got.item() == pytest.approx(want, rel=1e-4)
    # with an answer weight a, flagged rows add a times their cross-entropy
    both = _distilled_loss(peft_model, dict(batch), flags, cols, 0.5)
    assert flagged_ce > 1.0 and both.item() == pytest.approx(want + 0.5 * flagged_ce, rel=1e-4)
    # trained on flagged examples only, the model starts at the base (LoRA B = 0): the first loss is 0 and the
    # later ones stay near it (AdamW turns the rounding noise of a zero gradient into lr-sized steps), where the
    # cross-entropy of the same examples is ~ log(vocabulary)
    cfg = LoraTrainConfig(r=2, alpha=4, lr=1e-2, batch_size=4, max_steps=3)
    _, hist = train_lora(tiny_model("llama", vocab_size=len(smol_tokenizer)), smol_tokenizer, EXAMPLES, cfg,
                         progress=False, distill=[True] * len(EXAMPLES))
    _, plain = train_lora(tiny_model("llama", vocab_size=len(smol_tokenizer)), smol_tokenizer, EXAMPLES, cfg,
                          progress=False, distill=[False] * len(EXAMPLES))
    assert hist.loss[0] == 0 and max(abs(x) for x in hist.loss) < 1e-3 and min(plain.loss) > 5
    with pytest.raises(BrittleError, match="2 distillation flags for 8 examples"):
        train_lora(tiny_model("llama", vocab_size=len(smol_tokenizer)), smol_tokenizer, EXAMPLES, cfg,
                   progress=False, distill=[True, False])
