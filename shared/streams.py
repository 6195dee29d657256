"""Redis Streams for downstream consumers: one entry per result, one per dead letter."""

from __future__ import annotations

import json
from typing import Any, Protocol

import redis


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


def announce_model(client: redis.Redis, channel: str, category: str, version: str) -> int:
    """Tell running workers that `category` now serves `version` (they also poll CURRENT)."""
    return int(client.publish(channel, json.dumps({"category": category, "version": version})))
