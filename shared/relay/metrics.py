"""Prometheus metrics of `shelfsight relay` (labels are bounded: source and outcome names only)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SOURCES = ("sqs", "redis_list", "webhook")

NOTIFICATIONS = Counter(
    "shelfsight_relay_notifications_total",
    "Notifications taken from a source, by outcome: relayed (every record enqueued or "
    "dead-lettered), skipped (nothing to enqueue, e.g. s3:TestEvent), dead_letter (the whole "
    "notification was unusable), failed (left at the source to be retried)",
    ["source", "outcome"],
)
RECORDS = Counter(
    "shelfsight_relay_records_total",
    "S3 records seen by the relay, by outcome: enqueued, skipped (not ObjectCreated), dead_letter",
    ["source", "outcome"],
)
HANDLE_SECONDS = Histogram(
    "shelfsight_relay_handle_seconds",
    "Seconds from taking a notification to its events being enqueued (and the source acked)",
    ["source"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LAST_SUCCESS = Gauge(
    "shelfsight_relay_last_success_timestamp_seconds",
    "Unix time the relay last handled a notification from its source",
    ["source"],
)
SOURCE_ERRORS = Counter(
    "shelfsight_relay_source_errors_total",
    "Failed calls to the source itself (SQS receive/delete, Redis list moves)",
    ["source"],
)
WEBHOOK_REJECTED = Counter(
    "shelfsight_relay_webhook_rejected_total",
    "Webhook requests refused before reading the notification, by reason",
    ["reason"],
)
