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
    kept = man["outputs"]["safety"]["kept"]
    assert kept == res.counts["safety"]["kept"] == len(load_file(tmp_path / "out" / "safety.jsonl")) if kept else True
    from brittle.data.sources import harmful_splits

    eval_prompts = {e.prompt for e in harmful_splits()[1]}
    assert not eval_prompts & {e.prompt for e in load_file(tmp_path / "out" / "utility.jsonl")}
    if kept:
        assert not eval_prompts & {e.prompt for e in load_file(tmp_path / "out" / "safety.jsonl")}
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
