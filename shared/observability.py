"""Prometheus plumbing every process kind shares: the /metrics listener and the broker's queues.

Metric names follow Prometheus conventions: `_total` counters, base units (`_seconds`),
`_info` gauges of value 1, and labels with a bounded set of values (queue names from Settings,
categories from the taxonomy).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis
import structlog
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shelfsight.shared.enqueue import ENQUEUED_AT_HEADER
from shelfsight.shared.settings import Settings

log = structlog.get_logger()

_served: set[tuple[str, int]] = set()
_registered: dict[int, QueueCollector] = {}
_lock = threading.Lock()


def serve_metrics(settings: Settings) -> bool:
    """Expose /metrics on settings.metrics_address:metrics_port, once per process (port 0: off).

    A port already in use is logged, not fatal: a process must not die for its metrics.
    """
    port, address = settings.metrics_port, settings.metrics_address
    if not port:
        return False
    with _lock:
        if (address, port) in _served:
            return True
        try:
            start_http_server(port, addr=address)
        except OSError as exc:
            log.error("metrics.listen_failed", address=address, port=port, error=str(exc))
            return False
        _served.add((address, port))
    log.info("metrics.serving", address=address, port=port)
    return True


def serving_metrics(settings: Settings) -> bool:
    """Whether this process serves /metrics on settings' address and port (serve_metrics succeeded)."""
    with _lock:
        return (settings.metrics_address, settings.metrics_port) in _served


class QueueCollector(Collector):
    """Depth and oldest-message age of Celery's Redis queues, read at scrape time.

    A Celery queue on Redis is a list of JSON messages: producers LPUSH, workers BRPOP, so the
    oldest message is at index -1. kombu puts no timestamp on a message; the age comes from the
    `shelfsight_enqueued_at` header that shelfsight's producers add, and for a message without
    one (another producer, a Celery retry) from when this collector first saw it at the tail.
    """

    def __init__(self, client: redis.Redis, queues: Sequence[str],
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.queues = list(dict.fromkeys(queues))
        self.clock = clock
        self._first_seen: dict[str, tuple[str, float]] = {}

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("shelfsight_queue_messages",
                                  "Messages waiting in a broker queue (Redis list length)", labels=["queue"])
        age = GaugeMetricFamily("shelfsight_queue_oldest_message_age_seconds",
                                "Age of the oldest waiting message in a broker queue; 0 when empty",
                                labels=["queue"])
        unacked = GaugeMetricFamily("shelfsight_broker_unacked_messages",
                                    "Messages taken by workers and not yet acked (in flight or waiting "
                                    "for a retry countdown), all queues")
        up = GaugeMetricFamily("shelfsight_queue_collector_up",
                               "1 if the broker answered this scrape's queue reads, else 0")
        try:
            lengths, tails, in_flight = self._read()
        except redis.RedisError as exc:
            log.warning("metrics.queue_read_failed", error=str(exc))
            up.add_metric([], 0)
            yield up
            return
        now = self.clock()
        for queue, length, tail in zip(self.queues, lengths, tails, strict=True):
            depth.add_metric([queue], length)
            age.add_metric([queue], self._age(queue, tail, now) if length else 0.0)
        unacked.add_metric([], in_flight)
        up.add_metric([], 1)
        yield from (depth, age, unacked, up)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected at scrape time only; names are checked by tests instead

    def _read(self) -> tuple[list[int], list[Any], int]:
        pipe = self.client.pipeline(transaction=False)
        for queue in self.queues:
            pipe.llen(queue)
        for queue in self.queues:
            pipe.lindex(queue, -1)
        pipe.hlen("unacked")  # kombu's Redis transport keeps unacked messages in this hash
        replies = pipe.execute()
        n = len(self.queues)
        return [int(x) for x in replies[:n]], replies[n:2 * n], int(replies[-1])

    def _age(self, queue: str, raw: Any, now: float) -> float:
        try:
            message = json.loads(raw)
            stamped = message.get("headers", {}).get(ENQUEUED_AT_HEADER)
            if isinstance(stamped, int | float):
                self._first_seen.pop(queue, None)
                return max(0.0, now - float(stamped))
            tag = str(message.get("properties", {}).get("delivery_tag") or raw[:200])
        except (TypeError, ValueError, AttributeError):
            tag = str(raw)[:200]
        seen = self._first_seen.get(queue)
        if seen is None or seen[0] != tag:
            self._first_seen[queue] = seen = (tag, now)
        return max(0.0, now - seen[1])


def register_queue_metrics(settings: Settings, registry: CollectorRegistry = REGISTRY) -> QueueCollector:
    """Register (once per registry) the queue gauges of the extract, training and backfill queues."""
    with _lock:
        found = _registered.get(id(registry))
        if found is None:
            client = redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)
            found = QueueCollector(client, [settings.extract_queue, settings.training_queue, settings.backfill_queue])
            registry.register(found)
            _registered[id(registry)] = found
        return found
