#!/usr/bin/env python
"""Where a Celery task thread's CPU goes, per image, by stage: `bench/throughput.py` run in this
process with thread-CPU counters around the stages of the extraction path.

Each wrapped function adds `time.thread_time()` spent inside it, on the task threads only, to its
stage; the report divides by the events processed. Stages nest (`process` holds the rest;
`_write_result` holds the PUT, the dead-letter check and the stream round trip), so the rows
do not add up to the total. The counters themselves cost a few microseconds per call.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/task_probe.py --quick --processes "" --skip-naive \
        --paced-images 0 --repeats 1

Arguments go to bench/throughput.py unchanged. Its progress and JSON come out as usual; the
probe's table goes to stderr, and its JSON is the last line of stdout ({"task_probe_ms_per_img": ...}).
"""

from __future__ import annotations

import atexit
import collections
import functools
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput

from shelfsight.shared import framing, streams
from shelfsight.worker import batcher, delivery, extractor, s3_light

_spent: collections.Counter[str] = collections.Counter()
_calls: collections.Counter[str] = collections.Counter()
_lock = threading.Lock()
TOTAL = "process (the whole event)"


def _probe(owner: Any, name: str, stage: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def probed(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            if threading.current_thread().name.startswith("ThreadPoolExecutor"):  # celery's task threads
                spent = time.thread_time() - started
                with _lock:
                    _spent[stage] += spent
                    _calls[stage] += 1

    setattr(owner, name, probed)


_ORDER: list[str] = []


def _install() -> None:
    import celery.concurrency.base as celery_pool

    service = extractor.ExtractionService
    for owner, name, stage in (
        (celery_pool, "apply_target", "celery apply_target (task + trace + ack)"),
        (service, "process", TOTAL),
        (service, "parse_event", "parse event"),
        (delivery.RedisDeliveryTracker, "begin", "redis: delivery begin"),
        (delivery.RedisDeliveryTracker, "finished", "redis: dead-letter check"),
        (delivery.RedisDeliveryTracker, "finish", "redis: delivery finish (own round trip)"),
        (s3_light.LightS3ObjectStore, "get", "s3 GET image"),
        (service, "prepare", "decode + preprocess"),
        (extractor, "decode_rgb", "  decode"),
        (framing, "preprocess_array", "  preprocess"),
        (batcher.MicroBatcher, "run", "batcher hand-off and wait"),
        (service, "_record", "result record"),
        (service, "_write_result", "write result (all)"),
        (s3_light.LightS3ObjectStore, "put", "  s3 PUT result"),
        (streams.RedisStreamPublisher, "publish_many", "  redis: stream entries (+ outcome)"),
    ):
        _probe(owner, name, stage)
        _ORDER.append(stage)


def _report() -> None:
    events = _calls[TOTAL]
    if not events:
        return
    table = {stage: round(1000 * _spent[stage] / events, 3) for stage in _ORDER if _calls[stage]}
    for stage, ms in table.items():
        print(f"[task_probe] {stage:45s} {ms:7.3f} ms/image ({_calls[stage]} calls)", file=sys.stderr)
    print(json.dumps({"task_probe_ms_per_img": table, "events": events}))


if __name__ == "__main__":
    _install()
    atexit.register(_report)
    try:
        code = throughput.main(sys.argv[1:])
    finally:
        throughput.cleanup_children()
    sys.exit(code)
