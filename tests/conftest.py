"""Shared fixtures. The SmolLM2 tokenizer comes from the embedded default model (installed by make setup)."""

from __future__ import annotations

import os

import pytest

# Tests never reach the Hugging Face Hub (CI has no network beyond package registries).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smol_dir():
    from brittle.models import resolve_model_path

    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
