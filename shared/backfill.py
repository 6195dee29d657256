"""Backfill: re-extract a category's products after a promotion, behind live uploads.

Producer side: reads the category's result files, and for each one not already at the target
version (the category's CURRENT) sends an extraction event to `settings.backfill_queue`. The
extraction workers consume that queue after their live one (`extract`), in that order, always
(see shelfsight.shared.redis_transport), so re-extractions only use the room live uploads leave.

The event re-uses the result's image URI and its original `submitted_at`. The worker's rule, an
older event never overwrites a newer result, therefore still holds: a product uploaded again
since keeps its newer result (the backfill event ends "superseded"), and one that was not is
re-extracted in place by whatever version the worker serves now.

Idempotent and resumable by recomputation, not by a checkpoint: the event id is derived from
(target version, product) and `--stale-only` skips results already at the target version, so a
re-run enqueues only what is still stale. At most `max_queued` events wait in the backfill queue
at a time (the producer pauses while it is that long), which also bounds what a re-run after an
interruption may enqueue twice: the tail that was queued and not yet extracted.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import structlog
from celery import Celery
from pydantic import ValidationError

from shelfsight.shared.celery_app import BACKFILL_TASK, create_celery_app
from shelfsight.shared.enqueue import enqueue_event
from shelfsight.shared.events import ResultRecord, UploadEvent, result_key
from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import ObjectMissing, ObjectStore

log = structlog.get_logger()

ZERO_SHOT = "zero-shot"  # what a category that was never promoted serves (the worker's ModelCache)
EVENT_ID_PREFIX = "backfill"
MAX_EVENT_ID = 128  # shelfsight.shared.events._ID
MAX_RESULT_BYTES = 4 << 20  # as the worker reads an existing result
DEFAULT_MAX_QUEUED = 1000
CHUNK_KEYS = 500  # results checked per run of the after-promotion task before it hands over
QUEUE_FULL_PAUSE_S = 0.5
QUEUE_FULL_RETRY_S = 5.0  # the after-promotion task's pause before its next run when the queue is full
# The after-promotion backfill starts this long after the announcement: the workers load the new
# version first, so that a re-extraction is not taken by a worker still serving the old one.
SETTLE_S = 30.0

_NOT_ID = re.compile(r"[^A-Za-z0-9_.:\-]")


class QueueDepth(Protocol):
    def llen(self, name: str) -> Any: ...


def backfill_event_id(version: str, product_id: str) -> str:
    """The event id of the re-extraction of `product_id` for `version`: the same on every run.

    Characters outside the event-id pattern become '-'; an id over 128 characters keeps its head
    and ends with a hash of the whole, so two products never share an id.
    """
    raw = f"{EVENT_ID_PREFIX}-{version}-{product_id}"
    cleaned = _NOT_ID.sub("-", raw)
    if len(cleaned) <= MAX_EVENT_ID:
        return cleaned
    digest = hashlib.sha256(raw.encode()).hexdigest()[:16]
    return f"{cleaned[:MAX_EVENT_ID - len(digest) - 1]}-{digest}"


def target_version(registry: ModelRegistry, category: str) -> str:
    """The version the category serves now: CURRENT's, or zero-shot when never promoted."""
    pointer = registry.current(category)
    return pointer.version if pointer is not None else ZERO_SHOT


def results_prefix(settings: Settings, category: str) -> str:
    """The folder of the category's result files (`<results-prefix>/<category>/`)."""
    return result_key(settings.results_prefix, category, "x")[: -len("x.json")]


def result_keys(store: ObjectStore, settings: Settings, category: str, start_after: str = "") -> list[str]:
    """The category's result keys in order, those after `start_after` only (a key, or '')."""
    keys = store.list_keys(settings.bucket, results_prefix(settings, category))
    return [k for k in keys if k.endswith(".json") and k > start_after]


def read_result(store: ObjectStore, settings: Settings, key: str) -> ResultRecord | None:
    """A result file, or None when it vanished or does not parse (counted, never fatal)."""
    try:
        body = store.get(settings.bucket, key, max_bytes=MAX_RESULT_BYTES).body
        return ResultRecord.model_validate_json(body)
    except (ObjectMissing, ValidationError) as exc:
        log.warning("backfill.result_unreadable", key=key, error=str(exc)[:200])
        return None


def plan_event(record: ResultRecord, target: str, *, stale_only: bool) -> UploadEvent | None:
    """The re-extraction of a result's product, or None when `stale_only` and it is at `target`.

    Same image and original `submitted_at` as the result, so the worker's superseded rule keeps
    any newer upload's result; a deterministic event id per (target, product).
    """
    if stale_only and record.model.version == target:
        return None
    return UploadEvent(event_id=backfill_event_id(target, record.product_id), product_id=record.product_id,
                       category=record.category, image=record.image.uri, submitted_at=record.submitted_at)


class TokenBucket:
    """At most `rate` acquisitions per second on average, bursts of up to `burst`.

    `clock` and `sleep` are injectable so tests run it without waiting.
    """

    def __init__(self, rate: float, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = rate
        self.capacity = max(1.0, burst if burst is not None else min(rate, 10.0))
        self.tokens = self.capacity
        self.clock, self.sleep = clock, sleep
        self.updated = clock()

    def acquire(self) -> float:
        """Take one token, sleeping until there is one; returns the seconds slept."""
        slept = 0.0
        while True:
            now = self.clock()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return slept
            wait = (1.0 - self.tokens) / self.rate
            self.sleep(wait)
            slept += wait


@dataclass
class BackfillStats:
    """What a backfill run did; `last_key` is the last result key checked (where to resume)."""

    category: str
    target: str
    total: int = 0
    checked: int = 0
    enqueued: int = 0
    current: int = 0  # already at the target version (skipped with stale_only)
    unreadable: int = 0
    last_key: str = ""
    queue_full: bool = False  # stopped early: the backfill queue held max_queued events
    event_ids: list[str] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        summary = asdict(self)
        summary.pop("event_ids")
        return summary


@dataclass
class Backfill:
    """One backfill of one category: where events go and how fast.

    `queue` reads the backfill queue's depth (a redis client); `clock`/`sleep` drive both the
    rate limit and the pause while `max_queued` events are waiting.
    """

    app: Celery
    store: ObjectStore
    queue: QueueDepth
    settings: Settings
    rate_per_s: float
    max_queued: int = DEFAULT_MAX_QUEUED
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        self.bucket = TokenBucket(self.rate_per_s, clock=self.clock, sleep=self.sleep)

    def queued(self) -> int:
        return int(self.queue.llen(self.settings.backfill_queue))

    def room(self, wait: bool) -> bool:
        """True when the backfill queue is below `max_queued`; with `wait`, sleeps until it is."""
        while self.max_queued > 0 and self.queued() >= self.max_queued:
            if not wait:
                return False
            self.sleep(QUEUE_FULL_PAUSE_S)
        return True

    def run(self, category: str, target: str, *, stale_only: bool, start_after: str = "",
            limit: int | None = None, wait_for_room: bool = True,
            progress: Callable[[BackfillStats], None] | None = None) -> BackfillStats:
        """Check the category's results after `start_after` (at most `limit`) and enqueue the stale ones.

        Stops early, without checking the next result, when the queue is full and not
        `wait_for_room` (the caller continues from `stats.last_key` later).
        """
        keys = result_keys(self.store, self.settings, category, start_after)
        stats = BackfillStats(category, target, total=len(keys))
        for key in _limited(keys, limit):
            if not self.room(wait_for_room):
                stats.queue_full = True
                break
            record = read_result(self.store, self.settings, key)
            stats.checked += 1
            stats.last_key = key
            event = plan_event(record, target, stale_only=stale_only) if record is not None else None
            if record is None:
                stats.unreadable += 1
            elif event is None:
                stats.current += 1
            else:
                self.bucket.acquire()
                stats.event_ids.append(enqueue_event(self.app, event, queue=self.settings.backfill_queue))
                stats.enqueued += 1
            if progress is not None:
                progress(stats)
        log.info("backfill.done", **stats.as_dict(), stale_only=stale_only)
        return stats


def _limited(keys: list[str], limit: int | None) -> Iterator[str]:
    yield from keys if limit is None else keys[:limit]


def count_stale(store: ObjectStore, settings: Settings, category: str, target: str) -> tuple[int, int]:
    """(results not at `target`, all results) of a category: a GET per result."""
    stale = total = 0
    for key in result_keys(store, settings, category):
        record = read_result(store, settings, key)
        if record is None:
            continue
        total += 1
        stale += record.model.version != target
    return stale, total


# --- after a promotion ------------------------------------------------------------------------


def request_backfill(settings: Settings, category: str, version: str) -> str | None:
    """When `settings.backfill_after_promotion`, ask the trainer to backfill `category` to `version`.

    Sends the backfill task to the training queue, due `SETTLE_S` after now (the workers swap
    first), and returns its id (None when the setting is off). Never raises: a promotion that happened stays a promotion; the operator can run
    `shelfsight backfill` instead.
    """
    if not settings.backfill_after_promotion:
        return None
    app = create_celery_app(settings, current=False)  # never replaces the caller's current app
    try:
        result = app.send_task(BACKFILL_TASK, kwargs={"category": category, "version": version}, countdown=SETTLE_S)
        log.info("backfill.requested", category=category, version=version, task_id=result.id)
        return str(result.id)
    except Exception as exc:  # noqa: BLE001 - the promotion stands; say what to run instead
        log.error("backfill.request_failed", category=category, version=version, error=str(exc),
                  hint=f"run `shelfsight backfill --category {category} --stale-only`")
        return None
    finally:
        app.close()


@dataclass(frozen=True)
class ChunkOutcome:
    """One run of the after-promotion backfill task, and where the next run starts (None: done)."""

    stats: BackfillStats
    next_after: str | None
    delay_s: float
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {**self.stats.as_dict(), "next_after": self.next_after, "reason": self.reason}


def backfill_chunk(backfill: Backfill, registry: ModelRegistry, category: str, version: str, start_after: str = "",
                   *, chunk: int = CHUNK_KEYS, progress: Callable[[BackfillStats], None] | None = None) -> ChunkOutcome:
    """Up to `chunk` results after `start_after`, stale only, without waiting for room.

    The task that runs it hands over to its own continuation (`next_after`, after `delay_s`)
    rather than holding the trainer's one slot: a training queued meanwhile runs in between. It
    stops once `version` no longer serves: the promotion that replaced it plans its own backfill.
    """
    if target_version(registry, category) != version:
        return ChunkOutcome(BackfillStats(category, version), None, 0.0, "superseded: another version serves now")
    stats = backfill.run(category, version, stale_only=True, start_after=start_after, limit=chunk,
                         wait_for_room=False, progress=progress)
    if stats.queue_full:  # come back once the workers drained some
        return ChunkOutcome(stats, stats.last_key or start_after, QUEUE_FULL_RETRY_S, "backfill queue full")
    if stats.checked < stats.total:
        return ChunkOutcome(stats, stats.last_key, 0.0, "more to check")
    return ChunkOutcome(stats, None, 0.0, "done")
