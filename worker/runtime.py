"""Per-process resources of the extraction worker, built once from the app's Settings."""

from __future__ import annotations

import threading

import redis
import structlog
from celery import Celery

from shared.model_factory import resolve_device
from shared.registry import ModelRegistry
from shared.storage import S3ObjectStore
from shared.streams import RedisStreamPublisher
from shared.taxonomy import load_taxonomy
from worker import metrics
from worker.celery_app import settings_of
from worker.dead_letters import DeadLetterWriter
from worker.extractor import ExtractionService
from worker.model_cache import ModelCache

log = structlog.get_logger()
_lock = threading.Lock()
_services: dict[int, ExtractionService] = {}
_dead_letter_writers: dict[int, DeadLetterWriter] = {}


def build_extraction_service(app: Celery, *, background: bool = True) -> ExtractionService:
    """Wire store, publisher, taxonomy and model cache into an ExtractionService."""
    settings = settings_of(app)
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


def dead_letter_writer(app: Celery) -> DeadLetterWriter:
    """A DeadLetterWriter that needs no model, for messages that never reach a task; built once."""
    with _lock:
        writer = _dead_letter_writers.get(id(app))
        if writer is None:
            settings = settings_of(app)
            client = redis.Redis.from_url(settings.broker_url)
            writer = _dead_letter_writers[id(app)] = DeadLetterWriter(
                settings, S3ObjectStore(settings), RedisStreamPublisher(client, settings.stream_maxlen)
            )
        return writer


def extraction_service(app: Celery) -> ExtractionService:
    """The process's ExtractionService, built on first use."""
    with _lock:
        service = _services.get(id(app))
        if service is None:
            service = _services[id(app)] = build_extraction_service(app)
        return service


def warm_up(app: Celery) -> None:
    """Build the service and the base model before the first event arrives."""
    service = extraction_service(app)
    service.models.base_bundle()
    metrics.serve_metrics(settings_of(app).metrics_port)


def shutdown(app: Celery) -> None:
    with _lock:
        service = _services.pop(id(app), None)
    if service is not None:
        service.models.stop()
        service.close()
