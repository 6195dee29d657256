"""Wiring of `shelfsight relay`: a Relay and one source from Settings, run until stopped."""

from __future__ import annotations

import signal
import threading
from typing import Any

import redis
import structlog
from celery import Celery

from shelfsight.shared.celery_app import create_celery_app
from shelfsight.shared.enqueue import enqueue_event
from shelfsight.shared.observability import register_queue_metrics, serve_metrics
from shelfsight.shared.relay.core import Relay
from shelfsight.shared.relay.dead_letters import RelayDeadLetters
from shelfsight.shared.relay.sources import RedisListSource, Source, SqsSource, WebhookSource
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import ObjectStore, S3ObjectStore
from shelfsight.shared.streams import EventPublisher, RedisStreamPublisher

log = structlog.get_logger()


def build_relay(settings: Settings, *, app: Celery | None = None, store: ObjectStore | None = None,
                publisher: EventPublisher | None = None) -> Relay:
    """A Relay that enqueues on the settings' broker and dead-letters to its bucket and stream."""
    producer = app or create_celery_app(settings)
    writer = RelayDeadLetters(
        settings, store or S3ObjectStore(settings),
        publisher or RedisStreamPublisher(redis.Redis.from_url(settings.broker_url), settings.stream_maxlen),
    )
    return Relay(lambda event: enqueue_event(producer, event), writer,
                 settings.s3_notification_key_pattern, settings.relay_max_body_bytes)


def sqs_client(settings: Settings) -> Any:
    """boto3 SQS client for settings.sqs_endpoint_url (empty: AWS) with the default credential chain."""
    import boto3
    from botocore.config import Config

    # Read timeout above the long poll, so a quiet queue is not a timeout.
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5,
                    read_timeout=int(min(20, settings.relay_poll_wait_s)) + 15)
    return boto3.session.Session().client("sqs", endpoint_url=settings.sqs_endpoint_url or None,
                                          region_name=settings.sqs_region, config=config)


def sqs_source(settings: Settings, queue_url: str) -> SqsSource:
    """`relay --sqs QUEUE_URL`."""
    return SqsSource(sqs_client(settings), queue_url, batch_size=settings.relay_batch_size,
                     wait_s=settings.relay_poll_wait_s,
                     visibility_timeout_s=settings.relay_sqs_visibility_timeout_s,
                     backoff_s=settings.relay_retry_backoff_s)


def redis_list_source(settings: Settings, key: str, processing_key: str | None = None) -> RedisListSource:
    """`relay --redis-list KEY`: the list MinIO's Redis target (format `access`) pushes to."""
    client = redis.Redis.from_url(settings.relay_redis_url or settings.broker_url,
                                  socket_timeout=settings.relay_poll_wait_s + 15, health_check_interval=30)
    return RedisListSource(client, key, processing_key, batch_size=settings.relay_batch_size,
                           wait_s=settings.relay_poll_wait_s, backoff_s=settings.relay_retry_backoff_s)


def webhook_source(settings: Settings, address: str) -> WebhookSource:
    """`relay --webhook HOST:PORT`; ValueError without SHELFSIGHT_RELAY_WEBHOOK_TOKEN or a port."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--webhook wants HOST:PORT, got {address!r}")
    token = settings.relay_webhook_token.get_secret_value() if settings.relay_webhook_token else ""
    return WebhookSource(host.strip("[]"), int(port), token, settings.relay_max_body_bytes)


def run_relay(settings: Settings, source: Source, stop: threading.Event | None = None, *,
              relay: Relay | None = None, handle_signals: bool = True) -> None:
    """Serve metrics, then relay from `source` until `stop` is set (or SIGTERM/SIGINT arrives).

    A stop request lets the batch in hand finish: its notifications are enqueued and removed
    from the source before this returns.
    """
    stop = stop or threading.Event()
    if handle_signals and threading.current_thread() is threading.main_thread():
        def request_stop(signum: int, _frame: object) -> None:
            log.info("relay.stopping", signal=signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
    register_queue_metrics(settings)
    serve_metrics(settings)
    relay = relay or build_relay(settings)
    log.info("relay.start", source=source.name)
    source.run(relay, stop)
    log.info("relay.stopped", source=source.name)
