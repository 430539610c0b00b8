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


def test_shared_stage_is_copied_into_another_run_directory_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BRITTLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BRITTLE_SHARED_STAGES", "1")
    calls: list = []
    first = run_stage(RunContext(out=tmp_path / "a"), "data", tmp_path / "a" / "data", GroupsConfig(), {"w": "1"},
                      _producer(calls), shared=True)
    assert not first.reused and len(calls) == 1
    cached = list((tmp_path / "cache" / "stages").iterdir())
    assert [c.name[:5] for c in cached] == ["data-"] and (cached[0] / "out.txt").read_text() == "hello"

    logs: list[str] = []
    second = run_stage(RunContext(out=tmp_path / "b", log=logs.append), "data", tmp_path / "b" / "data",
                       GroupsConfig(), {"w": "1"}, _producer(calls, "other"), shared=True)
    assert second.reused and len(calls) == 1  # not computed again
    assert (tmp_path / "b" / "data" / "out.txt").read_text() == "hello" and second.outputs == first.outputs
    assert second.manifest["copied_from"] == str(cached[0]) and any("shared cache" in line for line in logs)
    assert not (tmp_path / "b" / "data.partial").exists()
    # a third run in "b" reuses its own folder by the one rule
    assert run_stage(RunContext(out=tmp_path / "b"), "data", tmp_path / "b" / "data", GroupsConfig(), {"w": "1"},
                     _producer(calls), shared=True).reused and len(calls) == 1

    # another record is computed (and cached beside the first); a stage not marked shared never touches the cache
    run_stage(RunContext(out=tmp_path / "c"), "data", tmp_path / "c" / "data", GroupsConfig(), {"w": "2"},
              _producer(calls, "w2"), shared=True)
    run_stage(RunContext(out=tmp_path / "c"), "groups", tmp_path / "c" / "groups", GroupsConfig(), {"w": "2"},
              _producer(calls))
    assert len(calls) == 3 and len(list((tmp_path / "cache" / "stages").iterdir())) == 2

    monkeypatch.setenv("BRITTLE_SHARED_STAGES", "0")  # off: computed, nothing added
    run_stage(RunContext(out=tmp_path / "d"), "data", tmp_path / "d" / "data", GroupsConfig(), {"w": "1"},
              _producer(calls, "off"), shared=True)
    assert len(calls) == 4 and (tmp_path / "d" / "data" / "out.txt").read_text() == "off"
