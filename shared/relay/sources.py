"""Where notifications come from: an SQS queue, a Redis list (MinIO), an HTTP webhook (MinIO).

Each source runs until `stop` is set, finishing the batch in hand first, and removes a
notification only after `Relay.handle` returned for it (at-least-once).
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import redis
import structlog

from shelfsight.shared.relay import metrics
from shelfsight.shared.relay.core import Relay, RelayUnavailable

log = structlog.get_logger()

MAX_BACKOFF_S = 30.0


class Source(Protocol):
    name: str

    def run(self, relay: Relay, stop: threading.Event) -> None: ...


class Backoff:
    """Exponential pause after failures, reset by a success; waits on `stop` so it ends early."""

    def __init__(self, first_s: float, stop: threading.Event) -> None:
        self.first_s = first_s
        self.stop = stop
        self.delay = 0.0

    def failed(self) -> None:
        self.delay = min(MAX_BACKOFF_S, self.delay * 2 if self.delay else self.first_s)
        self.stop.wait(self.delay)

    def succeeded(self) -> None:
        self.delay = 0.0


# --- SQS -----------------------------------------------------------------------------------------


class SqsSource:
    """Long-polls an SQS queue; deletes a message only after its events are enqueued.

    A message whose handling failed is left alone: SQS makes it visible again after the
    visibility timeout (give the queue a redrive policy to park messages that keep failing).
    """

    name = "sqs"

    def __init__(self, client: Any, queue_url: str, *, batch_size: int = 10, wait_s: float = 10.0,
                 visibility_timeout_s: int = 0, backoff_s: float = 1.0) -> None:
        self.client = client
        self.queue_url = queue_url
        self.batch_size = max(1, min(10, batch_size))
        self.wait_s = max(0, min(20, int(wait_s)))
        self.visibility_timeout_s = visibility_timeout_s
        self.backoff_s = backoff_s

    def run(self, relay: Relay, stop: threading.Event) -> None:
        backoff = Backoff(self.backoff_s, stop)
        log.info("relay.sqs.start", queue_url=self.queue_url)
        while not stop.is_set():
            try:
                messages = self._receive()
            except Exception as exc:  # noqa: BLE001 - botocore errors of every kind: retry
                metrics.SOURCE_ERRORS.labels(source=self.name).inc()
                log.warning("relay.sqs.receive_failed", error=f"{type(exc).__name__}: {exc}")
                backoff.failed()
                continue
            if self._handle_batch(relay, messages):
                backoff.succeeded()
            else:
                backoff.failed()

    def _receive(self) -> list[dict[str, Any]]:
        options: dict[str, Any] = {}
        if self.visibility_timeout_s:
            options["VisibilityTimeout"] = self.visibility_timeout_s
        response = self.client.receive_message(
            QueueUrl=self.queue_url, MaxNumberOfMessages=self.batch_size, WaitTimeSeconds=self.wait_s,
            **options,
        )
        messages: list[dict[str, Any]] = response.get("Messages", [])
        return messages

    def _handle_batch(self, relay: Relay, messages: list[dict[str, Any]]) -> bool:
        """Handle in order; delete what was handled. False if one failed (the rest stay)."""
        done: list[dict[str, str]] = []
        ok = True
        for message in messages:
            try:
                relay.handle(message.get("Body", ""), self.name)
            except RelayUnavailable as exc:
                log.warning("relay.sqs.kept", message_id=message.get("MessageId"), error=str(exc))
                ok = False
                break
            done.append({"Id": str(len(done)), "ReceiptHandle": message["ReceiptHandle"]})
        if done:
            self._delete(done)
        return ok

    def _delete(self, entries: list[dict[str, str]]) -> None:
        try:
            response = self.client.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
        except Exception as exc:  # noqa: BLE001 - they come back after the timeout: same event ids
            metrics.SOURCE_ERRORS.labels(source=self.name).inc()
            log.warning("relay.sqs.delete_failed", error=f"{type(exc).__name__}: {exc}", count=len(entries))
            return
        for failure in response.get("Failed", []):
            metrics.SOURCE_ERRORS.labels(source=self.name).inc()
            log.warning("relay.sqs.delete_failed", error=failure.get("Message"), code=failure.get("Code"))


# --- Redis list (MinIO's Redis target) -----------------------------------------------------------


class RedisListSource:
    """Moves items from `key` to a processing list (BLMOVE), removes them after handling.

    On start, and after any failure, the items left in the processing list (by a relay that was
    killed, or a batch that failed) are handled first: nothing taken from `key` is lost. Give
    every relay process its own processing list.
    """

    name = "redis_list"

    def __init__(self, client: redis.Redis, key: str, processing_key: str | None = None, *,
                 batch_size: int = 10, wait_s: float = 10.0, backoff_s: float = 1.0) -> None:
        self.client = client
        self.key = key
        self.processing_key = processing_key or f"{key}:processing"
        self.batch_size = max(1, batch_size)
        self.wait_s = max(0.01, wait_s)
        self.backoff_s = backoff_s

    def run(self, relay: Relay, stop: threading.Event) -> None:
        backoff = Backoff(self.backoff_s, stop)
        log.info("relay.redis_list.start", key=self.key, processing=self.processing_key)
        recovered = False
        while not stop.is_set():
            try:
                if not recovered:
                    self.recover(relay)
                    recovered = True
                batch = self._take()
                self._handle_batch(relay, batch)
            except (RelayUnavailable, redis.RedisError) as exc:
                if isinstance(exc, redis.RedisError):
                    metrics.SOURCE_ERRORS.labels(source=self.name).inc()
                log.warning("relay.redis_list.retry", error=f"{type(exc).__name__}: {exc}")
                recovered = False  # what was taken is in the processing list: handle it first
                backoff.failed()
                continue
            backoff.succeeded()

    def recover(self, relay: Relay) -> int:
        """Handle every item left in the processing list; returns how many."""
        items: list[bytes] = self.client.lrange(self.processing_key, 0, -1)  # type: ignore[assignment]
        if items:
            log.info("relay.redis_list.recovering", count=len(items), processing=self.processing_key)
        self._handle_batch(relay, items)
        return len(items)

    def _take(self) -> list[bytes]:
        # Redis >= 6 takes a fractional timeout; redis-py's stub says int.
        first = self.client.blmove(self.key, self.processing_key, self.wait_s, "LEFT", "RIGHT")  # type: ignore[arg-type]
        if first is None:
            return []
        batch: list[bytes] = [first]  # type: ignore[list-item]
        while len(batch) < self.batch_size:
            item = self.client.lmove(self.key, self.processing_key, "LEFT", "RIGHT")
            if item is None:
                break
            batch.append(item)  # type: ignore[arg-type]
        return batch

    def _handle_batch(self, relay: Relay, items: list[bytes]) -> None:
        for item in items:
            relay.handle(item, self.name)  # RelayUnavailable: the item stays in the processing list
            self.client.lrem(self.processing_key, 1, item)  # type: ignore[arg-type]  # bytes are fine


# --- HTTP webhook (MinIO's webhook target) -------------------------------------------------------


class WebhookSource:
    """An HTTP endpoint: POST a notification with `Authorization: Bearer <token>`.

    Answers 200 only after the notification's events are enqueued (503 otherwise, so the sender
    retries), 401 without the token, 411 without a Content-Length, 413 over the size limit.
    GET /healthz answers 200 without a token (for probes).
    """

    name = "webhook"

    def __init__(self, host: str, port: int, token: str, max_bytes: int) -> None:
        if not token:
            raise ValueError("the webhook needs a token (SHELFSIGHT_RELAY_WEBHOOK_TOKEN)")
        self.host = host
        self.port = port
        self.token = token
        self.max_bytes = max_bytes
        self.bound: tuple[str, int] | None = None
        self.ready = threading.Event()

    def run(self, relay: Relay, stop: threading.Event) -> None:
        from shelfsight.shared.relay.webhook import make_server

        server = make_server(self.host, self.port, relay, self.token, self.max_bytes)
        self.bound = server.server_address[:2]
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="relay-webhook", daemon=True)
        thread.start()
        self.ready.set()
        log.info("relay.webhook.start", host=self.bound[0], port=self.bound[1])
        try:
            stop.wait()
        finally:
            server.shutdown()      # stop accepting; requests in flight finish (block_on_close)
            server.server_close()
            thread.join(timeout=30)
