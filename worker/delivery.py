"""Per-event delivery bookkeeping in Redis, and the retry delay.

`DeliveryTracker` keeps one small hash per event, `shelfsight:delivery:<event_id>`, with a TTL:

- `n`: deliveries started and not yet ended. Incremented when processing starts and decremented
  when it ends in any way the process survives (an outcome, a retry, a requeue). Only a delivery
  the process did not survive (OOM kill, codec crash, fatal CUDA error, SIGKILL) leaves its
  increment behind, so `n` counts the deliveries that *never finished*. Past
  `settings.poison_max_deliveries` the event is dead-lettered as `poison` instead of being
  handed to a fresh worker to kill in turn.
- `done`: the outcome once it is durable (result, dead_letter, superseded). A redelivered copy
  (visibility timeout, a lost ack after a broker restart, a retry published before the ack of
  the original failed) finds it and is acked without rework, so one event never ends both as a
  result and as a dead letter.

Redis being down must not stop extraction: every call here degrades to "unknown" (logged and
counted by the caller) rather than raising.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import redis
import structlog
from redis.client import Pipeline

from shelfsight.shared.grouped_pipelines import GroupedPipelines
from shelfsight.shared.settings import Settings

log = structlog.get_logger()

# Returns {deliveries, done}: done is "" while the event has no durable outcome. A fresh message
# (ARGV[2] == '1': not a redelivery, not a retry) is a deliberate re-enqueue: it is worked again.
_BEGIN = """
local done = redis.call('HGET', KEYS[1], 'done')
if done and ARGV[2] ~= '1' then return {0, done} end
if done then redis.call('HDEL', KEYS[1], 'done') end
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('EXPIRE', KEYS[1], ARGV[1])
return {n, ''}
"""
_RELEASE = """
if redis.call('HINCRBY', KEYS[1], 'n', -1) <= 0 then redis.call('HDEL', KEYS[1], 'n') end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""
_FINISH = """
redis.call('HSET', KEYS[1], 'done', ARGV[2])
redis.call('HDEL', KEYS[1], 'n')
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Delivery:
    """What the tracker knew when processing started. `deliveries` 0: unknown (Redis down)."""

    deliveries: int
    finished_as: str | None = None
    tracked: bool = True


class DeliveryTracker(Protocol):
    def begin(self, event_id: str, *, fresh: bool = False) -> Delivery: ...
    def finished(self, event_id: str) -> str | None: ...
    def finished_many(self, event_ids: Sequence[str]) -> dict[str, str | None]: ...
    def release(self, event_id: str) -> None: ...
    def finish(self, event_id: str, outcome: str) -> None: ...


def _text(reply: bytes | str | None) -> str | None:
    """A recorded outcome as Redis returned it (bytes, or str on a decoding client), as text."""
    return reply.decode() if isinstance(reply, bytes) else reply


def delivery_key(event_id: str) -> str:
    return f"shelfsight:delivery:{event_id}"


class RedisDeliveryTracker:
    """The tracker above on Redis (the broker's instance: it already has to be up to deliver)."""

    def __init__(self, client: redis.Redis, ttl_s: int, pipelines: GroupedPipelines | None = None) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.pipelines = pipelines or GroupedPipelines(client)  # `begin`s of a burst: one round trip

    def begin(self, event_id: str, *, fresh: bool = False) -> Delivery:
        """Count a delivery starting; report an outcome already recorded by an earlier copy.

        `fresh`: the message is a new enqueue, not a redelivery or a retry of one, so an earlier
        outcome does not stand in for it.
        """
        try:
            [(n, done)] = self.pipelines.execute(
                lambda pipe: pipe.eval(_BEGIN, 1, delivery_key(event_id), self.ttl_s, "1" if fresh else "0"))
        except redis.RedisError as exc:
            log.warning("delivery.untracked", error=f"{type(exc).__name__}: {exc}")
            return Delivery(0, None, tracked=False)
        done = done.decode() if isinstance(done, bytes) else str(done)
        return Delivery(int(n), done or None)

    def finished(self, event_id: str) -> str | None:
        """The durable outcome another delivery already recorded, if any (None when unknown)."""
        try:
            done = self.client.hget(delivery_key(event_id), "done")
        except redis.RedisError:
            return None
        return _text(done)

    def finished_many(self, event_ids: Sequence[str]) -> dict[str, str | None]:
        """`finished` of several events in one round trip (every one None when Redis is unreachable)."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for event_id in event_ids:
                pipe.hget(delivery_key(event_id), "done")
            replies = pipe.execute()
        except redis.RedisError:
            return dict.fromkeys(event_ids)
        return {event_id: _text(done) for event_id, done in zip(event_ids, replies, strict=True)}

    def release(self, event_id: str) -> None:
        try:
            self.client.eval(_RELEASE, 1, delivery_key(event_id), self.ttl_s)
        except redis.RedisError as exc:
            log.warning("delivery.release_failed", error=f"{type(exc).__name__}: {exc}")

    def finish(self, event_id: str, outcome: str) -> None:
        try:
            self.client.eval(_FINISH, 1, delivery_key(event_id), self.ttl_s, outcome)
        except redis.RedisError as exc:  # the outcome is durable in S3; only dedup of copies is lost
            log.warning("delivery.finish_failed", error=f"{type(exc).__name__}: {exc}")

    def finish_in(self, pipe: Pipeline, event_id: str, outcome: str) -> None:
        """Queue `finish` on a pipeline of this tracker's client (the results stream's entry and the
        outcome in one round trip; see ResultWriter.announce)."""
        pipe.eval(_FINISH, 1, delivery_key(event_id), self.ttl_s, outcome)


class InMemoryDeliveryTracker:
    """The same bookkeeping in a dict (unit tests, and a service built without Redis)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.deliveries: dict[str, int] = {}
        self.done: dict[str, str] = {}

    def begin(self, event_id: str, *, fresh: bool = False) -> Delivery:
        with self._lock:
            if event_id in self.done and not fresh:
                return Delivery(0, self.done[event_id])
            self.done.pop(event_id, None)
            self.deliveries[event_id] = self.deliveries.get(event_id, 0) + 1
            return Delivery(self.deliveries[event_id])

    def finished(self, event_id: str) -> str | None:
        with self._lock:
            return self.done.get(event_id)

    def finished_many(self, event_ids: Sequence[str]) -> dict[str, str | None]:
        with self._lock:
            return {event_id: self.done.get(event_id) for event_id in event_ids}

    def release(self, event_id: str) -> None:
        with self._lock:
            left = self.deliveries.get(event_id, 0) - 1
            if left > 0:
                self.deliveries[event_id] = left
            else:
                self.deliveries.pop(event_id, None)

    def finish(self, event_id: str, outcome: str) -> None:
        with self._lock:
            self.done[event_id] = outcome
            self.deliveries.pop(event_id, None)


class BatchFinishedCheck:
    """The dead-letter check before a result is written, for every event of one micro-batch in
    one round trip: made by the first of the batch's task threads to ask, read by the others.

    Each copy of an event checks, just before its result's PUT, that no other copy has already
    ended as a dead letter (one outcome per event). The check was never atomic with the PUT; at
    batch B it now runs up to one round trip earlier for B - 1 of them, for 1/B of the round trips.
    """

    def __init__(self, deliveries: DeliveryTracker, event_ids: Sequence[str]) -> None:
        self._deliveries = deliveries
        self._event_ids = list(dict.fromkeys(event_ids))
        self._lock = threading.Lock()
        self._found: dict[str, str | None] | None = None

    def finished(self, event_id: str) -> str | None:
        with self._lock:
            if self._found is None:
                self._found = self._deliveries.finished_many(self._event_ids)
        if event_id not in self._found:  # not one of the batch's: ask on its own
            return self._deliveries.finished(event_id)
        return self._found[event_id]


def backoff_delay(settings: Settings, attempt: int, rng: random.Random | None = None) -> float:
    """Seconds before attempt `attempt + 1`: exponential from retry_backoff_s, capped, with jitter.

    The cap is retry_backoff_max_s and never more than half the extraction visibility timeout: a
    retry waits unacked in the worker until it is due, and must not be restored as lost meanwhile.
    Jitter (between half and all of the delay) spreads the retries of a burst of failures.
    """
    cap = max(0.0, min(settings.retry_backoff_max_s, settings.visibility_timeout_s / 2))
    delay = min(cap, settings.retry_backoff_s * 2 ** max(0, min(attempt - 1, 30)))
    return round((rng or random).uniform(delay / 2, delay), 3)


class OutcomeNotDurable(Exception):
    """Neither a result nor a dead letter could be written (S3 down or denied beyond retries).

    The message must not be acked: the task requeues it (with backoff) so the event is tried
    again once storage is back. `kind` is "result" or "dead_letter", for the metric.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
