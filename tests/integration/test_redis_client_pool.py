"""The shared Redis client under more threads than connections (the extraction worker runs 512
threads on a GPU): threads wait for a free connection; none is refused, and the process never
opens more than `redis_max_connections`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import redis

from shelfsight.shared.settings import Settings
from shelfsight.shared.streams import RedisStreamPublisher, redis_client

THREADS = 24


def test_more_threads_than_connections_wait_for_one_instead_of_failing(settings: Settings) -> None:
    small = settings.model_copy(update={"redis_max_connections": 3})
    client = redis_client(small)
    publisher = RedisStreamPublisher(client, 1000)
    stream = "pool-test"

    def hold_then_publish(i: int) -> str:
        client.blpop([f"pool-test-nothing-{i}"], timeout=0.2)  # holds a connection 0.2 s server-side
        return publisher.publish(stream, {"n": i})

    with ThreadPoolExecutor(THREADS) as pool:
        ids = list(pool.map(hold_then_publish, range(THREADS)))
    assert len(set(ids)) == THREADS and client.xlen(stream) == THREADS
    pool_state = client.connection_pool
    assert isinstance(pool_state, redis.BlockingConnectionPool)
    assert len(pool_state._connections) <= 3  # what the process opened

    # redis-py's default pool (what the worker had) refuses past its limit instead of waiting
    refusing = redis.Redis.from_url(settings.broker_url, max_connections=3)
    errors = []

    def hold(i: int) -> None:
        try:
            refusing.blpop([f"pool-test-nothing-{i}"], timeout=0.2)
        except redis.exceptions.ConnectionError as exc:  # MaxConnectionsError is one
            errors.append(exc)

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(hold, range(THREADS)))
    assert errors
