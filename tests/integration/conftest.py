"""Fixtures: a real redis-server and a real S3 endpoint (moto server) on loopback."""

from __future__ import annotations

import logging
import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto server's per-request lines

from shelfsight.shared.dev.services import free_port, redis_server_binary, wait_for_port  # noqa: E402
from shelfsight.shared.settings import Settings  # noqa: E402
from shelfsight.shared.storage import S3ObjectStore  # noqa: E402

# One Redis db per test that asks for `settings` (Redis's default of 16 ran out, and tests shared db 15).
REDIS_DATABASES = 512


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--databases", str(REDIS_DATABASES)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


_db_counter = iter(range(2, REDIS_DATABASES))


@pytest.fixture
def settings(redis_url: str, s3_endpoint: str) -> Settings:
    """Settings for one test: its own bucket and Redis db, the tiny model, fast timings."""
    db = next(_db_counter)  # its own db: no test sees another's queues, locks or leftovers
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s = Settings(
        broker_url=f"{redis_url}/{db}",
        result_backend=f"{redis_url}/{db}",
        s3_endpoint_url=s3_endpoint,
        s3_access_key_id="test",
        s3_secret_access_key="test",
        bucket=bucket,
        allowed_image_buckets=[bucket],
        model_arch="shelfsight-tiny",
        model_weights="none",
        device="cpu",
        batch_size=8,
        batch_max_wait_ms=10,
        max_retries=2,
        retry_backoff_s=0.05,
        model_poll_interval_s=0.5,
        train_epochs=2,
        train_batch_size=8,
    )
    S3ObjectStore(s).ensure_bucket(bucket)
    import redis

    redis.Redis.from_url(s.broker_url).flushdb()
    return s


@pytest.fixture
def store(settings: Settings) -> S3ObjectStore:
    return S3ObjectStore(settings)
