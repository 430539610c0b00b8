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


def _commands():
    import typer.main

    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            for sub_name, sub in cmd.commands.items():
                yield f"{name} {sub_name}", sub
        else:
            yield name, cmd


# options that are not config keys (run-directory, control flags and parsing aids), with their defaults
NOT_CONFIG = {"out": None, "force": False, "set_": None, "print_config": False, "evaluate": True, "threads": None,
              "suffix_file": None, "model": None, "data": None, "config": None, "levels": "total,type"}


def test_cli_options_default_to_not_given_and_show_the_config_default():
    """No default is written twice: options bound to a config key default to None (not given), and their help
    states the config model's default."""
    from brittle.cli import BOUND_OPTIONS, _show, config_default

    checked = 0
    for name, cmd in _commands():
        for param in cmd.params:
            flags = "/".join(param.opts + param.secondary_opts)
            if param.required:  # nothing to default
                continue
            keys = set().union(*(k for f, k in BOUND_OPTIONS.items() if set(f.split("/")) & set(param.opts)))
            shown = [k for k in keys if f"(default: {_show(config_default(k))})" in (param.help or "")]
            if param.name in NOT_CONFIG and not shown:
                assert param.default == NOT_CONFIG[param.name] or param.required or name == "demo", (name, flags)
                continue
            assert shown, f"`brittle {name}` option {flags} does not state a config default: {param.help}"
            assert param.required or param.default is None, (name, flags, param.default)
            checked += 1
    assert checked > 40


def test_help_states_the_config_defaults():
    from brittle.config import load_config

    cfg = load_config()
    res = runner.invoke(app, ["groups", "--help"], env={"COLUMNS": "250"})
    text = " ".join(res.output.split())
    assert f"(default: {cfg.groups.p:g})" in text and f"(default: {cfg.groups.scope})" in text
    res = runner.invoke(app, ["score", "--help"], env={"COLUMNS": "250"})
    text = " ".join(res.output.split())
    assert f"(default: {cfg.scores.nsamples})" in text and f"(default: {cfg.model})" in text


def test_every_command_that_runs_a_model_takes_device_and_dtype():
    """A GPU user can put any model-running command on CUDA in bf16 from the command line (``brittle run`` takes
    them as config keys)."""
    from typer.main import get_command

    root = get_command(app)
    commands = {"score": root.commands["score"], "finetune": root.commands["finetune"], "eval": root.commands["eval"],
                "ablate": root.commands["ablate"], "lowrank": root.commands["lowrank"],
                "data build": root.commands["data"].commands["build"]}
    for name, command in commands.items():
        flags = {flag for param in command.params for flag in param.opts}
        assert {"--device", "--dtype"} <= flags, name
