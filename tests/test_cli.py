"""The CLI shell: version, help, and how errors reach the user (one line; traceback only with -v)."""

from __future__ import annotations

import click
import pytest
from conftest import run_cli as run
from lighttransfer import cli
from lighttransfer.errors import LightTransferError


@pytest.fixture
def fake_commands(monkeypatch):
    @click.command()
    @cli.verbosity_options
    @click.option("--kind", default="user")
    def boom(kind):
        if kind == "user":
            raise LightTransferError("--calib 'x.txt' does not exist; pass an existing file.")
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setitem(cli.COMMANDS, "boom", ("tests_fake:boom", "raise an error"))
    import sys
    import types

    module = types.ModuleType("tests_fake")
    module.boom = boom
    monkeypatch.setitem(sys.modules, "tests_fake", module)
    monkeypatch.setitem(cli._state, "verbose", False)


def test_version(capsys):
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and "lighttransfer, version 0.1.0" in out


def test_help_lists_commands(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for name in ("analyze", "convert", "inspect", "generate", "eval", "bench"):
        assert name in out


def test_user_error_is_one_line(fake_commands, capsys):
    code, _, err = run(["boom"], capsys)
    assert code == 1
    assert err.strip().count("\n") == 0
    assert "error: --calib 'x.txt' does not exist" in err and "Traceback" not in err


def test_unexpected_error_is_one_line_unless_verbose(fake_commands, capsys):
    code, _, err = run(["boom", "--kind", "bug"], capsys)
    assert code == 1 and "Traceback" not in err
    assert "unexpected ZeroDivisionError: division by zero" in err and "second line" not in err
    code, _, err = run(["-v", "boom", "--kind", "bug"], capsys)
    assert code == 1 and "Traceback" in err


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_listed_command_is_built(name):
    command = cli.cli.get_command(click.Context(cli.cli), name)
    assert isinstance(command, click.Command) and command.name == name


def test_unknown_option_is_a_usage_error(fake_commands, capsys):
    code, _, err = run(["boom", "--no-such-option"], capsys)
    assert code == 2 and "No such option" in err


def _config_dir(path, model_type, **kw):
    from transformers import AutoConfig

    AutoConfig.for_model(model_type, **kw).save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d: d / "nowhere", "does not exist"),
        (lambda d: d, "no config.json"),
        (lambda d: (d / "config.json").write_text("{}") and d, "no weights"),
        (lambda d: _config_dir(d, "t5", d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=64),
         "not a causal language model"),
        (lambda d: _config_dir(d, "bloom", hidden_size=32, n_layer=1, n_head=2, vocab_size=64),
         "cannot be made streaming"),
    ],
    ids=["missing-path", "no-config", "no-weights", "not-causal-lm", "attention-not-swappable"],
)
@pytest.mark.parametrize("command", ["analyze", "convert", "generate"])
def test_model_errors_through_every_command(tmp_path, capsys, make, fragment, command):
    model = str(make(tmp_path))
    extra = {"analyze": [], "convert": ["--layers", "0", "--out", str(tmp_path / "out")],
             "generate": ["--prompt", "hi"]}[command]
    code, _, err = run([command, model, *extra], capsys)
    assert code == 1, err
    assert fragment in err and "Traceback" not in err
    assert err.strip().count("\n") <= 1  # one line (rich may wrap a long one at the terminal width)
    assert not (tmp_path / "out").exists()
