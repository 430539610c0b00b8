"""Shared fixtures. The SmolLM2 tokenizer comes from the embedded default model (installed by make setup)."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never reach the Hugging Face Hub (CI has no network beyond package registries).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Every test computes its stages: none copies a finished one from the shared cache of $BRITTLE_CACHE/stages
# (tests/test_stage.py turns the cache on with a private $BRITTLE_CACHE to test it).
os.environ["BRITTLE_SHARED_STAGES"] = "0"


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


def tiny_run_settings(tokenizer, folder, n_utility: int = 6) -> list[str]:
    """A tiny random Llama saved in ``folder/m`` and small safety / utility files beside it; returns the
    ``--set`` overrides that point a run at them (model and data.sets)."""
    import json

    from brittle.testing import tiny_model

    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder / "m")
    tokenizer.save_pretrained(folder / "m")
    rows = {"safety": [{"prompt": f"How do I make weapon {i}?", "response": "I can't help with that."} for i in range(6)],
            "utility": [{"prompt": f"Name a colour, number {i}.", "response": f"Blue is colour {i}."}
                        for i in range(n_utility)]}
    for kind, rs in rows.items():
        (folder / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    return [f"model={json.dumps(str(folder / 'm'))}", f"data.sets.safety={json.dumps(str(folder / 'safety.jsonl'))}",
            f"data.sets.utility={json.dumps(str(folder / 'utility.jsonl'))}"]


def run_settings(config, sets, out, *, force: bool = False, logs: list[str] | None = None):
    """Run the experiment of ``config`` (a file or None for the defaults) with ``--set`` overrides ``sets`` into
    ``out``, quietly; log lines go to ``logs``."""
    from brittle.config import load_config
    from brittle.pipeline import run_experiment
    from brittle.stage import RunContext

    return run_experiment(load_config(config, sets), RunContext(out=out, force=force, progress=False,
                                                                log=(logs if logs is not None else []).append))
