"""Prometheus metrics of the extraction worker (served on settings.metrics_address:metrics_port).

Labels are bounded: categories and attributes come from the taxonomy, codes and stages from
the code. The broker's queue gauges come from shelfsight.shared.observability.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

EVENTS = Counter("shelfsight_events_total", "Events finished, by outcome", ["outcome", "category"])
DEAD_LETTERS = Counter("shelfsight_dead_letters_total", "Dead letters, by error code", ["code"])
RETRIES = Counter("shelfsight_retries_total", "Transient failures retried", ["stage"])
BATCH_SIZE = Histogram("shelfsight_batch_size", "Images per model batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
STAGE_SECONDS = Histogram(
    "shelfsight_stage_seconds", "Seconds per stage per event", ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
MODEL_LOAD_SECONDS = Histogram("shelfsight_model_load_seconds", "Seconds to load a category model")
MODEL_LOAD_FAILURES = Counter("shelfsight_model_load_failures_total", "Failed model loads", ["category"])
MODEL_SIGNATURE_FAILURES = Counter(
    "shelfsight_model_signature_failures_total",
    "Model manifests refused for a missing or wrong signature (alert on any increase)", ["category"],
)
MODEL_SWAPS = Counter("shelfsight_model_swaps_total", "Hot swaps to a new version", ["category"])
RESIDENT_MODELS = Gauge("shelfsight_resident_models", "Category models resident in memory")
RESIDENT_BYTES = Gauge("shelfsight_resident_model_bytes", "Bytes of resident category models")
BATCHER_BACKLOG = Gauge("shelfsight_batcher_backlog", "Images waiting in the micro-batcher for a model batch")
# Reliability (docs/reliability.md): alert on any increase of the first two.
OUTCOME_WRITE_FAILURES = Counter(
    "shelfsight_outcome_write_failures_total",
    "Events whose result or dead letter could not be written: left unacked and requeued", ["kind"],
)
REQUEUED = Counter(
    "shelfsight_requeued_total", "Messages put back for redelivery instead of acked, by reason", ["reason"],
)
STREAM_PUBLISH_FAILURES = Counter(
    "shelfsight_stream_publish_failures_total",
    "Stream entries not written although their S3 record was (the record stands)", ["stream"],
)
REDELIVERIES_SKIPPED = Counter(
    "shelfsight_redeliveries_skipped_total", "Redelivered copies of events already finished, acked without rework",
)
DELIVERY_TRACKING_ERRORS = Counter(
    "shelfsight_delivery_tracking_errors_total", "Delivery counter reads/writes that failed (Redis down)",
)
MODEL_LOAD_WAIT_SECONDS = Histogram(
    "shelfsight_model_load_wait_seconds", "Seconds a cold model load waited for the global load limiter",
)
DECODE_WAIT_SECONDS = Histogram(
    "shelfsight_decode_wait_seconds", "Seconds an image waited for room in the decode byte budget",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
CONFIDENCE = Histogram(
    "shelfsight_attribute_confidence", "Confidence (top softmax score) of each extracted attribute",
    ["category", "attribute"], buckets=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
)


NEEDS_REVIEW = Counter(
    "shelfsight_attributes_needing_review_total",
    "Extracted attributes flagged needs_review (calibrated confidence below the review threshold)",
    ["category", "attribute"],
)


def observe_confidences(category: str, confidences: dict[str, float], needs_review: dict[str, bool]) -> None:
    """One observation per attribute of a result (category checked against the taxonomy), and a
    count of those flagged for review: their share is what the review queue receives."""
    for attribute, confidence in confidences.items():
        CONFIDENCE.labels(category=category, attribute=attribute).observe(confidence)
        if needs_review.get(attribute):
            NEEDS_REVIEW.labels(category=category, attribute=attribute).inc()


class ServingModels(Collector):
    """`shelfsight_model_info{category,version}` 1 for each model this worker serves now."""

    labelnames = ("category", "version")  # what the family carries, also before any model loads

    def __init__(self) -> None:
        self._versions: Callable[[], dict[str, str]] = dict

    def watch(self, versions: Callable[[], dict[str, str]]) -> None:
        self._versions = versions

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("shelfsight_model_info", "Model version each category is served with "
                                 "by this worker (value 1)", labels=list(self.labelnames))
        for category, version in sorted(self._versions().items()):
            info.add_metric([category, version], 1)
        yield info


SERVING = ServingModels()
REGISTRY.register(SERVING)


def watch_service(service: Any) -> None:
    """Point the backlog gauge and the model info at this process's ExtractionService (weakly)."""
    ref = weakref.ref(service)

    def backlog() -> float:
        current = ref()
        return float(current.batcher.backlog()) if current is not None else 0.0

    def versions() -> dict[str, str]:
        current = ref()
        return current.models.active_versions() if current is not None else {}

    BATCHER_BACKLOG.set_function(backlog)
    SERVING.watch(versions)


def serve_metrics(port: int, address: str = "127.0.0.1") -> None:
    """Expose /metrics on address:port (0 disables). The worker itself uses
    shelfsight.shared.observability.serve_metrics (settings' address, once per process)."""
    if port:
        start_http_server(port, addr=address)
