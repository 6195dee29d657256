"""Per-process resources of the extraction worker, built once from the app's Settings.

`WorkerRuntime` rides on the Celery app (`app.shelfsight_runtime`, attached by the composition
root in `shelfsight.worker.app`), so tasks and signal handlers reach the one instance of their
own app; nothing is kept in module globals.
"""

from __future__ import annotations

import threading

import redis
import structlog
from celery import Celery

from shelfsight.shared.model_factory import resolve_device
from shelfsight.shared.observability import register_queue_metrics, serve_metrics
from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from shelfsight.shared.streams import RedisStreamPublisher
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.worker import metrics
from shelfsight.worker.dead_letters import DeadLetterWriter
from shelfsight.worker.extractor import ExtractionService
from shelfsight.worker.model_cache import ModelCache

log = structlog.get_logger()


def build_extraction_service(settings: Settings, *, background: bool = True) -> ExtractionService:
    """Wire store, publisher, taxonomy and model cache into an ExtractionService."""
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    store = S3ObjectStore(settings)
    client = redis.Redis.from_url(settings.broker_url)
    taxonomy = load_taxonomy(settings.taxonomy_path)
    models = ModelCache(settings, taxonomy, store, ModelRegistry(store, settings.bucket, settings.models_prefix))
    if background:
        models.start_background(client)
    lanes = 2 if resolve_device(settings.device).type == "cuda" else 1  # 2: copy/compute overlap
    service = ExtractionService(
        settings, taxonomy, store, RedisStreamPublisher(client, settings.stream_maxlen), models, lanes=lanes
    )
    log.info("worker.ready", taxonomy_version=taxonomy.version, architecture=settings.model_arch,
             batch_size=settings.batch_size, batch_max_wait_ms=settings.batch_max_wait_ms)
    return service


class WorkerRuntime:
    """The extraction service and the model-free dead-letter writer of one worker process.

    Both are built on first use (the service loads a model, so not at import or app creation).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._service: ExtractionService | None = None
        self._dead_letters: DeadLetterWriter | None = None

    @property
    def service(self) -> ExtractionService:
        """The process's ExtractionService, built on first use."""
        with self._lock:
            if self._service is None:
                self._service = build_extraction_service(self.settings)
            return self._service

    @property
    def dead_letters(self) -> DeadLetterWriter:
        """A DeadLetterWriter that needs no model, for messages that never reach a task."""
        with self._lock:
            if self._dead_letters is None:
                client = redis.Redis.from_url(self.settings.broker_url)
                self._dead_letters = DeadLetterWriter(
                    self.settings, S3ObjectStore(self.settings),
                    RedisStreamPublisher(client, self.settings.stream_maxlen),
                )
            return self._dead_letters

    def warm_up(self) -> None:
        """Build the service and the base model before the first event arrives; serve metrics."""
        self.service.models.base_bundle()
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


def runtime_of(app: Celery) -> WorkerRuntime:
    """The WorkerRuntime the composition root attached to `app`."""
    runtime: WorkerRuntime = app.shelfsight_runtime
    return runtime
