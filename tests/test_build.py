"""Datasets built from the model's own answers: files, manifest counts, caching keyed by the weights."""

from __future__ import annotations

import json

import pytest
import torch

from brittle.data import load_file
from brittle.data.build import BuildConfig, build_datasets, default_build_dir, resolve_dataset
from brittle.io import BrittleError
from brittle.models import weight_fingerprint
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


def test_build_writes_sets_and_manifest(tiny, tmp_path):
    spec, model, tok = tiny
    cfg = BuildConfig(model=spec, n_safety=6, n_utility=5, max_new_tokens=4, batch_size=4, judge="keyword-wei")
    res = build_datasets(cfg, tmp_path / "out", model_and_tokenizer=(model, tok), progress=False)
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["outputs"]["safety"]["generated"] == 6 and man["outputs"]["utility"]["generated"] == 5
    assert man["inputs"]["model_weights"] == weight_fingerprint(model)
    # the paper's judge calls every answer under 20 words a refusal: all non-empty 4-token answers are kept
    safety = load_file(tmp_path / "out" / "safety.jsonl")
    utility = load_file(tmp_path / "out" / "utility.jsonl")
    assert man["outputs"]["safety"]["kept"] == res.counts["safety"]["kept"] == len(safety) == 6
    assert man["outputs"]["utility"]["kept"] == res.counts["utility"]["kept"] == len(utility) == 5
    token = tok.decode(tok.encode(" Sorry", add_special_tokens=False)[:1]).strip()  # the one favoured token
    assert all(e.response.split() == [token] * 4 for e in safety + utility)
    from brittle.data.sources import benign_splits, harmful_splits

    eval_prompts = {e.prompt for e in harmful_splits()[1]}
    assert not eval_prompts & {e.prompt for e in safety}
    train_harmful, train_benign = {e.prompt for e in harmful_splits()[0]}, {e.prompt for e in benign_splits()[0]}
    assert {e.prompt for e in safety} <= train_harmful and {e.prompt for e in utility} <= train_benign
    with pytest.raises(BrittleError, match="--force"):
        build_datasets(cfg, tmp_path / "out", model_and_tokenizer=(model, tok), progress=False)


def test_resolve_dataset_caches_and_rebuilds_for_new_weights(tiny, monkeypatch):
    spec, model, tok = tiny
    import brittle.data.build as B

    calls = []
    real = B.build_datasets

    def small(cfg, out, **kw):
        calls.append(out)
        return real(BuildConfig(model=spec, n_safety=3, n_utility=3, max_new_tokens=3, judge="keyword-wei"), out,
                    progress=False, **kw)

    monkeypatch.setattr(B, "build_datasets", small)
    first = resolve_dataset("utility", spec, 0, model_and_tokenizer=(model, tok))
    again = resolve_dataset("utility", spec, 0, model_and_tokenizer=(model, tok))
    assert first == again and len(calls) == 1 and calls[0] == default_build_dir(spec, 0)
    with torch.no_grad():  # "retrained" weights: the cached set is stale
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.add_(0.5)
    resolve_dataset("utility", spec, 0, model_and_tokenizer=(model, tok))
    assert len(calls) == 2
