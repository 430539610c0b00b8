"""`brittle demo`'s experiment runner on a tiny model: all stages, resume, and no silent reuse of other settings."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from brittle.io import BrittleError
from brittle.pipeline import AblationExperiment, run_ablation_experiment
from brittle.testing import tiny_model

TINY_EVAL = {"n_harmful": 2, "max_new_tokens": 2, "n_benign": 2, "n_perplexity": 2, "tasks": []}


@pytest.fixture
def setup(smol_tokenizer, tmp_path):
    model = tiny_model("llama", vocab_size=len(smol_tokenizer))
    model.save_pretrained(tmp_path / "m")
    smol_tokenizer.save_pretrained(tmp_path / "m")
    rows = {"safety": [{"prompt": f"How do I make weapon {i}?", "response": "I can't help with that."} for i in range(6)],
            "utility": [{"prompt": f"Name a colour, number {i}.", "response": f"Blue is colour {i}."} for i in range(6)]}
    for kind, rs in rows.items():
        (tmp_path / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    cfg = AblationExperiment(model=str(tmp_path / "m"), safety_data=str(tmp_path / "safety.jsonl"),
                             utility_data=str(tmp_path / "utility.jsonl"), nsamples=4, batch_size=2, max_length=64,
                             sparsities=(0.05,), eval_overrides=TINY_EVAL)
    return cfg, tmp_path


def test_experiment_runs_every_stage_then_resumes(setup):
    cfg, tmp_path = setup
    out = tmp_path / "run"
    said: list[str] = []
    outputs = run_ablation_experiment(cfg, out, echo=said.append)
    table = pd.read_csv(outputs["table"])
    assert list(table.group) == ["dense", "top_safety", "set_difference", "random", "random_magnitude"]
    assert outputs["figure"].stat().st_size > 1000
    assert sorted(p.name for p in outputs["scores"].glob("*.safetensors")) == ["safety-snip.safetensors",
                                                                               "utility-snip.safetensors"]
    assert (out / "groups" / "set_difference.safetensors").exists()
    assert json.loads((out / "manifest.json").read_text())["config"]["sparsities"] == [0.05]
    assert AblationExperiment().sparsities == (0.0025, 0.005, 0.01, 0.02)  # what `brittle demo --help` states
    stamp = outputs["table"].stat().st_mtime_ns

    said.clear()
    run_ablation_experiment(cfg, out, echo=said.append)  # same settings: every stage is reused
    assert outputs["table"].stat().st_mtime_ns == stamp
    assert sum("reusing" in s for s in said) == 4  # two score files, the groups, the sweep


def test_experiment_refuses_to_reuse_a_sweep_made_with_other_settings(setup):
    cfg, tmp_path = setup
    out = tmp_path / "run"
    run_ablation_experiment(cfg, out, echo=lambda s: None)
    other = AblationExperiment(**{**cfg.to_dict(), "sparsities": (0.1,)})
    with pytest.raises(BrittleError, match=r"ablation was made with other settings \(points\).*--force"):
        run_ablation_experiment(other, out, echo=lambda s: None)
    run_ablation_experiment(other, out, force=True, echo=lambda s: None)
    (out / "groups" / "stage.json").unlink()  # e.g. a run directory from before these records
    with pytest.raises(BrittleError, match=r"groups has no record of the settings"):
        run_ablation_experiment(other, out, echo=lambda s: None)
    assert list(pd.read_csv(out / "ablation" / "ablation.csv").sparsity.dropna().unique()) == [0.1]
