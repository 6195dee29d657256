"""Micro-batcher: requests from many task threads become per-category model batches.

Each Celery task thread submits one preprocessed image and blocks on its Future, so its
message is acked only after its own result or dead letter is written (at-least-once is
kept per message). Lane threads take the oldest waiting category, wait until it has
`max_batch` images or its oldest has waited `max_wait_s`, and run one batch. Several lanes
(one CUDA stream each) let one batch's host-to-device copy overlap another's compute.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger()


@dataclass
class BatchItem:
    """One image waiting for the model. `payload` is whatever the runner expects."""

    category: str
    payload: Any
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.perf_counter)


BatchRunner = Callable[[str, list[BatchItem]], Sequence[Any]]


class MicroBatcher:
    """Groups items by category into batches of at most `max_batch`, waiting at most `max_wait_s`."""

    def __init__(self, runner: BatchRunner, max_batch: int, max_wait_s: float, lanes: int = 1) -> None:
        self._runner = runner
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queues: OrderedDict[str, deque[BatchItem]] = OrderedDict()
        self._cond = threading.Condition()
        self._closed = False
        self._lanes = [
            threading.Thread(target=self._lane, name=f"batcher-{i}", daemon=True) for i in range(lanes)
        ]
        for lane in self._lanes:
            lane.start()

    def submit(self, category: str, payload: Any) -> Future:
        """Queue one item; its Future resolves to the runner's output for it."""
        item = BatchItem(category, payload)
        with self._cond:
            if self._closed:
                raise RuntimeError("batcher is closed")
            self._queues.setdefault(category, deque()).append(item)
            self._cond.notify_all()
        return item.future

    def run(self, category: str, payload: Any, timeout: float | None = None) -> Any:
        """Submit and wait: the call a task thread makes."""
        return self.submit(category, payload).result(timeout=timeout)

    def backlog(self) -> int:
        """Images waiting for a batch (the shelfsight_batcher_backlog gauge)."""
        with self._cond:
            return sum(len(queue) for queue in self._queues.values())

    def close(self) -> None:
        """Finish what is queued, then stop the lanes."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for lane in self._lanes:
            lane.join(timeout=30)

    def _next_batch(self) -> tuple[str, list[BatchItem]] | None:
        with self._cond:
            while True:
                ready = self._pick_ready()
                if ready is not None:
                    return ready
                if self._closed and not any(self._queues.values()):
                    return None
                self._cond.wait(timeout=self._time_to_deadline())

    def _pick_ready(self) -> tuple[str, list[BatchItem]] | None:
        """The oldest category that is full or overdue (everything is overdue once closed)."""
        now = time.perf_counter()
        oldest: tuple[float, str] | None = None
        for category, queue in self._queues.items():
            if not queue:
                continue
            if len(queue) >= self.max_batch:
                return category, self._pop(category)
            if oldest is None or queue[0].enqueued_at < oldest[0]:
                oldest = (queue[0].enqueued_at, category)
        if oldest is not None and (self._closed or now - oldest[0] >= self.max_wait_s):
            return oldest[1], self._pop(oldest[1])
        return None

    def _pop(self, category: str) -> list[BatchItem]:
        queue = self._queues[category]
        batch = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
        if not queue:
            del self._queues[category]
        return batch

    def _time_to_deadline(self) -> float | None:
        starts = [q[0].enqueued_at for q in self._queues.values() if q]
        if not starts:
            return None
        return max(0.0, min(starts) + self.max_wait_s - time.perf_counter())

    def _lane(self) -> None:
        while (job := self._next_batch()) is not None:
            category, batch = job
            self._run(category, batch)

    def _run(self, category: str, batch: list[BatchItem]) -> None:
        try:
            outputs = self._runner(category, batch)
        except Exception as exc:  # noqa: BLE001
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            # One poison input must not fail its neighbours: retry each alone.
            log.warning("batch.failed_retrying_singly", category=category, size=len(batch), error=str(exc))
            for item in batch:
                self._run(category, [item])
            return
        for item, output in zip(batch, outputs, strict=True):
            item.future.set_result(output)
