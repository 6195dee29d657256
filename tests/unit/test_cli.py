"""The `shelfsight` command line people expect: --version, help everywhere, exit codes, --json, completion."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import version

import click
import pytest

from shelfsight.shared.cli import COMMAND_GROUP, cli, main

# Commands whose output is data: each must offer --json.
DATA_COMMANDS = {
    "enqueue", "dead-letters", "dev status", "labels import", "train",
    "models list", "models show", "models promote", "models rollback", "review list", "review export",
}


def command_tree() -> Iterator[tuple[str, click.Command]]:
    """Every command reachable from the root, subcommands loaded through the group's get_command."""

    def walk(command: click.Command, ctx: click.Context, path: str) -> Iterator[tuple[str, click.Command]]:
        yield path, command
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None, f"{path} {name}: listed but not found"
                yield from walk(sub, click.Context(sub, info_name=name, parent=ctx), f"{path} {name}".strip())

    yield from walk(cli, click.Context(cli, info_name="shelfsight"), "")


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"shelfsight, version {version('shelfsight')}"


def test_every_entry_point_command_is_reachable_from_the_root() -> None:
    from importlib.metadata import entry_points

    registered = {ep.name for ep in entry_points(group=COMMAND_GROUP)}
    top = {path for path, _ in command_tree() if path and " " not in path}
    assert registered and registered <= top, registered - top


def test_every_command_and_option_has_help() -> None:
    missing = []
    for path, command in command_tree():
        if not (command.help or "").strip():
            missing.append(f"shelfsight {path}: no help text".replace("  ", " "))
        for param in command.params:
            if isinstance(param, click.Option) and not (param.help or "").strip():
                missing.append(f"shelfsight {path} {param.opts[0]}: no help".replace("  ", " "))
    assert not missing, "\n".join(missing)


def test_every_command_renders_its_help(capsys: pytest.CaptureFixture) -> None:
    for path, _ in command_tree():
        assert main([*path.split(), "--help"]) == 0, path
        assert "Usage: shelfsight" in capsys.readouterr().out, path


def test_root_help_lists_commands_and_documents_exit_codes(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # undo click's line wrapping
    assert "Exit codes: 0 success; 1 something was rejected or refused" in text
    assert "2 unusable input or usage error" in text
    for name in ("worker", "trainer", "enqueue", "models", "demo"):
        assert f" {name} " in text


def test_data_commands_accept_json() -> None:
    commands = dict(command_tree())
    assert not DATA_COMMANDS - set(commands), DATA_COMMANDS - set(commands)
    without = [p for p in sorted(DATA_COMMANDS) if not any(o.opts == ["--json"] for o in commands[p].params)]
    assert not without, f"no --json on: {without}"


def test_shell_completion_script(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("_SHELFSIGHT_COMPLETE", "bash_source")
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "_shelfsight_completion" in out and "complete " in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["no-such-command"]) == 2
    assert "No such command" in capsys.readouterr().err
    assert main(["models", "list", "--no-such-option"]) == 2
