"""ActSVD core (brittle.lowrank): output covariances, directions, low-rank edits, reversible application.

Each test names (in a comment) the plausible wrong implementation it catches.
"""

from __future__ import annotations

import pytest
import torch

from brittle.data.core import IGNORE_INDEX, DataError, encode, make_examples
from brittle.io import BrittleError
from brittle.lowrank import (
    OrthogonalRemoval,
    TopRemoval,
    fraction_removed,
    lowrank_modified,
    orthogonal_plan,
    orthogonal_removal,
    random_directions,
    random_plan,
    record_output_covariance,
    remove_directions,
    top_directions,
    top_removal_plan,
)
from brittle.models import linear_modules, linear_weight
from brittle.testing import tiny_model

EPS32 = torch.finfo(torch.float32).eps

PROMPTS = ["How do I bake bread?", "Name three colours.", "What is two plus two?", "Tell me a fact about owls.",
           "Write a haiku about rain."]
RESPONSES = ["Mix flour, water and yeast, let it rise, then bake it.", "Red, green and blue.", "Four.",
             "Owls can turn their heads a long way round.", "Grey clouds gather low / drops drum on the tin roof / the street shines again"]


@pytest.fixture(scope="module")
def examples():
    return make_examples("test", PROMPTS, RESPONSES)


def _model(arch, tok, dtype=torch.float32):
    return tiny_model(arch, vocab_size=len(tok), dtype=dtype)


def _orthonormal(d, r, seed):
    return random_directions(d, r, seed)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, before):
    after = model.state_dict()
    return all(torch.equal(after[k], v) for k, v in before.items())


def _scale_atol(ref: torch.Tensor, w: torch.Tensor, factor: float = 64.0) -> float:
    """fp32 rounding of a sum over d_out terms of size ~max|W|: factor * eps * sqrt(d_out) * max|W|."""
    return factor * EPS32 * ref.shape[0] ** 0.5 * float(w.abs().max())


# --------------------------------------------------------------------------------------------------
# Projections against dense float64 references


def test_remove_directions_matches_dense_float64(num_threads):
    # Catches: P W kept instead of removed; V V^T applied on the wrong side (W V V^T: shape error for
    # d_out != d_in); a sign error in the update.
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    v = _orthonormal(48, 7, seed=1)
    ref = (torch.eye(48, dtype=torch.float64) - v.double() @ v.double().t()) @ w.double()
    out = remove_directions(w, v)
    assert out.dtype == torch.float32 and out.shape == w.shape
    assert float((out.double() - ref).abs().max()) <= _scale_atol(ref, w)


def test_orthogonal_removal_matches_dense_float64(num_threads):
    # Catches: the projectors in the wrong order (P_s (I - P_u) W), (I - P_s) instead of P_s, U and S swapped.
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    u = _orthonormal(48, 10, seed=1)
    s = _orthonormal(48, 6, seed=2)
    eye = torch.eye(48, dtype=torch.float64)
    pu, ps = u.double() @ u.double().t(), s.double() @ s.double().t()
    ref = w.double() - (eye - pu) @ ps @ w.double()
    out = orthogonal_removal(w, u, s)
    assert out.dtype == torch.float32
    assert float((out.double() - ref).abs().max()) <= _scale_atol(ref, w)
    # the wrong orders really differ here (the test can fail)
    assert float(((w.double() - ps @ (eye - pu) @ w.double()) - ref).abs().max()) > 1e-2


def test_bf16_weight_is_computed_in_fp32_and_cast_once():
    # Catches: the algebra done in bf16 (V^T W rounded to bf16, then V @ (.) rounded again; seed bug B12).
    # Bound: half a bf16 ulp of the exact result (the single final rounding) plus fp32 rounding.
    torch.manual_seed(0)
    w = torch.randn(64, 48).to(torch.bfloat16)
    v = _orthonormal(64, 16, seed=3)
    ref = (torch.eye(64, dtype=torch.float64) - v.double() @ v.double().t()) @ w.double()
    out = remove_directions(w, v)
    assert out.dtype == torch.bfloat16
    exponent = torch.floor(torch.log2(ref.abs().clamp_min(1e-30)))
    bound = torch.exp2(exponent - 8) + _scale_atol(ref, w.float())
    assert bool(((out.double() - ref).abs() <= bound).all())
    naive = (w - v.to(torch.bfloat16) @ (v.to(torch.bfloat16).t() @ w)).double()  # the bf16 algebra
    assert not bool(((naive - ref).abs() <= bound).all())


def test_top_removal_zeroes_the_removed_directions():
    # Catches: keeping the top-r part (P W), removing from the input side, V not applied twice (V W).
    torch.manual_seed(0)
    w = torch.randn(40, 56)
    v = _orthonormal(40, 9, seed=4)
    out = remove_directions(w, v)
    assert float((v.t() @ out).abs().max()) <= _scale_atol(out, w)
    # and the orthogonal complement is untouched
    q = torch.linalg.qr(torch.cat([v, torch.randn(40, 31)], 1).double())[0][:, 9:].float()
    assert float((q.t() @ (out - w)).abs().max()) <= _scale_atol(out, w)


def test_orthogonal_removal_leaves_utility_outputs_unchanged():
    # U^T W' x = U^T W x for every x, since (I - P_u) P_s W x lies in the complement of span(U).
    # Catches: plain removal of S (W - P_s W) and the swapped order, since S overlaps span(U) here.
    torch.manual_seed(0)
    u = _orthonormal(48, 12, seed=5)
    s = torch.linalg.qr(torch.cat([u[:, :3] + 0.5 * torch.randn(48, 3), torch.randn(48, 5)], 1))[0]  # overlaps U
    w = torch.randn(48, 32)
    x = torch.randn(32, 100)
    out = orthogonal_removal(w, u, s)
    atol = _scale_atol(out, w) * float(x.abs().max()) * 32 ** 0.5
    assert float((u.t() @ (out @ x) - u.t() @ (w @ x)).abs().max()) <= atol
    assert float((out - w).abs().max()) > 0.1  # something was removed
    plain = remove_directions(w, s)
    assert float((u.t() @ (plain @ x) - u.t() @ (w @ x)).abs().max()) > 100 * atol


def test_paper_setting_r_safety_below_r_utility_is_allowed():
    # The paper's setting (reference/seed-code-spec.md 3.2): r_safety ~96 against r_utility ~1096, i.e.
    # r_safety < r_utility. Catches: a validation that rejects it, or a rank bound of r_safety - r_utility.
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    edit = OrthogonalRemoval(_orthonormal(64, 20, seed=1), _orthonormal(64, 3, seed=2))
    assert edit.rank == 3
    delta = edit(w) - w
    assert int(torch.linalg.matrix_rank(delta.double(), atol=1e-4)) == 3


# --------------------------------------------------------------------------------------------------
# Directions


def test_top_directions_are_the_top_right_singular_vectors():
    # Catches: eigh's ascending order taken as descending (the bottom-r directions), the top-r of A A^T
    # (left singular vectors, wrong size), an unsymmetrised covariance.
    torch.manual_seed(0)
    a = torch.randn(200, 24, dtype=torch.float64) @ torch.diag(torch.linspace(5, 0.1, 24, dtype=torch.float64))
    cov = (a.t() @ a).float()
    v = top_directions(cov, 5)
    assert v.shape == (24, 5) and v.dtype == torch.float32
    vh = torch.linalg.svd(a, full_matrices=False).Vh[:5].t()
    assert float((v.double() @ v.double().t() - vh @ vh.t()).abs().max()) < 1e-5
    # largest first: the energy along each column decreases
    energy = ((a @ v.double()) ** 2).sum(0)
    assert bool((energy[:-1] >= energy[1:]).all())
    # nested: the top-2 are the first two of the top-5 (a rank sweep needs one eigendecomposition)
    assert torch.allclose(top_directions(cov, 2), v[:, :2], atol=1e-6)
    # deterministic signs: the largest-magnitude entry of each column is positive
    assert bool((v.gather(0, v.abs().argmax(0, keepdim=True)) > 0).all())


def test_random_directions_rank_orthonormal_deterministic():
    # Catches: an unnormalised Gaussian (not orthonormal), use of the global RNG (not reproducible by seed,
    # advances the caller's RNG), a rank-deficient draw.
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = random_directions(30, 6, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)
    b = random_directions(30, 6, seed=7)
    c = random_directions(30, 6, seed=8)
    assert a.shape == (30, 6) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float((a.t() @ a - torch.eye(6)).abs().max()) < 1e-5
    assert int(torch.linalg.matrix_rank(a)) == 6


def test_random_plan_is_per_module_and_independent_of_the_selection(smol_tokenizer):
    # Catches: one shared subspace for all modules of a shape; seeds by position in the selection.
    model = _model("llama", smol_tokenizer)
    full = random_plan(model, 4, seed=0)
    one = random_plan(model, 4, seed=0, modules="layers.1.o")
    assert torch.equal(full["layers.1.o"].V, one["layers.1.o"].V)
    assert not torch.equal(full["layers.0.o"].V, full["layers.1.o"].V)
    assert not torch.equal(random_plan(model, 4, seed=1)["layers.1.o"].V, one["layers.1.o"].V)


# --------------------------------------------------------------------------------------------------
# Recording


def _brute_force_cov(model, tok, examples, name, max_length):
    """float64 A^T A from the module's inputs, one example at a time (no padding), at labels != -100."""
    module = linear_modules(model)[name]
    w = linear_weight(module).detach().double()
    seen = []
    h = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    cov = torch.zeros(w.shape[0], w.shape[0], dtype=torch.float64)
    n = 0
    try:
        for e in examples:
            enc = encode(tok, e, max_length)
            seen.clear()
            with torch.no_grad():
                model(input_ids=enc["input_ids"][None], use_cache=False)
            x = seen[0].reshape(-1, w.shape[1]).double()[enc["labels"] != IGNORE_INDEX]
            a = x @ w.t()
            cov += a.t() @ a
            n += x.shape[0]
    finally:
        h.remove()
    return cov, n


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_covariance_equals_float64_brute_force(arch, smol_tokenizer, examples):
    # Catches: prompt positions included, the SNIP-shifted mask (labels[t+1]), padding rows counted, the bias
    # included in A (qwen2 q/k/v get a random bias here), GPT-2 Conv1D's stored [d_in, d_out] used as W.
    model = _model(arch, smol_tokenizer)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 1.0)
    stats = {}
    covs = record_output_covariance(model, smol_tokenizer, examples, batch_size=2, max_length=64, progress=False,
                                    stats=stats)
    assert list(covs) == list(linear_modules(model))
    names = list(covs)
    for name in (names[0], names[2], names[-1]):
        ref, n = _brute_force_cov(model, smol_tokenizer, examples, name, 64)
        assert covs[name].dtype == torch.float32 and covs[name].shape == ref.shape
        # |C_ij| <= sqrt(C_ii C_jj) <= max diag: a tolerance on that scale, not element-wise rtol
        assert float((covs[name].double() - ref).abs().max()) <= 1e-5 * float(ref.diagonal().max())
    assert stats["n_response_tokens"] == n and stats["n_examples"] == len(examples) and stats["n_passes"] == 1


def test_float64_covariance_matches_brute_force_tightly(smol_tokenizer, examples):
    # Catches: dtype=float64 silently accumulated in fp32 (error ~1e-7 relative, far above the bound).
    model = _model("llama", smol_tokenizer, dtype=torch.float64)
    covs = record_output_covariance(model, smol_tokenizer, examples, batch_size=3, max_length=64, progress=False,
                                    dtype=torch.float64, modules="layers.1.*")
    ref, _ = _brute_force_cov(model, smol_tokenizer, examples, "layers.1.down", 64)
    assert covs["layers.1.down"].dtype == torch.float64
    assert float((covs["layers.1.down"] - ref).abs().max()) <= 1e-12 * float(ref.diagonal().max())


def test_one_pass_equals_per_module_recording(smol_tokenizer, examples):
    # Catches: hooks sharing one (late-bound) accumulator, so every module gets the last module's sum or all of
    # them; accumulators mixed up between modules of the same shape; passes split by max_accumulator_bytes
    # that drop or double-count modules.
    model = _model("llama", smol_tokenizer)
    together = record_output_covariance(model, smol_tokenizer, examples, batch_size=2, max_length=64, progress=False)
    stats = {}
    split = record_output_covariance(model, smol_tokenizer, examples, batch_size=2, max_length=64, progress=False,
                                     max_accumulator_bytes=64 * 64 * 4, stats=stats)
    assert stats["n_passes"] > 1
    for name, cov in together.items():
        alone = record_output_covariance(model, smol_tokenizer, examples, batch_size=2, max_length=64,
                                         progress=False, modules=name)[name]
        scale = float(cov.diagonal().max())
        assert float((alone - cov).abs().max()) <= 1e-6 * scale, name
        assert float((split[name] - cov).abs().max()) <= 1e-6 * scale, name
    assert float((together["layers.0.q"] - together["layers.1.q"]).abs().max()) > 1e-3


def test_recording_errors(smol_tokenizer, examples):
    # Catches: an example whose response is truncated away silently contributing nothing; bad arguments accepted.
    model = _model("llama", smol_tokenizer)
    long_prompt = make_examples("test", ["word " * 60], ["A response."])
    with pytest.raises(DataError, match="no response tokens"):
        record_output_covariance(model, smol_tokenizer, long_prompt, batch_size=1, max_length=16, progress=False)
    with pytest.raises(DataError, match="empty response"):
        record_output_covariance(model, smol_tokenizer, make_examples("t", ["Hi"], [" "]), batch_size=1,
                                 max_length=64, progress=False)
    with pytest.raises(BrittleError, match="batch_size"):
        record_output_covariance(model, smol_tokenizer, examples, batch_size=0, max_length=64, progress=False)
    with pytest.raises(BrittleError, match="dtype"):
        record_output_covariance(model, smol_tokenizer, examples, batch_size=1, max_length=64, progress=False,
                                 dtype=torch.float16)


# --------------------------------------------------------------------------------------------------
# Applying plans to a model


def test_top_removal_on_the_model_removes_the_top_output_energy(smol_tokenizer, examples):
    # After editing one module (its inputs unchanged), its recorded outputs have no energy along V.
    # Catches: the plan applied to another module, the edit not written into the model (e.g. into a copy of a
    # Conv1D transposed view), directions from the wrong end of the spectrum.
    model = _model("llama", smol_tokenizer)
    name = "layers.1.gate"
    cov = record_output_covariance(model, smol_tokenizer, examples, batch_size=2, max_length=64, progress=False,
                                   modules=name)
    plan = top_removal_plan(cov, 4)
    v = plan[name].V.double()
    with lowrank_modified(model, plan):
        after = record_output_covariance(model, smol_tokenizer, examples, batch_size=2, max_length=64,
                                         progress=False, modules=name)[name].double()
    top = float(torch.trace(v.t() @ cov[name].double() @ v))
    assert float(torch.trace(v.t() @ after @ v)) <= 1e-6 * top
    # the rest of the output energy is untouched (up to fp32 rounding)
    assert float(torch.trace(after)) == pytest.approx(float(torch.trace(cov[name].double())) - top, rel=1e-4)


def test_orthogonal_plan_keeps_utility_outputs_on_calibration_inputs(smol_tokenizer, examples):
    # U^T A' = U^T A on the calibration data (A = outputs of the edited module, inputs unchanged), while the
    # safety outputs change exactly as predicted. Catches: the swapped projector order, the edit written into
    # another module or not at all.
    model = _model("llama", smol_tokenizer)
    name = "layers.1.o"
    utility, safety = examples[:3], examples[3:]
    cu = record_output_covariance(model, smol_tokenizer, utility, batch_size=2, max_length=64, progress=False,
                                  modules=name)
    cs = record_output_covariance(model, smol_tokenizer, safety, batch_size=2, max_length=64, progress=False,
                                  modules=name)
    plan = orthogonal_plan(cu, cs, r_utility=8, r_safety=4)
    u, s = plan[name].U.double(), plan[name].S.double()
    with lowrank_modified(model, plan):
        cs_after = record_output_covariance(model, smol_tokenizer, safety, batch_size=2, max_length=64,
                                            progress=False, modules=name)[name].double()
    before = u.t() @ cs[name].double() @ u
    after = u.t() @ cs_after @ u
    scale = float(cs[name].diagonal().max())
    assert float((after - before).abs().max()) <= 1e-5 * scale
    # and the whole output covariance is the predicted one: A' = A (I - M)^T with M = (I - P_u) P_s
    m = (torch.eye(u.shape[0], dtype=torch.float64) - u @ u.t()) @ s @ s.t()
    predicted = (torch.eye(u.shape[0], dtype=torch.float64) - m) @ cs[name].double() @ (torch.eye(u.shape[0]) - m).t()
    assert float((cs_after - predicted).abs().max()) <= 1e-5 * scale
    assert float((cs_after - cs[name].double()).abs().max()) > 1e-2 * scale  # something was removed


@pytest.mark.parametrize("arch,dtype", [("llama", torch.bfloat16), ("gpt2", torch.float32)])
def test_restore_is_bit_exact(arch, dtype, smol_tokenizer):
    # Catches: originals saved without a copy (aliasing the edited tensor), restoring by adding the removed
    # part back (not bit-exact), a Conv1D weight restored in the wrong orientation, no restore on exceptions.
    model = _model(arch, smol_tokenizer, dtype=dtype)
    before = _state(model)
    plan = random_plan(model, 3, seed=0)
    with lowrank_modified(model, plan):
        assert not _same_state(model, before)
        w = linear_weight(linear_modules(model)["layers.0.o"]).detach()
        assert float((plan["layers.0.o"].V.t().to(w.dtype) @ w).float().abs().max()) < 0.05 * float(w.float().abs().max())
    assert _same_state(model, before)
    with pytest.raises(RuntimeError, match="boom"), lowrank_modified(model, plan, offload=True):
        assert not _same_state(model, before)
        raise RuntimeError("boom")
    assert _same_state(model, before)


def test_restore_when_an_edit_fails_midway(smol_tokenizer):
    # Catches: modules edited before a failing edit left modified.
    model = _model("llama", smol_tokenizer)
    before = _state(model)
    plan = dict(random_plan(model, 2, seed=0, modules="layers.0.*"))

    def fails(w):
        raise RuntimeError("edit failed")

    plan["layers.1.q"] = fails
    with pytest.raises(RuntimeError, match="edit failed"), lowrank_modified(model, plan):
        pass
    assert _same_state(model, before)


def _bad_entries():
    """(description, plan entry for layers.1.gate [64, 32]) that must be rejected."""
    return [
        ("r above min(d_out, d_in)", TopRemoval(random_directions(64, 33, 0))),  # r <= d_out but > d_in
        ("wrong d_out", TopRemoval(random_directions(32, 4, 0))),
        ("r_utility above min(d_out, d_in)", OrthogonalRemoval(random_directions(64, 40, 0), random_directions(64, 2, 1))),
        ("not callable", "top-4"),
    ]


def test_bad_plans_raise_before_any_weight_changes(smol_tokenizer):
    # A spy edit comes first in the plan: it must never run. Catches: validation done module by module while
    # applying (earlier modules already edited when the bad entry is reached).
    model = _model("llama", smol_tokenizer)
    before = _state(model)
    for what, bad in _bad_entries():
        calls = []
        plan = {"layers.0.q": lambda w: calls.append(1) or w, "layers.1.gate": bad}
        with pytest.raises(BrittleError), lowrank_modified(model, plan):
            pass
        assert not calls, what
        assert _same_state(model, before), what
    with pytest.raises(BrittleError, match="does not exist"), lowrank_modified(model, {"layers.9.q": lambda w: w}):
        pass
    # r_utility = d_out: I - P_u = 0, nothing to remove (q is [32, 32])
    with pytest.raises(BrittleError, match="r_utility"), lowrank_modified(
            model, {"layers.0.q": OrthogonalRemoval(random_directions(32, 32, 0), random_directions(32, 2, 1))}):
        pass
    assert _same_state(model, before)


def test_bad_bases_and_ranks_raise():
    # Catches: non-orthonormal or low-precision bases accepted (V V^T is then no projector), rank 0 accepted.
    v = random_directions(16, 4, 0)
    w = torch.randn(16, 8)
    for bad in (2 * v, torch.randn(16, 4), v.to(torch.bfloat16), v[:, :0], torch.full_like(v, float("nan"))):
        with pytest.raises(BrittleError):
            remove_directions(w, bad)
        with pytest.raises(BrittleError):
            orthogonal_removal(w, v, bad)
    with pytest.raises(BrittleError, match="r must be"):
        top_directions(torch.eye(16), 0)
    with pytest.raises(BrittleError, match="r must be"):
        top_directions(torch.eye(16), 17)
    with pytest.raises(BrittleError, match="square"):
        top_directions(torch.ones(16, 8), 2)
    with pytest.raises(BrittleError, match="r must be"):
        random_directions(16, 0, 0)
    with pytest.raises(BrittleError, match="r must be"):
        remove_directions(w, random_directions(16, 9, 0))  # 9 > min(16, 8)
    with pytest.raises(BrittleError, match="different modules"):
        orthogonal_plan({"a": torch.eye(4)}, {"b": torch.eye(4)}, r_utility=2, r_safety=1)


def test_fraction_removed_uses_min_of_both_dimensions(smol_tokenizer):
    # Catches: r / d_out (wrong for the [64, 32] gate/up), r_safety reported for the orthogonal variant when
    # d_out - r_utility is smaller.
    model = _model("llama", smol_tokenizer)
    plan = random_plan(model, 4, seed=0, modules=["layers.0.q", "layers.0.gate", "layers.0.down"])
    assert fraction_removed(model, plan) == {"layers.0.q": 4 / 32, "layers.0.gate": 4 / 32, "layers.0.down": 4 / 32}
    orth = {"layers.0.q": OrthogonalRemoval(random_directions(32, 30, 0), random_directions(32, 5, 1))}
    assert fraction_removed(model, orth) == {"layers.0.q": 2 / 32}
    with pytest.raises(BrittleError, match="no rank"):
        fraction_removed(model, {"layers.0.q": lambda w: w})
