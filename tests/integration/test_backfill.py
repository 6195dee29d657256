"""Issue 11 part 5 on real services: after a promotion, `shelfsight backfill --stale-only` brings every
result of the category to the new version, live uploads go first, and a re-run enqueues nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import redis

from shelfsight.shared.enqueue import enqueue_upload
from shelfsight.shared.events import ResultRecord, result_key
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore
from shelfsight.worker.runtime import runtime_of
from tests.helpers import jpeg_bytes, publish_tiny_version, run_cli, wait_for

PRODUCTS = 24
LIVE = 6
CONCURRENCY = 2


@contextmanager
def worker(settings: Settings) -> Iterator:
    """An extraction worker consuming what `shelfsight worker` consumes: extract, then backfill."""
    from celery.contrib.testing.worker import start_worker

    from shelfsight.worker.app import create_worker_app

    app = create_worker_app(settings)
    with start_worker(app, pool="threads", concurrency=CONCURRENCY, perform_ping_check=False, shutdown_timeout=30,
                      queues=[settings.extract_queue, settings.backfill_queue]):
        yield app
    runtime_of(app).shutdown()


def _result(store: S3ObjectStore, settings: Settings, product_id: str) -> ResultRecord:
    key = result_key(settings.results_prefix, "pans", product_id)
    return ResultRecord.model_validate_json(store.get(settings.bucket, key).body)


def _cli_json(settings: Settings, capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert run_cli(settings, *argv, "--json") == 0
    return json.loads(capsys.readouterr().out)


def test_backfill_after_promotion_brings_every_result_to_the_new_version_behind_live_uploads(
    settings: Settings, store: S3ObjectStore, capsys
) -> None:
    s = settings.model_copy(update={"batch_size": CONCURRENCY})
    images = [f"s3://{s.bucket}/uploads/pans/{i}.jpg" for i in range(3)]
    for i, uri in enumerate(images):
        store.put(s.bucket, uri.split("/", 3)[3], jpeg_bytes((40 * i, 90, 200 - 40 * i)), "image/jpeg")
    broker = redis.Redis.from_url(s.broker_url, decode_responses=True)

    version_a = publish_tiny_version(s, store, "pans", seed=1)
    with worker(s) as app:
        for i in range(PRODUCTS):
            enqueue_upload(app, product_id=f"p{i:02d}", category="pans", image=images[i % 3],
                           submitted_at=datetime(2026, 11, 1, tzinfo=UTC))
        wait_for(lambda: broker.xlen(s.results_stream) >= PRODUCTS, timeout=120)
    assert {_result(store, s, f"p{i:02d}").model.version for i in range(PRODUCTS)} == {version_a}

    version_b = publish_tiny_version(s, store, "pans", seed=2)  # promoted: every result is stale now
    shown = _cli_json(s, capsys, "models", "show", "pans")
    assert shown["version"] == version_b and shown["stale_results"] == {"stale": PRODUCTS, "total": PRODUCTS}

    planned = _cli_json(s, capsys, "backfill", "--category", "pans", "--stale-only", "--rate", "1000/s")
    assert (planned["enqueued"], planned["target"], planned["queue"]) == (PRODUCTS, version_b, "backfill")
    assert broker.llen(s.backfill_queue) == PRODUCTS
    # live uploads arrive behind the whole backfill: new products, and a newer upload of p00
    live_ids = [enqueue_upload(app, product_id=f"new{i}", category="pans", image=images[i % 3]) for i in range(LIVE)]
    live_ids.append(enqueue_upload(app, product_id="p00", category="pans", image=images[1]))
    stream_start = broker.xrevrange(s.results_stream, count=1)[0][0]

    with worker(s):
        entries = wait_for(lambda: len(e := broker.xrange(s.results_stream, min=f"({stream_start}")) >= PRODUCTS
                           + len(live_ids) and e, timeout=180)
        assert broker.llen(s.backfill_queue) == 0 and broker.xlen(s.dead_letter_stream) == 0
    order = [fields["event_id"] for _, fields in entries]
    assert sorted(order) == sorted([*live_ids, *(f"backfill-{version_b}-p{i:02d}" for i in range(PRODUCTS))])
    # live first: before the last live outcome, at most the messages the worker had already
    # reserved from the backfill queue (taking the queues in turn would interleave about LIVE)
    last_live = max(order.index(event_id) for event_id in live_ids)
    assert sum(event_id.startswith("backfill-") for event_id in order[:last_live]) <= CONCURRENCY, order
    statuses = {fields["event_id"]: fields["status"] for _, fields in entries}
    # the newer upload of p00 stays whichever finished first: a backfill of p00 after it is
    # superseded; one taken before it (one of the few reserved at start) is overwritten by it
    backfill_p00 = f"backfill-{version_b}-p00"
    after_live = order.index(backfill_p00) > order.index(live_ids[-1])
    assert statuses[backfill_p00] == ("superseded" if after_live else "result"), order
    assert _result(store, s, "p00").event_id == live_ids[-1]
    assert {_result(store, s, f"p{i:02d}").model.version for i in range(PRODUCTS)} == {version_b}
    rebuilt = _result(store, s, "p05")
    assert rebuilt.event_id == f"backfill-{version_b}-p05" and rebuilt.submitted_at == datetime(2026, 11, 1, tzinfo=UTC)

    again = _cli_json(s, capsys, "backfill", "--category", "pans", "--stale-only")
    assert (again["enqueued"], again["current"]) == (0, PRODUCTS + LIVE)  # idempotent: nothing left to do
    assert _cli_json(s, capsys, "models", "show", "pans")["stale_results"] == {"stale": 0, "total": PRODUCTS + LIVE}
