"""Run a block of torch ops on the calling thread alone, leaving every other thread as it was.

Torch's CPU ops split work over its intra-op OpenMP team (`torch.get_num_threads()`, all
cores by default). That suits one big op (a model forward in a batcher lane) and hurts many
small ones run from many threads at once: the extraction worker preprocesses each image in its
own Celery task thread, and a 224 px resize split over an OpenMP team of 2 took 1.7 ms of CPU
in all (the team's threads spin waiting for work) for the same wall time as 0.87 ms on one
thread (docs/performance.md). `torch.set_num_threads(1)` would also slow the model: it is
process-wide. OpenMP's team size, though, is a per-thread setting (an ICV): this sets it for
the calling thread only, for the length of a block.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import torch


@lru_cache(maxsize=1)
def _openmp() -> tuple[Any, Any] | None:
    """(omp_set_num_threads, omp_get_max_threads) of the OpenMP runtime torch loaded, or None
    (a build without OpenMP, or a runtime not visible to this process's global symbols)."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:  # PyDLL: the calls keep the GIL (CDLL would give it up and wait for it back around each one)
        process = ctypes.PyDLL(None)
        setter, getter = process.omp_set_num_threads, process.omp_get_max_threads
    except (AttributeError, OSError):
        return None
    setter.argtypes, setter.restype = [ctypes.c_int], None
    getter.argtypes, getter.restype = [], ctypes.c_int
    return setter, getter


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Torch ops in this block run on the calling thread only; other threads keep their team."""
    omp = _openmp()
    if omp is None:
        yield
        return
    setter, getter = omp
    torch.get_num_threads()  # torch sets each thread's team size lazily, once: let it, then override
    previous = getter()
    setter(1)
    try:
        yield
    finally:
        setter(previous)
