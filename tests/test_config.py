"""Experiment configs: TOML + --set overrides, errors naming the key, file and line and the allowed values."""

from __future__ import annotations

import pytest

from brittle.config import ConfigError, dump_toml, load_config, parse_override, shipped_config, shipped_configs


def test_defaults_file_and_overrides_merge_in_order(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('model = "m"\n[groups]\np = 0.2\nq = 0.3\n[ablation.eval]\nn_harmful = 20\n')
    cfg = load_config(path, ["groups.q=0.4", "ablation.sparsities=[0.01, 0.02]"], {"groups": {"top": 0.05}})
    assert cfg.model == "m" and (cfg.groups.p, cfg.groups.q, cfg.groups.top) == (0.2, 0.4, 0.05)
    assert cfg.ablation.sparsities == (0.01, 0.02)
    # a partial [ablation.eval] table keeps the sweep's lighter defaults for the other keys
    assert cfg.ablation.eval.n_harmful == 20 and cfg.ablation.eval.limit == 30 and cfg.ablation.eval.max_new_tokens == 32
    assert cfg.eval.n_harmful == 100  # the full evaluation's own defaults are untouched
    assert load_config().groups.p == 0.05 and load_config().model == "smollm2-135m-safe"


def test_stages_run_in_pipeline_order_and_seed_is_one():
    assert load_config(None, ['stages=["ablation", "data"]']).stages == ("data", "ablation")
    cfg = load_config(None, ["seed=7"])
    assert cfg.eval_config(cfg.ablation.eval).seed == 7 and cfg.eval_config(cfg.eval).seed == 7
    with pytest.raises(ConfigError, match="eval.seed = 3: set the experiment's top-level seed instead"):
        load_config(None, ["eval.seed=3"])


def test_unknown_key_names_file_line_and_allowed_keys(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 1\n\n[groups]\np = 0.1\nqq = 0.2\n')
    with pytest.raises(ConfigError, match=rf"{path}:5: unknown key 'groups.qq' \(allowed in groups: top, p, q, scope"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown key 'modle' \(allowed in top level: model, seed"):
        load_config(None, ["modle=x"])


def test_invalid_values_name_key_and_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["groups.p=2", "scores.method=grad", "groups.scope=layer"])
    text = str(e.value)
    assert "groups.p: p must be a fraction with 0 < p <= 1 (1% is 0.01), got 2" in text
    assert "scores.method: Input should be 'snip', 'wanda' or 'snip-summed'" in text
    assert "groups.scope: Input should be 'row', 'matrix' or 'global'" in text
    with pytest.raises(ConfigError, match="unknown .p, q. preset 'nope'"):
        load_config(None, ["ablation.pq=nope"])
    with pytest.raises(ConfigError, match="--set expects section.key=value"):
        load_config(None, ["groups.p"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[groups\np = 1\n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_override_values_are_toml():
    assert parse_override("a.b=0.1") == (["a", "b"], 0.1)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=hello world") == (["a"], "hello world")  # a bare word is a string
    assert parse_override('a="0.1"') == (["a"], "0.1")


def test_printed_config_loads_back_to_the_same_config(tmp_path):
    cfg = load_config(None, ["groups.p=0.2", "ablation.pq=[[0.01, 0.02]]", "data.sets.extra=x.jsonl"])
    path = tmp_path / "round.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path) == cfg


def test_shipped_ablation_config_reproduces_the_old_demo_settings():
    assert "ablation" in shipped_configs()
    cfg = load_config(shipped_config("ablation"))
    assert cfg.stages == ("data", "scores", "groups", "ablation") and cfg.model == "smollm2-135m-safe"
    assert cfg.ablation.sparsities == (0.0025, 0.005, 0.01, 0.02) and cfg.ablation.points()[0] == (0.0025, 0.0025)
    assert (cfg.scores.nsamples, cfg.scores.max_length, cfg.groups.p, cfg.groups.q) == (128, 256, 0.05, 0.05)


@pytest.mark.parametrize("name", ["ablation", "demo", "experiment1", "experiment2", "llama2-7b-experiment1",
                                  "llama2-7b-experiment2"])
def test_every_shipped_config_loads_with_its_analyses(name):
    cfg = load_config(shipped_config(name), [])
    assert name in shipped_configs()
    if name.endswith("experiment1"):  # overlap needs the merged, frozen fine-tuning
        assert "overlap" in cfg.stages and cfg.finetune.freeze == "set_difference" and cfg.finetune.merge
    if name.endswith("experiment2"):  # stats needs the drift of every group of the run, unconstrained
        assert "stats" in cfg.stages and cfg.finetune.freeze is None and cfg.finetune.track is None
    if name == "demo":  # both experiments in one run: two fine-tunings sharing data, scores and groups
        jobs = cfg.finetune.jobs()
        assert {"ablation", "overlap", "stats", "report"} <= set(cfg.stages) and set(jobs) == {"frozen", "free"}
        assert jobs["frozen"].merge and jobs["free"].freeze is None
        assert (cfg.overlap.finetune, cfg.stats.finetune) == ("frozen", "free")
    if name.startswith("llama2"):
        assert (cfg.groups.p, cfg.groups.q, cfg.finetune.train.r, cfg.finetune.drift_every) == (0.1, 0.1, 8, 100)
