"""The extraction service: one upload event in, one result file or one dead letter out.

Runs in a Celery task thread. Fetch, decode and writes happen here, concurrently across
threads; the model runs in the micro-batcher. Every path ends in `_finish_result`,
`_dead_letter` or a retry decision: an event never ends in silence.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
import torch
from pydantic import ValidationError

from shelfsight.shared.errors import Rejected
from shelfsight.shared.events import (
    AttributeResult,
    ErrorCode,
    ImageInfo,
    ModelInfo,
    ResultRecord,
    UploadEvent,
    result_key,
)
from shelfsight.shared.image_sources import ImageSourcePolicy, ImageSourceRefused
from shelfsight.shared.imaging import decode_image, open_header
from shelfsight.shared.model_factory import WeightsError
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import (
    ObjectMissing,
    ObjectStore,
    ObjectTooLarge,
    PreconditionFailed,
    StorageError,
    TransientStorageError,
)
from shelfsight.shared.streams import EventPublisher
from shelfsight.shared.taxonomy import Taxonomy
from shelfsight.worker import metrics
from shelfsight.worker.batcher import BatchItem, MicroBatcher
from shelfsight.worker.dead_letters import DeadLetterWriter, payload_id
from shelfsight.worker.gpu_decode import decode_batch
from shelfsight.worker.model_cache import CategoryModel, ModelCache

log = structlog.get_logger()
SCORE_DECIMALS = 4  # stable across batch composition, ample for thresholds


@dataclass
class Outcome:
    status: str  # "result" | "dead_letter" | "retry" | "superseded"
    event_id: str
    retry_in: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"status": self.status, "event_id": self.event_id, **self.detail}


@dataclass
class Prepared:
    """A decoded, preprocessed image ready for a batch (or raw JPEG for GPU decode)."""

    pixels: torch.Tensor | None
    jpeg: bytes | None
    size: int
    width: int
    height: int


@dataclass
class Scored:
    model: CategoryModel
    probabilities: dict[str, list[float]]
    batch_size: int
    model_ms: float


class ExtractionService:
    """Process upload events: validate, fetch, decode, score (batched), write, publish."""

    def __init__(
        self,
        settings: Settings,
        taxonomy: Taxonomy,
        store: ObjectStore,
        publisher: EventPublisher,
        models: ModelCache,
        *,
        lanes: int = 1,
    ) -> None:
        self.settings = settings
        self.taxonomy = taxonomy
        self.store = store
        self.publisher = publisher
        self.models = models
        self.dead_letters = DeadLetterWriter(settings, store, publisher)
        self.sources = ImageSourcePolicy.from_settings(settings)
        self._lane_local = threading.local()
        self.batcher = MicroBatcher(
            self._run_batch, settings.batch_size, settings.batch_max_wait_ms / 1000, lanes=lanes
        )

    def close(self) -> None:
        self.batcher.close()

    # --- the whole life of one event ------------------------------------------------------
    def process(self, raw: Any, attempt: int = 1) -> Outcome:
        """Handle one raw event. Returns the outcome; never raises for bad input."""
        started = time.perf_counter()
        structlog.contextvars.clear_contextvars()
        try:
            event = self.parse_event(raw)
        except Rejected as rejected:
            return self._dead_letter(raw, None, rejected.code, str(rejected), attempt)
        structlog.contextvars.bind_contextvars(
            event_id=event.event_id, product_id=event.product_id, category=event.category, attempt=attempt
        )
        try:
            return self._extract(event, started)
        except Rejected as rejected:
            return self._dead_letter(raw, event, rejected.code, str(rejected), attempt)
        except TransientStorageError as exc:
            metrics.RETRIES.labels(stage="storage").inc()
            if attempt <= self.settings.max_retries:
                delay = self.settings.retry_backoff_s * 2 ** (attempt - 1)
                log.warning("event.transient_error", error=str(exc), retry_in_s=delay)
                return Outcome("retry", event.event_id, retry_in=delay, detail={"error": str(exc)})
            return self._dead_letter(
                raw, event, "transient_exhausted", f"gave up after {attempt} attempts: {exc}", attempt
            )
        except Exception as exc:  # a bug must still end as a dead letter
            log.exception("event.internal_error")
            return self._dead_letter(raw, event, "internal_error", f"{type(exc).__name__}: {exc}", attempt)
        finally:
            metrics.STAGE_SECONDS.labels(stage="total").observe(time.perf_counter() - started)

    def parse_event(self, raw: Any) -> UploadEvent:
        """Validate the wire payload (a dict or JSON text) within the size limit."""
        try:
            text = raw if isinstance(raw, str | bytes) else json.dumps(raw, default=str)
        except (TypeError, ValueError) as exc:
            raise Rejected("malformed_event", f"event is not JSON-serialisable: {exc}") from exc
        if len(text) > self.settings.max_event_bytes:
            raise Rejected(
                "event_too_large", f"event is {len(text)} bytes; the limit is {self.settings.max_event_bytes}"
            )
        try:
            if isinstance(raw, str | bytes):
                return UploadEvent.model_validate_json(raw)
            return UploadEvent.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}" for e in exc.errors()[:5]
            )
            raise Rejected("malformed_event", f"invalid upload event: {problems}") from exc

    def _extract(self, event: UploadEvent, started: float) -> Outcome:
        try:
            self.taxonomy.category(event.category)
        except KeyError as exc:
            raise Rejected("unknown_category", str(exc.args[0])) from exc
        skew = self.settings.max_future_skew_s
        if skew >= 0 and event.submitted_at > datetime.now(UTC) + timedelta(seconds=skew):
            # it would make the product's result impossible to update (older never overwrites newer)
            raise Rejected("submitted_in_future", f"submitted_at {event.submitted_at.isoformat()} is more than "
                           f"{skew:g}s ahead of this worker's clock (SHELFSIGHT_MAX_FUTURE_SKEW_S)")
        try:  # before any S3 request: a refusal says nothing about what exists
            bucket, key = self.sources.check(event.image)
        except ImageSourceRefused as exc:
            raise Rejected("image_source_not_allowed", str(exc)) from exc
        try:
            model = self.models.get(event.category)
        except (WeightsError, StorageError) as exc:  # registry or weights unreachable: retry, then dead-letter
            raise TransientStorageError(f"model for {event.category!r} unavailable: {exc}") from exc
        t0 = time.perf_counter()
        try:
            obj = self.store.get(bucket, key, max_bytes=self.settings.max_image_bytes)
        except ObjectMissing as exc:
            raise Rejected("object_missing", f"{exc}; was the upload deleted or the key mistyped?") from exc
        except ObjectTooLarge as exc:
            raise Rejected("image_too_large", str(exc)) from exc
        t1 = time.perf_counter()
        prepared = self.prepare(obj.body, model)
        t2 = time.perf_counter()
        scored: Scored = self.batcher.run(event.category, prepared)
        t3 = time.perf_counter()
        record = self._record(event, obj.etag, len(obj.body), prepared, scored)
        record.timings = {
            "fetch_ms": _ms(t1 - t0), "decode_ms": _ms(t2 - t1),
            "queue_ms": _ms(t3 - t2 - scored.model_ms / 1000), "model_ms": round(scored.model_ms, 2),
            "batch_size": scored.batch_size,
        }
        status = self._write_result(record)
        metrics.observe_confidences(event.category, {a: r.confidence for a, r in record.attributes.items()})
        metrics.STAGE_SECONDS.labels(stage="fetch").observe(t1 - t0)
        metrics.STAGE_SECONDS.labels(stage="decode").observe(t2 - t1)
        metrics.STAGE_SECONDS.labels(stage="batch").observe(t3 - t2)
        metrics.EVENTS.labels(outcome=status, category=event.category).inc()
        log.info("event.done", status=status, version=record.model.version,
                 **{a: r.value for a, r in record.attributes.items()})
        return Outcome(status, event.event_id, detail={
            "result": f"s3://{self.settings.bucket}/{result_key(self.settings.results_prefix, event.category, event.product_id)}",
            "version": record.model.version,
        })

    # --- stages ---------------------------------------------------------------------------
    def prepare(self, data: bytes, model: CategoryModel) -> Prepared:
        """Check limits and decode; on CUDA, JPEGs go to nvJPEG in the batch instead."""
        if self._gpu_decode(model) and data[:3] == b"\xff\xd8\xff":
            with open_header(data, max_bytes=self.settings.max_image_bytes,  # no pixels decoded
                             max_pixels=self.settings.max_image_pixels,
                             max_frames=self.settings.max_image_frames) as header:
                width, height = header.size
            return Prepared(None, data, model.image_size, width, height)
        image = decode_image(
            data, max_bytes=self.settings.max_image_bytes, max_pixels=self.settings.max_image_pixels,
            draft_size=model.image_size, max_frames=self.settings.max_image_frames,
        )
        return Prepared(model.preprocess(image), None, model.image_size, *image.size)

    def _cpu_pixels(self, prepared: Prepared, model: CategoryModel) -> torch.Tensor:
        """Pixels of an image that was passed on as JPEG bytes, decoded with PIL (the fallback)."""
        if prepared.pixels is not None:
            return prepared.pixels
        if prepared.jpeg is None:  # a Prepared carries pixels or JPEG bytes, never neither
            raise ValueError("prepared image has neither pixels nor JPEG bytes")
        image = decode_image(prepared.jpeg, max_bytes=self.settings.max_image_bytes,
                             max_pixels=self.settings.max_image_pixels, draft_size=model.image_size,
                             max_frames=self.settings.max_image_frames)
        return model.preprocess(image)

    def _gpu_decode(self, model: CategoryModel) -> bool:
        return self.settings.decode_on_gpu and model.device.type == "cuda"

    def _run_batch(self, category: str, items: list[BatchItem]) -> list[Scored]:
        """Runs in a batcher lane: one model reference for the whole batch."""
        model = self.models.get(category)
        if model.device.type == "cuda":
            with torch.cuda.stream(self._lane_stream(model.device)):
                return self._score_batch(model, items)
        return self._score_batch(model, items)

    def _lane_stream(self, device: torch.device) -> torch.cuda.Stream:
        """Each lane thread has its own CUDA stream, so one lane's copies overlap another's compute."""
        stream = getattr(self._lane_local, "stream", None)
        if stream is None:
            stream = self._lane_local.stream = torch.cuda.Stream(device=device)
        return stream

    def _score_batch(self, model: CategoryModel, items: list[BatchItem]) -> list[Scored]:
        started = time.perf_counter()
        prepared: list[Prepared] = [item.payload for item in items]
        if any(p.size != model.image_size for p in prepared):
            raise TransientStorageError("model input size changed by a swap; retrying the event")
        jpegs = [p.jpeg for p in prepared if p.jpeg is not None]
        pixels = None
        if len(jpegs) == len(prepared):
            try:
                pixels = decode_batch(jpegs, model.image_size, model.mean, model.std, model.device)
            except RuntimeError as exc:  # nvJPEG refuses some JPEGs (e.g. CMYK): decode those with PIL
                log.warning("gpu_decode.fallback_to_cpu", error=str(exc)[:200], batch=len(jpegs))
        if pixels is None:
            pixels = torch.stack([self._cpu_pixels(p, model) for p in prepared])
            if model.device.type == "cuda":
                pixels = pixels.pin_memory()
        probabilities = model.score(pixels)
        rows = {name: probs.cpu().tolist() for name, probs in probabilities.items()}
        elapsed_ms = (time.perf_counter() - started) * 1000
        metrics.BATCH_SIZE.observe(len(items))
        metrics.STAGE_SECONDS.labels(stage="model").observe(elapsed_ms / 1000)
        return [
            Scored(model, {name: rows[name][i] for name in rows}, len(items), elapsed_ms)
            for i in range(len(items))
        ]

    def _record(self, event: UploadEvent, etag: str, nbytes: int, prepared: Prepared, scored: Scored) -> ResultRecord:
        model = scored.model
        attributes = {}
        for head in model.heads:
            probs = scored.probabilities[head.name]
            best = max(range(len(probs)), key=probs.__getitem__)
            attributes[head.name] = AttributeResult(
                value=head.values[best],
                confidence=round(probs[best], SCORE_DECIMALS),
                scores={v: round(p, SCORE_DECIMALS) for v, p in zip(head.values, probs, strict=True)},
            )
        return ResultRecord(
            event_id=event.event_id, product_id=event.product_id, category=event.category,
            submitted_at=event.submitted_at,
            image=ImageInfo(uri=event.image, etag=etag, bytes=nbytes, width=prepared.width, height=prepared.height),
            model=ModelInfo(architecture=model.architecture, version=model.version, mode=model.mode,
                            weights_sha256=model.weights_sha256, taxonomy_version=model.taxonomy_version),
            attributes=attributes,
        )

    # --- endings --------------------------------------------------------------------------
    def _write_result(self, record: ResultRecord) -> str:
        """Idempotent write: identical content is not rewritten; an older event never overwrites a newer one.

        With conditional writes, a new product costs one PUT (If-None-Match); an existing file
        is read, compared, and replaced only if unchanged since (If-Match), so racing workers
        cannot lose an update.
        """
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
                log.info("result.superseded", newer_event_id=existing.event_id)
                return "superseded"
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
        self.publisher.publish(self.settings.results_stream, {
            "event_id": record.event_id, "product_id": record.product_id, "category": record.category,
            "result": f"s3://{self.settings.bucket}/{key}", "model_version": record.model.version,
            "image_etag": record.image.etag,
        })
        metrics.STAGE_SECONDS.labels(stage="write").observe(time.perf_counter() - t0)
        return "result"

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

    def _dead_letter(
        self, raw: Any, event: UploadEvent | None, code: ErrorCode, message: str, attempt: int
    ) -> Outcome:
        key = self.dead_letters.record(raw, event, code, message, attempt)
        event_id = event.event_id if event else payload_id(raw)
        return Outcome("dead_letter", event_id, detail={"error_code": code, "message": message, "record": key})


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)
