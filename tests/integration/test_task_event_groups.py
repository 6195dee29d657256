"""The extraction worker's task events go to Redis in groups (worker/consumer.py), on a real
redis-server: every event Flower needs arrives, in far fewer PUBLISHes than events, and what is
still buffered when the worker stops is sent, not dropped."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from celery.contrib.testing.worker import start_worker

from shelfsight.shared.celery_app import create_celery_app
from shelfsight.shared.settings import Settings
from shelfsight.worker.consumer import use_extraction_consumer

TASKS = 40


class EventTap:
    """Every message published on the test db's event exchange, decoded: one list per PUBLISH."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        db = self.client.connection_pool.connection_kwargs.get("db", 0)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(f"/{db}.celeryev*")
        self.messages: list[list[dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.pubsub.get_message(timeout=0.05)
            if message is None:
                continue
            envelope = json.loads(message["data"])
            body = envelope["body"]
            if envelope["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            events = json.loads(body)
            self.messages.append(events if isinstance(events, list) else [events])

    def task_events(self, kind: str) -> list[dict[str, Any]]:
        return [e for batch in list(self.messages) for e in batch if e.get("type") == kind]

    def worker_task_messages(self) -> list[list[dict[str, Any]]]:
        """The PUBLISHes carrying the worker's task events (the producer's task-sent are its own)."""
        return [batch for batch in list(self.messages)
                if any(e.get("type") in ("task-received", "task-succeeded") for e in batch)]

    def wait_for(self, kind: str, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.task_events(kind)) >= count:
                return True
            time.sleep(0.02)
        return False

    def __enter__(self) -> EventTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.pubsub.close()


@contextmanager
def worker_with_events(settings: Settings) -> Iterator[tuple[Any, threading.Event, list[str]]]:
    """A threads-pool worker with the extraction consumer and a no-op task that waits for `gate`."""
    app = create_celery_app(settings)
    use_extraction_consumer(app, settings)
    gate, done = threading.Event(), []

    @app.task(name="test.noop", ignore_result=True, typing=False, shared=False)
    def noop(*_args: Any) -> None:
        gate.wait(30)
        done.append("x")

    app.conf.task_routes = {"test.noop": {"queue": settings.extract_queue}}
    with start_worker(app, pool="threads", concurrency=8, queues=[settings.extract_queue],
                      perform_ping_check=False, shutdown_timeout=30, loglevel="WARNING"):
        yield noop, gate, done


def test_every_task_event_arrives_in_far_fewer_publishes_than_events(settings: Settings) -> None:
    settings = settings.model_copy(update={"task_event_flush_ms": 200})
    with EventTap(settings.broker_url) as tap, worker_with_events(settings) as (noop, gate, _):
        gate.set()
        ids = [noop.delay(i).id for i in range(TASKS)]
        assert tap.wait_for("task-succeeded", TASKS, timeout=30), len(tap.task_events("task-succeeded"))
        received = {e["uuid"] for e in tap.task_events("task-received")}
        succeeded = {e["uuid"] for e in tap.task_events("task-succeeded")}
        publishes = len(tap.worker_task_messages())
    assert received == set(ids) and succeeded == set(ids)
    assert publishes <= TASKS // 4, f"{publishes} PUBLISHes for {2 * TASKS} task events"


def test_with_the_interval_at_zero_celery_flushes_every_loop_turn(settings: Settings) -> None:
    """The comparison for the test above: Celery's own flush publishes many more messages."""
    settings = settings.model_copy(update={"task_event_flush_ms": 0})
    with EventTap(settings.broker_url) as tap, worker_with_events(settings) as (noop, gate, _):
        gate.set()
        for i in range(TASKS):
            noop.delay(i)
            time.sleep(0.01)  # spread out, as uploads arrive: each event is its loop turn's only one
        assert tap.wait_for("task-succeeded", TASKS, timeout=30)
        publishes = len(tap.worker_task_messages())
    assert publishes > TASKS // 2, f"only {publishes} PUBLISHes for {2 * TASKS} events without grouping"


def test_events_still_buffered_when_the_worker_stops_are_sent(settings: Settings) -> None:
    settings = settings.model_copy(update={"task_event_flush_ms": 60_000})  # far longer than the test
    with EventTap(settings.broker_url) as tap:
        with worker_with_events(settings) as (noop, gate, done):
            ids = [noop.delay(i).id for i in range(4)]
            assert tap.wait_for("task-received", 4, timeout=1.0) is False  # held for the interval
            gate.set()
            deadline = time.monotonic() + 10
            while len(done) < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert tap.task_events("task-succeeded") == []  # still held
        # the worker stopped: its buffered events were flushed on the way out, not a minute later
        assert tap.wait_for("task-succeeded", 4, timeout=10.0)
    assert {e["uuid"] for e in tap.task_events("task-succeeded")} == set(ids)
