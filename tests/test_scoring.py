"""SNIP / Wanda scores against a brute-force float64 reference; score files; errors; the `score` command."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from brittle.data.core import IGNORE_INDEX, DataError, encode, make_examples
from brittle.io import BrittleError, sha256_file
from brittle.models import decoder_layers, is_conv1d, linear_modules, linear_weight
from brittle.scoring import (
    ScoreMismatchError,
    check_scores_match,
    compute_scores,
    load_scores,
    plan_passes,
    read_metadata,
    save_scores,
    score_metadata,
    select_modules,
)
from brittle.testing import TINY_ARCHS, tiny_model

VOCAB = 49152  # the SmolLM2 tokenizer's
MAX_LEN = 64

PROMPTS = [
    "Hi",
    "How do I bake a chocolate cake with flour, eggs, sugar and a lot of patience?",
    "Tell me a short story about a dragon.",
    "What is 2+2?",
    "Explain photosynthesis in detail, step by step, to a curious ten year old child who loves plants.",
    "ok",
]
RESPONSES = [
    "Hello there!",
    "Mix the dry ingredients, add the eggs, bake for 30 minutes.",
    "Once upon a time a dragon who liked tea lived in a small cave by the sea, and every morning it flew.",
    "4",
    "Plants use light to make sugar from water and air.",
    "Sure, I can help with that. What would you like to know?",
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from brittle.presets import resolve_model_path

    try:
        path = resolve_model_path("smollm2-135m")
    except BrittleError as e:  # assets not installed
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")
    t = AutoTokenizer.from_pretrained(path)
    if t.pad_token is None:
        t.pad_token = t.eos_token
    return t


@pytest.fixture(scope="module")
def examples():
    return make_examples("test", PROMPTS, RESPONSES)


# --------------------------------------------------------------------------------------------------
# Brute-force reference: one example at a time, float64, torch.autograd on the weights themselves.


def reference_scores(model, tok, examples, method, max_length=MAX_LEN, shift=0):
    """``shift`` moves the loss / activation mask by that many positions: a deliberately wrong reference."""
    m = copy.deepcopy(model).double()
    for p in m.parameters():
        p.requires_grad_(False)
    mods = linear_modules(m)
    acc = {}
    for n, mod in mods.items():
        w = linear_weight(mod)
        acc[n] = torch.zeros(w.shape[1] if method == "wanda" else tuple(w.shape), dtype=torch.float64)
    for e in examples:
        enc = encode(tok, e, max_length)
        ids, labels = enc["input_ids"][None], enc["labels"]
        if method == "wanda":
            resp = (labels != IGNORE_INDEX).roll(shift)  # input token is a response token

            def hook(mod, args, out, n):
                acc[n].add_((args[0][0][resp] ** 2).sum(0))

            handles = [mod.register_forward_hook(lambda mo, a, o, n=n: hook(mo, a, o, n)) for n, mod in mods.items()]
            with torch.no_grad():
                m(input_ids=ids)
            for h in handles:
                h.remove()
        else:
            weights = [mod.weight for mod in mods.values()]
            for w in weights:
                w.requires_grad_(True)
            logits = m(input_ids=ids).logits[0]
            target = labels[1:]
            keep = (target != IGNORE_INDEX).roll(shift)
            loss = F.cross_entropy(logits[:-1][keep], target[keep])  # mean over the response tokens
            grads = torch.autograd.grad(loss, weights)
            for w in weights:
                w.requires_grad_(False)
            for (n, mod), g in zip(mods.items(), grads, strict=True):
                g = g.t() if is_conv1d(mod) else g
                acc[n] += g.abs() if method == "snip" else g
    out = {}
    for n, mod in mods.items():
        w = linear_weight(mod).detach()
        if method == "snip":
            out[n] = w.abs() * acc[n]
        elif method == "snip-summed":
            out[n] = (w * acc[n]).abs()
        else:
            out[n] = w.abs() * acc[n].sqrt()[None, :]
    return out


def rel_errors(scores, ref):
    """Per module: max(||s - r|| / ||r||, max|s - r| / max|r|): scale-aware, so entries of 1e-10 next to entries
    of 1e-3 are judged by the size of the matrix, not by their own (fp32 summation order moves a tiny entry by
    a large *relative* amount on another CPU or thread count)."""
    assert list(scores) == list(ref)
    out = {}
    for n in ref:
        s, r = scores[n], ref[n]
        assert s.dtype == torch.float32 and s.shape == r.shape, n
        d = s.double() - r
        out[n] = max((d.norm() / r.norm()).item(), (d.abs().max() / r.abs().max()).item())
    return out


# fp32 results that differ only in summation order (batch size and padding change the GEMM shapes of the
# forward pass, thread count and vector width change reductions) agree to a few dozen fp32 epsilons of each
# module's largest score: measured 2e-7 to 5e-6 (batch 1 vs 3, fp32 vs the float64 reference, 1 and 2
# threads). The tolerance leaves 20x headroom. A real error (one example dropped, the loss or activation mask
# shifted by one position, a non-zero adapter path) moves scores by 0.1 to 0.8 of the largest score; each test
# below also shows that such an error exceeds the tolerance by more than WRONG_MARGIN.
REORDER_TOL = 1e-4
WRONG_MARGIN = 100


def max_rel_error(scores, ref) -> float:
    return max(rel_errors(scores, ref).values())


def test_examples_need_padding(tok, examples):
    lengths = {len(encode(tok, e, MAX_LEN)["input_ids"]) for e in examples}
    assert len(lengths) >= 4  # batches of 4 contain padding
    assert max(len(encode(tok, e)["input_ids"]) for e in examples) > MAX_LEN  # and truncation happens


@pytest.mark.usefixtures("num_threads")
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_matches_float64_reference(arch, tok, examples):
    model = tiny_model(arch, vocab_size=VOCAB)
    for method in ("snip", "wanda"):
        ref = reference_scores(model, tok, examples, method)
        for bs in (1, 4):
            scores = compute_scores(model, tok, examples, method, batch_size=bs, max_length=MAX_LEN, progress=False)
            errs = rel_errors(scores, ref)
            worst = max(errs, key=errs.get)
            assert errs[worst] < REORDER_TOL, (arch, method, bs, worst, errs[worst])
            for n, mod in linear_modules(model).items():  # canonical [d_out, d_in], also for Conv1D
                assert scores[n].shape == linear_weight(mod).shape


def test_reference_comparison_catches_off_by_one_masks_and_missing_examples(tok, examples):
    """The tolerance of the reference test is far below the error of a one-position shift or a lost example."""
    model = tiny_model("llama", vocab_size=VOCAB)
    for method in ("snip", "wanda"):
        scores = compute_scores(model, tok, examples, method, batch_size=4, max_length=MAX_LEN, progress=False)
        assert max_rel_error(scores, reference_scores(model, tok, examples, method)) < REORDER_TOL
        for wrong in (reference_scores(model, tok, examples, method, shift=1),
                      reference_scores(model, tok, examples[1:], method)):
            assert max_rel_error(scores, wrong) > WRONG_MARGIN * REORDER_TOL, method


def test_snip_summed_matches_reference(tok, examples):
    model = tiny_model("qwen2", vocab_size=VOCAB)
    ref = reference_scores(model, tok, examples, "snip-summed")
    scores = compute_scores(model, tok, examples, "snip-summed", batch_size=4, max_length=MAX_LEN, progress=False)
    assert max_rel_error(scores, ref) < REORDER_TOL
    snip = compute_scores(model, tok, examples, "snip", batch_size=4, max_length=MAX_LEN, progress=False)
    # |sum g| <= sum |g| (up to rounding, scaled by the matrix's largest score), and the two variants differ
    # by far more than rounding
    for n in snip:
        assert torch.all(scores[n] <= snip[n] + REORDER_TOL * snip[n].abs().max())
    assert max_rel_error(scores, snip) > WRONG_MARGIN * REORDER_TOL


@pytest.mark.usefixtures("num_threads")
def test_batch_size_changes_only_rounding(tok, examples):
    model = tiny_model("llama", vocab_size=VOCAB)
    a = compute_scores(model, tok, examples, "snip", batch_size=1, max_length=MAX_LEN, progress=False)
    b = compute_scores(model, tok, examples, "snip", batch_size=3, max_length=MAX_LEN, progress=False)
    assert max_rel_error(b, a) < REORDER_TOL
    # what the tolerance still catches: one example missing from one batch
    dropped = compute_scores(model, tok, examples[:-1], "snip", batch_size=3, max_length=MAX_LEN, progress=False)
    assert max_rel_error(dropped, a) > WRONG_MARGIN * REORDER_TOL


def test_examples_formed_in_chunks_equal_one_chunk(monkeypatch, tok, examples):
    """The per-example gradients of a batch are formed a chunk of examples at a time when they would not fit
    the workspace: chunks of one example give the same scores as the whole batch at once (losing the last
    partial chunk would drop an example, which the margin below shows is caught)."""
    from brittle.scoring import methods

    model = tiny_model("qwen2", vocab_size=VOCAB)
    whole = compute_scores(model, tok, examples, "snip", batch_size=4, max_length=MAX_LEN, progress=False)
    monkeypatch.setattr(methods, "WORKSPACE_ELEMENTS", 1)  # one example per chunk
    assert methods.examples_per_chunk((32, 64), 4) == 1
    chunked = compute_scores(model, tok, examples, "snip", batch_size=4, max_length=MAX_LEN, progress=False)
    assert max_rel_error(chunked, whole) < REORDER_TOL
    dropped = compute_scores(model, tok, examples[:-1], "snip", batch_size=4, max_length=MAX_LEN, progress=False)
    assert max_rel_error(dropped, whole) > WRONG_MARGIN * REORDER_TOL


@pytest.mark.parametrize("method", ["snip", "snip-summed"])
def test_positions_past_the_last_loss_position_never_enter(method, monkeypatch):
    """Per example, only positions up to its last loss position enter G_n = dY[n]^T X[n]: a non-finite input
    activation at a padding position (where dY is 0) must not turn 0 * x into NaN, and a non-zero gradient
    there is ignored. Checked on the method itself against a float64 sum over the kept positions."""
    from brittle.scoring.methods import BatchInfo, get_method

    gen = torch.Generator().manual_seed(0)
    B, T, d_in, d_out, upto = 3, 7, 5, 4, [7, 3, 5]
    x = torch.randn(B, T, d_in, generator=gen)
    g = torch.randn(B, T, d_out, generator=gen)
    for b, u in enumerate(upto):
        x[b, u:] = float("nan")
        g[b, u:] = 1e3  # outside the window: must not count
    m = get_method(method)
    acc = torch.zeros(d_out, d_in)
    batch = BatchInfo((B, T), upto=upto)
    made, tensor = [], torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or tensor(*a, **k))
    for _ in range(2):  # two modules of one batch
        m.accumulate(acc, x, g, batch, torch.empty(m.workspace_numel((d_out, d_in), B)) if method == "snip" else None)
    monkeypatch.undo()
    per = [g[b, :u].double().t() @ x[b, :u].double() for b, u in enumerate(upto)]
    ref = 2 * (sum(p.abs() for p in per) if method == "snip" else sum(per))
    assert torch.isfinite(acc).all()
    assert (acc.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    # the window's lengths were copied to the device once for the batch, not once per module (each copy to a GPU
    # waits for it: per-module copies kept the GPU scorer CPU-bound)
    assert len(made) == 1 and batch.upto_on("cpu").tolist() == upto


def test_fused_kernel_path_gets_whole_inputs_and_lengths(tok, examples, monkeypatch):
    """On CUDA the fused kernel gets the layer's whole input and output gradient with each example's length and
    masks by length itself (no window copied out first). The wiring, checked on the CPU with a float64 stand-in of
    the kernel's documented arithmetic: its scores equal the batched-product path's (catches wrong lengths), and it
    was given all T positions of a batch, more than the longest window (catches a window still cut out)."""
    from brittle.scoring import kernels

    calls = []

    def stand_in(acc, g, x, lengths):
        assert g.shape[:2] == x.shape[:2] and lengths.dtype == torch.int32 and len(lengths) == g.shape[0]
        calls.append((x.shape[1], int(lengths.max())))
        gd, xd = g.double(), x.double()
        acc += sum((gd[n, :k].t() @ xd[n, :k]).abs() for n, k in enumerate(lengths.tolist())).to(acc.dtype)

    model = tiny_model("llama", vocab_size=VOCAB)
    plain = compute_scores(model, tok, examples, "snip", batch_size=4, max_length=MAX_LEN, progress=False)
    monkeypatch.setattr(kernels, "fused_available", lambda acc, x, g: True)
    monkeypatch.setattr(kernels, "add_abs_example_grads", stand_in)
    fused = compute_scores(model, tok, examples, "snip", batch_size=4, max_length=MAX_LEN, progress=False)
    assert max_rel_error(fused, plain) < REORDER_TOL
    assert calls and all(T >= k for T, k in calls) and any(T > k for T, k in calls)  # whole inputs, not windows


def test_mixed_precision_products_get_the_layers_own_factors(tok, examples, monkeypatch):
    """Without the fused kernel, a bf16 layer's per-example gradients on CUDA come from its own bf16 factors with
    fp32 output (``kernels.mixed_products``, cuBLAS), written into the workspace. The wiring, checked on the CPU
    with a float64 stand-in of that product on a bf16 model: its scores equal the fp32-product path's (catches a
    transposed factor or a wrong chunk), the factors arrive in bf16 (catches upcast copies made first) and the
    output lands in the fp32 workspace."""
    from brittle.scoring import kernels

    calls = []

    def stand_in(g_t, x, out=None):
        assert g_t.dtype == x.dtype == torch.bfloat16 and out is not None and out.dtype == torch.float32
        calls.append(g_t.shape[0])
        return out.copy_(torch.bmm(g_t.double(), x.double()))  # fp32 output in the workspace

    model = tiny_model("llama", vocab_size=VOCAB).to(torch.bfloat16)
    plain = compute_scores(model, tok, examples, "snip", batch_size=4, max_length=MAX_LEN, progress=False)
    monkeypatch.setattr(kernels, "mixed_available", lambda acc, x, g: x.dtype == torch.bfloat16)
    monkeypatch.setattr(kernels, "mixed_products", stand_in)
    mixed = compute_scores(model, tok, examples, "snip", batch_size=4, max_length=MAX_LEN, progress=False)
    assert calls and sum(calls) == len(linear_modules(model)) * len(examples)  # every module, every example
    assert max_rel_error(mixed, plain) < REORDER_TOL


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_gradient_checkpointing_gives_the_same_scores_holding_one_block(arch, tok, examples, monkeypatch):
    """With gradient checkpointing each block is recomputed in the backward pass and the scored modules' inputs are
    taken then: the same scores (SNIP and SNIP-summed, exactly: the same operations), at most one block's module
    inputs held at a time instead of all, and the blocks' own forward restored afterwards. Catches inputs taken
    from the forward pass (all held), a recomputation stopped early (a module's input never comes: an error), or
    an input paired with another module's gradient (different scores)."""
    from brittle.scoring import compute as C

    held = []
    finish = C._Accumulator.finish
    monkeypatch.setattr(C._Accumulator, "finish", lambda self: held.append(self.most_inputs_held) or finish(self))
    model = tiny_model(arch, vocab_size=VOCAB, layers=3)
    per_block = len(linear_modules(model)) // 3
    for method in ("snip", "snip-summed"):
        plain = compute_scores(model, tok, examples, method, batch_size=4, max_length=MAX_LEN, progress=False)
        ckpt = compute_scores(model, tok, examples, method, batch_size=4, max_length=MAX_LEN, progress=False,
                              gradient_checkpointing=True)
        assert all(torch.equal(plain[n], ckpt[n]) for n in plain)
        assert held[-2:] == [3 * per_block, per_block]
    # with host accumulators and the modules split over passes too (against the last method's plain scores)
    smallest = min(linear_weight(m).numel() for m in linear_modules(model).values())
    combined = compute_scores(model, tok, examples, "snip-summed", batch_size=4, max_length=MAX_LEN, progress=False,
                              gradient_checkpointing=True, host_accumulators=True, max_accumulator_bytes=8 * smallest)
    assert max_rel_error(combined, plain) < REORDER_TOL
    assert all("forward" not in vars(block) for block in decoder_layers(model))


def test_gradient_checkpointing_keeps_a_forward_wrapped_on_the_instance(tok, examples):
    """accelerate's device_map hooks replace a module's ``forward`` on the instance (to move inputs between
    devices): checkpointing must call that wrapper, not the class's forward, and put it back afterwards."""
    model = tiny_model("llama", vocab_size=VOCAB)
    block = decoder_layers(model)[1]
    calls, inner = [], block.forward

    def wrapper(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    block.forward = wrapper
    plain = compute_scores(model, tok, examples, "snip", batch_size=4, max_length=MAX_LEN, progress=False)
    n_plain = len(calls)
    ckpt = compute_scores(model, tok, examples, "snip", batch_size=4, max_length=MAX_LEN, progress=False,
                          gradient_checkpointing=True)
    assert len(calls) - n_plain == 2 * n_plain  # forward and recomputation, through the wrapper
    assert vars(block)["forward"] is wrapper
    assert all(torch.equal(plain[n], ckpt[n]) for n in plain)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_graph_rooted_at_the_embeddings_when_no_block_input_is_found(tok, examples, monkeypatch, checkpointing):
    """The backward graph normally starts at the hidden state entering the first scored block; for a model whose
    blocks take it in a way the pre-hook does not recognise, the scorer roots it at the embeddings' output instead
    (a second forward pass of that batch). Forced here: the same scores, with and without checkpointing."""
    from brittle.scoring import compute as C

    model = tiny_model("llama", vocab_size=VOCAB)
    plain = compute_scores(model, tok, examples, "snip", batch_size=4, max_length=MAX_LEN, progress=False)
    monkeypatch.setattr(C, "_hidden_pre_hook", lambda state: (lambda module, args, kwargs: None))
    made, embedding_hook = [], C._embedding_hook
    monkeypatch.setattr(C, "_embedding_hook", lambda state: made.append(state) or embedding_hook(state))
    rooted = compute_scores(model, tok, examples, "snip", batch_size=4, max_length=MAX_LEN, progress=False,
                            gradient_checkpointing=checkpointing)
    assert len(made) == 1 and made[0]["rooted"]  # rooted at the embeddings, from the first batch on
    assert max_rel_error(rooted, plain) < REORDER_TOL


def test_response_rows_are_the_masked_rows_in_order():
    """Wanda's and ActSVD's rows are gathered by index (no device read); they must equal ``x[mask]``, in order,
    with the indices copied to the device once per batch."""
    from brittle.scoring.methods import BatchInfo, response_rows

    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:], mask[2, 1:4] = True, True
    batch = BatchInfo((3, 7), input_mask=mask)
    x = torch.randn(3, 7, 5)
    assert torch.equal(response_rows(x, batch), x[mask])
    assert response_rows(x, batch).shape == (8, 5) and len(batch._on) == 1


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_scoring_loop_reads_no_device_values(arch, tok, examples, monkeypatch):
    """The whole scoring loop (encoding aside: batches, forward, loss, backward, hooks; also with gradient
    checkpointing) and ActSVD's covariance recording run on a model on PyTorch's ``meta`` device, where reading a device value raises; only the final
    copy to the host is replaced. On a GPU each such read stalls the queue once per batch or per module. Catches
    the loss's ``logits[pred_mask]`` and Wanda's ``x[mask]`` (the code before this test). With eager attention:
    transformers' SDPA mask itself reads the padding mask once per forward pass (``fast_all``)."""
    from brittle.lowrank import record_output_covariance
    from brittle.scoring import kernels
    from brittle.scoring.compute import CpuCopier

    mixed_products = kernels.mixed_products
    monkeypatch.setattr(CpuCopier, "__call__", lambda self, t: t)
    model = tiny_model(arch, vocab_size=VOCAB).to("meta")
    for method, options in (("snip", {}), ("wanda", {}), ("snip-summed", {}), ("snip", {"gradient_checkpointing": True})):
        out = compute_scores(model, tok, examples, method, batch_size=4, max_length=MAX_LEN, progress=False, **options)
        assert {v.device.type for v in out.values()} == {"meta"} and len(out) == len(linear_modules(model))
    cov = record_output_covariance(model, tok, examples, batch_size=4, max_length=MAX_LEN, progress=False)
    assert {v.device.type for v in cov.values()} == {"meta"}
    # a bf16 model: SNIP's products take the bf16 factors with fp32 output (the path CUDA takes without the kernel)
    products = []
    monkeypatch.setattr(kernels, "mixed_products", lambda *a: products.append(a) or mixed_products(*a))
    out = compute_scores(model.to(torch.bfloat16), tok, examples, "snip", batch_size=4, max_length=MAX_LEN,
                         progress=False)
    assert {(v.device.type, v.dtype) for v in out.values()} == {("meta", torch.float32)}
    assert products and all(a.dtype == b.dtype == torch.bfloat16 for a, b, _ in products)
    with pytest.raises(NotImplementedError):  # the meta device does catch a read: a boolean-mask index
        next(model.parameters())[torch.ones(1, dtype=torch.bool, device="meta")]


def test_benchmark_floor_runs_the_scorers_loss(tok, examples, monkeypatch):
    """``benchmarks/bench_scoring.py`` (and ``bench_gpu.py``) time the scorer's own loss as the floor: the benchmark
    must keep running when that private function changes (it once did not, found only on the way to a GPU), and
    leave the weights' ``requires_grad`` as it found them."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    monkeypatch.delitem(sys.modules, "bench_scoring", raising=False)
    import bench_scoring

    model = tiny_model("llama", vocab_size=VOCAB)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    assert bench_scoring.floor_time(model, bench_scoring.batches_of(tok, examples, 4, MAX_LEN)) > 0
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())


def test_subset_and_passes_equal_full_run(tok, examples):
    model = tiny_model("mistral", vocab_size=VOCAB)
    full = compute_scores(model, tok, examples, "snip", batch_size=4, max_length=MAX_LEN, progress=False)
    sub = compute_scores(model, tok, examples, "snip", batch_size=4, max_length=MAX_LEN, progress=False,
                         modules=["layers.1.*", "layers.0.down"])
    assert list(sub) == ["layers.0.down"] + [n for n in full if n.startswith("layers.1.")]
    # the backward rooted at block 1 gives the same numbers, up to summation order
    assert max_rel_error(sub, {n: full[n] for n in sub}) < REORDER_TOL
    stats: dict = {}
    cap = 4 * 32 * 64 + 1  # about one MLP matrix per pass
    split = compute_scores(model, tok, examples, "snip", batch_size=4, max_length=MAX_LEN, progress=False,
                           max_accumulator_bytes=cap, stats=stats)
    assert stats["n_passes"] == len(plan_passes(select_modules(model), "snip", cap)) > 3
    assert list(split) == list(full)
    assert max_rel_error(split, full) < REORDER_TOL
    # one pass per module group must still see every example: a pass over all but the last example is caught
    short = compute_scores(model, tok, examples[:-1], "snip", batch_size=4, max_length=MAX_LEN, progress=False,
                           max_accumulator_bytes=cap)
    assert max_rel_error(short, full) > WRONG_MARGIN * REORDER_TOL


@pytest.mark.parametrize("method", ["snip", "wanda"])
def test_host_accumulators_equal_device_accumulators(tok, examples, method):
    """Accumulators kept in host memory (each batch's contribution formed in a reused buffer, then added) give the
    device path's scores up to summation order: catches a buffer not zeroed between batches (earlier batches
    counted again), a contribution not added, or one added twice."""
    model = tiny_model("qwen2", vocab_size=VOCAB)
    full = compute_scores(model, tok, examples, method, batch_size=2, max_length=MAX_LEN, progress=False)
    host = compute_scores(model, tok, examples, method, batch_size=2, max_length=MAX_LEN, progress=False,
                          host_accumulators=True)
    assert list(host) == list(full) and all(t.device.type == "cpu" for t in host.values())
    assert max_rel_error(host, full) < REORDER_TOL
    # combined with passes too
    cap = 4 * 32 * 64 + 1
    both = compute_scores(model, tok, examples, method, batch_size=2, max_length=MAX_LEN, progress=False,
                          host_accumulators=True, max_accumulator_bytes=cap)
    assert max_rel_error(both, full) < REORDER_TOL


def test_model_state_untouched(tok, examples):
    model = tiny_model("gemma3", vocab_size=VOCAB)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    compute_scores(model, tok, examples[:3], "snip", batch_size=2, max_length=MAX_LEN, progress=False)
    assert not model.training
    for n, p in model.named_parameters():
        assert p.grad is None, n
        assert p.requires_grad == flags[n], n
        assert torch.equal(p, before[n]), n


def test_pre_encoded_and_bf16(tok, examples):
    model = tiny_model("phi3", vocab_size=VOCAB)
    encoded = [encode(tok, e, MAX_LEN) for e in examples]
    a = compute_scores(model, tok, examples, "wanda", batch_size=4, max_length=MAX_LEN, progress=False)
    b = compute_scores(model, None, encoded, "wanda", batch_size=4, max_length=MAX_LEN, progress=False)
    for n in a:  # the same token ids in the same batches: the same computation, bit for bit
        assert torch.equal(a[n], b[n]), n
    half = copy.deepcopy(model).to(torch.bfloat16)
    s16 = compute_scores(half, tok, examples, "snip", batch_size=4, max_length=MAX_LEN, progress=False)
    s32 = compute_scores(model, tok, examples, "snip", batch_size=4, max_length=MAX_LEN, progress=False)
    for n in s32:
        assert s16[n].dtype == torch.float32 and torch.isfinite(s16[n]).all()
        assert ((s16[n] - s32[n]).norm() / s32[n].norm()) < 0.1  # bf16 forward, fp32 accumulation


def test_peft_wrapped_model_scores_base_weights(tok, examples):
    peft = pytest.importorskip("peft")
    model = tiny_model("llama", vocab_size=VOCAB)
    plain = compute_scores(model, tok, examples[:4], "snip", batch_size=2, max_length=MAX_LEN, progress=False)
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    wrapped = peft.get_peft_model(copy.deepcopy(model), cfg)  # B = 0: same function as the plain model
    scores = compute_scores(wrapped, tok, examples[:4], "snip", batch_size=2, max_length=MAX_LEN, progress=False)
    assert list(scores) == list(plain)
    # the adapters add (zero) terms to the layer outputs, so fp32 rounding differs; the scores do not
    assert max_rel_error(scores, plain) < REORDER_TOL
    # what the tolerance still catches: the adapter's own (trained, non-zero) path changes the base gradients
    for m in wrapped.modules():
        if hasattr(m, "lora_B"):
            for b in m.lora_B.values():
                torch.nn.init.normal_(b.weight, std=0.5)
    moved = compute_scores(wrapped, tok, examples[:4], "snip", batch_size=2, max_length=MAX_LEN, progress=False)
    assert max_rel_error(moved, plain) > WRONG_MARGIN * REORDER_TOL


# --------------------------------------------------------------------------------------------------
# Score files


def _score_file(model, tok, examples, path, seed=0, **kw):
    stats: dict = {}
    scores = compute_scores(model, tok, examples, "snip", batch_size=4, max_length=MAX_LEN, progress=False,
                            stats=stats, **kw)
    meta = score_metadata(model, examples, "snip", seed=seed, max_length=MAX_LEN, stats=stats, data="test")
    save_scores(path, scores, meta)
    return scores, meta


def test_save_load_roundtrip_and_determinism(tmp_path, tok, examples):
    model = tiny_model("gpt2", vocab_size=VOCAB)
    scores, meta = _score_file(model, tok, examples, tmp_path / "a.safetensors")
    _score_file(tiny_model("gpt2", vocab_size=VOCAB), tok, examples, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()

    for mmap in (True, False):
        loaded, m2 = load_scores(tmp_path / "a.safetensors", mmap=mmap)
        assert list(loaded) == list(scores)  # canonical (natural) order, not the file's string order
        for n in scores:
            assert loaded[n].device.type == "cpu" and loaded[n].dtype == torch.float32
            assert torch.equal(loaded[n], scores[n])
        assert m2 == json.loads(json.dumps(meta))
    assert meta["n_examples"] == len(examples) and meta["n_response_tokens"] > 0
    assert meta["n_tokens"] >= meta["n_response_tokens"]
    assert meta["method"] == "snip" and meta["max_length"] == MAX_LEN and meta["seed"] == 0
    assert "torch" in meta["versions"] and len(meta["dataset_hash"]) == 64
    assert read_metadata(tmp_path / "a.safetensors")["model_hash"] == meta["model_hash"]
    sub, _ = load_scores(tmp_path / "a.safetensors", modules=["layers.1.*"])
    assert set(sub) == {n for n in scores if n.startswith("layers.1.")}
    # memory-mapped tensors are copy-on-write: editing one never changes the file
    mm, _ = load_scores(tmp_path / "a.safetensors")
    next(iter(mm.values())).zero_()
    again, _ = load_scores(tmp_path / "a.safetensors")
    assert torch.equal(next(iter(again.values())), next(iter(scores.values())))
    check_scores_match(model, meta, mm)
    with pytest.raises(BrittleError, match="already exists"):
        save_scores(tmp_path / "a.safetensors", scores, meta)


# --------------------------------------------------------------------------------------------------
# Errors


def test_errors(tmp_path, tok, examples):
    model = tiny_model("llama", vocab_size=VOCAB)
    with pytest.raises(BrittleError, match="unknown scoring method 'grad'"):
        compute_scores(model, tok, examples, "grad", batch_size=1, max_length=MAX_LEN, progress=False)
    long_prompt = make_examples("t", ["word " * 200], ["fine"])
    with pytest.raises(DataError, match=r"example #2 \(" + long_prompt[0].id + r"\) has no response tokens after "
                       "truncation to max_length=64"):
        compute_scores(model, tok, [examples[0], examples[3]] + long_prompt, "snip", batch_size=1, max_length=64,
                       progress=False)
    with pytest.raises(DataError, match="no response tokens"):
        compute_scores(model, tok, long_prompt, "wanda", batch_size=1, max_length=32, progress=False)
    with pytest.raises(DataError, match="empty response"):
        compute_scores(model, tok, make_examples("t", ["q"], [""]), "snip", batch_size=1, max_length=MAX_LEN,
                       progress=False)
    with pytest.raises(DataError, match="no examples"):
        compute_scores(model, tok, [], "snip", batch_size=1, max_length=MAX_LEN, progress=False)
    with pytest.raises(BrittleError, match="no linear module matches 'layers.9.*'"):
        compute_scores(model, tok, examples, "snip", batch_size=1, max_length=MAX_LEN, progress=False,
                       modules=["layers.9.*"])

    scores, meta = _score_file(model, tok, examples[:2], tmp_path / "s.safetensors", modules=["layers.0.q"])
    other = tiny_model("llama", seed=1, vocab_size=VOCAB)
    with pytest.raises(ScoreMismatchError, match="computed on model 'tiny-llama-seed0'.*not on the loaded model 'tiny-llama-seed1'"):
        check_scores_match(other, meta)
    with pytest.raises(ScoreMismatchError, match="shape"):
        check_scores_match(model, meta, {"layers.0.q": torch.zeros(3, 3)})
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(BrittleError, match="not a safetensors file"):
        load_scores(tmp_path / "x.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(BrittleError, match="not a brittle score file"):
        load_scores(tmp_path / "plain.safetensors")
    with pytest.raises(BrittleError, match="not found"):
        load_scores(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------------------------------
# The `brittle score` command


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", vocab_size=VOCAB).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_score_command(tmp_path, tiny_dir, examples):
    from typer.testing import CliRunner

    from brittle.cli import app
    from brittle.data.core import save_jsonl

    data = save_jsonl(tmp_path / "pairs.jsonl", examples)
    out = tmp_path / "run"
    args = ["score", "--model", str(tiny_dir), "--data", str(data), "--method", "snip", "--nsamples", "4",
            "--seed", "0", "--batch-size", "2", "--max-length", str(MAX_LEN), "--out", str(out)]
    runner = CliRunner()
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    path = out / "scores" / "pairs-snip" / "scores.safetensors"
    assert path.is_file() and str(path) in r.output
    scores, meta = load_scores(path)
    assert meta["n_examples"] == 4 and meta["seed"] == 0 and len(scores) == 14 and meta["data"] == "pairs"
    man = json.loads((out / "scores" / "pairs-snip" / "manifest.json").read_text())
    assert man["stage"] == "scores:pairs" and man["config"]["nsamples"] == 4
    assert man["inputs"]["data"] == json.loads((out / "data" / "manifest.json").read_text())["outputs"]["pairs"]["sha256"]
    assert man["outputs"]["scores"]["sha256"] == sha256_file(path)
    first = path.read_bytes()

    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "reusing" in r.output and path.read_bytes() == first
    # gradient checkpointing is not part of the record (the same scores): reused here, the same scores elsewhere
    r = runner.invoke(app, args + ["--gradient-checkpointing"])
    assert r.exit_code == 0 and "[scores:pairs] reusing" in r.output, r.output
    other = tmp_path / "checkpointed"
    r = runner.invoke(app, [a if a != str(out) else str(other) for a in args] + ["--gradient-checkpointing"])
    assert r.exit_code == 0 and "[scores:pairs] reusing" not in r.output, r.output
    again = load_scores(other / "scores" / "pairs-snip" / "scores.safetensors")[0]
    assert all(torch.equal(again[n], scores[n]) for n in scores)

    r = runner.invoke(app, [a if a != str(MAX_LEN) else "56" for a in args])
    assert r.exit_code == 2 and "other settings or inputs (config.max_length)" in r.output
    r = runner.invoke(app, [a if a != str(MAX_LEN) else "56" for a in args] + ["--force"])
    assert r.exit_code == 0 and read_metadata(path)["max_length"] == 56, r.output

    r = runner.invoke(app, [a if a != "snip" else "magnitude" for a in args])
    assert r.exit_code == 2 and "scores.method: Input should be 'snip', 'wanda' or 'snip-summed'" in r.output
