"""Prometheus metrics of the extraction worker (scraped from settings.metrics_port on loopback)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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


def serve_metrics(port: int) -> None:
    """Expose /metrics on 127.0.0.1:port (0 disables)."""
    if port:
        start_http_server(port, addr="127.0.0.1")
