"""`shelfsight dev up|down|env|status`: the embedded dev stack from the command line.

    eval "$(shelfsight dev up --no-worker)"   # Redis + S3 + Flower; exports on stdout
    shelfsight dev status
    shelfsight dev down

Only the `export` lines go to stdout (so `eval` works); messages go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from shared.devstack import (
    DevStackError,
    alive_processes,
    export_lines,
    load_state,
    start_stack,
    stop_stack,
)
from shared.settings import Settings

DEFAULT_STATE_DIR = Path(".shelfsight/dev")


def register(subparsers: Any, handlers: dict[str, Any]) -> None:
    """Add the `dev` subcommand (up, down, env, status) to the shelfsight parser."""
    parser = subparsers.add_parser("dev", help="run an embedded dev stack (Redis, S3, workers, Flower)")
    actions = parser.add_subparsers(dest="dev_action", required=True)

    up = actions.add_parser("up", help="start the stack in the background and print export lines")
    up.add_argument("--with-trainer", action="store_true", help="also start the trainer worker")
    up.add_argument("--no-worker", action="store_true", help="do not start the extraction worker")
    up.add_argument("--no-flower", action="store_true", help="do not start Flower")
    up.add_argument("--timeout", type=float, default=180.0,
                    help="seconds to wait for each worker to answer a ping")
    for action, text in (("down", "stop the stack and remove its state"),
                         ("env", "print the export lines of the running stack"),
                         ("status", "show which processes of the stack are alive")):
        actions.add_parser(action, help=text)
    for sub in actions.choices.values():
        sub.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                         help=f"where state.json and logs/ live (default {DEFAULT_STATE_DIR})")
    handlers["dev"] = cmd_dev


def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    """Dispatch `shelfsight dev <action>`; DevStackError becomes a message and exit code 1."""
    action = {"up": _up, "down": _down, "env": _env, "status": _status}[args.dev_action]
    try:
        return action(args, settings)
    except DevStackError as exc:
        print(f"shelfsight dev {args.dev_action}: {exc}", file=sys.stderr)
        return 1


def _up(args: argparse.Namespace, settings: Settings) -> int:
    stack = start_stack(args.state_dir, worker=not args.no_worker, trainer=args.with_trainer,
                        flower=not args.no_flower, settings=settings, timeout_s=args.timeout)
    print("\n".join(stack.export_lines()))
    names = ", ".join(f"{name} (pid {info.pid})" for name, info in stack.processes.items())
    print(f"dev stack up in {stack.state_dir}: {names}; logs in {stack.state_dir / 'logs'}",
          file=sys.stderr)
    return 0


def _down(args: argparse.Namespace, settings: Settings) -> int:
    if stop_stack(args.state_dir):
        print(f"dev stack in {args.state_dir} stopped", file=sys.stderr)
    else:
        print(f"no dev stack in {args.state_dir}; nothing to stop", file=sys.stderr)
    return 0


def _env(args: argparse.Namespace, settings: Settings) -> int:
    state = load_state(args.state_dir)
    if state is None:
        print(f"no dev stack in {args.state_dir}; run `shelfsight dev up` first", file=sys.stderr)
        return 1
    print("\n".join(export_lines(state["env"], state["ports"])))
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    state = load_state(args.state_dir)
    if state is None:
        print(f"no dev stack in {args.state_dir}")
        return 1
    alive = alive_processes(state)
    ports = state.get("ports", {})
    for name, info in state["processes"].items():
        port = f" port {ports[name]}" if name in ports else ""
        status = "alive" if alive.get(name) else "DEAD"
        print(f"{name:8} pid {info['pid']:<8} {status}{port}  log {info['log']}")
    print(f"state: {state.get('status')}, {sum(alive.values())}/{len(alive)} alive")
    return 0 if alive and all(alive.values()) else 1
