"""Experiment configs: TOML + --set overrides, errors naming the key, file and line and the allowed values."""

from __future__ import annotations

import functools
import operator
import re
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from brittle.config import (
    REFERENCE_COMMAND,
    ConfigError,
    ExperimentConfig,
    dump_toml,
    load_config,
    parse_override,
    reference_markdown,
    shipped_config,
    shipped_configs,
)


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


@pytest.mark.parametrize("name", ["ablation", "attack", "demo", "experiment1", "experiment2", "llama2-7b-experiment1",
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
        # the ablation's unchanged model is the fine-tunings' "before" only when both evaluate alike
        assert all(j.eval == cfg.ablation.eval for j in jobs.values())
    if name == "attack":  # section 4.4: 10/50/100 pairs x (nothing, set difference, top safety) frozen, 5 epochs
        jobs = cfg.finetune.jobs()
        assert {(j.n_examples, j.freeze) for j in jobs.values()} == {
            (n, f) for n in (10, 50, 100) for f in (None, "set_difference", "top_safety")}
        assert all(j.data == "attack" and j.train.epochs == 5 and j.evaluate for j in jobs.values())
    if name.startswith("llama2"):
        assert (cfg.groups.p, cfg.groups.q, cfg.finetune.train.r, cfg.finetune.drift_every) == (0.1, 0.1, 8, 100)


# --------------------------------------------------------------------------------------------------
# The reference of every key (docs/config.md), generated from the models

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def _leaves(cls: type[BaseModel] = ExperimentConfig, prefix: str = "") -> dict[str, FieldInfo]:
    """Every leaf key of the config, as a dotted path -> its field."""
    out: dict[str, FieldInfo] = {}
    for name, field in cls.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out |= _leaves(field.annotation, f"{prefix}{name}.")
        else:
            out[prefix + name] = field
    return out


def _unescape(cell: str) -> str:
    return re.sub(r"\\([|<*])", r"\1", cell)


def _doc_rows(text: str) -> dict[str, tuple[str, str, str]]:
    """The key rows of the reference's tables, read as a reader would: full key -> (type, default cell, meaning).
    A table with several default columns ("default in `[eval]`" | "default in `[ablation.eval]`, ...") documents
    the same keys in each section it names: its key column's `eval.x` stands for `<section>.x`."""
    rows: dict[str, tuple[str, str, str]] = {}
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if header is None:
            header = cells
            continue
        if header[0] != "key" or set(line) <= set("|-"):
            continue
        key, type_, meaning = _unescape(cells[0]).strip("`"), _unescape(cells[1]).strip("`"), _unescape(cells[-1])
        columns = [re.findall(r"`\[([\w.]+)\]`", head) for head in header[2:-1]]  # the sections each one names
        home = columns[0][0] if columns[0] else None  # the section of the key column's paths
        assert home is None or key.startswith(home + "."), key
        for sections, default in zip(columns, cells[2:-1], strict=True):
            for full in [section + key[len(home):] for section in sections] if home else [key]:
                assert full not in rows, f"{full} is documented twice"
                rows[full] = (type_, default, meaning)
    return rows


def _default(cell: str):
    """A default cell read back: "unset" -> None, else the TOML value."""
    return None if cell == "unset" else tomllib.loads(f"v = {_unescape(cell).strip('`')}")["v"]


def test_config_reference_doc_is_current():
    text = reference_markdown()
    assert text.startswith(f"<!-- Generated from the config models by: {REFERENCE_COMMAND}")
    if DOC.read_text(encoding="utf-8") != text:
        pytest.fail(f"docs/config.md is out of date with the config models; regenerate it in the repository root:\n"
                    f"  {REFERENCE_COMMAND}")


def test_every_key_has_a_description_and_is_in_the_reference_with_its_default():
    leaves = _leaves()
    missing = [key for key, field in leaves.items() if not (field.description or "").strip()]
    assert not missing, f"config keys without a description (give them Field(..., description=...)): {missing}"
    rows = _doc_rows(DOC.read_text(encoding="utf-8"))
    defaults = ExperimentConfig().model_dump(mode="json")
    for key, field in leaves.items():
        assert key in rows, f"{key} is not in docs/config.md; regenerate it: {REFERENCE_COMMAND}"
        _, cell, meaning = rows[key]
        assert _default(cell) == functools.reduce(operator.getitem, key.split("."), defaults), key
        assert meaning == field.description, key
    # readable types, and the evaluation sections' own defaults
    assert rows["finetune.train.lr"][0] == "float" and rows["device"][0] == "str | None"
    assert rows["scores.method"][0] == '"snip" | "wanda" | "snip-summed"' and rows["data.sets"][0] == "table of str"
    assert rows["ablation.kinds"][0] == 'list["top_safety" | "set_difference" | "random" | "random_magnitude" | "bottom_safety"]'
    assert (_default(rows["eval.n_harmful"][1]), _default(rows["ablation.eval.n_harmful"][1])) == (100, 50)
    assert _default(rows["lowrank.eval.limit"][1]) == 30
    assert _default(rows["finetune.eval.tasks"][1]) == ["arc_easy", "piqa"]
    assert rows["device"][1] == "unset" and rows["finetune.variants"][1] == "`{}`"


def test_the_reference_names_only_real_keys_with_defaults_that_load():
    text = reference_markdown()
    rows = _doc_rows(text)
    assert sorted(set(rows) - set(_leaves())) == [] and "groups.qq" not in text
    default = load_config()
    for key, (_, cell, _) in rows.items():  # each documented default, given back as an override, is the default
        if cell != "unset":
            assert load_config(None, [f"{key}={_unescape(cell).strip('`')}"]) == default, key
