"""Redis Streams for downstream consumers: one entry per result, one per dead letter.

Also the one way this project builds a Redis client for its own commands (streams, locks,
delivery counters): with socket and connect timeouts, TCP keepalive and health checks, so a
half-open connection fails a command instead of hanging it.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

import redis
import structlog

from shelfsight.shared.settings import Settings

log = structlog.get_logger()

PUBLISH_ATTEMPTS = 3


def redis_client(settings: Settings, url: str | None = None) -> redis.Redis:
    """A Redis client for `url` (default: the broker) with the settings' timeouts and keepalive."""
    return redis.Redis.from_url(
        url or settings.broker_url,
        socket_timeout=settings.broker_socket_timeout_s,
        socket_connect_timeout=settings.broker_connect_timeout_s,
        socket_keepalive=True,
        health_check_interval=settings.broker_health_check_interval_s,
        retry_on_timeout=False,  # a timed-out command is reported, never silently sent twice
    )


class EventPublisher(Protocol):
    def publish(self, stream: str, fields: dict[str, Any]) -> str: ...


class RedisStreamPublisher:
    """XADD with an approximate MAXLEN, so the stream cannot grow without bound."""

    def __init__(self, client: redis.Redis, maxlen: int) -> None:
        self.client = client
        self.maxlen = maxlen

    def publish(self, stream: str, fields: dict[str, Any]) -> str:
        flat = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
        entry_id = self.client.xadd(stream, flat, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


class InMemoryPublisher:
    """For unit tests."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, Any]]] = []

    def publish(self, stream: str, fields: dict[str, Any]) -> str:
        self.entries.append((stream, dict(fields)))
        return f"{len(self.entries)}-0"


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


def announce_model(client: redis.Redis, channel: str, category: str, version: str) -> int:
    """Tell running workers that `category` now serves `version` (they also poll CURRENT)."""
    return int(client.publish(channel, json.dumps({"category": category, "version": version})))
