"""The command line's success paths on a tiny model saved with the SmolLM2 tokenizer: `brittle align`,
`brittle demo`, `brittle data build` and `brittle eval` (exit codes, stage folders written, their manifests,
numbers, reuse of a finished stage, refusal of other settings and --force)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from brittle.cli import app
from brittle.config import load_config
from brittle.data import load_file
from brittle.data.core import sample
from brittle.data.sources import benign_splits, harmful_splits, normalize_prompt
from brittle.evaluation.config import EvalConfig
from brittle.io import sha256_file
from brittle.models import weight_fingerprint
from brittle.presets import load_model

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_dir) -> str:
    return tiny_llama_dir


@pytest.fixture(scope="module")
def tiny_fingerprint(tiny_dir) -> str:
    return weight_fingerprint(load_model(tiny_dir)[0])


@pytest.fixture
def cache(tiny_dir, tmp_path, monkeypatch) -> Path:
    # tiny_dir first: the session's SmolLM2 tokenizer is resolved before BRITTLE_CACHE points elsewhere
    monkeypatch.setenv("BRITTLE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _ok(res):
    assert res.exit_code == 0, f"exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    return res.output


def _refused(res, *keys: str) -> str:
    """A clean user error (exit 2, no traceback) naming the differing keys and --force."""
    assert res.exit_code == 2, f"exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    assert "Traceback" not in res.output and "--force" in res.output, res.output
    assert f"other settings or inputs ({', '.join(keys)})" in res.output, res.output
    return res.output


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _in_unit(x) -> bool:
    return 0.0 <= x <= 1.0


# --------------------------------------------------------------------------------------------------
# brittle align


def test_align_command_builds_the_organism(tiny_dir, tiny_fingerprint, tmp_path, cache):
    out = tmp_path / "safe"
    model_dir = out / "align"
    args = ["align", "--out", out, "--model", tiny_dir, "--n-harmful", 3, "--n-benign", 2, "--lora-r", 2,
            "--lora-alpha", 6, "--lr", 0.01, "--epochs", 2, "--seed", 3, "--no-eval"]
    text = _ok(invoke(*args))
    assert f"aligned model: {model_dir} (use it as --model {model_dir})" in text
    man = _manifest(model_dir)
    assert man["stage"] == "align" and man["seeds"] == {"seed": 3}
    cfg = man["config"]
    assert cfg["base"] == tiny_dir and cfg["n_harmful"] == 3 and cfg["n_benign"] == 2 and cfg["seed"] == 3
    assert cfg["lora"]["r"] == 2 and cfg["lora"]["alpha"] == 6 and cfg["lora"]["lr"] == 0.01  # alpha as given
    assert cfg["lora"]["epochs"] == 2 and cfg["lora"]["seed"] == 3  # --seed seeds the recipe and the LoRA init
    counts = man["outputs"]["counts"]
    data = load_file(model_dir / "alignment_data.jsonl", require_response=True)
    assert counts["harmful_refusal"] == 3 and counts["benign_own_answer"] == len(data) - 3 <= 2
    # at most 5 examples, batch 8: one step per epoch, two epochs
    assert json.loads((model_dir / "train_history.json").read_text())["steps"] == [1, 2]
    assert man["inputs"] == {"base_weights": tiny_fingerprint}
    aligned, _ = load_model(str(model_dir))
    assert man["outputs"]["model_weights"] == weight_fingerprint(aligned) != tiny_fingerprint
    assert not (out / "eval").exists() and not (out / "align.partial").exists()

    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    text = _ok(invoke(*args))  # the same --out and settings again: reused, nothing rewritten
    assert f"[align] reusing {model_dir}" in text and "1 of 1 stages reused" in text
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    _refused(invoke(*args, "--lr", 0.05), "config.lora.lr")  # other settings: a clean error, nothing touched
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp and _manifest(model_dir) == man

    # --dtype is part of the recipe (another organism: refused here), --device only where it runs
    _refused(invoke(*args, "--dtype", "bfloat16"), "config.dtype", "inputs.base_weights")
    out16 = tmp_path / "safe16"
    _ok(invoke(*[out16 if a == out else a for a in args], "--dtype", "bfloat16", "--device", "cpu"))
    man16 = _manifest(out16 / "align")
    assert man16["config"]["dtype"] == "bfloat16" and "dtype" not in cfg  # float32 stays out: old digests hold
    assert {k: v for k, v in man16["config"].items() if k != "dtype"} == cfg
    assert man16["inputs"]["base_weights"] != tiny_fingerprint  # the base, loaded in bfloat16
    with safe_open(out16 / "align" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    aligned16, _ = load_model(str(out16 / "align"), dtype="bfloat16")
    assert weight_fingerprint(aligned16) == man16["outputs"]["model_weights"]


TINY_EVAL = {"n_harmful": 2, "max_new_tokens": 2, "n_sampled": 0, "n_benign": 0, "n_edgy": 0, "n_perplexity": 2,
             "tasks": []}


@pytest.fixture
def eval_calls(monkeypatch):
    """Records what the eval stage evaluates, then evaluates for real with tiny settings (the default
    evaluation takes minutes)."""
    import brittle.evaluation.suite as S

    calls: list[dict] = []
    real = S.evaluate_model

    def small_eval(model, tok, out_dir, config=None, **kw):
        calls.append({"weights": weight_fingerprint(model), "folder": Path(out_dir), "config": config})
        return real(model, tok, out_dir, config.model_copy(update=TINY_EVAL), **kw)

    monkeypatch.setattr(S, "evaluate_model", small_eval)
    return calls


def test_align_command_evaluates_the_result(tiny_dir, tmp_path, cache, eval_calls):
    out = tmp_path / "safe"
    base = ["align", "--out", out, "--model", tiny_dir, "--n-harmful", 2, "--n-benign", 1, "--lora-r", 1]
    text = _ok(invoke(*base))  # --eval is the default
    first = _manifest(out / "align")
    assert first["config"]["lora"]["r"] == 1 and first["config"]["lora"]["alpha"] == 32  # the default, not 2r
    weights = first["outputs"]["model_weights"]
    # the saved aligned model, evaluated with the default settings into OUT/eval
    assert eval_calls == [{"weights": weights, "folder": out / "eval.partial", "config": EvalConfig()}]
    ev = _manifest(out / "eval")
    assert ev["stage"] == "eval" and ev["inputs"] == {"model_weights": weights}
    assert ev["config"] == json.loads(json.dumps(EvalConfig().to_dict()))
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["model"] == str(out / "align") and summary["weights"] == weights
    assert ev["outputs"]["summary"] == {"file": "summary.json", "sha256": sha256_file(out / "eval" / "summary.json")}
    assert "0 of 2 stages reused" in text

    text = _ok(invoke(*base))  # both stages reused: nothing trained or evaluated
    assert "2 of 2 stages reused" in text and len(eval_calls) == 1

    text = _ok(invoke(*base, "--force", "--lr", 0.05))
    second = _manifest(out / "align")
    assert second["config"]["lora"]["lr"] == 0.05 and second["outputs"]["model_weights"] != weights
    # the aligned weights changed, so the evaluation (whose input they are) was recomputed on the new model
    assert "0 of 2 stages reused" in text and "inputs.model_weights" in text
    assert eval_calls[1:] == [{"weights": second["outputs"]["model_weights"], "folder": out / "eval.partial",
                               "config": EvalConfig()}]
    assert _manifest(out / "eval")["inputs"] == {"model_weights": second["outputs"]["model_weights"]}


# --------------------------------------------------------------------------------------------------
# brittle data build


def test_data_build_command(tiny_dir, tiny_fingerprint, tmp_path, cache):
    out = tmp_path / "run"
    data = out / "data"
    args = ["data", "build", "--out", out, "--model", tiny_dir, "--n-safety", 4, "--n-utility", 3,
            "--max-new-tokens", 4, "--batch-size", 2, "--seed", 1]
    text = _ok(invoke(*args, "--judge", "keyword-wei"))
    man = _manifest(data)
    assert man["stage"] == "data" and man["seeds"] == {"seed": 1}
    assert man["config"] == {"seed": 1, "sets": {"safety": "safety", "utility": "utility"}, "n_safety": 4,
                             "n_utility": 3, "max_new_tokens": 4, "batch_size": 2, "judge": "keyword-wei"}
    assert man["inputs"] == {"model_weights": tiny_fingerprint}

    safety, utility = load_file(data / "safety.jsonl"), load_file(data / "utility.jsonl")
    # keyword-wei calls every answer under 20 words a refusal: all non-empty 4-token answers are kept
    assert man["outputs"]["safety"]["generated"] == 4 and man["outputs"]["utility"]["generated"] == 3
    for kind, exs in (("safety", safety), ("utility", utility)):
        o = man["outputs"][kind]
        assert o["kept"] == o["n"] == len(exs) and o["kept"] + o["dropped"] == o["generated"]
        assert o["file"] == f"{kind}.jsonl" and o["source"] == kind
        assert o["sha256"] == sha256_file(data / f"{kind}.jsonl")
        assert all(e.response.strip() for e in exs)
        assert f"[data] {kind}: kept {o['kept']} of {o['generated']} answers" in text
    assert len(safety) >= 1 and len(utility) >= 1
    assert re.search(rf"\(0 of 1 stages reused\); run directory {re.escape(str(out))}\n", text)
    assert not (cache / "data").exists()  # built into the run directory, not cached
    # --batch-size auto: off a GPU the CPU batch (32), at most the prompts; the size used is logged, "auto" recorded
    auto = tmp_path / "auto"
    text = _ok(invoke(*[a if a != out else auto for a in args[:-4]], "--batch-size", "auto", "--seed", 1,
                      "--judge", "keyword-wei"))
    assert "[data] safety: generation batch size auto -> 4" in text and "[data] utility: generation batch size auto -> 3" in text
    assert _manifest(auto / "data")["config"]["batch_size"] == "auto"
    # prompts: the seeded training splits, never the evaluation prompts
    assert [e.prompt for e in safety] == [e.prompt for e in sample(harmful_splits(seed=1)[0], 4, 1)
                                          if e.prompt in {s.prompt for s in safety}]
    assert {e.prompt for e in utility} <= {e.prompt for e in sample(benign_splits(seed=1)[0], 3, 1)}
    held_out = {normalize_prompt(e.prompt) for e in harmful_splits()[1]}
    assert not held_out & {normalize_prompt(e.prompt) for e in safety + utility}

    stamp = (data / "safety.jsonl").stat().st_mtime_ns
    text = _ok(invoke(*args, "--judge", "keyword-wei"))  # same settings: reused
    assert f"[data] reusing {data}" in text and (data / "safety.jsonl").stat().st_mtime_ns == stamp
    _refused(invoke(*args), "config.judge")  # the default judge refusal-v1: other settings, refused
    assert (data / "safety.jsonl").stat().st_mtime_ns == stamp and _manifest(data) == man
    text = _ok(invoke(*args, "--force"))
    assert "[data] recomputing" in text and "(config.judge changed)" in text
    man2 = _manifest(data)
    assert man2["config"]["judge"] == "refusal-v1" and man2["inputs"] == man["inputs"]
    kept = man2["outputs"]["safety"]["kept"]
    assert kept == len(load_file(data / "safety.jsonl")) if kept else (data / "safety.jsonl").read_text() == ""
    assert f"the model refused only {kept}/4 harmful prompts" in text  # a weak refuser is pointed out


# --------------------------------------------------------------------------------------------------
# brittle run ablation (the weight-level sweep on the model's own sets)

# the model's own safety/utility sets, small; a small sweep evaluation
TINY_DEMO = ["data.n_safety=5", "data.n_utility=5", "data.max_new_tokens=4", "data.judge=keyword-wei",
             "ablation.sparsities=[0.05]", "ablation.eval.n_harmful=2", "ablation.eval.max_new_tokens=2",
             "ablation.eval.n_benign=2", "ablation.eval.n_perplexity=2", "ablation.eval.tasks=[]"]
DEMO_STAGES = {"data": "data", "scores/safety-snip": "scores:safety", "scores/utility-snip": "scores:utility",
               "groups": "groups", "ablation": "ablation"}


def test_run_ablation_runs_every_stage_on_the_models_own_sets(tiny_dir, tiny_fingerprint, tmp_path, cache):
    out = tmp_path / "demo"
    sets = [f"model={json.dumps(tiny_dir)}", *TINY_DEMO]
    args = ["run", "ablation", "--out", out, *sum((["--set", s] for s in sets), [])]
    text = _ok(invoke(*args))
    assert "0 of 5 stages reused" in text
    for folder, stage in DEMO_STAGES.items():
        man = _manifest(out / folder)
        assert man["stage"] == stage and not (out / f"{folder}.partial").exists()
        assert {"config", "inputs", "outputs", "seeds", "versions", "git_commit", "seconds"} <= set(man)
    resolved = load_config(out / "config.toml")
    assert resolved == load_config("configs/ablation.toml", sets)
    assert resolved.model == tiny_dir and resolved.ablation.sparsities == (0.05,)

    # the model's own sets, built into the run directory (nothing cached in $BRITTLE_CACHE/data)
    data = _manifest(out / "data")
    assert data["inputs"] == {"model_weights": tiny_fingerprint}
    assert data["config"]["sets"] == {"safety": "safety", "utility": "utility"}
    assert not (cache / "data").exists()
    n = {}
    for kind in ("safety", "utility"):
        o = data["outputs"][kind]
        n[kind] = len(load_file(out / "data" / f"{kind}.jsonl"))
        assert o["generated"] == 5 and o["n"] == o["kept"] == n[kind] >= 2
        assert f"[data] {kind}: kept {n[kind]} of 5 answers" in text
        # the scores are computed on exactly these sets, on every example (nsamples 128 > 5)
        sc = _manifest(out / "scores" / f"{kind}-snip")
        assert sc["inputs"] == {"model_weights": tiny_fingerprint, "data": o["sha256"]}
        assert sc["outputs"]["n_examples"] == n[kind] and sc["config"]["method"] == "snip"
        assert sc["outputs"]["scores"]["sha256"] == sha256_file(out / "scores" / f"{kind}-snip" / "scores.safetensors")
    groups = _manifest(out / "groups")
    assert groups["inputs"]["safety_scores"] == _manifest(out / "scores" / "safety-snip")["outputs"]["scores"]["sha256"]
    assert groups["config"]["sweep_points"] == [[0.05, 0.05]]

    ab = _manifest(out / "ablation")
    assert ab["config"]["eval"]["n_harmful"] == 2 and ab["config"]["points"] == [[0.05, 0.05]]
    assert ab["inputs"]["groups"] == {s["label"]: s["sha256"] for s in groups["outputs"]["sweep"]}
    files = {k: out / "ablation" / ab["outputs"][k]["file"] for k in ("table", "markdown", "figure")}
    assert files == {"table": out / "ablation" / "ablation.csv", "markdown": out / "ablation" / "ablation.md",
                     "figure": out / "ablation" / "ablation.png"}
    assert all(sha256_file(p) == ab["outputs"][k]["sha256"] for k, p in files.items())
    assert files["figure"].stat().st_size > 1000 and "set_difference" in files["markdown"].read_text()

    table = pd.read_csv(files["table"])
    assert list(table.group) == ["dense", "top_safety", "set_difference", "random", "random_magnitude"]
    assert ab["outputs"]["rows"] == len(table)
    rows = table.set_index("group")
    assert rows.loc["dense", "fraction_removed"] == 0
    assert rows.loc["top_safety", "fraction_removed"] == pytest.approx(0.05, abs=0.005)  # q, per matrix
    sd = rows.loc["set_difference", "fraction_removed"]
    assert 0 < sd <= rows.loc["top_safety", "fraction_removed"]  # a subset of the top safety weights
    assert rows.loc["random", "fraction_removed"] == pytest.approx(sd, rel=1e-9)  # controls sized like it
    assert rows.loc["random_magnitude", "fraction_removed"] == pytest.approx(sd, rel=1e-9)
    for _, r in table.iterrows():
        assert _in_unit(r.asr) and _in_unit(r.asr_wei) and _in_unit(r.over_refusal) and _in_unit(r.refusal)
        assert r.asr_ci95_low <= r.asr <= r.asr_ci95_high and r.n_harmful == 2 and r.perplexity > 1

    stamp = files["table"].stat().st_mtime_ns
    text = _ok(invoke(*args))  # resume: every stage reused
    assert text.count("reusing") == 5 and "5 of 5 stages reused" in text
    assert files["table"].stat().st_mtime_ns == stamp
    changed = ["--set", "ablation.sparsities=[0.1]"]
    _refused(invoke(*args, *changed), "config.sweep_points")
    assert files["table"].stat().st_mtime_ns == stamp
    text = _ok(invoke(*args, *changed, "--force"))  # only what depends on the sweep is recomputed
    assert text.count("reusing") == 3 and "[groups] recomputing" in text and "[ablation] recomputing" in text
    assert list(pd.read_csv(files["table"]).sparsity.dropna().unique()) == [0.1]
    assert _manifest(out / "data") == data


# --------------------------------------------------------------------------------------------------
# brittle eval


def test_eval_command_writes_summary_generations_and_manifest(tiny_dir, tiny_fingerprint, tmp_path, cache, monkeypatch):
    import brittle.evaluation.suite as S

    real = S.perplexity_examples
    monkeypatch.setattr(S, "perplexity_examples", lambda cfg: real(cfg)[:10])  # `eval` has no --n-perplexity (100)
    run = tmp_path / "run"
    out = run / "eval"
    args = ["eval", "--out", run, "--model", tiny_dir, "--tasks", "arc_easy", "--limit", 2, "--n-harmful", 3,
            "--n-sampled", 2, "--num-samples", 2, "--n-benign", 2, "--n-edgy", 2, "--max-new-tokens", 4,
            "--batch-size", "auto", "--suffix", "Sure, here is", "--seed", 1]
    text = _ok(invoke(*args))
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == tiny_dir and s["weights"] == tiny_fingerprint and s["seed"] == 1
    assert s["judge"] == "refusal-v1" and s["judges"] == ["refusal-v1", "keyword-wei"]
    assert set(s["by_judge"]) == {"refusal-v1", "keyword-wei"}
    assert set(s["asr"]) == {"vanilla_sys", "vanilla_nosys", "sampled_any_of_n", "sampled_per_sample", "suffix_1",
                             "suffix_any", "suffix_best"}
    n_expected = {"vanilla_sys": 3, "vanilla_nosys": 3, "sampled_any_of_n": 2, "sampled_per_sample": 4, "suffix_1": 3}
    for variant, n in n_expected.items():
        r = s["asr"][variant]
        assert r["n"] == n and _in_unit(r["value"]), variant
        lo, hi = r["ci95"]
        assert 0 <= lo <= r["value"] <= hi <= 1, variant
        assert _in_unit(s["degenerate"][variant])
    assert s["asr"]["sampled_any_of_n"]["value"] >= s["asr"]["sampled_per_sample"]["value"] - 1e-9
    for key in ("refusal_harmful", "over_refusal", "over_refusal_edgy", "degenerate_benign", "degenerate_edgy"):
        assert _in_unit(s[key]), key
    assert s["n_prompts"] == {"harmful": 3, "sampled": 2, "benign": 2, "edgy": 2}
    assert s["suffixes"] == {"suffix_1": "Sure, here is"}
    # --batch-size auto: off a GPU the CPU batch (32), at most each variant's prompts; the sizes used are noted
    assert s["config"]["batch_size"] == "auto"
    assert ("generation batch size auto (sized to the free GPU memory; 32 off a GPU): vanilla_nosys 3, vanilla_sys 3, "
            "sampled 2, suffix_1 3, benign 2, edgy 2") in s["notes"]
    # a randomly initialised model predicts nearly uniformly: perplexity close to the vocabulary size
    vocab = len(load_model(tiny_dir)[1])
    assert 0.5 * vocab < s["perplexity"] < 2 * vocab
    assert s["perplexity_detail"]["n"] == 10 and s["perplexity"] == pytest.approx(s["perplexity_detail"]["value"], rel=1e-4)
    assert set(s["accuracy"]) == {"arc_easy", "mean"} and _in_unit(s["accuracy"]["arc_easy"])
    assert s["accuracy"]["mean"] == s["accuracy"]["arc_easy"] and s["accuracy_detail"]["arc_easy"]["n"] == 2
    cfg = s["config"]
    assert (cfg["n_harmful"], cfg["max_new_tokens"], cfg["limit"], cfg["tasks"]) == (3, 4, 2, ["arc_easy"])
    assert s["system_prompts"]["nosys"] == "<explicit empty system message>"  # SmolLM2's template injects a default

    gens = {p.name for p in (out / "generations").iterdir()}
    assert gens == {f"{v}.jsonl" for v in ("vanilla_sys", "vanilla_nosys", "sampled", "suffix_1", "benign", "edgy")}
    rows = [json.loads(line) for line in (out / "generations" / "suffix_1.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["suffix"] == "Sure, here is" for r in rows)
    assert [r["prompt"] for r in rows] == [e.prompt for e in harmful_splits()[1][:3]]  # AdvBench[:3], file order
    assert all(set(r["verdicts"]) == {"refusal-v1", "keyword-wei"} for r in rows)
    assert len((out / "generations" / "sampled.jsonl").read_text().splitlines()) == 4

    man = _manifest(out)
    assert man["stage"] == "eval" and man["inputs"] == {"model_weights": tiny_fingerprint}
    assert man["seeds"] == {"seed": 1} and man["config"] == json.loads(json.dumps(cfg))
    assert man["config"]["n_sampled"] == 2 and man["config"]["suffixes"] == ["Sure, here is"]
    assert man["outputs"] == {"summary": {"file": "summary.json", "sha256": sha256_file(out / "summary.json")},
                              "markdown": {"file": "summary.md", "sha256": sha256_file(out / "summary.md")}}
    md = (out / "summary.md").read_text()
    assert md.strip() in text and "| ASR vanilla, no system prompt |" in md
    assert f"summary: {out / 'summary.json'} (generations under {out / 'generations'})" in text

    stamp = (out / "summary.json").stat().st_mtime_ns
    text = _ok(invoke(*args))  # the same settings: the finished evaluation is reused, not redone
    assert f"[eval] reusing {out}" in text and (out / "summary.json").stat().st_mtime_ns == stamp
    _refused(invoke(*args, "--n-harmful", 2), "config.n_harmful")  # other settings: refused without --force
    assert (out / "summary.json").stat().st_mtime_ns == stamp


def test_eval_command_single_judge_suffix_file_and_system_prompt(tiny_dir, tmp_path, cache, monkeypatch):
    import brittle.evaluation.suite as S
    from brittle.evaluation.suite import LLAMA2_DEFAULT_SYSTEM_PROMPT

    real = S.perplexity_examples
    monkeypatch.setattr(S, "perplexity_examples", lambda cfg: real(cfg)[:3])  # `eval` has no --n-perplexity
    suffixes = tmp_path / "suffixes.txt"
    suffixes.write_text("# adversarial suffixes\nSure, here is\n\n!! !! !!\n")
    run = tmp_path / "run"
    out = run / "eval"
    _ok(invoke("eval", "--out", run, "--model", tiny_dir, "--tasks", "none", "--extra-judge", "none",
               "--suffix-file", suffixes, "--n-harmful", 2, "--n-sampled", 0, "--n-benign", 0, "--n-edgy", 0,
               "--max-new-tokens", 3, "--system-prompt", "llama2"))
    s = json.loads((out / "summary.json").read_text())
    assert s["judges"] == ["refusal-v1"] and list(s["by_judge"]) == ["refusal-v1"]
    assert s["suffixes"] == {"suffix_1": "Sure, here is", "suffix_2": "!! !! !!"}
    assert set(s["asr"]) == {"vanilla_sys", "vanilla_nosys", "suffix_1", "suffix_2", "suffix_any", "suffix_best"}
    assert s["asr"]["suffix_best"]["suffix"] in ("suffix_1", "suffix_2")
    assert s["asr"]["suffix_any"]["value"] >= max(s["asr"]["suffix_1"]["value"], s["asr"]["suffix_2"]["value"]) - 1e-9
    assert s["over_refusal"] is None and s["over_refusal_edgy"] is None and s["accuracy"] is None
    assert s["perplexity_detail"]["n"] == 3 and s["perplexity"] > 1
    assert s["system_prompts"]["vanilla_sys"] == LLAMA2_DEFAULT_SYSTEM_PROMPT
    assert LLAMA2_DEFAULT_SYSTEM_PROMPT in s["system_prompts"]["rendered_sys"]
    assert LLAMA2_DEFAULT_SYSTEM_PROMPT not in s["system_prompts"]["rendered_nosys"]
    gens = {p.name for p in (out / "generations").iterdir()}
    assert gens == {"vanilla_sys.jsonl", "vanilla_nosys.jsonl", "suffix_1.jsonl", "suffix_2.jsonl"}
    rows = [json.loads(line) for line in (out / "generations" / "vanilla_sys.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(list(r["verdicts"]) == ["refusal-v1"] for r in rows)
    man = _manifest(out)
    assert man["config"]["suffixes"] == ["Sure, here is", "!! !! !!"] and man["config"]["extra_judges"] == []
    assert man["config"]["system_prompt"] == "llama2" and man["config"]["tasks"] == []
