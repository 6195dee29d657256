"""Per-process resources of the extraction worker, built once from the app's Settings.

`WorkerRuntime` rides on the Celery app (`app.shelfsight_runtime`, attached by the composition
root in `shelfsight.worker.app`), so tasks and signal handlers reach the one instance of their
own app; nothing is kept in module globals.

The service is built by a worker bootstep (`BuildService`) before the consumer starts: a worker
whose service cannot be built (a bad taxonomy path, device or endpoint) exits with an error
instead of taking messages it can only fail. Built lazily otherwise (tests, tools); a build that
fails there raises ServiceUnavailable, and the task requeues its message instead of acking it.
"""

from __future__ import annotations

import threading
from typing import Any

import structlog
from celery import Celery, bootsteps

from shelfsight.shared import framing
from shelfsight.shared.grouped_pipelines import GroupedPipelines
from shelfsight.shared.model_factory import resolve_device
from shelfsight.shared.observability import register_queue_metrics, serve_metrics
from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from shelfsight.shared.streams import RedisStreamPublisher, redis_client
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.worker import metrics
from shelfsight.worker.dead_letters import DeadLetterWriter
from shelfsight.worker.delivery import RedisDeliveryTracker
from shelfsight.worker.extractor import ExtractionService
from shelfsight.worker.model_cache import ModelCache
from shelfsight.worker.s3_light import worker_object_store

log = structlog.get_logger()


class ServiceUnavailable(RuntimeError):
    """The extraction service could not be built: nothing can be processed, nothing may be acked."""


def build_extraction_service(settings: Settings, *, background: bool = True) -> ExtractionService:
    """Wire store, publisher, taxonomy, delivery tracker and model cache into an ExtractionService."""
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    store = worker_object_store(settings)  # image GET and result PUT on the light path
    client = redis_client(settings)
    taxonomy = load_taxonomy(settings.taxonomy_path)
    models = ModelCache(settings, taxonomy, store, ModelRegistry(store, settings.bucket, settings.models_prefix))
    if background:
        models.start_background(client)
    lanes = 2 if resolve_device(settings.device).type == "cuda" else 1  # 2: copy/compute overlap
    pipelines = GroupedPipelines(client)  # every task thread's begins, stream entries and outcomes
    service = ExtractionService(
        settings, taxonomy, store, RedisStreamPublisher(client, settings.stream_maxlen, pipelines), models,
        lanes=lanes, deliveries=RedisDeliveryTracker(client, settings.delivery_tracking_ttl_s, pipelines),
    )
    log.info("worker.ready", taxonomy_version=taxonomy.version, architecture=settings.model_arch,
             batch_size=settings.batch_size, batch_max_wait_ms=settings.batch_max_wait_ms)
    return service


class WorkerRuntime:
    """The extraction service and the model-free dead-letter writer of one worker process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._service: ExtractionService | None = None
        self._dead_letters: DeadLetterWriter | None = None
        self.startup_failed = False  # set by BuildService: `shelfsight worker` then exits 1

    def build(self) -> ExtractionService:
        """Build the service now (the bootstep calls this before consuming); errors propagate."""
        with self._lock:
            if self._service is None:
                self._service = build_extraction_service(self.settings)
            return self._service

    @property
    def service(self) -> ExtractionService:
        """The process's ExtractionService; ServiceUnavailable if it cannot be built."""
        try:
            return self.build()
        except Exception as exc:
            log.critical("worker.service_unavailable", error=f"{type(exc).__name__}: {exc}")
            raise ServiceUnavailable(f"extraction service cannot be built: {type(exc).__name__}: {exc}") from exc

    @property
    def dead_letters(self) -> DeadLetterWriter:
        """A DeadLetterWriter that needs no model, for messages that never reach a task."""
        with self._lock:
            if self._dead_letters is None:
                self._dead_letters = DeadLetterWriter(
                    self.settings, S3ObjectStore(self.settings),
                    RedisStreamPublisher(redis_client(self.settings), self.settings.stream_maxlen),
                )
            return self._dead_letters

    def warm_up(self) -> None:
        """Build the service and the base model (and script the CPU preprocessing) before the first
        event arrives; serve metrics."""
        self.service.models.base_bundle()
        framing.warm_up_preprocessing()
        metrics.watch_service(self.service)
        register_queue_metrics(self.settings)
        serve_metrics(self.settings)

    def shutdown(self) -> None:
        """Stop the model watcher and the batcher lanes (idempotent)."""
        with self._lock:
            service, self._service = self._service, None
        if service is not None:
            service.models.stop()
            service.close()


class BuildService(bootsteps.StartStopStep):
    """Worker bootstep: build the extraction service and the base model before the consumer
    starts. An exception here is an unrecoverable worker error: the process exits non-zero and
    never takes a message."""

    label = "shelfsight extraction service"

    def start(self, parent: Any) -> None:
        runtime: WorkerRuntime | None = getattr(parent.app, "shelfsight_runtime", None)
        if runtime is None:
            return
        try:
            runtime.build().models.base_bundle()
        except Exception as exc:
            runtime.startup_failed = True
            log.critical("worker.cannot_start", error=f"{type(exc).__name__}: {exc}")
            raise


def runtime_of(app: Celery) -> WorkerRuntime:
    """The WorkerRuntime the composition root attached to `app`."""
    runtime: WorkerRuntime = app.shelfsight_runtime
    return runtime
