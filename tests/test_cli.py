"""The ``vioasid`` dispatcher: one static command list, each command's help from its module, and a
command whose module cannot be imported still listed and refusing with one line."""

from __future__ import annotations

import importlib

import pytest

from vioasid import cli


@pytest.mark.parametrize("name,module_name,summary", cli.COMMANDS)
def test_every_command_has_help_from_its_module(
    name: str, module_name: str, summary: str, capsys: pytest.CaptureFixture[str]
) -> None:
    module = importlib.import_module(module_name)
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: vioasid {name}")
    first = (module.__doc__ or "").strip().splitlines()[0].replace("``", "")
    assert first and first in out


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name, _module, summary in cli.COMMANDS:
        assert name in out and " ".join(summary.split()) in out, name


def test_missing_module_is_a_message_not_a_vanished_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ghost = ("ghost", "qemu_glue.commands.no_such_module", "a command whose module is missing")
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, ghost))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "ghost" in capsys.readouterr().out
    assert cli.main(["ghost", "--anything"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_module" in err[0] and "setup-host.sh" in err[0]


def test_command_with_actions_needs_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["image"])
    assert exc.value.code == 2
    assert "ACTION" in capsys.readouterr().err
