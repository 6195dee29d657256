"""The worker as it was before each session's plumbing changes (issue 12), for the interleaved
before/after tables of docs/performance.md: each context manager switches one session's per-image
savings off in this process's worker while its block runs (and every later session's too, since
they came after).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def plumbing_baseline(on: bool, service: Any) -> Iterator[None]:
    """Switch off session 2's per-image savings in this process's worker while the block runs:
    boto3 for every S3 request, PIL's resize in preprocessing, and the task-started event."""
    if not on:
        yield
        return
    import shelfsight.worker.task_request as task_request
    from shelfsight.shared import framing
    from shelfsight.shared.storage import S3ObjectStore

    fast, skipped, store = framing.preprocess_pil, task_request.SKIPPED_EVENTS, service.store
    framing.preprocess_pil = lambda image, size, mean, std: framing.eval_transform(size, mean, std)(image)
    task_request.SKIPPED_EVENTS = frozenset()
    service.store = service.results.store = S3ObjectStore(service.settings)
    try:
        yield
    finally:
        framing.preprocess_pil, task_request.SKIPPED_EVENTS, service.store = fast, skipped, store
        service.results.store = store


@contextlib.contextmanager
def plumbing_baseline_s5(on: bool, service: Any) -> Iterator[None]:
    """Switch off session 5's per-image savings while the block runs: Pillow decodes every JPEG
    (reopening the header, as decode_image does), float ops and TF.normalize after the resize,
    urllib3's pool for the light S3 client's requests, the delivery outcome in a round trip of
    its own (not with the stream entries), the dead-letter check per event (not per batch), and
    log lines rendered under the handler's lock."""
    if not on:
        yield
        return
    import numpy as np
    import torchvision.transforms.v2.functional as TF

    import shelfsight.worker.extractor as extractor
    from shelfsight.shared import framing, imaging

    def pil_decode(data: bytes, header: Any, *, max_pixels: int, draft_size: int | None = None) -> Any:
        limits = service.settings
        return np.array(imaging.decode_image(data, max_bytes=limits.max_image_bytes, max_pixels=max_pixels,
                                               draft_size=draft_size, max_frames=limits.max_image_frames))

    def session4_preprocess(image: Any, size: int, mean: Any, std: Any, draft_size: int | None = None) -> Any:
        square = framing.letterbox_tensor(framing.draft_like(image, draft_size))
        resized = TF.resize(square, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        return TF.normalize(resized.contiguous().float().div_(255.0).clamp_(0.0, 1.0), list(mean), list(std))

    import logging as std_logging

    from shelfsight.shared.logs import RenderFirstHandler
    from shelfsight.worker.delivery import BatchFinishedCheck, RedisDeliveryTracker

    saved = (extractor.decode_rgb, framing.preprocess_tensor, RedisDeliveryTracker.finish_in,
             BatchFinishedCheck.finished, RenderFirstHandler.handle)
    store = getattr(service, "store", None)  # no service: bench/_throughput_floor.py (no S3 request)
    RenderFirstHandler.handle = std_logging.Handler.handle  # type: ignore[method-assign]  # render under the lock
    extractor.decode_rgb = pil_decode
    framing.preprocess_tensor = session4_preprocess
    if service is not None:
        service.store = service.results.store = _Urllib3LightStore(service.settings,
                                                                    fallback=getattr(store, "fallback", None))
    RedisDeliveryTracker.finish_in = None  # type: ignore[assignment,method-assign]  # ResultWriter.announce: apart
    BatchFinishedCheck.finished = lambda self, event_id: self._deliveries.finished(event_id)  # type: ignore[method-assign]
    try:
        with plumbing_baseline_s6(True, service):  # session 5 came before session 6's changes
            yield
    finally:
        (extractor.decode_rgb, framing.preprocess_tensor, RedisDeliveryTracker.finish_in,
         BatchFinishedCheck.finished, RenderFirstHandler.handle) = saved
        if service is not None:
            service.store = service.results.store = store


class _Urllib3LightStore:
    """Session 4's light S3 client transport, for the baseline: the same signed requests through a
    urllib3 PoolManager (one pool for all threads, a response object per request)."""

    def __init__(self, settings: Any, fallback: Any) -> None:
        import urllib3

        from shelfsight.worker.s3_light import LightS3ObjectStore

        self._light = LightS3ObjectStore(settings, fallback=fallback)
        self._pool = urllib3.PoolManager(num_pools=4, maxsize=max(settings.s3_max_pool_connections,
                                                                    settings.effective_concurrency() + 4),
                                         block=False, retries=False,
                                         timeout=urllib3.Timeout(connect=settings.s3_connect_timeout_s,
                                                                 read=settings.s3_read_timeout_s))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._light, name)

    def _send(self, method: str, bucket: str, key: str, headers: dict[str, str], body: bytes) -> Any:
        import hashlib
        from datetime import UTC, datetime

        from shelfsight.worker.s3_light import object_path

        light = self._light
        path = object_path(light._base_path, bucket, key)
        creds = light._credentials.get_frozen_credentials()
        signed = light._signer.sign(method, light._host, path, headers, hashlib.sha256(body).hexdigest(),
                                    creds.access_key, creds.secret_key, creds.token, datetime.now(UTC))
        response = self._pool.request(method, f"{light._scheme}://{light._host}{path}", body=body or None,
                                      headers=signed, redirect=False)
        if response.status >= 300:  # the bench's requests all succeed; anything else: the real client
            raise RuntimeError(f"baseline S3 {method} {key}: {response.status}")
        return response

    def get(self, bucket: str, key: str, max_bytes: int | None = None) -> Any:
        from shelfsight.shared.storage import StoredObject

        response = self._send("GET", bucket, key, {}, b"")
        return StoredObject(body=response.data, etag=str(response.headers.get("ETag", "")).strip('"'))

    def put(self, bucket: str, key: str, body: bytes, content_type: str = "application/json", *,
            if_none_match: bool = False, if_match: str | None = None) -> str:
        headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
        if if_none_match:
            headers["If-None-Match"] = "*"
        if if_match:
            headers["If-Match"] = f'"{if_match}"'
        return str(self._send("PUT", bucket, key, headers, body).headers.get("ETag", "")).strip('"')


@contextlib.contextmanager
def plumbing_baseline_s4(on: bool, service: Any) -> Iterator[None]:
    """Switch off session 4's transport savings while the block runs: the pop that takes a burst
    in batches and records what it pops, and the acks written once per turn of the event loop (and
    session 5's, which came after)."""
    if not on:
        yield
        return
    from shelfsight.shared import redis_transport

    saved = (redis_transport.POP_BATCH_MAX, redis_transport.Channel.defers_acks)
    redis_transport.POP_BATCH_MAX = 1  # one message per pop, recorded by QoS.append
    redis_transport.Channel.defers_acks = lambda self: False  # type: ignore[method-assign]
    try:
        with plumbing_baseline_s5(True, service):  # session 4 came before session 5's changes
            yield
    finally:
        redis_transport.POP_BATCH_MAX, redis_transport.Channel.defers_acks = saved  # type: ignore[method-assign]


@contextlib.contextmanager
def plumbing_baseline_s3(on: bool, service: Any) -> Iterator[None]:
    """Switch off session 3's per-image savings (docs/performance.md) while the block runs: kombu's
    new redis.Redis per command and separate in-flight LREM in the transport, redaction's three
    substitutions on every field of every log line, float ops and normalize on channels-last pixels,
    one XADD round trip per stream entry."""
    if not on:
        yield
        return
    import re

    import torchvision.transforms.v2.functional as TF
    from kombu.transport import redis as kombu_redis

    from shelfsight.shared import framing, logs, redis_transport, streams

    def strided_preprocess(image: Any, size: int, mean: Any, std: Any, draft_size: int | None = None) -> Any:
        square = framing.letterbox_tensor(framing.draft_like(image, draft_size))
        resized = TF.resize(square, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        return TF.normalize(resized.float().div_(255.0).clamp_(0.0, 1.0), list(mean), list(std))

    saved = (redis_transport.Channel.conn_or_acquire, redis_transport.QoS.append, logs._MAYBE_SECRET,
             logs._secret_key, framing.preprocess_tensor, streams.RedisStreamPublisher.publish_many)
    redis_transport.Channel.conn_or_acquire = kombu_redis.Channel.conn_or_acquire
    redis_transport.QoS.append = kombu_redis.QoS.append  # LREM after, as before
    logs._MAYBE_SECRET = re.compile("")  # matches everything: every substitution runs
    logs._secret_key = lambda key: isinstance(key, str) and any(s in key.lower() for s in logs._SECRET_KEYS)
    framing.preprocess_tensor = strided_preprocess
    setattr(streams.RedisStreamPublisher, "publish_many", None)  # noqa: B010 - publish_all_after_write: one XADD each
    try:
        with plumbing_baseline_s4(True, service):  # session 3 came before session 4's transport
            yield
    finally:
        (redis_transport.Channel.conn_or_acquire, redis_transport.QoS.append, logs._MAYBE_SECRET,
         logs._secret_key, framing.preprocess_tensor, streams.RedisStreamPublisher.publish_many) = saved


@contextlib.contextmanager
def plumbing_baseline_s6(on: bool, service: Any) -> Iterator[None]:
    """Switch off session 6's per-image savings while the block runs: the light S3 client's
    requests over `http.client` (headers parsed by the email package, headers and body written
    apart) instead of shelfsight.worker.http1; each thread's Redis round trips on their own (the
    delivery's begin an EVAL, the stream entries and outcome a pipeline of their own) instead of
    grouped across threads."""
    if not on:
        yield
        return
    from shelfsight.shared.grouped_pipelines import GroupedPipelines
    from shelfsight.worker import delivery, s3_light

    def alone(self: Any, queue: Any) -> Any:
        pipe = self.client.pipeline(transaction=False)
        queue(pipe)
        return pipe.execute()

    def begin_alone(self: Any, event_id: str, *, fresh: bool = False) -> Any:
        import redis

        try:
            n, done = self.client.eval(delivery._BEGIN, 1, delivery.delivery_key(event_id), self.ttl_s,
                                       "1" if fresh else "0")
        except redis.RedisError:
            return delivery.Delivery(0, None, tracked=False)
        done = done.decode() if isinstance(done, bytes) else str(done)
        return delivery.Delivery(int(n), done or None)

    def fresh_connections() -> None:
        """Every task thread opens a new connection, of the class in force (the worker's threads
        outlive a burst, and each keeps its connection)."""
        if isinstance(getattr(service, "store", None), s3_light.LightS3ObjectStore):
            service.store._local = threading.local()

    saved = (s3_light.Connection, GroupedPipelines.execute, delivery.RedisDeliveryTracker.begin)
    s3_light.Connection = _HttpClientConnection  # type: ignore[misc,assignment]
    fresh_connections()
    GroupedPipelines.execute = alone  # type: ignore[method-assign]
    delivery.RedisDeliveryTracker.begin = begin_alone  # type: ignore[method-assign]
    try:
        with plumbing_baseline_s7(True, service):  # session 6 came before session 7's changes
            yield
    finally:
        s3_light.Connection, GroupedPipelines.execute, delivery.RedisDeliveryTracker.begin = saved  # type: ignore[misc,method-assign]
        fresh_connections()


@contextlib.contextmanager
def plumbing_baseline_s7(on: bool, service: Any) -> Iterator[None]:
    """Switch off session 7's per-image savings while the block runs: task events flushed on the
    consumer's next loop turn, as Celery does (one PUBLISH per turn), instead of grouped for
    `task_event_flush_ms`. The bench's worker consumer is found among live objects (bench only)."""
    if not on:
        yield
        return
    import gc

    from shelfsight.worker.consumer import Consumer

    consumers = [o for o in gc.get_objects() if isinstance(o, Consumer)]
    saved = [(c, c.event_flush_interval_s) for c in consumers]
    for consumer, _ in saved:
        consumer.group_task_events(0.0)
    try:
        with plumbing_baseline_s8(True, service):  # session 7 came before session 8's changes
            yield
    finally:
        for consumer, interval in saved:
            if consumer.event_dispatcher is not None:
                consumer.event_dispatcher.flush()  # the baseline's events, before grouping resumes
            consumer.group_task_events(interval)


@contextlib.contextmanager
def plumbing_baseline_s8(on: bool, service: Any) -> Iterator[None]:
    """Switch off session 8's per-image savings (and session 9's) while the block runs: Pillow opens
    every image's header (with `getexif()` for the orientation) instead of the JPEG marker reader."""
    if not on:
        yield
        return
    from shelfsight.shared import imaging

    saved = imaging.read_jpeg_header
    imaging.read_jpeg_header = lambda data: None  # every header is Pillow's, as before session 8
    try:
        with plumbing_baseline_s9(True, service):  # session 8 came before session 9's changes
            yield
    finally:
        imaging.read_jpeg_header = saved


@contextlib.contextmanager
def plumbing_baseline_s9(on: bool, service: Any) -> Iterator[None]:
    """Switch off session 9's per-image savings while the block runs: the worker's preprocessing
    runs op by op in Python (`preprocess_tensor`, each op giving the GIL up) instead of as one
    TorchScript call, and the OpenMP team-size calls give the GIL up (ctypes.CDLL)."""
    if not on:
        yield
        return
    import ctypes

    import torch

    from shelfsight.shared import framing, torch_threads

    def session8_preprocess(rgb: Any, size: int, mean: Any, std: Any) -> Any:
        with torch_threads.one_intra_op_thread():
            return framing.preprocess_tensor(torch.from_numpy(rgb).permute(2, 0, 1), size, mean, std)

    saved_preprocess, saved_openmp = framing.preprocess_array, torch_threads._openmp
    process = ctypes.CDLL(None)
    setter, getter = process.omp_set_num_threads, process.omp_get_max_threads
    setter.argtypes, setter.restype, getter.argtypes, getter.restype = [ctypes.c_int], None, [], ctypes.c_int
    framing.preprocess_array = session8_preprocess
    torch_threads._openmp = lambda: (setter, getter) if saved_openmp() is not None else None
    try:
        yield
    finally:
        framing.preprocess_array, torch_threads._openmp = saved_preprocess, saved_openmp


class _HttpClientConnection:
    """Session 5's transport for the light S3 client, behind http1.Connection's interface."""

    def __init__(self, host: str, port: int, *, tls: Any = None, connect_timeout: float, read_timeout: float) -> None:
        import http.client

        self._conn = (http.client.HTTPSConnection(host, port, timeout=connect_timeout, context=tls) if tls is not None
                      else http.client.HTTPConnection(host, port, timeout=connect_timeout))
        self._conn.connect()
        self._conn.sock.settimeout(read_timeout)
        self.sock = self._conn.sock

    def request(self, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> Any:
        self._conn.request(method, target, body=body or None, headers=headers)
        return _HttpClientResponse(self._conn.getresponse())

    def close(self) -> None:
        self._conn.close()


class _HttpClientResponse:
    def __init__(self, response: Any) -> None:
        self._response, self.status = response, response.status

    def header(self, name: str, default: str = "") -> str:
        return str(self._response.getheader(name, default))

    @property
    def reusable(self) -> bool:
        return bool(self._response.isclosed() and not self._response.will_close)

    def read(self, limit: int | None = None) -> bytes:
        from shelfsight.worker.http1 import BodyTooLarge

        length = int(self._response.getheader("Content-Length", "0") or 0)
        if limit is not None and length > limit:
            raise BodyTooLarge(length, limit)
        data: bytes = self._response.read() if limit is None else self._response.read(limit + 1)
        if limit is not None and len(data) > limit:
            raise BodyTooLarge(None, limit)
        return data


# `--plumbing-baseline` / `--baseline` names: each session's savings switched off (with every later one's).
BASELINES = {"s2": plumbing_baseline, "s3": plumbing_baseline_s3, "s4": plumbing_baseline_s4,
             "s5": plumbing_baseline_s5, "s6": plumbing_baseline_s6, "s7": plumbing_baseline_s7,
             "s8": plumbing_baseline_s8, "s9": plumbing_baseline_s9}
