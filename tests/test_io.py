"""Atomic writes, no silent overwrite, manifests."""

from __future__ import annotations

import json

import pytest

from brittle.io import ExistsError, atomic_path, manifest, write_json, write_manifest


def test_existing_result_is_never_silently_overwritten(tmp_path):
    p = write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(ExistsError, match="already exists; pass --force"):
        write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 1}
    write_json(p, {"a": 3}, overwrite=True)
    assert json.loads(p.read_text()) == {"a": 3}


def test_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_manifest_records_provenance_and_keeps_previous(tmp_path):
    rec = manifest("test", {"x": 1}, seeds={"seed": 0}, inputs={"data": "ab" * 32})
    for key in ("command", "argv", "config", "seeds", "inputs", "versions", "git_commit", "created"):
        assert key in rec
    assert rec["versions"]["torch"] and rec["versions"]["transformers"]
    write_manifest(tmp_path, rec)
    with pytest.raises(ExistsError):
        write_manifest(tmp_path, rec)
    write_manifest(tmp_path, {**rec, "config": {"x": 2}}, overwrite=True)
    assert json.loads((tmp_path / "manifest.prev.json").read_text())["config"] == {"x": 1}
    assert json.loads((tmp_path / "manifest.json").read_text())["config"] == {"x": 2}
