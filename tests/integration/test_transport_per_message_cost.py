"""The crash-safe transport's per-message Redis work (session 3 of issue 12), on a real redis-server:
a delivered message is recorded as unacked and off the consumer's in-flight list by the time the
consumer sees it (one MULTI/EXEC), and consuming builds no redis.Redis per message."""

from __future__ import annotations

import time

import pytest
import redis
from kombu import Connection, Exchange, Queue

from shelfsight.shared.celery_app import CRASH_SAFE_REDIS_TRANSPORT
from shelfsight.shared.settings import Settings

MESSAGES = 20


def test_each_message_is_unacked_and_off_the_inflight_list_when_delivered(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, queue = settings.broker_url, "cost"
    exchange = Exchange(queue, "direct")
    with Connection(url) as conn:
        producer = conn.Producer()
        for i in range(MESSAGES):
            producer.publish({"n": i}, exchange=exchange, routing_key=queue, serializer="json",
                             declare=[Queue(queue, exchange, routing_key=queue)])
    client = redis.Redis.from_url(url)
    built = {"n": 0}
    original_init = redis.Redis.__init__

    def counting_init(self: redis.Redis, *args: object, **kwargs: object) -> None:
        built["n"] += 1
        original_init(self, *args, **kwargs)  # type: ignore[arg-type]

    seen: list[tuple[int, bool, int]] = []
    with Connection(url, transport=CRASH_SAFE_REDIS_TRANSPORT) as conn:
        channel = conn.default_channel
        inflight = channel._inflight_list(queue)

        def on_message(body: dict, message) -> None:  # type: ignore[no-untyped-def]
            tag = message.delivery_tag
            seen.append((body["n"], client.hexists("unacked", tag), client.llen(inflight)))
            message.ack()

        with conn.Consumer(Queue(queue, exchange, routing_key=queue), callbacks=[on_message], accept=["json"]):
            conn.drain_events(timeout=5)  # the first: clients and pools built here
            monkeypatch.setattr(redis.Redis, "__init__", counting_init)
            deadline = time.monotonic() + 30
            while len(seen) < MESSAGES and time.monotonic() < deadline:
                conn.drain_events(timeout=5)
    assert sorted(n for n, _, _ in seen) == list(range(MESSAGES))
    assert all(unacked and held == 0 for _, unacked, held in seen), seen  # recorded, and not in flight
    assert built["n"] <= 1, f"{built['n']} redis.Redis built for {MESSAGES - 1} messages"
    assert client.hlen("unacked") == 0 and client.llen(queue) == 0


def test_a_burst_is_popped_and_recorded_in_batches_of_the_free_prefetch_slots(settings: Settings) -> None:
    """With messages waiting, one pop takes as many as the consumer has room for and records them
    as unacked in the same atomic step: each is unacked and never in flight when delivered, a
    burst of 40 with prefetch 8 takes a handful of pops, and everything acked leaves nothing."""
    url, queue = settings.broker_url, "burst"
    exchange = Exchange(queue, "direct")
    with Connection(url) as conn:
        producer = conn.Producer()
        for i in range(40):
            producer.publish({"n": i}, exchange=exchange, routing_key=queue, serializer="json",
                             declare=[Queue(queue, exchange, routing_key=queue)])
    client = redis.Redis.from_url(url)
    seen: list[tuple[int, bool, int, int]] = []
    pops = {"n": 0}
    with Connection(url, transport=CRASH_SAFE_REDIS_TRANSPORT) as conn:
        channel = conn.default_channel
        inflight = channel._inflight_list(queue)
        original_start = channel._brpop_start

        def counting_start(*args: object, **kwargs: object) -> None:
            pops["n"] += 1
            original_start(*args, **kwargs)  # type: ignore[arg-type]

        channel._brpop_start = counting_start  # type: ignore[method-assign]
        pending: list = []

        def on_message(body: dict, message) -> None:  # type: ignore[no-untyped-def]
            seen.append((body["n"], client.hexists("unacked", message.delivery_tag), client.llen(inflight),
                         len(channel.qos._delivered)))
            pending.append(message)
            if len(pending) == 8:  # the consumer's slots are full: ack them, as threads finish
                for held in pending:
                    held.ack()
                pending.clear()

        consumer = conn.Consumer(Queue(queue, exchange, routing_key=queue), callbacks=[on_message],
                                 accept=["json"])
        consumer.qos(prefetch_count=8)
        with consumer:
            deadline = time.monotonic() + 30
            while len(seen) < 40 and time.monotonic() < deadline:
                conn.drain_events(timeout=5)
        for held in pending:
            held.ack()
    assert sorted(n for n, _, _, _ in seen) == list(range(40))
    assert [n for n, _, _, _ in seen] == list(range(40))  # in queue order
    assert all(unacked and held == 0 for _, unacked, held, _ in seen), seen
    assert max(slots for _, _, _, slots in seen) <= 8  # never more than the prefetch allows
    assert pops["n"] <= 12, pops  # 40 messages, 8 per pop: not one pop per message
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0 and client.llen(queue) == 0


def test_acks_on_the_event_loops_thread_are_written_together_and_flushed_on_close(settings: Settings) -> None:
    """Celery's consumer acks on its event loop's thread: the prefetch slot frees at once, the
    unacked records go in one round trip when the loop next turns (here: flush_acks by hand),
    and a close writes what is pending. An ack from another thread is written at once."""
    import threading
    from types import SimpleNamespace

    url, queue = settings.broker_url, "acks"
    exchange = Exchange(queue, "direct")
    with Connection(url) as conn:
        for i in range(4):
            conn.Producer().publish({"n": i}, exchange=exchange, routing_key=queue, serializer="json",
                                    declare=[Queue(queue, exchange, routing_key=queue)])
    client = redis.Redis.from_url(url)
    held: list = []
    with Connection(url, transport=CRASH_SAFE_REDIS_TRANSPORT) as conn:
        conn.transport.ack_loop = SimpleNamespace(_loop_thread=threading.get_ident())  # this thread runs "the loop"
        channel = conn.default_channel
        with conn.Consumer(Queue(queue, exchange, routing_key=queue), callbacks=[lambda body, m: held.append(m)],
                           accept=["json"]):
            deadline = time.monotonic() + 10
            while len(held) < 4 and time.monotonic() < deadline:
                conn.drain_events(timeout=2)
        assert client.hlen("unacked") == 4
        held[0].ack()
        held[1].ack()
        assert client.hlen("unacked") == 4  # deferred...
        assert len(channel.qos._delivered) - len(channel.qos._dirty) == 2  # ...but the slots are free
        zrem_before = client.info("commandstats").get("cmdstat_zrem", {}).get("calls", 0)
        conn.transport.flush_acks()
        assert client.hlen("unacked") == 2 and client.zcard("unacked_index") == 2
        assert client.info("commandstats")["cmdstat_zrem"]["calls"] == zrem_before + 1  # one ZREM for both
        other = threading.Thread(target=held[2].ack)
        other.start()
        other.join()
        assert client.hlen("unacked") == 1  # another thread: at once
        held[3].ack()
        assert client.hlen("unacked") == 1
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0  # the close wrote it
