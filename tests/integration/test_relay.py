"""`shelfsight relay` against moto's SQS, a real redis-server and HTTP: the right events, nothing lost."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading

import pytest
import redis
from pydantic import SecretStr

from shelfsight.shared.enqueue import NotificationError, events_from_s3_notification
from shelfsight.shared.events import DeadLetter
from shelfsight.shared.relay.runner import redis_list_source, run_relay, sqs_source, webhook_source
from shelfsight.shared.relay.sources import Source
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from tests.helpers import run_cli, wait_for
from tests.integration.relay_helpers import new_queue, queued_event_ids, sqs, sqs_counts
from tests.relay_fixtures import (
    eventbridge_event,
    minio_list_item,
    s3_notification,
    s3_record,
    s3_test_event,
    sns_envelope,
)


@pytest.fixture
def relay_settings(settings: Settings, s3_endpoint: str) -> Settings:
    return settings.model_copy(update={"sqs_endpoint_url": s3_endpoint, "relay_poll_wait_s": 0.5,
                                       "relay_retry_backoff_s": 0.1})


class RunningRelay:
    """A relay in a thread of this process, stopped (as SIGTERM would) at exit."""

    def __init__(self, settings: Settings, source: Source) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=run_relay, args=(settings, source, self.stop),
                                       kwargs={"handle_signals": False}, daemon=True)

    def __enter__(self) -> RunningRelay:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the relay did not stop"


def expected_ids(settings: Settings, *notifications: dict) -> set[str]:
    """Event ids of the notifications' good records (what `enqueue --s3-notification` would give)."""
    pattern = settings.s3_notification_key_pattern
    ids = set()
    for record in (r for n in notifications for r in n["Records"]):
        with contextlib.suppress(NotificationError):  # a bad record: dead-lettered, no event
            ids.update(e.event_id for e in events_from_s3_notification({"Records": [record]}, pattern))
    return ids


def dead_letters(settings: Settings) -> list[DeadLetter]:
    store = S3ObjectStore(settings)
    return [DeadLetter.model_validate_json(store.get(settings.bucket, key).body)
            for key in store.list_keys(settings.bucket, settings.dead_letter_prefix + "/")]


def test_sqs_relay_enqueues_s3_sns_and_eventbridge_records_skips_test_events(relay_settings: Settings) -> None:
    s = relay_settings
    bucket = s.bucket
    direct = s3_notification(s3_record(bucket, "uploads/tops/p1.jpg", "01"),
                             s3_record(bucket, "not-a-product.jpg", "02"),          # bad: dead letter
                             s3_record(bucket, "uploads/pans/p3.jpg", "03"))
    via_sns = s3_notification(s3_record(bucket, "uploads/tops/p4.jpg", "04"))
    queue_url = new_queue(s)
    client = sqs(s)
    for body in (direct, sns_envelope(via_sns), eventbridge_event(bucket, "uploads/pans/p5.jpg", "05"),
                 s3_test_event()):
        client.send_message(QueueUrl=queue_url, MessageBody=json.dumps(body))
    want = expected_ids(s, direct, via_sns, s3_notification(s3_record(bucket, "uploads/pans/p5.jpg", "05")))
    assert len(want) == 4

    with RunningRelay(s, sqs_source(s, queue_url)):
        wait_for(lambda: set(queued_event_ids(s)) == want and sqs_counts(s, queue_url) == (0, 0), timeout=30)
    assert sorted(queued_event_ids(s)) == sorted(want), "each event enqueued once"
    [letter] = dead_letters(s)
    assert letter.error_code == "malformed_event" and "not-a-product.jpg" in letter.message
    entries = redis.Redis.from_url(s.broker_url, decode_responses=True).xrange(s.dead_letter_stream)
    assert [fields["event_id"] for _, fields in entries] == [letter.event_id]  # type: ignore[union-attr]


def test_redis_list_relay_enqueues_minio_items_and_empties_its_processing_list(relay_settings: Settings) -> None:
    s = relay_settings
    client = redis.Redis.from_url(s.broker_url)
    first = (s3_record(s.bucket, "uploads/tops/p1.jpg", "01"), s3_record(s.bucket, "uploads/tops/p2.jpg", "02"))
    second = (s3_record(s.bucket, "uploads/pans/p3.jpg", "03"),)
    client.rpush("minio:uploads", minio_list_item(*first), "not json at all", minio_list_item(*second))
    # A relay killed earlier left an item in its processing list: it is recovered first.
    left_over = (s3_record(s.bucket, "uploads/pans/p0.jpg", "00"),)
    client.rpush("minio:uploads:processing", minio_list_item(*left_over))
    want = expected_ids(s, s3_notification(*first), s3_notification(*second), s3_notification(*left_over))

    with RunningRelay(s, redis_list_source(s, "minio:uploads")):
        wait_for(lambda: set(queued_event_ids(s)) == want and client.llen("minio:uploads") == 0
                 and client.llen("minio:uploads:processing") == 0, timeout=30)
    assert len(queued_event_ids(s)) == 4
    assert [d.error_code for d in dead_letters(s)] == ["malformed_event"]


def test_webhook_relay_answers_200_after_enqueue(relay_settings: Settings) -> None:
    from shelfsight.shared.dev.services import free_port

    s = relay_settings.model_copy(update={"relay_webhook_token": SecretStr("tok")})
    port = free_port()
    notification = s3_notification(s3_record(s.bucket, "uploads/tops/p9.jpg", "09"))
    with RunningRelay(s, webhook_source(s, f"127.0.0.1:{port}")):
        wait_for(lambda: _healthz(port), timeout=20)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/minio/events", body=json.dumps(notification),
                     headers={"Authorization": "Bearer tok", "Content-Type": "application/json"})
        response = conn.getresponse()
        payload = json.loads(response.read())
        # 200 means the event is already in the broker.
        assert response.status == 200 and set(queued_event_ids(s)) == expected_ids(s, notification)
        assert payload["enqueued"] == queued_event_ids(s)


def _healthz(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False


def test_relay_cli_wants_exactly_one_source(settings: Settings) -> None:
    assert run_cli(settings, "relay") == 2
    assert run_cli(settings, "relay", "--sqs", "http://q", "--redis-list", "k") == 2
    assert run_cli(settings, "relay", "--webhook", "127.0.0.1:0") == 2  # no token configured
    assert run_cli(settings, "relay", "--webhook", "nonsense") == 2
    assert run_cli(settings, "relay", "--sqs", "http://q", "--processing-list", "p") == 2

