"""The data stage: sets built from the model's own answers (files, manifest counts), user files copied,
reuse keyed by the weights."""

from __future__ import annotations

import json

import pytest
import torch

from brittle.config import load_config
from brittle.data import load_file
from brittle.data.build import build_prompts, keep_answers
from brittle.data.core import DataError, make_examples
from brittle.models import weight_fingerprint
from brittle.pipeline import data_stage
from brittle.stage import RunContext, StageMismatchError
from brittle.testing import tiny_model


@pytest.fixture()
def tiny(smol_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("BRITTLE_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama", vocab_size=len(smol_tokenizer))
    model.save_pretrained(tmp_path / "tiny")
    # a random model answers with random tokens, often an end-of-turn token at once; make it say "Sorry" every
    # time, so that the filters keep a known number of answers
    word = smol_tokenizer.encode(" Sorry", add_special_tokens=False)[0]

    def favour_word(module, args, logits):
        logits = logits.clone()
        logits[..., word] += 100.0
        return logits

    model.lm_head.register_forward_hook(favour_word)
    smol_tokenizer.save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny"), model, smol_tokenizer


def _ctx(tmp_path, spec, model, tok, **kw):
    """A run context whose model is the in-memory (hooked) tiny model, as the stages would load it."""
    ctx = RunContext(out=tmp_path / "out", progress=False, log=lambda s: None, **kw)
    ctx.cache[("model", spec, "float32", None)] = (model, tok, weight_fingerprint(model))
    return ctx


def test_data_stage_builds_sets_and_manifest(tiny, tmp_path):
    spec, model, tok = tiny
    cfg = load_config(None, [f"model={json.dumps(spec)}", "data.n_safety=6", "data.n_utility=5",
                             "data.max_new_tokens=4", "data.batch_size=4", "data.judge=keyword-wei"])
    res = data_stage(_ctx(tmp_path, spec, model, tok), cfg)
    man = json.loads((tmp_path / "out" / "data" / "manifest.json").read_text())
    assert man["stage"] == "data" and man["inputs"]["model_weights"] == weight_fingerprint(model)
    assert man["outputs"]["safety"]["generated"] == 6 and man["outputs"]["utility"]["generated"] == 5
    # the paper's judge calls every answer under 20 words a refusal: all non-empty 4-token answers are kept
    safety, utility = load_file(res.path("safety")), load_file(res.path("utility"))
    assert man["outputs"]["safety"]["kept"] == len(safety) == 6
    assert man["outputs"]["utility"]["kept"] == len(utility) == 5
    token = tok.decode(tok.encode(" Sorry", add_special_tokens=False)[:1]).strip()  # the one favoured token
    assert all(e.response.split() == [token] * 4 for e in safety + utility)
    from brittle.data.sources import benign_splits, harmful_splits

    eval_prompts = {e.prompt for e in harmful_splits()[1]}
    assert not eval_prompts & {e.prompt for e in safety}
    train_harmful, train_benign = {e.prompt for e in harmful_splits()[0]}, {e.prompt for e in benign_splits()[0]}
    assert {e.prompt for e in safety} <= train_harmful and {e.prompt for e in utility} <= train_benign

    # same weights: reused; "retrained" weights: the recorded sets are stale and refused
    assert data_stage(_ctx(tmp_path, spec, model, tok), cfg).reused
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.add_(0.5)
    with pytest.raises(StageMismatchError, match=r"inputs\.model_weights"):
        data_stage(_ctx(tmp_path, spec, model, tok), cfg)
    assert not data_stage(_ctx(tmp_path, spec, model, tok, force=True), cfg).reused


def test_user_files_are_copied_without_loading_the_model(tmp_path):
    src = tmp_path / "pairs.jsonl"
    src.write_text(json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n")
    cfg = load_config(None, ["model=never-loaded", f"data.sets={{pairs = {json.dumps(str(src))}}}"])
    ctx = RunContext(out=tmp_path / "out", progress=False, log=lambda s: None)
    res = data_stage(ctx, cfg)  # an unknown model name would fail if it were loaded
    assert [e.response for e in load_file(res.path("pairs"))] == ["Hello"] and "model_weights" not in res.manifest["inputs"]
    src.write_text(json.dumps({"prompt": "Hi", "response": "Changed"}) + "\n")
    with pytest.raises(StageMismatchError, match=r"inputs\.set:pairs"):
        data_stage(ctx, cfg)


def test_built_prompts_and_filters():
    a, b = build_prompts("safety", 5, seed=0), build_prompts("safety", 5, seed=0)
    assert [e.prompt for e in a] == [e.prompt for e in b] and len(a) == 5
    assert [e.prompt for e in build_prompts("safety", 5, seed=1)] != [e.prompt for e in a]
    prompts = make_examples("t", ["p1", "p2", "p3"], ["", "", ""])
    kept, counts = keep_answers("safety", prompts, ["I can't.", "Sure: step 1", "  "], ["refusal", "compliance", "refusal"])
    assert [e.response for e in kept] == ["I can't."] and counts == {"generated": 3, "kept": 1, "dropped": 2}
    kept, counts = keep_answers("utility", prompts, ["a", " ", "b"])
    assert [e.response for e in kept] == ["a", "b"] and counts["dropped"] == 1
    with pytest.raises(ValueError, match="verdicts"):
        keep_answers("safety", prompts, ["a", "b", "c"])


def test_an_empty_built_safety_set_stops_scoring_with_the_reason(tiny, tmp_path):
    from brittle.pipeline import scores_stage

    spec, model, tok = tiny
    # the refusal-v1 judge does not call four repeated words a refusal: nothing is kept
    cfg = load_config(None, [f"model={json.dumps(spec)}", "data.n_safety=3", "data.n_utility=2",
                             "data.max_new_tokens=4", "scores.nsamples=2"])
    ctx = _ctx(tmp_path, spec, model, tok)
    res = data_stage(ctx, cfg)
    assert res.outputs["safety"]["kept"] == 0 and res.outputs["safety"]["n"] == 0
    with pytest.raises(DataError, match=r"the set 'safety' .* is empty -- the model refused none"):
        scores_stage(ctx, cfg, "safety")
