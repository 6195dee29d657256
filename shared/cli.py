"""`shelfsight` command line: the composition root of every non-Celery process.

Settings are built once here and passed down.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from shared.logs import configure_logging
from shared.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]


def _celery(argv: list[str]) -> int:
    from worker.app import app  # composition root of the Celery processes

    app.start(argv)
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Extraction worker: threads pool (CUDA-safe), one micro-batcher per process."""
    concurrency = args.concurrency or settings.effective_concurrency()
    return _celery([
        "worker", "--pool", "threads", "--concurrency", str(concurrency),
        "--queues", settings.extract_queue, "--hostname", args.hostname or "extract@%h",
        "--without-mingle", "--without-gossip", "--loglevel", settings.log_level,
    ])


def cmd_trainer(args: argparse.Namespace, settings: Settings) -> int:
    """Trainer worker: solo pool (owns the GPU, one training at a time), beat embedded if scheduled."""
    argv = [
        "worker", "--pool", "solo", "--queues", settings.training_queue,
        "--hostname", args.hostname or "trainer@%h", "--without-mingle", "--without-gossip",
        "--loglevel", settings.log_level,
    ]
    if settings.retrain_schedule_s > 0:
        argv.append("--beat")
    return _celery(argv)


def cmd_flower(args: argparse.Namespace, settings: Settings) -> int:
    """Flower on loopback behind basic auth (passed by environment, not on the command line)."""
    os.environ["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth.get_secret_value()
    return _celery(["flower", f"--address={args.address}", f"--port={args.port}"])


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """The `make demo` job (see shared/demo.py)."""
    from pathlib import Path

    from shared.demo import run_demo

    return run_demo(Path(args.state_dir))


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    parser = argparse.ArgumentParser(prog="shelfsight", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Handler] = {}

    p = sub.add_parser("worker", help="run an extraction worker")
    p.add_argument("--concurrency", type=int, default=0)
    p.add_argument("--hostname", default="")
    handlers["worker"] = cmd_worker

    p = sub.add_parser("trainer", help="run the trainer worker (training queue)")
    p.add_argument("--hostname", default="")
    handlers["trainer"] = cmd_trainer

    p = sub.add_parser("flower", help="run Flower behind basic auth")
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5555)
    handlers["flower"] = cmd_flower

    p = sub.add_parser("demo", help="run the whole service on an embedded stack with sample products")
    p.add_argument("--state-dir", default=".shelfsight/demo")
    handlers["demo"] = cmd_demo

    from worker.cli import register as register_worker_commands

    register_worker_commands(sub, handlers)
    from shared.devstack_cli import register as register_dev_commands
    from trainer.cli import register as register_trainer_commands

    register_trainer_commands(sub, handlers)
    register_dev_commands(sub, handlers)
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `shelfsight` console script."""
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    return handlers[args.command](args, settings)


if __name__ == "__main__":
    sys.exit(main())
