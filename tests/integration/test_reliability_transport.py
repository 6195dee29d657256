"""Issue 8 on a real redis-server: a consumer that dies right after popping a message loses nothing.

kombu's Redis transport BRPOPs a message and only then records it as unacked; a consumer killed in
between (a SIGKILLed worker takes tens of milliseconds to die, its sockets open to the end) loses
it for good. The chaos benchmark hit this in most runs. shelfsight's transport pops into a
per-consumer in-flight list instead, and puts back what a dead consumer held.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import redis
from kombu import Connection, Exchange, Queue

from shelfsight.shared.celery_app import CRASH_SAFE_REDIS_TRANSPORT
from shelfsight.shared.settings import Settings
from tests.helpers import wait_for

KOMBU_REDIS = "kombu.transport.redis:Transport"

# A consumer process that dies the instant a message reaches it, before kombu records it anywhere.
DYING_CONSUMER = textwrap.dedent("""
    import os, sys
    from kombu import Connection, Queue
    from kombu.transport import virtual
    virtual.Transport._deliver = lambda self, message, queue: os._exit(9)  # popped, then killed
    with Connection(sys.argv[1], transport=sys.argv[2], transport_options={"inflight_alive_s": 2}) as conn:
        with conn.Consumer(Queue(sys.argv[3]), callbacks=[lambda body, message: None], accept=["json"]):
            while True:
                conn.drain_events(timeout=30)
""")


def _publish(url: str, queue: str, body: dict) -> None:
    with Connection(url) as conn:
        conn.Producer().publish(body, exchange=Exchange(queue, "direct"), routing_key=queue,
                                declare=[Queue(queue, Exchange(queue, "direct"), routing_key=queue)],
                                serializer="json")


def _die_on_first_message(url: str, transport: str, queue: str) -> int:
    proc = subprocess.Popen([sys.executable, "-c", DYING_CONSUMER, url, transport, queue])
    time.sleep(1.5)  # it is blocked in its pop
    _publish(url, queue, {"event": f"{queue}-1"})
    return proc.wait(timeout=60)


def _received(url: str, transport: str, queue: str, timeout_s: float) -> list[dict]:
    got: list[dict] = []
    with Connection(url, transport=transport, transport_options={"inflight_alive_s": 2}) as conn:
        def on_message(body: dict, message) -> None:
            got.append(body)
            message.ack()

        with conn.Consumer(Queue(queue, Exchange(queue, "direct"), routing_key=queue), callbacks=[on_message],
                           accept=["json"]):
            deadline = time.monotonic() + timeout_s
            while not got and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=1)
                except TimeoutError:
                    # kombu's restore sweep runs on the event loop; drain_events is the sync path
                    conn.default_channel.qos.restore_visible(num=10, interval=1)
    return got


def test_kombus_own_transport_loses_a_message_popped_by_a_consumer_that_dies(settings: Settings) -> None:
    """The hazard, shown: this is why shelfsight does not use kombu's Redis transport as is."""
    url = settings.broker_url
    assert _die_on_first_message(url, KOMBU_REDIS, "plain") == 9
    client = redis.Redis.from_url(url)
    assert client.llen("plain") == 0 and client.hlen("unacked") == 0  # gone: nowhere in Redis


def test_a_message_popped_by_a_consumer_that_dies_comes_back(settings: Settings) -> None:
    url = settings.broker_url
    assert _die_on_first_message(url, CRASH_SAFE_REDIS_TRANSPORT, "safe") == 9
    client = redis.Redis.from_url(url)
    held = [k for k in client.keys("shelfsight:inflight:safe:*") if client.type(k) == b"list"]
    assert len(held) == 1 and client.llen(held[0]) == 1  # in the dead consumer's in-flight list
    # once its heartbeat has expired, the next consumer's sweep puts the message back and takes it
    got = _received(url, CRASH_SAFE_REDIS_TRANSPORT, "safe", timeout_s=30)
    assert got == [{"event": "safe-1"}]
    wait_for(lambda: client.llen(held[0]) == 0 and client.hlen("unacked") == 0, timeout=10)


def test_the_crash_safe_transport_is_what_celery_uses(settings: Settings) -> None:
    from shelfsight.shared.celery_app import create_celery_app

    assert create_celery_app(settings).conf.broker_transport == CRASH_SAFE_REDIS_TRANSPORT
    with create_celery_app(settings).connection_for_read() as conn:
        assert type(conn.transport).__module__ == "shelfsight.shared.redis_transport"


def test_an_extraction_workers_sweep_never_restores_a_running_training(settings: Settings) -> None:
    """One visibility timeout per kind: the trainer's unacked messages live in their own index."""
    from shelfsight.shared.celery_app import broker_transport_options

    short = settings.model_copy(update={"visibility_timeout_s": 1, "training_visibility_timeout_s": 1})
    url = settings.broker_url
    _publish(url, "training", {"task": "a multi-hour training"})
    client = redis.Redis.from_url(url)
    with Connection(url, transport=CRASH_SAFE_REDIS_TRANSPORT,
                    transport_options=broker_transport_options(settings, "training")) as trainer:
        held: list[object] = []
        with trainer.Consumer(Queue("training", Exchange("training", "direct"), routing_key="training"),
                              callbacks=[lambda body, message: held.append(message)], accept=["json"]):
            trainer.drain_events(timeout=10)  # taken, running, not acked
        assert held and client.llen("training") == 0
        time.sleep(1.5)  # past the (shortened) extraction visibility timeout
        with Connection(url, transport=CRASH_SAFE_REDIS_TRANSPORT,
                        transport_options=broker_transport_options(short, "extract")) as extraction:
            extraction.default_channel.qos.restore_visible(num=10, interval=1)
        assert client.llen("training") == 0  # old code: one "unacked" hash, restored as if lost
        with Connection(url, transport=CRASH_SAFE_REDIS_TRANSPORT,
                        transport_options=broker_transport_options(short, "training")) as other_trainer:
            other_trainer.default_channel.qos.restore_visible(num=10, interval=1)
        assert client.llen("training") == 1  # the training index's own timeout does apply
