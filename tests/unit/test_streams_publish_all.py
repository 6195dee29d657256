"""publish_all_after_write: several stream entries about durable records in one round trip, and
per-entry tries when that fails, so one stream's outage never costs another's entry."""

from __future__ import annotations

from typing import Any

from shelfsight.shared.streams import (
    InMemoryPublisher,
    RedisStreamPublisher,
    publish_all_after_write,
)

ENTRIES = [("results", {"event_id": "e1", "n": 1}), ("review", {"event_id": "e1", "scores": {"a": 0.5}})]


class _Pipeline:
    def __init__(self, client: _Client) -> None:
        self.client = client
        self.queued: list[tuple[str, dict[str, Any]]] = []

    @property
    def command_stack(self) -> list[tuple[str, dict[str, Any]]]:  # what GroupedPipelines counts
        return self.queued

    def xadd(self, stream: str, fields: dict[str, Any], **_: Any) -> _Pipeline:
        self.queued.append((stream, fields))
        return self

    def execute(self, raise_on_error: bool = True) -> list[bytes]:
        self.client.round_trips += 1
        if self.client.down:
            raise ConnectionError("redis down")
        self.client.entries += self.queued
        return [f"{len(self.client.entries) - len(self.queued) + i + 1}-0".encode() for i in range(len(self.queued))]


class _Client:
    def __init__(self) -> None:
        self.round_trips = 0
        self.down = False
        self.entries: list[Any] = []

    def pipeline(self, transaction: bool = True) -> _Pipeline:
        assert transaction is False  # notifications, not a transaction
        return _Pipeline(self)

    def xadd(self, stream: str, fields: dict[str, Any], **_: Any) -> bytes:
        self.round_trips += 1
        if self.down:
            raise ConnectionError("redis down")
        self.entries.append((stream, fields))
        return f"{len(self.entries)}-0".encode()


def test_redis_entries_go_in_one_round_trip_in_order_and_flattened() -> None:
    client = _Client()
    ids = publish_all_after_write(RedisStreamPublisher(client, 1000), ENTRIES)
    assert ids == ["1-0", "2-0"] and client.round_trips == 1
    assert [s for s, _ in client.entries] == ["results", "review"]
    assert client.entries[1][1]["scores"] == '{"a": 0.5}'  # non-strings as JSON, as publish does


def test_a_failed_pipeline_falls_back_to_per_entry_tries_and_reports_each() -> None:
    client = _Client()
    client.down = True
    ids = publish_all_after_write(RedisStreamPublisher(client, 1000), ENTRIES, attempts=2, pause_s=0)
    assert ids == [None, None] and client.round_trips == 1 + 2 * 2


class _Refusing(InMemoryPublisher):
    def publish(self, stream: str, fields: dict[str, Any]) -> str:
        if stream == "review":
            raise ConnectionError("review stream down")
        return super().publish(stream, fields)


def test_one_streams_outage_never_costs_the_others_entry() -> None:
    publisher = _Refusing()
    ids = publish_all_after_write(publisher, ENTRIES, attempts=1, pause_s=0)
    assert ids[0] is not None and ids[1] is None
    assert [s for s, _ in publisher.entries] == ["results"]  # once: the refused batch wrote nothing


def test_a_single_entry_is_one_plain_publish() -> None:
    publisher = InMemoryPublisher()
    assert publish_all_after_write(publisher, ENTRIES[:1]) == ["1-0"]
