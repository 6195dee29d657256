"""Backfill planning with in-memory fakes: stale filter, deterministic ids, rate limit, queue bound."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from shelfsight.shared.backfill import (
    Backfill,
    TokenBucket,
    backfill_chunk,
    backfill_event_id,
    count_stale,
    plan_event,
)
from shelfsight.shared.events import ResultRecord, UploadEvent
from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import InMemoryObjectStore
from shelfsight.shared.streams import InMemoryPublisher
from shelfsight.shared.taxonomy import load_taxonomy
from tests.helpers import jpeg_bytes, upload_fake_version

BUCKET = "shelfsight"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")


@pytest.fixture
def unit_settings() -> Settings:
    return Settings(bucket=BUCKET, allowed_image_buckets=[BUCKET], model_arch="shelfsight-tiny",
                    model_weights="none", device="cpu", batch_size=4, batch_max_wait_ms=5)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class FakeApp:
    """Records send_task calls; its queue is what FakeQueue measures."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send_task(self, name: str, **kwargs: Any) -> None:
        self.sent.append({"name": name, **kwargs})


class FakeQueue:
    """LLEN of the backfill queue: what was sent minus what 'workers' drained."""

    def __init__(self, app: FakeApp, clock: FakeClock | None = None, drain_per_s: float = 0.0) -> None:
        self.app, self.clock, self.drain_per_s = app, clock, drain_per_s
        self.started = clock() if clock else 0.0

    def llen(self, name: str) -> int:
        drained = int((self.clock() - self.started) * self.drain_per_s) if self.clock else 0
        return max(0, len(self.app.sent) - drained)


def _result(product_id: str, version: str, submitted_at: str = "2026-11-27T10:00:00Z") -> ResultRecord:
    return ResultRecord.model_validate({
        "event_id": f"live-{product_id}", "product_id": product_id, "category": "pans", "submitted_at": submitted_at,
        "image": {"uri": f"s3://{BUCKET}/uploads/pans/{product_id}.jpg", "etag": "e", "bytes": 1, "width": 1,
                  "height": 1},
        "model": {"architecture": "a", "version": version, "mode": "fine_tuned", "weights_sha256": "0",
                  "taxonomy_version": "t"},
        "attributes": {},
    })


def _store_results(store: InMemoryObjectStore, versions: dict[str, str]) -> None:
    for product_id, version in versions.items():
        store.put(BUCKET, f"results/pans/{product_id}.json", _result(product_id, version).model_dump_json().encode())


def test_event_ids_are_deterministic_valid_and_distinct() -> None:
    assert backfill_event_id("v20261127T101010-abc123", "sku-1") == "backfill-v20261127T101010-abc123-sku-1"
    assert backfill_event_id("v1", "sku-1") == backfill_event_id("v1", "sku-1")
    assert backfill_event_id("v1", "sku-1") != backfill_event_id("v2", "sku-1")
    weird = backfill_event_id("zero shot/ä", "p")
    assert _ID.match(weird) and weird == "backfill-zero-shot---p"
    long_a, long_b = backfill_event_id("v1", "x" * 127 + "a"), backfill_event_id("v1", "x" * 127 + "b")
    assert _ID.match(long_a) and len(long_a) == 128 and long_a != long_b
    UploadEvent(event_id=long_a, product_id="p", category="pans", image=f"s3://{BUCKET}/k")  # the wire accepts it


def test_plan_keeps_image_and_submitted_at_and_skips_current_when_stale_only() -> None:
    record = _result("sku-1", "vA", submitted_at="2026-01-02T03:04:05Z")
    event = plan_event(record, "vB", stale_only=True)
    assert event is not None
    assert event.event_id == "backfill-vB-sku-1" and event.image == record.image.uri
    assert event.submitted_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC) and event.category == "pans"
    assert plan_event(_result("sku-1", "vB"), "vB", stale_only=True) is None
    assert plan_event(_result("sku-1", "vB"), "vB", stale_only=False) is not None


def test_token_bucket_holds_the_rate_with_an_injected_clock() -> None:
    clock = FakeClock()
    bucket = TokenBucket(5.0, burst=1, clock=clock, sleep=clock.sleep)
    start = clock()
    for _ in range(11):
        bucket.acquire()
    assert clock() - start == pytest.approx(2.0)  # the first at once, then one every 0.2 s
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_run_enqueues_only_stale_results_to_the_backfill_queue_and_rerun_enqueues_nothing(
    unit_settings: Settings,
) -> None:
    store = InMemoryObjectStore()
    _store_results(store, {f"p{i:02d}": ("vB" if i % 3 == 0 else "vA") for i in range(12)})
    store.put(BUCKET, "results/pans/broken.json", b"{not json")
    store.put(BUCKET, "results/panszzz/other.json", b"{}")  # another category sharing the prefix's start
    clock = FakeClock()
    app = FakeApp()
    runner = Backfill(app, store, FakeQueue(app), unit_settings, rate_per_s=1000, clock=clock,  # type: ignore[arg-type]
                      sleep=clock.sleep)
    seen: list[int] = []
    stats = runner.run("pans", "vB", stale_only=True, progress=lambda s: seen.append(s.checked))
    assert (stats.total, stats.checked, stats.enqueued, stats.current, stats.unreadable) == (13, 13, 8, 4, 1)
    assert seen == list(range(1, 14))
    assert {m["queue"] for m in app.sent} == {"backfill"} and {m["name"] for m in app.sent} == {"shelfsight.extract"}
    assert [m["task_id"] for m in app.sent] == [f"backfill-vB-p{i:02d}" for i in range(12) if i % 3]
    assert app.sent[0]["args"][0]["image"] == f"s3://{BUCKET}/uploads/pans/p01.jpg"

    # the workers brought them to vB: a re-run enqueues nothing
    _store_results(store, {f"p{i:02d}": "vB" for i in range(12)})
    again = runner.run("pans", "vB", stale_only=True)
    assert again.enqueued == 0 and again.current == 12
    assert count_stale(store, unit_settings, "pans", "vB") == (0, 12)


def test_run_pauses_while_the_backfill_queue_is_full(unit_settings: Settings) -> None:
    store = InMemoryObjectStore()
    _store_results(store, {f"p{i}": "vA" for i in range(6)})
    clock = FakeClock()
    app = FakeApp()
    runner = Backfill(app, store, FakeQueue(app, clock, drain_per_s=1.0), unit_settings,  # type: ignore[arg-type]
                      rate_per_s=1000, max_queued=2, clock=clock, sleep=clock.sleep)
    started = clock()
    stats = runner.run("pans", "vB", stale_only=True)
    assert stats.enqueued == 6
    assert clock() - started >= 3.5  # 4 of them had to wait for the 'workers' to drain one a second


def test_chunk_hands_over_and_stops_when_another_version_serves(unit_settings: Settings) -> None:
    store = InMemoryObjectStore()
    registry = ModelRegistry(store, BUCKET)
    for version in ("vA", "vB"):
        upload_fake_version(registry, version)
    registry.promote("pans", "vB", reason="test")
    _store_results(store, {f"p{i}": "vA" for i in range(5)})
    app = FakeApp()
    runner = Backfill(app, store, FakeQueue(app), unit_settings, rate_per_s=1000, max_queued=0)  # type: ignore[arg-type]
    first = backfill_chunk(runner, registry, "pans", "vB", chunk=3)
    assert (first.stats.enqueued, first.next_after, first.reason) == (3, "results/pans/p2.json", "more to check")
    rest = backfill_chunk(runner, registry, "pans", "vB", first.next_after or "", chunk=3)
    assert (rest.stats.enqueued, rest.next_after, rest.reason) == (2, None, "done")
    full = Backfill(app, store, FakeQueue(app), unit_settings, rate_per_s=1000, max_queued=1)  # type: ignore[arg-type]
    waiting = backfill_chunk(full, registry, "pans", "vB", "results/pans/p0.json")
    assert (waiting.stats.checked, waiting.next_after, waiting.delay_s > 0) == (0, "results/pans/p0.json", True)
    registry.promote("pans", "vA", reason="back")
    assert backfill_chunk(runner, registry, "pans", "vB").next_after is None  # vB no longer serves


@pytest.fixture
def service(unit_settings: Settings) -> Iterator[Any]:
    from shelfsight.worker.extractor import ExtractionService
    from shelfsight.worker.model_cache import ModelCache

    store = InMemoryObjectStore()
    taxonomy = load_taxonomy(unit_settings.taxonomy_path)
    svc = ExtractionService(unit_settings, taxonomy, store, InMemoryPublisher(),
                            ModelCache(unit_settings, taxonomy, store, ModelRegistry(store, BUCKET)))
    yield svc
    svc.close()


def test_worker_replaces_a_result_with_its_backfill_but_keeps_a_newer_upload(service: Any) -> None:
    """The rule the backfill relies on: same submitted_at replaces, an older one never does."""
    service.store.put(BUCKET, "uploads/pans/sku-1.jpg", jpeg_bytes(), "image/jpeg")
    live = {"event_id": "live-1", "product_id": "sku-1", "category": "pans",
            "image": f"s3://{BUCKET}/uploads/pans/sku-1.jpg", "submitted_at": "2026-11-27T10:00:00Z"}
    assert service.process(live).status == "result"

    def stored() -> ResultRecord:
        return ResultRecord.model_validate_json(service.store.get(BUCKET, "results/pans/sku-1.json").body)

    event = plan_event(stored(), "vB", stale_only=True)
    assert event is not None
    assert service.process(event.model_dump(mode="json")).status == "result"
    assert stored().event_id == "backfill-vB-sku-1"  # replaced in place, same submitted_at

    newer = {**live, "event_id": "live-2", "submitted_at": "2026-11-27T11:00:00Z"}
    assert service.process(newer).status == "result"
    late = plan_event(_result("sku-1", "vA"), "vC", stale_only=True)  # planned before the new upload
    assert late is not None
    assert service.process(late.model_dump(mode="json")).status == "superseded"
    assert json.loads(service.store.get(BUCKET, "results/pans/sku-1.json").body)["event_id"] == "live-2"


def test_promotion_requests_a_backfill_only_when_configured(unit_settings: Settings, monkeypatch) -> None:
    from shelfsight.shared import backfill

    apps: list[FakeApp] = []

    class ClosingApp(FakeApp):
        closed = False

        def send_task(self, name: str, **kwargs: Any) -> Any:
            super().send_task(name, **kwargs)
            return type("Sent", (), {"id": "task-1"})()

        def close(self) -> None:
            self.closed = True

    def fake_app(settings: Settings, **kwargs: Any) -> ClosingApp:
        assert kwargs == {"current": False}  # never replaces the trainer's own app
        apps.append(ClosingApp())
        return apps[-1]

    monkeypatch.setattr(backfill, "create_celery_app", fake_app)
    assert backfill.request_backfill(unit_settings, "pans", "vB") is None and not apps  # off by default
    on = unit_settings.model_copy(update={"backfill_after_promotion": True})
    assert backfill.request_backfill(on, "pans", "vB") == "task-1"
    [app] = apps
    assert app.sent == [{"name": "shelfsight.backfill_category", "kwargs": {"category": "pans", "version": "vB"},
                         "countdown": backfill.SETTLE_S}]  # after the workers swapped
    assert app.closed
