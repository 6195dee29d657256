#!/usr/bin/env python
"""Celery's own CPU per message on the extraction worker's configuration: the floor under the
worker's per-image plumbing (docs/performance.md, issue 12).

A no-op task with the extract task's options (`ignore_result`, the `ExtractRequest` without
`task-started`, any arguments) on an app from `create_celery_app` (threads pool, `acks_late`,
the crash-safe Redis transport, task events on unless --no-events), `--concurrency` threads, a
real redis-server, consuming the extract and backfill queues as the worker does. N messages with
an upload event's size are enqueued; the CPU of the worker's threads (the consumer and the task
threads; not the bench's main thread) is divided by N. With --baseline [s7|s4|s3], bursts alternate
with session 7's task event groups (the default), session 4's transport savings, or session 3's
and 4's switched off.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/_throughput_floor.py --baseline
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _plumbing_baselines import BASELINES
from _throughput_harness import CpuMeter, plumbing_by_component, say, services


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--no-events", action="store_true", help="worker_send_task_events off (all task events)")
    p.add_argument("--baseline", nargs="?", const="s7", default=None, choices=("s3", "s4", "s7"),
                   help="interleave bursts with session 7's task event groups off (default), or session "
                        "4's transport savings, or session 3's and 4's")
    args = p.parse_args()
    from celery.contrib.testing.worker import start_worker

    from shelfsight.shared.celery_app import create_celery_app
    from shelfsight.shared.settings import Settings
    from shelfsight.worker.consumer import use_extraction_consumer

    with tempfile.TemporaryDirectory() as tmp, services(Path(tmp), "standin", 1) as svc:
        settings = Settings(broker_url=f"{svc.redis_url}/3", result_backend=f"{svc.redis_url}/3")
        app = create_celery_app(settings)
        use_extraction_consumer(app, settings)  # the extraction worker's consumer and task event groups
        app.conf.worker_send_task_events = not args.no_events
        done = {"n": 0}

        @app.task(name="bench.noop", ignore_result=True, typing=False,
                  Request="shelfsight.worker.task_request:ExtractRequest")
        def noop(*_args: Any, **_kwargs: Any) -> None:
            done["n"] += 1

        app.conf.task_routes = {"bench.noop": {"queue": settings.extract_queue}}
        event = {"event_id": "0" * 32, "product_id": "p", "category": "tops", "image": "s3://bucket/uploads/tops/p.jpg",
                 "submitted_at": "2026-11-27T12:00:00+00:00"}
        results: dict[bool, list[float]] = {False: [], True: []}
        with start_worker(app, pool="threads", concurrency=args.concurrency, queues=[settings.extract_queue, settings.backfill_queue],
                          perform_ping_check=False, loglevel="WARNING"):
            baseline_off = BASELINES[args.baseline or "s7"]  # without a baseline, only its `on=False` is used
            order = [False, True] if args.baseline else [False]
            for repeat in range(args.repeats):
                for baseline in (order if repeat % 2 == 0 else order[::-1]):  # A B, B A: drift favours neither
                    with baseline_off(baseline, None):
                        done["n"] = 0
                        for _ in range(50):  # warm: every thread started, clients built
                            noop.delay(event)
                        while done["n"] < 50:
                            time.sleep(0.05)
                        done["n"] = 0
                        signatures = [noop.s(event) for _ in range(args.messages)]
                        meter = CpuMeter({"redis_server": svc.redis.pid})
                        meter.start()
                        for signature in signatures:
                            signature.delay()
                        while done["n"] < args.messages:
                            time.sleep(0.02)
                        time.sleep(0.5)  # the last acks
                        by_kind = plumbing_by_component(meter.stop(), args.messages)
                    results[baseline].append(sum(by_kind.values()))
                    say(f"{'before' if baseline else 'after '}: {sum(by_kind.values()):.2f} ms of worker CPU per "
                        f"message {by_kind}; load {os.getloadavg()[0]:.1f}")
        for baseline, runs in results.items():
            if runs:
                say(f"{'before' if baseline else 'after'}: median {statistics.median(runs):.2f} ms per message")
        print(json.dumps({"bench": "throughput_floor", "messages": args.messages, "baseline": args.baseline,
                          "ms_per_message": [round(r, 3) for r in results[False]],
                          "ms_per_message_baseline": [round(r, 3) for r in results[True]],
                          "median_ms_per_message": round(statistics.median(results[False]), 3)}))


if __name__ == "__main__":
    main()
