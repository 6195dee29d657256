"""Shared by both tiers: no test may reach a model hub; no test inherits another's warnings hook."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models on a small box: torch's per-op thread pool mostly spins and competes with the
# other process of a test (worker, subprocess). One thread per process halves the suite's CPU
# time; set OMP_NUM_THREADS to override. (Before anything imports torch.)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _release_captured_warnings() -> Iterator[None]:
    """configure_logging routes warnings into logging (logging.captureWarnings). pytest swaps
    warnings.showwarning around every test, so after the first test logging would believe its hook
    is still installed and a later configure_logging would not reinstall it: release it each time."""
    yield
    logging.captureWarnings(False)
