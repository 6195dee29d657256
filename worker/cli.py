"""`shelfsight enqueue` and `shelfsight dead-letters`: the worker side of the command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pydantic import ValidationError

from shared.settings import Settings

MAX_NOTIFICATION_BYTES = 1 << 20  # an S3 notification carries a few records, never megabytes


def cmd_enqueue(args: argparse.Namespace, settings: Settings) -> int:
    """Enqueue one upload, or every ObjectCreated record of an S3 notification; print event ids."""
    from worker.celery_app import create_celery_app
    from worker.enqueue import (
        NotificationError,
        enqueue_event,
        enqueue_upload,
        events_from_s3_notification,
    )

    app = create_celery_app(settings)
    try:
        if args.s3_notification:
            source = sys.stdin.buffer if args.s3_notification == "-" else open(args.s3_notification, "rb")
            with source:
                data = source.read(MAX_NOTIFICATION_BYTES + 1)
            if len(data) > MAX_NOTIFICATION_BYTES:
                print(f"not enqueued: the notification exceeds {MAX_NOTIFICATION_BYTES} bytes", file=sys.stderr)
                return 2
            text = data.decode("utf-8")
            events = events_from_s3_notification(json.loads(text), settings.s3_notification_key_pattern)
            for event in events:
                print(enqueue_event(app, event))
            if not events:
                print("no ObjectCreated records in the notification", file=sys.stderr)
            return 0
        if not (args.product_id and args.category and args.image):
            print("enqueue needs --product-id, --category and --image (or --s3-notification)", file=sys.stderr)
            return 2
        print(enqueue_upload(app, product_id=args.product_id, category=args.category, image=args.image,
                             event_id=args.event_id or None))
        return 0
    except (ValidationError, NotificationError, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        print(f"not enqueued: {exc}", file=sys.stderr)
        return 2


def cmd_dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    """Print the newest dead letters from the Redis stream (full records are in S3)."""
    import redis

    client = redis.Redis.from_url(settings.broker_url, decode_responses=True)
    entries: Any = client.xrevrange(settings.dead_letter_stream, count=args.count)
    for entry_id, fields in entries:
        print(json.dumps({"id": entry_id, **fields}))
    return 0


def register(sub: argparse._SubParsersAction, handlers: dict) -> None:
    p = sub.add_parser("enqueue", help="enqueue an upload event (prints the event id)")
    p.add_argument("--product-id")
    p.add_argument("--category")
    p.add_argument("--image", help="s3://bucket/key")
    p.add_argument("--event-id", help="idempotency key; default: a new uuid")
    p.add_argument("--s3-notification", metavar="FILE|-", help="an S3/MinIO ObjectCreated notification JSON")
    handlers["enqueue"] = cmd_enqueue

    p = sub.add_parser("dead-letters", help="show the newest dead letters")
    p.add_argument("--count", type=int, default=20)
    handlers["dead-letters"] = cmd_dead_letters
