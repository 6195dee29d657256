"""Hostile messages on a real broker: pickled and non-JSON bodies never run, and each leaves a dead letter.

Cases (expected outcome):
- pickled body, Celery task headers, pickle content type  -> not unpickled; dead letter malformed_event
- pickled body, no task headers (raw kombu message)       -> not unpickled; dead letter malformed_event
- non-JSON body declared as application/json              -> dead letter malformed_event
- JSON body naming a task nobody registered               -> dead letter malformed_event
After all of them, the worker still turns a good event into a result.
"""

from __future__ import annotations

import json
import pickle
import uuid

import redis

from shelfsight.shared.celery_app import EXTRACT_TASK
from shelfsight.shared.enqueue import enqueue_upload
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from tests.helpers import extraction_worker, jpeg_bytes, wait_for

PWNED = "/tmp/shelfsight-hostile-pickle-ran"


class _Exploit:
    """Unpickling this would run a shell command: it must never be unpickled."""

    def __reduce__(self):
        import os

        return (os.system, (f"touch {PWNED}",))


def _publish_raw(app, body: bytes, content_type: str, headers: dict | None) -> None:
    with app.connection_for_write() as conn:
        conn.Producer().publish(
            body, exchange="", routing_key="extract", serializer=None, content_type=content_type,
            content_encoding="binary" if content_type != "application/json" else "utf-8",
            headers=headers or {}, retry=True,
        )


def test_pickled_and_non_json_bodies_are_dead_lettered_never_run(settings: Settings, store: S3ObjectStore) -> None:
    import os

    if os.path.exists(PWNED):
        os.unlink(PWNED)
    store.put(settings.bucket, "uploads/pans/ok.jpg", jpeg_bytes(), "image/jpeg")
    pickled = pickle.dumps(((_Exploit(),), {}, {}))
    task_headers = {"task": EXTRACT_TASK, "id": uuid.uuid4().hex, "lang": "py", "argsrepr": "", "kwargsrepr": ""}
    client = redis.Redis.from_url(settings.broker_url, decode_responses=True)
    with extraction_worker(settings, concurrency=2) as app:
        _publish_raw(app, pickled, "application/x-python-serialize", task_headers)
        _publish_raw(app, pickled, "application/x-python-serialize", None)
        _publish_raw(app, b"{this is not json", "application/json", {**task_headers, "id": uuid.uuid4().hex})
        app.send_task("shelfsight.no_such_task", args=[{"x": 1}])
        letters = wait_for(lambda: (d := client.xrange(settings.dead_letter_stream)) and len(d) >= 4 and d,
                           timeout=60)
        enqueue_upload(app, product_id="ok", category="pans", image=f"s3://{settings.bucket}/uploads/pans/ok.jpg")
        wait_for(lambda: store.exists(settings.bucket, "results/pans/ok.json"), timeout=90)
    assert not os.path.exists(PWNED), "a pickled body was unpickled"
    codes = [fields["error_code"] for _, fields in letters]
    assert codes == ["malformed_event"] * 4
    for _, fields in letters:
        bucket, key = fields["record"].removeprefix("s3://").split("/", 1)
        assert "/malformed/" in key  # named by content, never by a claimed id
        record = json.loads(store.get(bucket, key).body)
        assert record["error_code"] == "malformed_event" and record["message"]
