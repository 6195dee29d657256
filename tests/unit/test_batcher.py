"""Micro-batcher: per-category batches, size and wait bounds, failures isolated."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from shelfsight.worker.batcher import MicroBatcher


class Recorder:
    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[tuple[str, list]] = []
        self.gate = gate
        self.lock = threading.Lock()

    def __call__(self, category, items):
        if self.gate is not None:
            self.gate.wait(5)
        payloads = [i.payload for i in items]
        if "poison" in payloads:
            raise ValueError("poison in batch")
        with self.lock:
            self.batches.append((category, payloads))
        return [(category, p, len(items)) for p in payloads]


def test_batches_fill_up_to_max_and_never_mix_categories() -> None:
    gate = threading.Event()
    runner = Recorder(gate)
    batcher = MicroBatcher(runner, max_batch=4, max_wait_s=5.0)
    futures = [batcher.submit("tops" if i % 2 else "pans", i) for i in range(16)]
    gate.set()  # first batch was taken while the rest queued up
    results = [f.result(timeout=10) for f in futures]
    batcher.close()
    assert [r[1] for r in results] == list(range(16))  # each caller gets its own output
    assert all(len(p) <= 4 for _, p in runner.batches)
    for category, payloads in runner.batches:
        assert all(("tops" if p % 2 else "pans") == category for p in payloads)
    assert max(len(p) for _, p in runner.batches) == 4  # batching happened


def test_a_lone_item_waits_at_most_max_wait() -> None:
    runner = Recorder()
    batcher = MicroBatcher(runner, max_batch=64, max_wait_s=0.02)
    # with max_batch 64 and one item, only the wait bound can release it
    assert batcher.run("pans", "x", timeout=2.0) == ("pans", "x", 1)
    batcher.close()


def test_poison_item_fails_alone() -> None:
    gate = threading.Event()
    runner = Recorder(gate)
    batcher = MicroBatcher(runner, max_batch=8, max_wait_s=0.05)
    futures = {p: batcher.submit("pans", p) for p in ["a", "b", "poison", "c"]}
    gate.set()
    with pytest.raises(ValueError, match="poison"):
        futures["poison"].result(timeout=5)
    assert {p: futures[p].result(timeout=5)[1] for p in "abc"} == {"a": "a", "b": "b", "c": "c"}
    batcher.close()


def test_many_threads_concurrently_each_get_their_own_answer() -> None:
    batcher = MicroBatcher(Recorder(), max_batch=8, max_wait_s=0.01, lanes=2)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: batcher.run("tops", i, timeout=10), range(200)))
    batcher.close()
    assert [r[1] for r in results] == list(range(200))
    assert max(r[2] for r in results) > 1


def test_close_drains_queue_and_rejects_new_work() -> None:
    gate = threading.Event()
    batcher = MicroBatcher(Recorder(gate), max_batch=100, max_wait_s=60)
    future = batcher.submit("tops", 1)
    gate.set()
    batcher.close()  # overdue-on-close: the queued item is run, not dropped
    assert future.result(timeout=1) == ("tops", 1, 1)
    with pytest.raises(RuntimeError):
        batcher.submit("tops", 2)
