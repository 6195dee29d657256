"""The light S3 path against a real S3 endpoint (moto server), directly and behind the fault
proxy: the same contract, the same errors and retries as the boto3 store."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from shelfsight.shared.dev.faults import FaultProxy
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import (
    AccessDenied,
    ObjectMissing,
    ObjectTooLarge,
    S3ObjectStore,
    TransientStorageError,
)
from shelfsight.worker.s3_light import LightS3ObjectStore
from tests.storage_contract import check_conditional_writes, check_put_get_list_delete


@pytest.fixture
def light(settings: Settings) -> LightS3ObjectStore:
    return LightS3ObjectStore(settings)


@pytest.fixture
def proxied(settings: Settings) -> Iterator[tuple[FaultProxy, LightS3ObjectStore]]:
    with FaultProxy(settings.s3_endpoint_url or "") as proxy:
        yield proxy, LightS3ObjectStore(settings.model_copy(update={
            "s3_endpoint_url": proxy.url, "s3_read_timeout_s": 0.5, "s3_retries": 3,
        }))


def test_contract(light: LightS3ObjectStore, settings: Settings) -> None:
    assert light.light
    check_put_get_list_delete(light, settings.bucket)
    check_conditional_writes(light, settings.bucket)


def test_same_bytes_and_etags_as_boto3(light: LightS3ObjectStore, store: S3ObjectStore, settings: Settings) -> None:
    key = "uploads/a b/ü+x=1&y~z.jpg"  # every character class the path encoding handles
    etag = light.put(settings.bucket, key, b"\xff\xd8\xff" + bytes(range(256)) * 100, "image/jpeg")
    by_boto = store.get(settings.bucket, key)
    assert by_boto.etag == etag and light.get(settings.bucket, key) == by_boto
    store.put(settings.bucket, "r.json", b"{}")
    assert light.get(settings.bucket, "r.json") == store.get(settings.bucket, "r.json")
    with pytest.raises(ObjectMissing):
        light.get(settings.bucket, "nothing/here.jpg")
    with pytest.raises(ObjectMissing):
        light.get(f"{settings.bucket}-absent", "k")
    with pytest.raises(ObjectTooLarge):
        light.get(settings.bucket, key, max_bytes=100)


def test_transient_errors_are_retried_then_raised(proxied: tuple[FaultProxy, LightS3ObjectStore],
                                                 settings: Settings) -> None:
    proxy, light = proxied
    light.put(settings.bucket, "k.json", b"{}")
    proxy.set("error_503", count=2)  # two failures, then the third attempt passes
    assert light.get(settings.bucket, "k.json").body == b"{}"
    assert proxy.counts["error_503"] == 2
    for mode in ("error_503", "reset", "slow"):
        proxy.set(mode, slow_s=1.0)
        before = sum(proxy.counts.values())
        with pytest.raises(TransientStorageError) as raised:
            light.put(settings.bucket, "k.json", b"[]", if_none_match=True)
        assert not isinstance(raised.value, AccessDenied)
        assert sum(proxy.counts.values()) - before == 3, mode  # s3_retries attempts in all
    proxy.clear()
    assert light.get(settings.bucket, "k.json").body == b"{}"  # nothing was written meanwhile


def test_denied_is_raised_at_once_as_access_denied(proxied: tuple[FaultProxy, LightS3ObjectStore],
                                                   settings: Settings) -> None:
    proxy, light = proxied
    proxy.set("deny")
    started = time.monotonic()
    with pytest.raises(AccessDenied):
        light.get(settings.bucket, "k.json")
    assert proxy.counts["deny"] == 1 and time.monotonic() - started < 1.0


def test_the_bench_s3_standin_keeps_the_contract_for_both_clients(tmp_path) -> None:
    """bench/_s3_standin.py (the GPU bench's S3 server) answers like S3 for boto3 and the light path,
    across its processes (conditional writes are atomic between them)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from shelfsight.shared.dev.services import free_port, wait_for_port

    port = free_port()
    server = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parents[2] / "bench" / "_s3_standin.py"),
                               "--port", str(port), "--root", str(tmp_path / "s3"), "--processes", "2"],
                              start_new_session=True)
    try:
        wait_for_port(port, 30)
        settings = Settings(s3_endpoint_url=f"http://127.0.0.1:{port}", s3_access_key_id="test",
                            s3_secret_access_key="test", s3_retries=1)
        for bucket, store in (("boto", S3ObjectStore(settings)), ("light", LightS3ObjectStore(settings))):
            store.ensure_bucket(bucket)
            check_put_get_list_delete(store, bucket)
            check_conditional_writes(store, bucket)
        with pytest.raises(ObjectMissing):
            LightS3ObjectStore(settings).get("absent-bucket", "k")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)


def test_a_connection_the_server_closed_while_idle_is_replaced_without_spending_a_retry() -> None:
    """S3 closes idle keep-alive connections (after about 20 s); the next request on one must go out
    on a new connection, not fail and wait out a backoff. The server here closes every connection
    right after its response, without saying so, and the client has no retries to spend."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    closed = threading.Semaphore(0)
    peers: list[int] = []

    class Closing(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive unless told otherwise: nothing tells the client

        def do_GET(self) -> None:
            peers.append(self.client_address[1])
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.send_header("ETag", '"e"')
            self.end_headers()
            self.wfile.write(b"image")
            self.close_connection = True

        def log_message(self, *_: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        def shutdown_request(self, request) -> None:  # type: ignore[no-untyped-def]
            super().shutdown_request(request)
            closed.release()  # the server's end is closed: the client's socket now reads as closed

    with Server(("127.0.0.1", 0), Closing) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        light = LightS3ObjectStore(Settings(s3_endpoint_url=f"http://127.0.0.1:{server.server_port}",
                                            s3_access_key_id="test", s3_secret_access_key="test", s3_retries=1))
        for _ in range(3):
            assert light.get("bucket", "k.jpg").body == b"image"
            assert closed.acquire(timeout=10)
        server.shutdown()
    assert len(peers) == 3 and len(set(peers)) == 3  # three requests, each on its own new connection
