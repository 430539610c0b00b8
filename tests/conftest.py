"""Shared fixtures. The SmolLM2 tokenizer comes from the embedded default model (installed by make setup)."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never reach the Hugging Face Hub (CI has no network beyond package registries).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smol_dir():
    from brittle.presets import resolve_model_path

    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(params=["threads=1", "threads=default"])
def num_threads(request):
    """Run a numerical test single-threaded and multi-threaded: fp32 reductions split differently across
    threads, so a tolerance that encodes one machine's summation order fails here too, on any machine."""
    before = torch.get_num_threads()
    n = 1 if request.param == "threads=1" else max(2, before)
    torch.set_num_threads(n)
    yield n
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama_dir(smol_tokenizer, tmp_path_factory) -> str:
    """A tiny random Llama (seed 0) with the SmolLM2 tokenizer, saved as a Hugging Face model directory.
    Shared by the whole session: tests read it and never write into it."""
    from brittle.testing import tiny_model

    d = tmp_path_factory.mktemp("tiny-llama") / "m"
    tiny_model("llama", vocab_size=len(smol_tokenizer)).save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return str(d)
