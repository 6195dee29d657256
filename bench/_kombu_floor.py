#!/usr/bin/env python
"""What a bulk consumer could save: the CPU per message of consuming extract messages with kombu
alone, against Celery's floor (bench/_throughput_floor.py) on the same messages.

The same Celery task messages (sent with the extract task's options to the extract queue) are
consumed with the crash-safe transport, prefetch 64, one consumer thread draining the broker and
`--concurrency` threads that decode each message's body and hand its delivery tag back; the
consumer thread acks the handed-back tags once per loop turn, as the transport's deferred acks
do. No task events, no Celery request, no tracer: the per-message work a bulk consumer would
keep. Worker CPU (the consumer and the pool threads; not the main thread) divided by N.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/_kombu_floor.py --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from _throughput_harness import CpuMeter, plumbing_by_component, say, services


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    from kombu import Connection, Queue

    from shelfsight.shared.celery_app import (
        CRASH_SAFE_REDIS_TRANSPORT,
        EXTRACT_TASK,
        create_celery_app,
    )
    from shelfsight.shared.settings import Settings

    event = {"event_id": "0" * 32, "product_id": "p", "category": "tops", "image": "s3://bucket/uploads/tops/p.jpg",
             "submitted_at": "2026-11-27T12:00:00+00:00"}
    runs: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, services(Path(tmp), "standin", 1) as svc:
        settings = Settings(broker_url=f"{svc.redis_url}/3", result_backend=f"{svc.redis_url}/3")
        app = create_celery_app(settings)
        done = {"n": 0}
        acked: queue.SimpleQueue[Any] = queue.SimpleQueue()

        def work(message: Any) -> None:
            body = message.decode()  # what a task would get: args, kwargs, embed
            if body[0][0]["event_id"] != event["event_id"]:
                raise AssertionError("unexpected body")
            acked.put(message)

        pool = ThreadPoolExecutor(args.concurrency)
        with Connection(settings.broker_url, transport=CRASH_SAFE_REDIS_TRANSPORT,
                        transport_options=app.conf.broker_transport_options) as conn:
            channel = conn.channel()
            channel.basic_qos(0, 64, False)
            consumer = conn.Consumer(Queue(settings.extract_queue), channel=channel,
                                     callbacks=[lambda _body, message: pool.submit(work, message)], accept=["json"])
            consumer.consume()
            stop = threading.Event()

            def consume() -> None:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=0.05)
                    while True:
                        try:
                            message = acked.get_nowait()
                        except queue.Empty:
                            break
                        message.ack()
                        done["n"] += 1
                    conn.transport.flush_acks()

            thread = threading.Thread(target=consume, name="consumer", daemon=True)
            thread.start()
            conn.transport.ack_loop = SimpleNamespace(_loop_thread=thread.ident)  # acks on this thread are deferred
            for repeat in range(args.repeats + 1):  # the first is the warm-up
                n = 50 if repeat == 0 else args.messages
                signatures = [app.signature(EXTRACT_TASK, args=(event,), queue=settings.extract_queue,
                                            ignore_result=True) for _ in range(n)]
                done["n"] = 0
                meter = CpuMeter({"redis_server": svc.redis.pid})
                meter.start()
                for signature in signatures:
                    signature.apply_async()
                while done["n"] < n:
                    time.sleep(0.02)
                by_kind = plumbing_by_component(meter.stop(), n)
                if repeat:
                    runs.append(sum(by_kind.values()))
                    say(f"kombu alone: {sum(by_kind.values()):.2f} ms of worker CPU per message {by_kind}")
            stop.set()
            thread.join(timeout=5)
            pool.shutdown()
    say(f"kombu alone: median {statistics.median(runs):.2f} ms per message")
    print(json.dumps({"bench": "kombu_floor", "messages": args.messages, "ms_per_message": runs,
                      "median_ms_per_message": round(statistics.median(runs), 3)}))


if __name__ == "__main__":
    main()
