"""Issue 8: the chaos benchmark at the suite's size (bench/chaos.py --ci).

Real redis-server (AOF), moto S3 behind the fault proxy, two `shelfsight worker` processes;
120 events (good images in two categories, one of each of 32 kinds of bad input); one kill -9
(the worker is restarted), one Redis restart, 6 s of S3 faults (503, resets, slow responses,
403). Every event must end as exactly one result or dead letter, good images never with a
permanent code, bad inputs with the code each one deserves.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"


def _chaos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("shelfsight_bench_chaos", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_event_is_accounted_for_under_kills_a_redis_restart_and_s3_faults() -> None:
    chaos = _chaos()
    summary = chaos.run(chaos.CI, seed=8)
    details = summary["details"]
    assert summary["events"] == chaos.CI.events
    assert (summary["lost"], summary["double_outcome"], summary["wrong_dead_letters"]) == (0, 0, 0), details
    assert summary["results"] + summary["dead_letters"] == summary["events"]
    assert summary["worker_kills"] == 1 and summary["redis_restarts"] == 1 and summary["s3_fault_s"] > 0
    assert details["bad_kinds"] >= 25 and not details["unexpected_codes"] and not details["bad_with_result"]
    assert all(details["proxy_requests"].get(mode, 0) > 0 for mode in ("error_503", "reset", "deny"))
    if summary["max_recovery_s"] is not None:  # the victim's in-flight events came back in time
        assert summary["max_recovery_s"] <= details["recovery_bound_s"]
