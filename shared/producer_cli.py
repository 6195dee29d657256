"""`shelfsight enqueue`: what an upload pipeline runs. Loads neither the worker nor the trainer."""

from __future__ import annotations

import json
from typing import BinaryIO

import click
from pydantic import ValidationError

from shelfsight.shared.celery_app import create_celery_app
from shelfsight.shared.cli import EXIT_OK, EXIT_USAGE, echo_json, json_option, pass_settings
from shelfsight.shared.enqueue import (
    NotificationError,
    enqueue_event,
    enqueue_upload,
    events_from_s3_notification,
)
from shelfsight.shared.settings import Settings

MAX_NOTIFICATION_BYTES = 1 << 20  # an S3 notification carries a few records, never megabytes


@click.command(epilog="Exit codes: 0 enqueued; 2 not enqueued (the reason is on stderr).")
@click.option("--product-id", help="The product the image shows (letters, digits, '-', '_', '.', ':').")
@click.option("--category", help="The product's category; must be in the taxonomy.")
@click.option("--image", help="Where the image is: s3://bucket/key.")
@click.option("--event-id", help="Idempotency key: enqueueing the same id twice is one event. Default: a new uuid.")
@click.option("--s3-notification", metavar="FILE|-", type=click.File("rb"),
              help="An S3/MinIO notification JSON (file, or - for stdin): one event per ObjectCreated record.")
@json_option
@pass_settings
def enqueue(settings: Settings, product_id: str | None, category: str | None, image: str | None,
            event_id: str | None, s3_notification: BinaryIO | None, as_json: bool) -> int:
    """Enqueue an upload event; print its event id (one per line for a notification)."""
    app = create_celery_app(settings)
    try:
        if s3_notification is not None:
            data = s3_notification.read(MAX_NOTIFICATION_BYTES + 1)
            if len(data) > MAX_NOTIFICATION_BYTES:
                click.echo(f"not enqueued: the notification exceeds {MAX_NOTIFICATION_BYTES} bytes", err=True)
                return EXIT_USAGE
            events = events_from_s3_notification(json.loads(data.decode("utf-8")),
                                                 settings.s3_notification_key_pattern)
            event_ids = [enqueue_event(app, event) for event in events]
            if not events:
                click.echo("no ObjectCreated records in the notification", err=True)
        elif product_id and category and image:
            event_ids = [enqueue_upload(app, product_id=product_id, category=category, image=image,
                                        event_id=event_id or None)]
        else:
            click.echo("enqueue needs --product-id, --category and --image (or --s3-notification)", err=True)
            return EXIT_USAGE
    except (ValidationError, NotificationError, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        click.echo(f"not enqueued: {exc}", err=True)
        return EXIT_USAGE
    if as_json:
        echo_json({"event_ids": event_ids})
    else:
        for enqueued_id in event_ids:
            click.echo(enqueued_id)
    return EXIT_OK
