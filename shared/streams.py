"""Redis Streams for downstream consumers: one entry per result, one per dead letter.

Also the one way this project builds a Redis client for its own commands (streams, locks,
delivery counters): with socket and connect timeouts, TCP keepalive and health checks, so a
half-open connection fails a command instead of hanging it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import redis
import structlog
from redis.client import Pipeline

from shelfsight.shared.grouped_pipelines import GroupedPipelines
from shelfsight.shared.settings import Settings

log = structlog.get_logger()

PUBLISH_ATTEMPTS = 3


def redis_client(settings: Settings, url: str | None = None) -> redis.Redis:
    """A Redis client for `url` (default: the broker) with the settings' timeouts and keepalive.

    Its pool is a blocking one of `redis_max_connections`: a thread that finds every connection
    busy waits for one (up to the socket timeout) instead of failing. redis-py's default pool
    raises MaxConnectionsError past 100 connections, which the extraction worker's 512 threads
    on a GPU reached (the first H200 run: 2,492 stream and delivery writes refused).
    """
    pool = redis.BlockingConnectionPool.from_url(
        url or settings.broker_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.broker_socket_timeout_s,
        socket_timeout=settings.broker_socket_timeout_s,
        socket_connect_timeout=settings.broker_connect_timeout_s,
        socket_keepalive=True,
        health_check_interval=settings.broker_health_check_interval_s,
        retry_on_timeout=False,  # a timed-out command is reported, never silently sent twice
    )
    return redis.Redis(connection_pool=pool)


class EventPublisher(Protocol):
    def publish(self, stream: str, fields: dict[str, Any]) -> str: ...


def _flat(fields: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}


class RedisStreamPublisher:
    """XADD with an approximate MAXLEN, so the stream cannot grow without bound.

    `pipelines`: where `publish_many` sends its round trips (grouped with other threads' on the
    same client; shared with the delivery tracker in the extraction worker)."""

    def __init__(self, client: redis.Redis, maxlen: int, pipelines: GroupedPipelines | None = None) -> None:
        self.client = client
        self.maxlen = maxlen
        self.pipelines = pipelines or GroupedPipelines(client)

    def publish(self, stream: str, fields: dict[str, Any]) -> str:
        entry_id = self.client.xadd(stream, _flat(fields), maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def publish_many(self, entries: Sequence[tuple[str, dict[str, Any]]],
                     then: Callable[[Pipeline], object] | None = None) -> list[str]:
        """Every entry in one round trip (a pipeline, no transaction, grouped with other threads'),
        in order; raises if any fails. `then` queues more commands on the same client after them
        (their replies are not returned; one that fails raises too)."""
        flat = [(stream, _flat(fields)) for stream, fields in entries]

        def queue(pipe: Pipeline) -> None:
            for stream, fields in flat:
                pipe.xadd(stream, fields, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            if then is not None:
                then(pipe)

        replies = self.pipelines.execute(queue)[:len(entries)]
        return [i.decode() if isinstance(i, bytes) else str(i) for i in replies]


class InMemoryPublisher:
    """For unit tests."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, Any]]] = []

    def publish(self, stream: str, fields: dict[str, Any]) -> str:
        self.entries.append((stream, dict(fields)))
        return f"{len(self.entries)}-0"

    def publish_many(self, entries: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        """Each entry through `publish` (a subclass that refuses a stream refuses it here too);
        all or nothing, as a pipeline on a refused connection."""
        mark = len(self.entries)
        try:
            return [self.publish(stream, fields) for stream, fields in entries]
        except Exception:
            del self.entries[mark:]
            raise


def publish_after_write(
    publisher: EventPublisher, stream: str, fields: dict[str, Any], *,
    attempts: int = PUBLISH_ATTEMPTS, pause_s: float = 0.1,
) -> str | None:
    """Announce an outcome whose record is already durable in S3: a few quick tries, then give up.

    Returns the entry id, or None when the stream could not be reached. The S3 record is the
    source of truth; a stream entry is a notification. A failure here must never turn a written
    result into a dead letter, so it is logged (`stream.publish_failed`) and reported to the
    caller, which counts it, instead of raised.
    """
    for attempt in range(1, attempts + 1):
        try:
            return publisher.publish(stream, fields)
        except Exception as exc:  # noqa: BLE001 - any client error: the record exists regardless
            if attempt == attempts:
                log.error("stream.publish_failed", stream=stream, event_id=fields.get("event_id"),
                          attempts=attempts, error=f"{type(exc).__name__}: {exc}")
                return None
            time.sleep(pause_s * 2 ** (attempt - 1))
    return None


def publish_all_after_write(
    publisher: EventPublisher, entries: Sequence[tuple[str, dict[str, Any]]], **retry: Any,
) -> list[str | None]:
    """`publish_after_write` for several entries about records already durable, in one round trip
    when the publisher can pipeline (`publish_many`). If that fails, each entry gets its own
    `publish_after_write` (its own tries, its own failure), so one stream's outage never costs
    another's entry; an entry the failed pipeline did write may then appear twice (consumers key
    on event_id, as for a redelivered event). Returns the entry ids, None where one failed."""
    publish_many = getattr(publisher, "publish_many", None)
    if publish_many is not None and len(entries) > 1:
        try:
            return list(publish_many(entries))
        except Exception as exc:  # noqa: BLE001 - per entry below, with retries and logging
            log.warning("stream.pipeline_failed", error=f"{type(exc).__name__}: {exc}", entries=len(entries))
    return publish_each_after_write(publisher, entries, **retry)


def publish_each_after_write(
    publisher: EventPublisher, entries: Sequence[tuple[str, dict[str, Any]]], **retry: Any,
) -> list[str | None]:
    """`publish_after_write` for each entry, one at a time (the fallback of a failed pipeline)."""
    return [publish_after_write(publisher, stream, fields, **retry) for stream, fields in entries]


def announce_model(client: redis.Redis, channel: str, category: str, version: str) -> int:
    """Tell running workers that `category` now serves `version` (they also poll CURRENT)."""
    return int(client.publish(channel, json.dumps({"category": category, "version": version})))
