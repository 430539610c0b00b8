"""The command line: help text and clean errors."""

from __future__ import annotations

from typer.testing import CliRunner

from brittle.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("data", "models"):
        assert cmd in res.output


def test_models_lists_presets():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0
    assert "smollm2-135m" in res.output and "installed" in res.output


def test_user_error_is_printed_without_traceback(tmp_path):
    res = runner.invoke(app, ["data", "build", "--model", "no-such-model", "--out", str(tmp_path / "d")])
    assert res.exit_code == 2
    assert "unknown model 'no-such-model'" in res.output
    assert "Traceback" not in res.output
