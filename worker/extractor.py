"""The extraction service: one upload event in, one result file or one dead letter out.

Runs in a Celery task thread. Fetch, decode and writes happen here, concurrently across
threads (the result's write and its stream entries in `ResultWriter`, worker/result_writer.py);
the model runs in the micro-batcher. Every path ends in a result, `_dead_letter` or a retry
decision: an event never ends in silence.
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

from shelfsight.shared import clip_math, framing
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
from shelfsight.shared.imaging import decode_rgb, exif_orientation, open_header, upright_size
from shelfsight.shared.model_factory import WeightsError
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import (
    ObjectMissing,
    ObjectStore,
    ObjectTooLarge,
    StorageError,
    TransientStorageError,
)
from shelfsight.shared.streams import EventPublisher
from shelfsight.shared.taxonomy import Taxonomy
from shelfsight.worker import metrics
from shelfsight.worker.batcher import BatchItem, MicroBatcher
from shelfsight.worker.dead_letters import DeadLetterWriter, payload_id
from shelfsight.worker.delivery import (
    BatchFinishedCheck,
    DeliveryTracker,
    InMemoryDeliveryTracker,
    OutcomeNotDurable,
    backoff_delay,
)
from shelfsight.worker.gpu_decode import decode_batch
from shelfsight.worker.limits import ByteBudget, decoded_bytes_estimate
from shelfsight.worker.model_cache import CategoryModel, ModelCache
from shelfsight.worker.result_writer import SCORE_DECIMALS, ResultWriter

log = structlog.get_logger()
DURABLE_OUTCOMES = frozenset({"result", "dead_letter", "superseded"})


@dataclass
class Outcome:
    status: str  # "result" | "dead_letter" | "superseded" | "duplicate" | "retry" | "requeue"
    event_id: str
    retry_in: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    finish_recorded: bool = False  # the delivery's outcome already went to Redis (with the stream entry)

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
    model: CategoryModel | None = None  # what it was prepared for: a lane's model when none is resident
    event_id: str = ""  # whose image it is (the batch's dead-letter check asks for every event at once)


@dataclass
class Scored:
    model: CategoryModel
    probabilities: dict[str, list[float]]
    batch_size: int
    model_ms: float
    uncertainty: float  # clip_math.product_uncertainty: the review queue's order
    finished_check: BatchFinishedCheck  # shared by the batch's events


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
        deliveries: DeliveryTracker | None = None,
    ) -> None:
        self.settings = settings
        self.taxonomy = taxonomy
        self.store = store
        self.publisher = publisher
        self.models = models
        self.deliveries: DeliveryTracker = deliveries or InMemoryDeliveryTracker()
        self.dead_letters = DeadLetterWriter(settings, store, publisher)
        self.decode_budget = ByteBudget(max(1, settings.decode_memory_bytes))
        self.worker_name = self.dead_letters.worker_name
        self.results = ResultWriter(settings, store, publisher, self.deliveries, self.worker_name)
        self.sources = ImageSourcePolicy.from_settings(settings)
        self._lane_local = threading.local()
        self.batcher = MicroBatcher(
            self._run_batch, settings.batch_size, settings.batch_max_wait_ms / 1000, lanes=lanes
        )

    def close(self) -> None:
        self.batcher.close()

    # --- the whole life of one event ------------------------------------------------------
    def process(self, raw: Any, attempt: int = 1, *, fresh: bool = True) -> Outcome:
        """Handle one raw event. Returns the outcome; never raises for bad input.

        Statuses: "result", "dead_letter" and "superseded" are durable outcomes (written to S3):
        ack. "duplicate": an earlier copy of this event already finished: ack. "retry": a
        transient error, try again after `retry_in`. "requeue": the outcome could not be written
        (S3 down or denied): the message must not be acked; put it back after `retry_in`.
        `fresh` is False for a redelivered message or a retry (see DeliveryTracker.begin).
        """
        started = time.perf_counter()
        structlog.contextvars.clear_contextvars()
        try:
            return self._process(raw, attempt, fresh, started)
        except OutcomeNotDurable as exc:
            delay = backoff_delay(self.settings, attempt)
            log.error("event.outcome_not_durable", kind=exc.kind, error=str(exc), retry_in_s=delay)
            return Outcome("requeue", payload_id(raw), retry_in=delay, detail={"error": str(exc)})
        finally:
            metrics.STAGE_SECONDS.labels(stage="total").observe(time.perf_counter() - started)

    def _process(self, raw: Any, attempt: int, fresh: bool, started: float) -> Outcome:
        try:
            event = self.parse_event(raw)
        except Rejected as rejected:
            return self._dead_letter(raw, None, rejected.code, str(rejected), attempt)
        structlog.contextvars.bind_contextvars(
            event_id=event.event_id, product_id=event.product_id, category=event.category, attempt=attempt
        )
        delivery = self.deliveries.begin(event.event_id, fresh=fresh)
        if not delivery.tracked:
            metrics.DELIVERY_TRACKING_ERRORS.inc()
        if delivery.finished_as is not None:
            metrics.REDELIVERIES_SKIPPED.inc()
            log.info("event.already_finished", outcome=delivery.finished_as)
            return Outcome("duplicate", event.event_id, detail={"finished_as": delivery.finished_as})
        outcome: Outcome | None = None
        try:
            if delivery.deliveries > self.settings.poison_max_deliveries:
                outcome = self._dead_letter(raw, event, "poison", (
                    f"processing started {delivery.deliveries - 1} times and never finished: the worker "
                    "died each time (out of memory, a crashing decoder, a fatal device error); not handed "
                    f"to another worker (SHELFSIGHT_POISON_MAX_DELIVERIES={self.settings.poison_max_deliveries})"
                ), attempt)
            else:
                outcome = self._attempt(raw, event, attempt, started)
            return outcome
        finally:
            if outcome is not None and outcome.status in DURABLE_OUTCOMES:
                if not outcome.finish_recorded:
                    self.deliveries.finish(event.event_id, outcome.status)
            else:  # a retry, a requeue or an exception: this delivery ended, without an outcome
                self.deliveries.release(event.event_id)

    def _attempt(self, raw: Any, event: UploadEvent, attempt: int, started: float) -> Outcome:
        """One try at an event: a result, a dead letter, or a retry decision."""
        try:
            return self._extract(event, started)
        except Rejected as rejected:
            return self._dead_letter(raw, event, rejected.code, str(rejected), attempt)
        except TransientStorageError as exc:
            metrics.RETRIES.labels(stage="storage").inc()
            if attempt <= self.settings.max_retries:
                delay = backoff_delay(self.settings, attempt)
                log.warning("event.transient_error", error=str(exc), retry_in_s=delay)
                return Outcome("retry", event.event_id, retry_in=delay, detail={"error": str(exc)})
            return self._dead_letter(
                raw, event, "transient_exhausted", f"gave up after {attempt} attempts: {exc}", attempt
            )
        except OutcomeNotDurable:
            raise
        except Exception as exc:  # a bug must still end as a dead letter
            log.exception("event.internal_error")
            return self._dead_letter(raw, event, "internal_error", f"{type(exc).__name__}: {exc}", attempt)

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
        prepared.model, prepared.event_id = model, event.event_id
        t2 = time.perf_counter()
        scored: Scored = self.batcher.run(event.category, prepared)
        t3 = time.perf_counter()
        record = self._record(event, obj.etag, len(obj.body), prepared, scored)
        record.timings = {
            "fetch_ms": _ms(t1 - t0), "decode_ms": _ms(t2 - t1),
            "queue_ms": _ms(t3 - t2 - scored.model_ms / 1000), "model_ms": round(scored.model_ms, 2),
            "batch_size": scored.batch_size,
        }
        status, finish_recorded = self.results.write(record, event, scored.finished_check, scored.uncertainty)
        metrics.observe_confidences(event.category, {a: r.confidence for a, r in record.attributes.items()},
                                    {a: r.needs_review for a, r in record.attributes.items()})
        metrics.STAGE_SECONDS.labels(stage="fetch").observe(t1 - t0)
        metrics.STAGE_SECONDS.labels(stage="decode").observe(t2 - t1)
        metrics.STAGE_SECONDS.labels(stage="batch").observe(t3 - t2)
        metrics.EVENTS.labels(outcome=status, category=event.category).inc()
        log.info("event.done", status=status, version=record.model.version,
                 **{a: r.value for a, r in record.attributes.items()})
        return Outcome(status, event.event_id, detail={
            "result": f"s3://{self.settings.bucket}/{result_key(self.settings.results_prefix, event.category, event.product_id)}",
            "version": record.model.version,
        }, finish_recorded=finish_recorded)

    # --- stages ---------------------------------------------------------------------------
    def prepare(self, data: bytes, model: CategoryModel) -> Prepared:
        """Check limits and decode; on CUDA, upright JPEGs go to nvJPEG in the batch instead.

        nvJPEG ignores EXIF orientation (torchvision applies it on CPU only), so a JPEG whose
        EXIF says it is rotated or mirrored is decoded here with PIL, which turns it upright.
        """
        if self._gpu_decode(model) and data[:3] == b"\xff\xd8\xff":
            with open_header(data, max_bytes=self.settings.max_image_bytes,  # no pixels decoded
                             max_pixels=self.settings.max_image_pixels,
                             max_frames=self.settings.max_image_frames) as header:
                width, height = header.size
                upright = exif_orientation(header) == 1
            if upright:
                return Prepared(None, data, model.image_size, width, height)
        pixels, width, height = self._decode_within_budget(data, model)
        return Prepared(pixels, None, model.image_size, width, height)

    def _decode_within_budget(self, data: bytes, model: CategoryModel) -> tuple[torch.Tensor, int, int]:
        """Decode and preprocess holding a reservation of the process's decode byte budget.

        The header (checked against every limit first) gives the size and mode, from which the
        decode's peak memory is estimated; threads wait while the budget is full, so a burst of
        large PNG/WebP/TIFF images costs at most the budget, not threads × the largest image.
        """
        limits = {"max_bytes": self.settings.max_image_bytes, "max_pixels": self.settings.max_image_pixels,
                  "max_frames": self.settings.max_image_frames}
        with open_header(data, **limits) as header:
            estimate = decoded_bytes_estimate(*header.size, header.mode, header.format, model.image_size)
            width, height = upright_size(header)  # full size, as the GPU path reports it
            with self.decode_budget.reserve(estimate) as waited:
                metrics.DECODE_WAIT_SECONDS.observe(waited)
                rgb = decode_rgb(data, header, max_pixels=self.settings.max_image_pixels,
                                 draft_size=model.image_size)
                # the tensor path (as nvJPEG batches take): a third of eval_transform's CPU, same pixels ±1 level
                return framing.preprocess_array(rgb, model.image_size, model.mean, model.std), width, height

    def _cpu_pixels(self, prepared: Prepared, model: CategoryModel) -> torch.Tensor:
        """Pixels of an image that was passed on as JPEG bytes, decoded with PIL (the fallback)."""
        if prepared.pixels is not None:
            return prepared.pixels
        if prepared.jpeg is None:  # a Prepared carries pixels or JPEG bytes, never neither
            raise ValueError("prepared image has neither pixels nor JPEG bytes")
        pixels, _, _ = self._decode_within_budget(prepared.jpeg, model)
        return pixels

    def _gpu_decode(self, model: CategoryModel) -> bool:
        return self.settings.decode_on_gpu and model.device.type == "cuda"

    def _run_batch(self, category: str, items: list[BatchItem]) -> list[Scored]:
        """Runs in a batcher lane: one model reference for the whole batch.

        Never loads a model (a load here would stall every category behind this lane): the
        resident model, else the one the first item was prepared with (evicted meanwhile).
        """
        model = self.models.resident(category) or items[0].payload.model
        if model is None:
            raise TransientStorageError(f"no model resident for {category!r}; retrying the event")
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
        uncertainty = clip_math.product_uncertainty(probabilities).cpu().tolist()  # once per batch
        elapsed_ms = (time.perf_counter() - started) * 1000
        metrics.BATCH_SIZE.observe(len(items))
        metrics.STAGE_SECONDS.labels(stage="model").observe(elapsed_ms / 1000)
        check = BatchFinishedCheck(self.deliveries, [p.event_id for p in prepared])  # no I/O here: on first use
        return [
            Scored(model, {name: rows[name][i] for name in rows}, len(items), elapsed_ms, uncertainty[i], check)
            for i in range(len(items))
        ]

    def _record(self, event: UploadEvent, etag: str, nbytes: int, prepared: Prepared, scored: Scored) -> ResultRecord:
        model = scored.model
        attributes = {}
        for head in model.heads:
            probs = scored.probabilities[head.name]  # calibrated (the manifest's temperature)
            best = max(range(len(probs)), key=probs.__getitem__)
            threshold = model.review_thresholds.get(head.name)  # absent: never reviewed
            attributes[head.name] = AttributeResult(
                value=head.values[best],
                confidence=round(probs[best], SCORE_DECIMALS),
                scores={v: round(p, SCORE_DECIMALS) for v, p in zip(head.values, probs, strict=True)},
                needs_review=threshold is not None and probs[best] < threshold,
            )
        return ResultRecord(
            event_id=event.event_id, product_id=event.product_id, category=event.category,
            submitted_at=event.submitted_at,
            image=ImageInfo(uri=event.image, etag=etag, bytes=nbytes, width=prepared.width, height=prepared.height),
            model=ModelInfo(architecture=model.architecture, version=model.version, mode=model.mode,
                            weights_sha256=model.weights_sha256, taxonomy_version=model.taxonomy_version),
            attributes=attributes, needs_review=any(a.needs_review for a in attributes.values()),
        )

    # --- endings ---------------------------------------------------------------------------
    def _dead_letter(
        self, raw: Any, event: UploadEvent | None, code: ErrorCode, message: str, attempt: int
    ) -> Outcome:
        """Record a dead letter (raises OutcomeNotDurable when it cannot be written)."""
        if event is not None and (earlier := self.deliveries.finished(event.event_id)) is not None:
            # a concurrent copy of this event already ended (as a result, say): one outcome per event
            log.warning("dead_letter.not_written_already_finished", error_code=code, finished_as=earlier)
            return Outcome("duplicate", event.event_id, detail={"finished_as": earlier})
        key = self.dead_letters.record(raw, event, code, message, attempt)
        event_id = event.event_id if event else payload_id(raw)
        return Outcome("dead_letter", event_id, detail={"error_code": code, "message": message, "record": key})


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)
