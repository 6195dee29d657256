#!/usr/bin/env python
"""Where a Celery task thread's CPU goes, per image, by stage: `bench/throughput.py` run in this
process with thread-CPU counters around the stages of the extraction path.

Each wrapped function adds `time.thread_time()` spent inside it, within a Celery task only (not
the bench's own threads that read the results back), to its stage; the report divides by the
events processed. Stages nest (`process` holds the rest;
`ResultWriter.write` holds the PUT, the dead-letter check and the stream round trip), so the rows
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
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput

from shelfsight.shared import framing, streams
from shelfsight.worker import batcher, delivery, extractor, metrics, model_cache, s3_light

_spent: collections.Counter[str] = collections.Counter()
_waits: collections.Counter[str] = collections.Counter()  # the thread's voluntary context switches (it blocked)
_preempted: collections.Counter[str] = collections.Counter()  # involuntary ones (the kernel took the core)
_calls: collections.Counter[str] = collections.Counter()
_lock = threading.Lock()
TOTAL = "process (the whole event)"


_in_task = threading.local()


def _probe(owner: Any, name: str, stage: str, *, task: bool = False) -> bool:
    """Count `owner.name`'s thread CPU under `stage` when it runs inside a Celery task (`task`: it
    is the task's own entry point). False if there is no such function (an older worker)."""
    original = getattr(owner, name, None)
    if original is None:
        return False

    @functools.wraps(original)
    def probed(*args: Any, **kwargs: Any) -> Any:
        counted = task or getattr(_in_task, "on", False)  # not the bench's own reader threads
        if task:
            _in_task.on = True
        started, switches = time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD)
        try:
            return original(*args, **kwargs)
        finally:
            if task:
                _in_task.on = False
            if counted:
                spent, now = time.thread_time() - started, resource.getrusage(resource.RUSAGE_THREAD)
                with _lock:
                    _spent[stage] += spent
                    _calls[stage] += 1
                    _waits[stage] += now.ru_nvcsw - switches.ru_nvcsw
                    _preempted[stage] += now.ru_nivcsw - switches.ru_nivcsw

    setattr(owner, name, probed)
    return True


_ORDER: list[str] = []


def _install() -> None:
    import celery.concurrency.base as celery_pool

    service = extractor.ExtractionService
    writer = getattr(extractor, "ResultWriter", service)  # before session 8 the service wrote results itself
    _probe(celery_pool, "apply_target", "celery apply_target (task + trace + ack)", task=True)
    _ORDER.append("celery apply_target (task + trace + ack)")
    for owner, name, stage in (
        (service, "process", TOTAL),
        (service, "parse_event", "parse event"),
        (service, "_extract", "extract (after begin, before the outcome's bookkeeping)"),
        (model_cache.ModelCache, "get", "  model lookup"),
        (delivery.RedisDeliveryTracker, "begin", "redis: delivery begin"),
        (delivery.RedisDeliveryTracker, "finished", "redis: dead-letter check"),
        (delivery.RedisDeliveryTracker, "finished_many", "redis: dead-letter check"),  # per batch, first asker
        (delivery.RedisDeliveryTracker, "finish", "redis: delivery finish (own round trip)"),
        (s3_light.LightS3ObjectStore, "get", "s3 GET image"),
        (service, "prepare", "decode + preprocess"),
        (extractor, "decode_rgb", "  decode"),
        (extractor, "decode_image", "  decode"),  # before session 5
        (framing, "preprocess_array", "  preprocess"),
        (framing, "preprocess_pil", "  preprocess"),  # before session 5 (now it calls preprocess_array)
        (batcher.MicroBatcher, "run", "batcher hand-off and wait"),
        (extractor, "open_header", "  image header"),
        (service, "_record", "result record"),
        (metrics, "observe_confidences", "metrics: confidences"),
        (writer, "write" if writer is not service else "_write_result", "write result (all)"),
        (s3_light.LightS3ObjectStore, "put", "  s3 PUT result"),
        (streams.RedisStreamPublisher, "publish_many", "  redis: stream entries (+ outcome)"),
        (writer, "announce" if writer is not service else "_announce", "  announce (entries, outcome, fallbacks)"),
    ):
        if _probe(owner, name, stage) and stage not in _ORDER:
            _ORDER.append(stage)


def _report() -> None:
    events = _calls[TOTAL]
    if not events:
        return
    table = {stage: round(1000 * _spent[stage] / events, 3) for stage in _ORDER if _calls[stage]}
    waits = {stage: round(_waits[stage] / events, 2) for stage in table}
    preempted = {stage: round(_preempted[stage] / events, 2) for stage in table}
    for stage, ms in table.items():
        print(f"[task_probe] {stage:45s} {ms:7.3f} ms/image, {waits[stage]:6.2f} waits and {preempted[stage]:5.2f} "
              f"preemptions per image ({_calls[stage]} calls)", file=sys.stderr)
    print(json.dumps({"task_probe_ms_per_img": table, "task_probe_waits_per_img": waits,
                      "task_probe_preemptions_per_img": preempted, "events": events}))


if __name__ == "__main__":
    _install()
    atexit.register(_report)
    try:
        code = throughput.main(sys.argv[1:])
    finally:
        throughput.cleanup_children()
    sys.exit(code)
