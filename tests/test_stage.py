"""The run protocol: one manifest per stage folder, reuse exactly on equal records, refusal naming the
differing keys, --force recomputes, an interrupted stage leaves nothing that looks finished."""

from __future__ import annotations

import json

import pytest

from brittle.config import GroupsConfig
from brittle.stage import RunContext, StageMismatchError, differing_keys, file_outputs, run_stage


def _producer(calls: list, text: str = "hello"):
    def produce(folder):
        calls.append(folder.name)
        (folder / "out.txt").write_text(text)
        return {"result": file_outputs(folder, {"result": "out.txt"})["result"], "n": len(text)}

    return produce


def test_first_run_writes_folder_and_manifest_then_reuses(tmp_path):
    logs: list[str] = []
    ctx = RunContext(out=tmp_path, log=logs.append)
    calls: list = []
    cfg = GroupsConfig(p=0.1)
    res = run_stage(ctx, "groups", tmp_path / "groups", cfg, {"scores": "abc"}, _producer(calls))
    assert not res.reused and calls == ["groups.partial"]  # written into a partial folder first
    man = json.loads((tmp_path / "groups" / "manifest.json").read_text())
    assert man["stage"] == "groups" and man["config"]["p"] == 0.1 and man["inputs"] == {"scores": "abc"}
    assert man["outputs"]["n"] == 5 and len(man["outputs"]["result"]["sha256"]) == 64
    assert {"versions", "git_commit", "argv", "seeds", "seconds"} <= set(man)
    assert res.path("result").read_text() == "hello" and not (tmp_path / "groups.partial").exists()
    assert ctx.results["groups"] is res

    again = run_stage(ctx, "groups", tmp_path / "groups", GroupsConfig(p=0.1), {"scores": "abc"}, _producer(calls))
    assert again.reused and calls == ["groups.partial"] and again.outputs == res.outputs
    assert any("reusing" in line for line in logs)


def test_other_settings_are_refused_naming_the_keys_or_recomputed_with_force(tmp_path):
    calls: list = []
    folder = tmp_path / "groups"
    run_stage(RunContext(out=tmp_path), "groups", folder, GroupsConfig(), {"scores": "abc"}, _producer(calls))
    with pytest.raises(StageMismatchError, match=r"other settings or inputs \(config\.q, inputs\.scores\).*--force"):
        run_stage(RunContext(out=tmp_path), "groups", folder, GroupsConfig(q=0.2), {"scores": "xyz"}, _producer(calls))
    assert (folder / "out.txt").read_text() == "hello" and len(calls) == 1  # nothing touched
    res = run_stage(RunContext(out=tmp_path, force=True), "groups", folder, GroupsConfig(q=0.2), {"scores": "xyz"},
                    _producer(calls, "changed"))
    assert not res.reused and (folder / "out.txt").read_text() == "changed"
    assert json.loads((folder / "manifest.json").read_text())["config"]["q"] == 0.2
    # force does not recompute a stage whose record matches
    assert run_stage(RunContext(out=tmp_path, force=True), "groups", folder, GroupsConfig(q=0.2), {"scores": "xyz"},
                     _producer(calls)).reused
    assert len(calls) == 2


def test_interrupted_stage_is_redone_and_its_leftovers_removed(tmp_path):
    def crash(folder):
        (folder / "half.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(RunContext(out=tmp_path), "data", tmp_path / "data", {"n": 1}, {}, crash)
    assert not (tmp_path / "data").exists() and (tmp_path / "data.partial" / "half.txt").exists()
    calls: list = []
    res = run_stage(RunContext(out=tmp_path), "data", tmp_path / "data", {"n": 1}, {}, _producer(calls))
    assert not res.reused and calls == ["data.partial"]
    assert not (tmp_path / "data.partial").exists() and not (tmp_path / "data" / "half.txt").exists()


def test_foreign_folder_is_never_overwritten(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("user file")
    with pytest.raises(StageMismatchError, match="holds no manifest.json"):
        run_stage(RunContext(out=tmp_path, force=True), "data", tmp_path / "data", {}, {}, _producer([]))
    assert (tmp_path / "data" / "mine.txt").read_text() == "user file"
    # a folder made by another stage is not taken for this one
    run_stage(RunContext(out=tmp_path), "eval", tmp_path / "e", {}, {}, _producer([]))
    with pytest.raises(StageMismatchError, match=r"\(stage\)"):
        run_stage(RunContext(out=tmp_path), "groups", tmp_path / "e", {}, {}, _producer([]))


def test_differing_keys_are_dotted_paths():
    old = {"config": {"a": 1, "eval": {"n": 2, "t": [1]}}, "inputs": {"x": "h"}}
    new = {"config": {"a": 1, "eval": {"n": 3, "t": [1]}}, "inputs": {"x": "h", "y": "g"}}
    assert differing_keys(old, new) == ["config.eval.n", "inputs.y"]
    assert differing_keys(old, old) == []
