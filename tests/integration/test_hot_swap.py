"""Hot swap on real services: a steady stream of events across promotions loses nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis

from shelfsight.shared.enqueue import enqueue_upload
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from shelfsight.shared.streams import announce_model
from shelfsight.worker.runtime import runtime_of
from tests.helpers import extraction_worker, jpeg_bytes, publish_tiny_version, wait_for


def publish_version(settings: Settings, store: S3ObjectStore, category: str, seed: int,
                    *, corrupt_sha: bool = False) -> str:
    """Publish and promote a distinct tiny version, then announce it as the trainer does."""
    version = publish_tiny_version(settings, store, category, seed, corrupt_sha=corrupt_sha)
    announce_model(redis.Redis.from_url(settings.broker_url), settings.model_events_channel, category, version)
    return version


@pytest.fixture
def swap_settings(settings: Settings) -> Settings:
    # poll slowly: the pub/sub announcement must be what triggers the swap
    return settings.model_copy(update={"model_poll_interval_s": 60.0, "batch_size": 4})


@pytest.fixture
def worker_app(swap_settings: Settings) -> Iterator:
    with extraction_worker(swap_settings) as app:
        yield app


def test_stream_across_two_promotions_gives_exactly_one_result_per_event(
    worker_app, swap_settings: Settings, store: S3ObjectStore
) -> None:
    s = swap_settings
    store.put(s.bucket, "uploads/pans/img.jpg", jpeg_bytes((90, 90, 90)), "image/jpeg")
    service = runtime_of(worker_app).service
    batch_versions: list[str] = []  # in the order batches ran in this worker
    lock = threading.Lock()
    run_batch = service.batcher._runner

    def recording_runner(category, items):
        outputs = run_batch(category, items)
        with lock:
            batch_versions.append(outputs[0].model.version)
        return outputs

    service.batcher._runner = recording_runner
    event_ids: list[str] = []

    def send(n: int) -> None:
        for _ in range(n):
            i = len(event_ids)
            event_ids.append(enqueue_upload(worker_app, product_id=f"p{i}", category="pans",
                                            image=f"s3://{s.bucket}/uploads/pans/img.jpg"))

    send(15)
    v1 = publish_version(s, store, "pans", seed=1)
    send(15)
    wait_for(lambda: service.models.active_versions().get("pans") == v1, timeout=60)
    send(10)
    v2 = publish_version(s, store, "pans", seed=2)
    send(15)
    wait_for(lambda: service.models.active_versions().get("pans") == v2, timeout=60)
    send(10)

    client = redis.Redis.from_url(s.broker_url, decode_responses=True)
    entries = wait_for(lambda: len(e := client.xrange(s.results_stream)) >= len(event_ids) and e, timeout=120)
    seen = [fields["event_id"] for _, fields in entries]
    assert sorted(seen) == sorted(event_ids)  # every event exactly once: none lost, none doubled
    versions = {fields["model_version"] for _, fields in entries}
    assert versions <= {"zero-shot", v1, v2} and v2 in versions
    order = {"zero-shot": 0, v1: 1, v2: 2}
    ranks = [order[v] for v in batch_versions]
    assert ranks == sorted(ranks), "a worker went back to an older version"
    assert client.xlen(s.dead_letter_stream) == 0


def test_failed_load_keeps_serving_the_old_version(worker_app, swap_settings: Settings, store: S3ObjectStore) -> None:
    s = swap_settings
    store.put(s.bucket, "uploads/pans/img.jpg", jpeg_bytes((90, 90, 90)), "image/jpeg")
    service = runtime_of(worker_app).service
    good = publish_version(s, store, "pans", seed=3)
    service.models.refresh("pans")
    assert service.models.active_versions()["pans"] == good
    publish_version(s, store, "pans", seed=4, corrupt_sha=True)  # manifest hash does not match
    assert service.models.refresh("pans") is False  # sha256 mismatch: refused
    assert service.models.active_versions()["pans"] == good
    enqueue_upload(worker_app, product_id="after", category="pans", image=f"s3://{s.bucket}/uploads/pans/img.jpg")
    client = redis.Redis.from_url(s.broker_url, decode_responses=True)
    entries = wait_for(lambda: client.xrange(s.results_stream), timeout=60)
    assert entries[-1][1]["model_version"] == good
