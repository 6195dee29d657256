"""The crash-safe transport over two queues on a real redis-server: live before backfill, no polling lag.

kombu takes several queues in turn; a worker draining re-extractions must take a live upload first
whenever both wait, and must not make either wait a poll timeout per other queue.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import redis
from kombu import Connection, Exchange, Queue

from shelfsight.shared.celery_app import CRASH_SAFE_REDIS_TRANSPORT
from shelfsight.shared.settings import Settings

OPTIONS = {"queue_order_strategy": "priority", "queue_priority": ["live", "bulk"], "inflight_alive_s": 5}


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name, "direct"), routing_key=name)


def _publish(conn: Connection, queue: str, body: dict) -> None:
    conn.Producer().publish(body, exchange=Exchange(queue, "direct"), routing_key=queue,
                            declare=[_queue(queue)], serializer="json")


def _drain_until(conn: Connection, done: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=1)


def test_live_messages_are_taken_before_backfill_ones_whatever_arrived_first(settings: Settings) -> None:
    url = settings.broker_url
    with Connection(url) as producer:
        for i in range(5):
            _publish(producer, "bulk", {"n": f"bulk-{i}"})
        for i in range(3):
            _publish(producer, "live", {"n": f"live-{i}"})
    got: list[str] = []
    with Connection(url, transport=CRASH_SAFE_REDIS_TRANSPORT, transport_options=OPTIONS) as conn:
        def on_message(body: dict, message) -> None:
            got.append(body["n"])
            message.ack()
            if body["n"] == "bulk-0":  # a live upload arrives while backfill drains: it goes next
                _publish(conn, "live", {"n": "live-late"})

        # the consumer lists bulk first: the transport's priority option, not the order, decides
        with conn.Consumer([_queue("bulk"), _queue("live")], callbacks=[on_message], accept=["json"]):
            _drain_until(conn, lambda: len(got) >= 9)
    assert got == ["live-0", "live-1", "live-2", "bulk-0", "live-late", "bulk-1", "bulk-2", "bulk-3", "bulk-4"]
    client = redis.Redis.from_url(url)
    assert not [k for k in client.scan_iter("shelfsight:inflight:*:*") if not k.endswith(b":alive")
                and client.type(k) == b"list" and client.llen(k)]  # nothing left in flight


def test_an_idle_consumer_of_two_queues_takes_either_without_a_poll_per_queue(settings: Settings) -> None:
    url = settings.broker_url
    arrived: dict[str, float] = {}
    with Connection(url, transport=CRASH_SAFE_REDIS_TRANSPORT, transport_options=OPTIONS) as conn:
        def on_message(body: dict, message) -> None:
            arrived[body["n"]] = time.monotonic() - body["sent"]
            message.ack()

        with conn.Consumer([_queue("live"), _queue("bulk")], callbacks=[on_message], accept=["json"]):
            for _ in range(2):  # both queues empty: the consumer is blocked on the live one
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.3)
            with Connection(url) as producer:
                _publish(producer, "live", {"n": "live", "sent": time.monotonic()})
                _drain_until(conn, lambda: "live" in arrived)
                _publish(producer, "bulk", {"n": "bulk", "sent": time.monotonic()})
                _drain_until(conn, lambda: "bulk" in arrived)
    assert arrived["live"] < 0.25  # woken by the message itself
    assert arrived["bulk"] < 1.5  # at most one blocking poll (1 s) on the live queue
