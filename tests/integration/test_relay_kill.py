"""A relay process SIGKILLed mid-batch loses nothing: after a restart every notification's events are
in the extract queue (duplicates allowed, with identical event ids).

"Mid-batch" is made certain, not hoped for: once some events are enqueued, the broker's Redis is
paused for writes (CLIENT PAUSE WRITE), so the relay blocks inside a batch it has already taken
from its source; the test checks that the batch is held (SQS in flight, or the processing list)
and only then kills the process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shelfsight.shared.dev.services import free_port, redis_server_binary, wait_for_port
from shelfsight.shared.settings import Settings
from tests.helpers import wait_for
from tests.integration.relay_helpers import new_queue, queued_event_ids, sqs, sqs_counts
from tests.integration.test_relay import expected_ids
from tests.relay_fixtures import minio_list_item, s3_notification, s3_record

PAUSE_MS = 15_000


def relay_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHELFSIGHT_")}
    env.update({
        "SHELFSIGHT_BROKER_URL": settings.broker_url,
        "SHELFSIGHT_RESULT_BACKEND": settings.result_backend,
        "SHELFSIGHT_S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
        "SHELFSIGHT_S3_ACCESS_KEY_ID": "test",
        "SHELFSIGHT_S3_SECRET_ACCESS_KEY": "test",
        "SHELFSIGHT_BUCKET": settings.bucket,
        "SHELFSIGHT_SQS_ENDPOINT_URL": settings.sqs_endpoint_url or "",
        "SHELFSIGHT_RELAY_REDIS_URL": settings.relay_redis_url or "",
        "SHELFSIGHT_RELAY_BATCH_SIZE": "10",
        "SHELFSIGHT_RELAY_POLL_WAIT_S": "1",
        "SHELFSIGHT_RELAY_RETRY_BACKOFF_S": "0.2",
        "SHELFSIGHT_LOG_FORMAT": "json",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def start_relay(settings: Settings, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "shelfsight.shared.cli", "relay", *args],
                                env=relay_env(settings), stdout=out, stderr=subprocess.STDOUT)


def stop_gracefully(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
    assert '"relay.stopped"' in log.read_text()


@pytest.fixture
def broker(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.broker_url)
    yield client
    client.client_unpause()


@pytest.fixture(scope="module")
def list_redis_url() -> Iterator[str]:
    """A second redis-server holding the notification list, so pausing the broker leaves it alone."""
    port = free_port()
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _notifications(bucket: str, count: int) -> list[dict]:
    return [s3_notification(s3_record(bucket, f"uploads/tops/t{i}.jpg", f"{i:06X}"),
                            s3_record(bucket, f"uploads/pans/p{i}.jpg", f"{i:06X}"))
            for i in range(count)]


def _kill_mid_batch(proc: subprocess.Popen[bytes], settings: Settings, broker: redis.Redis,
                    held: object, log: Path) -> None:
    """Wait for some events, pause the broker's writes, wait until a batch is held, SIGKILL."""
    wait_for(lambda: broker.llen(settings.extract_queue) >= 6 or proc.poll() is not None,
             timeout=60, interval=0.005)
    assert proc.poll() is None, log.read_text()[-3000:]
    broker.client_pause(PAUSE_MS, all=False)  # WRITE: the relay's next enqueue blocks
    wait_for(held, timeout=20)  # type: ignore[arg-type]
    proc.kill()
    proc.wait(timeout=10)
    broker.client_unpause()


def test_sqs_relay_killed_mid_batch_loses_nothing(settings: Settings, s3_endpoint: str, broker: redis.Redis,
                                                  tmp_path: Path) -> None:
    s = settings.model_copy(update={"sqs_endpoint_url": s3_endpoint})
    queue_url = new_queue(s, visibility_timeout_s=3)  # a killed relay's messages come back in 3 s
    notifications = _notifications(s.bucket, 150)
    client = sqs(s)
    for start in range(0, len(notifications), 10):
        client.send_message_batch(QueueUrl=queue_url, Entries=[
            {"Id": str(i), "MessageBody": json.dumps(n)} for i, n in enumerate(notifications[start:start + 10])])
    want = expected_ids(s, *notifications)
    log = tmp_path / "relay.log"

    first = start_relay(s, ["--sqs", queue_url], log)
    _kill_mid_batch(first, s, broker, lambda: sqs_counts(s, queue_url)[1] > 0, log)
    enqueued_before_restart = set(queued_event_ids(s))
    assert 0 < len(enqueued_before_restart) < len(want), "killed mid-way"
    assert sqs_counts(s, queue_url)[1] > 0, "the killed relay held messages it had not deleted"

    second = start_relay(s, ["--sqs", queue_url], log)
    wait_for(lambda: set(queued_event_ids(s)) == want and sqs_counts(s, queue_url) == (0, 0), timeout=120)
    stop_gracefully(second, log)
    queued = queued_event_ids(s)
    assert set(queued) == want and len(queued) >= len(want)  # duplicates only as identical ids


def test_redis_list_relay_killed_mid_batch_loses_nothing(settings: Settings, list_redis_url: str,
                                                         broker: redis.Redis, tmp_path: Path) -> None:
    s = settings.model_copy(update={"relay_redis_url": list_redis_url})
    source = redis.Redis.from_url(list_redis_url)
    source.flushdb()
    key, processing = "minio:uploads", "minio:uploads:processing"
    notifications = _notifications(s.bucket, 300)
    source.rpush(key, *[minio_list_item(*n["Records"]) for n in notifications])
    want = expected_ids(s, *notifications)
    log = tmp_path / "relay.log"

    first = start_relay(s, ["--redis-list", key], log)
    _kill_mid_batch(first, s, broker, lambda: source.llen(processing) > 0, log)
    assert source.llen(processing) > 0, "the killed relay left its batch in the processing list"
    assert 0 < len(set(queued_event_ids(s))) < len(want), "killed mid-way"

    second = start_relay(s, ["--redis-list", key], log)
    wait_for(lambda: set(queued_event_ids(s)) == want and source.llen(key) == 0
             and source.llen(processing) == 0, timeout=120)
    stop_gracefully(second, log)
    assert '"relay.redis_list.recovering"' in log.read_text()
