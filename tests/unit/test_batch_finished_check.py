"""The dead-letter check of a micro-batch: asked once for all its events, whichever thread asks
first; an event outside the batch is asked on its own; Redis down reads as "unknown" (the write
goes ahead, as the per-event check did)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis

from shelfsight.worker.delivery import (
    BatchFinishedCheck,
    InMemoryDeliveryTracker,
    RedisDeliveryTracker,
)


class CountingTracker(InMemoryDeliveryTracker):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[str, ...]] = []
        self.gate = threading.Event()

    def finished_many(self, event_ids: Any) -> dict[str, str | None]:
        self.asked.append(tuple(event_ids))
        self.gate.wait(5)  # hold the first asker so the others arrive while it asks
        return super().finished_many(event_ids)

    def finished(self, event_id: str) -> str | None:
        self.asked.append((event_id,))
        return super().finished(event_id)


def test_eight_threads_of_a_batch_make_one_request_and_each_reads_its_own_answer() -> None:
    tracker = CountingTracker()
    tracker.finish("e3", "dead_letter")
    ids = [f"e{i}" for i in range(8)]
    check = BatchFinishedCheck(tracker, ids + ["e0"])  # a duplicate id is asked once
    with ThreadPoolExecutor(8) as pool:
        answers = pool.map(check.finished, ids)
        tracker.gate.set()
        got = dict(zip(ids, answers, strict=True))
    assert tracker.asked == [tuple(ids)]
    assert got == {**dict.fromkeys(ids), "e3": "dead_letter"}
    assert check.finished("other") is None and tracker.asked[-1] == ("other",)


class _DownPipeline:
    def hget(self, *_: Any) -> None:
        pass

    def execute(self) -> list[Any]:
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


class _DownClient:
    def pipeline(self, transaction: bool = True) -> _DownPipeline:
        return _DownPipeline()


def test_redis_down_reads_as_unknown_for_every_event_of_the_batch() -> None:
    tracker = RedisDeliveryTracker(_DownClient(), ttl_s=60)  # type: ignore[arg-type]
    assert tracker.finished_many(["a", "b"]) == {"a": None, "b": None}
    assert BatchFinishedCheck(tracker, ["a", "b"]).finished("b") is None
