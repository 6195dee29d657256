"""`shelfsight flower`: the composition root of the Flower process.

Flower is a Celery command: it runs on a producer app (no task modules), with basic auth
passed by environment, never on the command line (where `ps` would show it). Flower's API can
send any registered task and shut workers down, so it never starts without real credentials:
an empty, malformed, shipped-default or short password is refused (exit code 2).
"""

from __future__ import annotations

import os

import click

from shelfsight.shared.celery_app import create_celery_app
from shelfsight.shared.cli import EXIT_USAGE, pass_settings
from shelfsight.shared.settings import Settings

MIN_PASSWORD_LENGTH = 12
# The login this project once shipped as its default, and the placeholders its docs used.
KNOWN_DEFAULT_PASSWORDS = frozenset({"shelfsight", "change-me", "changeme", "password", "admin", "secret"})


class WeakCredentials(ValueError):
    """SHELFSIGHT_FLOWER_BASIC_AUTH is not a usable secret; the message says why."""


def check_basic_auth(value: str) -> None:
    """Refuse anything but `user:password[,user2:password2]` with strong passwords.

    Raises WeakCredentials naming the problem (never the password itself).
    """
    if not value.strip():
        raise WeakCredentials("SHELFSIGHT_FLOWER_BASIC_AUTH is empty")
    for number, pair in enumerate(value.split(","), start=1):
        user, sep, password = pair.partition(":")
        where = f"entry {number} of SHELFSIGHT_FLOWER_BASIC_AUTH"
        if not sep or not user.strip() or not password:
            raise WeakCredentials(f"{where} is not of the form user:password")
        if password.lower() in KNOWN_DEFAULT_PASSWORDS or password == user:
            raise WeakCredentials(f"{where} uses a shipped default or placeholder password")
        if len(password) < MIN_PASSWORD_LENGTH:
            raise WeakCredentials(f"{where} has a password shorter than {MIN_PASSWORD_LENGTH} characters")


@click.command(epilog="Exit codes: 2 when SHELFSIGHT_FLOWER_BASIC_AUTH is empty, malformed or weak.")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on. Keep loopback unless a proxy or network policy guards it.")
@click.option("--port", default=5555, show_default=True, type=int, help="Port to listen on.")
@pass_settings
def flower(settings: Settings, address: str, port: int) -> int:
    """Run Flower (Celery monitoring) behind basic auth (SHELFSIGHT_FLOWER_BASIC_AUTH).

    The credentials must be `user:password` with a password of at least 12 characters that is
    not a shipped default; generate one with
    `python -c "import secrets; print('admin:' + secrets.token_urlsafe(24))"`.
    """
    credentials = settings.flower_basic_auth.get_secret_value()
    try:
        check_basic_auth(credentials)
    except WeakCredentials as exc:
        click.echo(f"shelfsight flower: refusing to start: {exc}. Flower's API can send tasks and shut "
                   "workers down; set SHELFSIGHT_FLOWER_BASIC_AUTH=user:password with a password of at "
                   f"least {MIN_PASSWORD_LENGTH} characters (e.g. admin:$(python -c 'import secrets; "
                   "print(secrets.token_urlsafe(24))')).", err=True)
        return EXIT_USAGE
    os.environ["FLOWER_BASIC_AUTH"] = credentials
    create_celery_app(settings).start(["flower", f"--address={address}", f"--port={port}"])
    return 0
