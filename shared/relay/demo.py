"""One upload through the relay, as MinIO would send it: what `shelfsight demo` shows.

The demo stack runs `shelfsight relay --redis-list <UPLOADS_LIST>` (start_stack(relay=True)).
`upload_through_relay` puts an image into the bucket and pushes the notification MinIO's Redis
target would push for it, then waits for the worker's result file: no `enqueue` call anywhere.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Any

import redis

from shelfsight.shared.enqueue import events_from_s3_notification
from shelfsight.shared.events import result_key
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import ObjectMissing, S3ObjectStore

UPLOADS_LIST = "minio:uploads"  # the list MinIO's Redis target fills in docker/compose.yaml


def minio_put_notification(bucket: str, key: str, size: int, etag: str) -> str:
    """The list item MinIO's Redis target (format `access`) pushes for one PUT."""
    now = datetime.now(UTC)
    record = {
        "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "", "eventTime": now.isoformat(),
        "eventName": "s3:ObjectCreated:Put",
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
               "object": {"key": key, "size": size, "eTag": etag, "contentType": "image/jpeg",
                          "sequencer": f"{time.time_ns():X}"}},
    }
    return json.dumps([{"Event": [record], "EventTime": now.isoformat()}])


def upload_through_relay(settings: Settings, key: str, body: bytes, *, list_key: str = UPLOADS_LIST,
                         timeout_s: float = 120.0) -> dict[str, Any]:
    """PUT `body` at s3://<bucket>/<key>, notify the relay as MinIO would, return the result file.

    Waits for the result whose event id is the one the relay derives from this notification.
    """
    store = S3ObjectStore(settings)
    etag = store.put(settings.bucket, key, body, "image/jpeg") or hashlib.md5(body).hexdigest()  # noqa: S324
    item = minio_put_notification(settings.bucket, key, len(body), etag)
    [event] = events_from_s3_notification({"Records": json.loads(item)[0]["Event"]},
                                          settings.s3_notification_key_pattern)
    redis.Redis.from_url(settings.relay_redis_url or settings.broker_url).rpush(list_key, item)
    target = result_key(settings.results_prefix, event.category, event.product_id)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result: dict[str, Any] = json.loads(store.get(settings.bucket, target).body)
        except ObjectMissing:
            result = {}
        if result.get("event_id") == event.event_id:
            return result
        time.sleep(0.2)
    raise TimeoutError(f"no result for {key} (event {event.event_id}) after {timeout_s:.0f}s; "
                       "see the relay's and the worker's logs")
