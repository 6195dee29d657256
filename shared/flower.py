"""`shelfsight flower`: the composition root of the Flower process.

Flower is a Celery command: it runs on a producer app (no task modules), with basic auth
passed by environment, never on the command line (where `ps` would show it).
"""

from __future__ import annotations

import os

import click

from shelfsight.shared.celery_app import create_celery_app
from shelfsight.shared.cli import pass_settings
from shelfsight.shared.settings import Settings


@click.command()
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on. Keep loopback unless a proxy or network policy guards it.")
@click.option("--port", default=5555, show_default=True, type=int, help="Port to listen on.")
@pass_settings
def flower(settings: Settings, address: str, port: int) -> int:
    """Run Flower (Celery monitoring) behind basic auth (SHELFSIGHT_FLOWER_BASIC_AUTH)."""
    os.environ["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth.get_secret_value()
    create_celery_app(settings).start(["flower", f"--address={address}", f"--port={port}"])
    return 0
