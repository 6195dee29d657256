"""Pipelines of many threads in one round trip, on a real redis-server: each caller gets exactly
its own replies, and a failure is its own unless the round trip itself failed."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.retry import Retry

from shelfsight.shared.grouped_pipelines import GroupedPipelines
from shelfsight.shared.settings import Settings
from shelfsight.shared.streams import redis_client
from tests.helpers import RecordingRedis


@pytest.fixture
def client(settings: Settings) -> RecordingRedis:
    counting = RecordingRedis(connection_pool=redis_client(settings).connection_pool)
    counting.flushdb()
    counting.trips.clear()
    return counting


def _in_threads(calls: list[Any]) -> list[Any]:
    """Run each call in its own thread; their results (or exceptions), in order."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001 - returned to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results


def _hold_the_first_round(grouped: GroupedPipelines, then: list[Any]) -> list[Any]:
    """Send a first call that stays in flight until every call in `then` has queued; return the
    results of `then` (they go in the round trips after it)."""
    queued_all = threading.Event()

    def slow(pipe: Pipeline) -> None:
        queued_all.wait(10)  # inside the round trip: the others queue meanwhile
        pipe.incr("first")

    first = threading.Thread(target=grouped.execute, args=(slow,))
    first.start()
    waiting = threading.Thread(target=lambda: _wait_queued(grouped, len(then), queued_all))
    waiting.start()
    results = _in_threads(then)
    first.join(10)
    waiting.join(10)
    return results


def _wait_queued(grouped: GroupedPipelines, n: int, done: threading.Event) -> None:
    while True:
        with grouped._lock:
            if len(grouped._queued) >= n:
                break
        threading.Event().wait(0.001)
    done.set()


def test_callers_that_queue_during_a_round_trip_share_the_next_one(client: RecordingRedis) -> None:
    grouped = GroupedPipelines(client)
    calls = [lambda i=i: grouped.execute(lambda pipe, i=i: (pipe.set(f"k{i}", i), pipe.incrby("total", i)))
             for i in range(12)]
    results = _hold_the_first_round(grouped, calls)
    assert client.rounds == [0, 24]  # the held round trip (one command), then all twelve callers' in one
    assert [r[0] for r in results] == [True] * 12
    totals = sorted(r[1] for r in results)  # INCRBY's running total, as each caller's own reply
    assert len(set(totals)) == 12 and totals[-1] == sum(range(12))
    assert [client.get(f"k{i}") for i in range(12)] == [str(i).encode() for i in range(12)]
    assert int(client.get("total") or 0) == sum(range(12))


def test_a_refused_command_fails_only_its_caller(client: RecordingRedis) -> None:
    grouped = GroupedPipelines(client)
    client.set("text", "not a number")
    client.trips.clear()
    calls = [lambda: grouped.execute(lambda pipe: pipe.incr("text")),
             lambda: grouped.execute(lambda pipe: (pipe.set("a", 1), pipe.get("a"))),
             lambda: grouped.execute(lambda pipe: pipe.lpush("list", "x"))]
    bad, pair, pushed = _hold_the_first_round(grouped, calls)
    assert isinstance(bad, redis.ResponseError)
    assert pair == [True, b"1"] and pushed == [1]
    assert client.rounds == [0, 4]


def test_a_queueing_function_that_raises_is_left_out(client: RecordingRedis) -> None:
    grouped = GroupedPipelines(client)

    def broken(pipe: Pipeline) -> None:
        pipe.set("half", 1)
        raise ValueError("bug in the caller")

    broken_result, fine = _hold_the_first_round(grouped, [lambda: grouped.execute(broken),
                                                          lambda: grouped.execute(lambda pipe: pipe.incr("n"))])
    assert isinstance(broken_result, ValueError) and fine == [1]
    assert client.rounds == [0, 0]  # the held round trip, then the fine caller's command alone
    assert client.get("half") is None  # the broken caller's half-queued command was not sent


def test_a_round_trip_that_fails_fails_every_caller_in_it_and_the_next_works(settings: Settings) -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1,  # nothing listens there
                       retry=Retry(NoBackoff(), 0))
    grouped = GroupedPipelines(dead)
    results = _in_threads([lambda: grouped.execute(lambda pipe: pipe.incr("n")) for _ in range(4)])
    assert all(isinstance(r, redis.ConnectionError) for r in results)
    live = GroupedPipelines(redis_client(settings))
    assert live.execute(lambda pipe: pipe.ping()) == [True]


def test_a_caller_alone_sends_at_once_and_one_command_goes_without_a_pipeline(client: RecordingRedis) -> None:
    grouped = GroupedPipelines(client)
    assert grouped.execute(lambda pipe: (pipe.set("x", "1"), pipe.get("x"))) == [True, b"1"]
    assert grouped.execute(lambda pipe: pipe.get("x")) == [b"1"]
    assert client.rounds == [2, 0]
    client.set("text", "not a number")
    with pytest.raises(redis.ResponseError):
        grouped.execute(lambda pipe: pipe.incr("text"))
    assert grouped.execute(lambda pipe: pipe.incr("n")) == [1]  # the client is still in step
