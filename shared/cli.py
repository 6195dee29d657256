"""`shelfsight`: the command line, and the composition root of every process it starts.

Subcommands are discovered through the `shelfsight.commands` entry-point group (as Celery does
with `celery.commands`): this dispatcher names no command module, and running one command
imports only that command's module. Settings are built once here, on first use, and passed
down to the command through the click context.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import cached_property, update_wrapper
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import Any, TypeVar

import click

from shelfsight.shared.logs import configure_logging, secret_values
from shelfsight.shared.settings import Settings

COMMAND_GROUP = "shelfsight.commands"

EXIT_OK, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2
EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 something was rejected or refused (bad label lines, a training "
    "already pending, a failed run, a stack that did not start); 2 unusable input or usage "
    "error (bad option, missing file, invalid id or URI)."
)

F = TypeVar("F", bound=Callable[..., Any])


class CliContext:
    """What every command shares: the one Settings object of this process."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._given = settings

    @cached_property
    def settings(self) -> Settings:
        """Built on first use (so `--help` works with a broken environment), then configured once."""
        settings = self._given or Settings()
        configure_logging(settings.log_format, settings.log_level, secrets=secret_values(settings))
        return settings


def pass_settings(command: F) -> F:
    """Decorator: call the command with the process's Settings as first argument."""

    @click.pass_context
    def wrapper(ctx: click.Context, /, *args: Any, **kwargs: Any) -> Any:
        return ctx.invoke(command, ctx.ensure_object(CliContext).settings, *args, **kwargs)

    return update_wrapper(wrapper, command)  # type: ignore[return-value]


def json_option(command: F) -> F:
    """`--json`: print machine-readable JSON instead of text."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(command)


def echo_json(payload: object) -> None:
    """One JSON document on stdout (logs go to stderr)."""
    import json

    click.echo(json.dumps(payload, indent=2, default=str))


class EntryPointGroup(click.Group):
    """A click group whose subcommands come from an entry-point group, loaded on demand."""

    def __init__(self, *args: Any, entry_point_group: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entry_point_group = entry_point_group

    def _entry_points(self) -> dict[str, Any]:
        return {ep.name: ep for ep in entry_points(group=self.entry_point_group)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._entry_points()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        found = self._entry_points().get(cmd_name)
        if found is None:
            return None
        loaded = found.load()
        if not isinstance(loaded, click.Command):
            raise click.ClickException(f"entry point {found.value} is not a click command")
        return loaded

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List commands with their short help; a command whose extra is missing says so."""
        rows = []
        for name in self.list_commands(ctx):
            try:
                command = self.get_command(ctx, name)
            except ImportError as exc:
                rows.append((name, f"(unavailable: {exc.name} is not installed)"))
                continue
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=formatter.width - 20)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _version() -> str:
    try:
        return version("shelfsight")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


@click.group(
    cls=EntryPointGroup, entry_point_group=COMMAND_GROUP,
    epilog=EXIT_CODES_HELP + " Shell completion: eval \"$(_SHELFSIGHT_COMPLETE=bash_source shelfsight)\" "
    "(zsh_source, fish_source for other shells). Settings come from SHELFSIGHT_* environment variables.",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(_version(), "--version", prog_name="shelfsight")
def cli() -> None:
    """shelfsight: product attribute extraction with per-category fine-tuned CLIP models."""


def main(argv: Sequence[str] | None = None, settings: Settings | None = None) -> int:
    """Entry point of the `shelfsight` console script; returns the exit code.

    `settings` lets an in-process caller (tests, the demo) pass its own Settings object.
    """
    try:
        result = cli.main(args=list(argv) if argv is not None else None, prog_name="shelfsight",
                          obj=CliContext(settings), standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return int(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        return EXIT_REJECTED
    return int(result) if isinstance(result, int) else EXIT_OK


if __name__ == "__main__":
    # `python -m shelfsight.shared.cli`: run the importable module's main, so that commands
    # and this dispatcher share one CliContext class (this file runs here as __main__).
    from shelfsight.shared.cli import main as _main

    sys.exit(_main())
