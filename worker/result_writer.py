"""Writing a scored event's result: the idempotent S3 write (conditional where S3 supports it), the
record of an event superseded by a newer upload, and the stream entries announced with the
delivery's outcome in one round trip. Used by the extraction service (worker/extractor.py), which
decides when an event has a result to write.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import structlog
from pydantic import ValidationError

from shelfsight.shared.events import (
    ResultRecord,
    SupersededRecord,
    UploadEvent,
    result_key,
    superseded_key,
)
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import (
    ObjectMissing,
    ObjectStore,
    PreconditionFailed,
    TransientStorageError,
)
from shelfsight.shared.streams import (
    EventPublisher,
    publish_after_write,
    publish_all_after_write,
    publish_each_after_write,
)
from shelfsight.worker import metrics
from shelfsight.worker.delivery import BatchFinishedCheck, DeliveryTracker

log = structlog.get_logger()
SCORE_DECIMALS = 4  # stable across batch composition, ample for thresholds


class ResultWriter:
    """Writes results and what announces them; one per extraction service, shared by its threads."""

    def __init__(self, settings: Settings, store: ObjectStore, publisher: EventPublisher,
                 deliveries: DeliveryTracker, worker_name: str) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.deliveries = deliveries
        self.worker_name = worker_name

    def write(self, record: ResultRecord, event: UploadEvent, finished_check: BatchFinishedCheck,
              uncertainty: float) -> tuple[str, bool]:
        """Idempotent write: identical content is not rewritten; an older event never overwrites a newer one.

        With conditional writes, a new product costs one PUT (If-None-Match); an existing file
        is read, compared, and replaced only if unchanged since (If-Match), so racing workers
        cannot lose an update. An event older than the stored result is "superseded", and that
        is recorded too (`_record_superseded`). Returns "result", "superseded" or "duplicate"
        (another copy of this event already ended as a dead letter: one outcome per event), and
        whether the delivery's outcome was recorded with the stream entries (`announce`).
        `finished_check` is the batch's (one dead-letter check per batch); `uncertainty` orders the
        review queue.
        """
        if finished_check.finished(record.event_id) == "dead_letter":  # one round trip per batch
            log.warning("result.not_written_already_dead_lettered")
            return "duplicate", False
        key = result_key(self.settings.results_prefix, record.category, record.product_id)
        t0 = time.perf_counter()
        record.timings["finished_at"] = datetime.now(UTC).isoformat()
        body = record.model_dump_json(indent=2).encode()
        conditional = self.settings.s3_conditional_writes
        for _ in range(5):
            if conditional:
                try:
                    self.store.put(self.settings.bucket, key, body, if_none_match=True)
                    break
                except PreconditionFailed:
                    pass  # a result exists: decide below
            existing, etag = self._existing_result(key)
            if existing is not None and existing.submitted_at > record.submitted_at:
                self._record_superseded(event, existing)
                return "superseded", False
            if existing is not None and existing.content_fingerprint() == record.content_fingerprint():
                log.info("result.duplicate_kept")  # redelivery: the file already says exactly this
                break
            try:
                if conditional and etag is not None:
                    self.store.put(self.settings.bucket, key, body, if_match=etag)
                else:
                    self.store.put(self.settings.bucket, key, body)
                break
            except PreconditionFailed:
                continue  # another worker wrote in between: look again
        else:
            raise TransientStorageError(f"result {key} kept changing under concurrent writers")
        # the result is durable now: a stream failure is counted and logged, never a dead letter;
        # the results entry, the review entry (if it needs review) and the delivery's outcome go in
        # one round trip
        entries = [(self.settings.results_stream, {
            "event_id": record.event_id, "product_id": record.product_id, "category": record.category,
            "result": f"s3://{self.settings.bucket}/{key}", "model_version": record.model.version,
            "image_etag": record.image.etag, "status": "result",
        })]
        if record.needs_review:
            entries.append((self.settings.review_stream,
                            self._review_entry(record, f"s3://{self.settings.bucket}/{key}", uncertainty)))
        finish_recorded = self.announce(record.event_id, entries)
        metrics.STAGE_SECONDS.labels(stage="write").observe(time.perf_counter() - t0)
        return "result", finish_recorded

    def announce(self, event_id: str, entries: list[tuple[str, dict[str, Any]]]) -> bool:
        """Publish a durable result's stream entries; True if the delivery's "result" outcome was
        recorded in the same round trip (a Redis tracker on the publisher's own client).

        If that round trip fails, each entry is published on its own (`publish_each_after_write`:
        retries, then counted; not a second pipeline) and False tells the extraction service
        (ExtractionService._process) to record the outcome itself.
        """
        finish_in = getattr(self.deliveries, "finish_in", None)
        if finish_in is not None and getattr(self.deliveries, "client", None) is getattr(self.publisher, "client", ()):
            try:
                self.publisher.publish_many(entries, then=lambda pipe: finish_in(pipe, event_id, "result"))
                return True
            except Exception as exc:  # noqa: BLE001 - the entries are retried one by one below
                log.warning("stream.pipeline_failed", error=f"{type(exc).__name__}: {exc}", entries=len(entries))
            ids = publish_each_after_write(self.publisher, entries)
        else:
            ids = publish_all_after_write(self.publisher, entries)
        for (stream, _), published in zip(entries, ids, strict=True):
            if published is None:
                metrics.STREAM_PUBLISH_FAILURES.labels(
                    stream="results" if stream == self.settings.results_stream else "review").inc()
        return False

    def _review_entry(self, record: ResultRecord, result_uri: str, uncertainty: float) -> dict[str, Any]:
        """The review stream entry of a durable result that needs review (published with the results
        entry: a notification after the write, never raised). A redelivered event publishes again:
        consumers key on event_id. `uncertainty` was computed with the batch (ExtractionService._score_batch)."""
        return {
            "event_id": record.event_id, "product_id": record.product_id, "category": record.category,
            "image": record.image.uri, "result": result_uri, "model_version": record.model.version,
            "uncertainty": str(round(uncertainty, SCORE_DECIMALS)),
            "attributes": json.dumps({a: {"value": r.value, "confidence": r.confidence, "needs_review": r.needs_review,
                                          "scores": r.scores} for a, r in record.attributes.items()}),
            "submitted_at": record.submitted_at.isoformat(),
        }

    def _record_superseded(self, event: UploadEvent, newer: ResultRecord) -> None:
        """A newer upload of the product already has a result: record that this event lost.

        S3 first (a failure raises TransientStorageError: the event is retried, nothing was
        written), then the results stream with status "superseded".
        """
        record = SupersededRecord(
            event_id=event.event_id, product_id=event.product_id, category=event.category, image=event.image,
            submitted_at=event.submitted_at, superseded_by=newer.event_id, newer_submitted_at=newer.submitted_at,
            worker=self.worker_name,
        )
        key = superseded_key(self.settings.results_prefix, record.recorded_at, event.event_id)
        self.store.put(self.settings.bucket, key, record.model_dump_json(indent=2).encode())
        published = publish_after_write(self.publisher, self.settings.results_stream, {
            "event_id": event.event_id, "product_id": event.product_id, "category": event.category,
            "status": "superseded", "superseded_by": newer.event_id,
            "record": f"s3://{self.settings.bucket}/{key}",
        })
        if published is None:
            metrics.STREAM_PUBLISH_FAILURES.labels(stream="results").inc()
        log.info("result.superseded", newer_event_id=newer.event_id, record=key)

    def _existing_result(self, key: str) -> tuple[ResultRecord | None, str | None]:
        """The current result file and its ETag, (None, None) if absent."""
        try:
            stored = self.store.get(self.settings.bucket, key, max_bytes=4 << 20)
        except ObjectMissing:
            return None, None
        try:
            return ResultRecord.model_validate_json(stored.body), stored.etag
        except ValidationError:
            log.warning("result.unreadable_existing", key=key)
            return None, stored.etag
