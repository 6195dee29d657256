#!/usr/bin/env python
"""Chaos benchmark: real processes on loopback, faults injected while events flow, then every
event sent is accounted for.

What runs (nothing in this process but the producer, the fault proxy and the bookkeeping):
- `redis-server` with AOF (`appendfsync always`), the broker and the streams;
- the moto S3 server (`moto_server`), behind a fault-injecting HTTP proxy (shelfsight.shared.dev.faults)
  that this bench drives: 503s, connection resets, responses slower than the client's timeout,
  403 AccessDenied;
- N extraction workers started as an operator starts them: `python -m shelfsight.shared.cli worker`;
- the trainer (`python -m shelfsight.shared.cli trainer`), given one training run mid-benchmark.

While the events are sent (good images of two categories, and more than 25 kinds of bad input),
it kill -9s workers (and restarts them), restarts redis-server (SIGKILL, then the same AOF),
injects S3 faults for a while, and promotes a new model mid-run and then rolls it back (with the
operator's CLI). When all is quiet it reads every result and dead-letter record from S3 and
matches them to what was sent.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/chaos.py --quick   # this 2-core VM: about 4-6 min

The LAST line of stdout is one JSON object:
  events, results, dead_letters, lost, double_outcome, wrong_dead_letters, worker_kills,
  redis_restarts, s3_fault_s, max_recovery_s, p95_latency_ms (+ details).
- lost: events with neither a result nor a dead letter; double_outcome: events with both;
- wrong_dead_letters: good images dead-lettered with a non-transient code;
- max_recovery_s: for each kill, the longest time from the kill to the outcome of an event the
  broker held unacked at that moment (the victim's in-flight work), the max over kills.
Exit status 0 only when lost == double_outcome == wrong_dead_letters == 0.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")

import redis
from PIL import Image

from shelfsight.shared.celery_app import EXTRACT_TASK, create_celery_app
from shelfsight.shared.dev.faults import FaultMode, FaultProxy
from shelfsight.shared.dev.services import free_port, redis_server_binary, wait_for_port
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import S3ObjectStore

TRANSIENT_CODES = frozenset({"transient_exhausted"})
CATEGORIES = ("pans", "tops")
MARKER = re.compile(r"bad-\d{5}-[0-9a-f]{6}")


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Plan:
    """The size of a run: how many events, and which faults when (seconds after sending starts)."""

    events: int
    send_seconds: float
    workers: int = 2
    concurrency: int = 8
    kills: int = 5
    kill_start_s: float = 8.0
    kill_every_s: float = 10.0
    redis_restart_at_s: float | None = 25.0
    redis_down_s: float = 2.0
    s3_fault_at_s: float = 38.0
    s3_fault_phase_s: float = 8.0  # each of the four modes, in turn
    s3_fault_modes: tuple[FaultMode, ...] = ("error_503", "reset", "slow", "deny")
    promote_at_s: float | None = 15.0
    rollback_at_s: float | None = 45.0
    train: bool = True
    bad_fraction: float = 0.12
    visibility_timeout_s: int = 20
    quiet_timeout_s: float = 240.0

    @property
    def s3_fault_s(self) -> float:
        return self.s3_fault_phase_s * len(self.s3_fault_modes)


QUICK = Plan(events=1000, send_seconds=60.0, promote_at_s=12.0, rollback_at_s=30.0)
FULL = Plan(events=3000, send_seconds=150.0, kills=10, kill_every_s=12.0, redis_restart_at_s=60.0,
            s3_fault_at_s=80.0, s3_fault_phase_s=15.0, promote_at_s=30.0, rollback_at_s=110.0)
CI = Plan(events=120, send_seconds=12.0, workers=2, concurrency=4, kills=1, kill_start_s=5.0,
          redis_restart_at_s=9.0, s3_fault_at_s=3.0, s3_fault_phase_s=1.5, promote_at_s=None,
          rollback_at_s=None, train=False, visibility_timeout_s=8, quiet_timeout_s=75.0)


@dataclass
class Sent:
    """One event as sent: its id (or marker, for payloads that cannot carry an id), when, and
    what it should end as (None: a result)."""

    key: str
    sent_at: float
    expected: str | None
    category: str | None = None
    kind: str = "good"


@dataclass
class World:
    """The processes and endpoints of one run."""

    root: Path
    redis_port: int
    moto_port: int
    proxy: FaultProxy
    settings: Settings  # as the workers see it (S3 through the proxy)
    direct: Settings  # as the bench, the trainer and the operator's CLI see it (S3 direct)
    redis_proc: subprocess.Popen | None = None
    moto_proc: subprocess.Popen | None = None
    workers: dict[int, subprocess.Popen] = field(default_factory=dict)
    trainer: subprocess.Popen | None = None
    spawned: int = 0
    visibility_timeout_s: int = 0


# --- processes -------------------------------------------------------------------------------------
def _spawn(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with log_path.open("ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, start_new_session=True)


def _kill(proc: subprocess.Popen | None, sig: int = signal.SIGKILL) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def start_redis(world: World) -> None:
    data = world.root / "redis"
    data.mkdir(exist_ok=True)
    world.redis_proc = _spawn([
        redis_server_binary(), "--port", str(world.redis_port), "--bind", "127.0.0.1", "--dir", str(data),
        "--appendonly", "yes", "--appendfsync", "always", "--save", "",
    ], {}, world.root / "redis.log")
    wait_for_port(world.redis_port, 20)


def start_moto(world: World) -> None:
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    world.moto_proc = _spawn([moto, "-H", "127.0.0.1", "-p", str(world.moto_port)], {}, world.root / "moto.log")
    wait_for_port(world.moto_port, 30)


def _env(settings: Settings, plan: Plan) -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "1",
        "SHELFSIGHT_BROKER_URL": settings.broker_url, "SHELFSIGHT_RESULT_BACKEND": settings.result_backend,
        "SHELFSIGHT_S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
        "SHELFSIGHT_S3_ACCESS_KEY_ID": "test", "SHELFSIGHT_S3_SECRET_ACCESS_KEY": "test",
        "SHELFSIGHT_BUCKET": settings.bucket,
        "SHELFSIGHT_MODEL_ARCH": settings.model_arch, "SHELFSIGHT_MODEL_WEIGHTS": settings.model_weights,
        "SHELFSIGHT_DEVICE": "cpu", "SHELFSIGHT_TORCH_THREADS": "1",
        "SHELFSIGHT_VISIBILITY_TIMEOUT_S": str(plan.visibility_timeout_s),
        "SHELFSIGHT_S3_RETRIES": "1", "SHELFSIGHT_S3_READ_TIMEOUT_S": "2", "SHELFSIGHT_S3_CONNECT_TIMEOUT_S": "2",
        "SHELFSIGHT_MAX_RETRIES": "3", "SHELFSIGHT_RETRY_BACKOFF_S": "0.5", "SHELFSIGHT_RETRY_BACKOFF_MAX_S": "4",
        "SHELFSIGHT_MODEL_POLL_INTERVAL_S": "2", "SHELFSIGHT_MODEL_RETRY_BACKOFF_S": "4",
        "SHELFSIGHT_BATCH_SIZE": "8", "SHELFSIGHT_BATCH_MAX_WAIT_MS": "20",
        "SHELFSIGHT_MAX_IMAGE_BYTES": str(settings.max_image_bytes),
        "SHELFSIGHT_MAX_IMAGE_PIXELS": str(settings.max_image_pixels),
        "SHELFSIGHT_WORKER_SOFT_SHUTDOWN_TIMEOUT_S": "0",
        "SHELFSIGHT_BROKER_SOCKET_TIMEOUT_S": "10", "SHELFSIGHT_BROKER_HEALTH_CHECK_INTERVAL_S": "5",
        "SHELFSIGHT_TRAIN_EPOCHS": "1", "SHELFSIGHT_TRAIN_BATCH_SIZE": "8",
        "SHELFSIGHT_LOG_FORMAT": "json",
    }


def start_worker(world: World, slot: int, plan: Plan) -> None:
    world.spawned += 1
    world.workers[slot] = _spawn(
        [sys.executable, "-m", "shelfsight.shared.cli", "worker", "--concurrency", str(plan.concurrency),
         "--hostname", f"chaos{slot}-{world.spawned}@%h"],
        _env(world.settings, plan), world.root / f"worker{slot}.log",
    )


def start_trainer(world: World, plan: Plan) -> None:
    world.trainer = _spawn([sys.executable, "-m", "shelfsight.shared.cli", "trainer", "--hostname", "chaos-trainer@%h"],
                           _env(world.direct, plan), world.root / "trainer.log")


def cli(world: World, plan: Plan, *argv: str) -> dict[str, Any] | list[Any] | None:
    """Run an operator's command (S3 direct), --json; None if it failed."""
    done = subprocess.run([sys.executable, "-m", "shelfsight.shared.cli", *argv, "--json"],
                          env={**os.environ, **_env(world.direct, plan)}, capture_output=True, timeout=180, check=False)
    if done.returncode != 0:
        log(f"`shelfsight {' '.join(argv)}` exited {done.returncode}: {done.stderr.decode()[-800:]}")
        with (world.root / "operator.log").open("a") as out:
            out.write(f"$ shelfsight {' '.join(argv)}  -> exit {done.returncode}\n{done.stdout.decode()}\n"
                      f"{done.stderr.decode()}\n")
        return None
    text = done.stdout.decode()
    starts = [m.start() for m in re.finditer(r"(?m)^[\[{]", text)]
    for start in reversed(starts):  # the command's --json output: the last JSON value that parses
        with contextlib.suppress(ValueError):
            value, _ = json.JSONDecoder().raw_decode(text[start:])
            return value
    return {}


# --- inputs ----------------------------------------------------------------------------------------
def _image_bytes(fmt: str, size: tuple[int, int], color: tuple[int, int, int], **save: Any) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt, **save)
    return out.getvalue()


def upload_inputs(store: S3ObjectStore, bucket: str, rng: random.Random, settings: Settings) -> dict[str, str]:
    """Good images per category and one object per bad-image kind; returns kind -> s3 URI."""
    uris: dict[str, str] = {}
    for category in CATEGORIES:
        for i in range(12):
            color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            fmt = "PNG" if i % 4 == 3 else "JPEG"
            key = f"uploads/{category}/good-{i}.{fmt.lower()}"
            store.put(bucket, key, _image_bytes(fmt, (rng.randrange(64, 400), rng.randrange(64, 400)), color),
                      f"image/{fmt.lower()}")
            uris[f"good:{category}:{i}"] = f"s3://{bucket}/{key}"
    frames = [Image.new("RGB", (8, 8), (i, 255 - i, (7 * i) % 256)) for i in range(130)]  # all distinct
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], optimize=False)
    big_png = io.BytesIO()
    Image.new("1", (6000, 5000)).save(big_png, format="PNG")  # 30 Mpx, a few KB
    jpeg = _image_bytes("JPEG", (300, 300), (10, 20, 30))
    bad_objects = {
        "truncated-jpeg": jpeg[: len(jpeg) // 3],
        "random-bytes": rng.randbytes(5000),
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        "pdf": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n",
        "svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
        "empty": b"",
        "text": b"this is not an image, it is a shopping list: eggs, milk\n",
        "too-many-frames": gif.getvalue(),
        "too-many-pixels": big_png.getvalue(),
        "too-large": rng.randbytes(settings.max_image_bytes + 1024),
        "psd": b"8BPS\x00\x01" + b"\x00" * 64,
    }
    for kind, data in bad_objects.items():
        key = f"uploads/pans/bad-{kind}.bin"
        store.put(bucket, key, data, "application/octet-stream")
        uris[f"bad:{kind}"] = f"s3://{bucket}/{key}"
    return uris


def bad_kinds(bucket: str, uris: dict[str, str]) -> list[tuple[str, str, Callable[[str], Any]]]:
    """(kind, expected dead-letter code, how to send it given its marker)."""
    now = datetime.now(UTC)

    def event(marker: str, **fields: Any) -> dict[str, Any]:
        base = {"event_id": marker, "product_id": f"p-{marker}", "category": "pans",
                "image": uris["good:pans:0"], "submitted_at": now.isoformat()}
        base.update(fields)
        return {k: v for k, v in base.items() if v is not _DROP}

    def task(payload_of: Callable[[str], Any]) -> Callable[[str], Any]:
        return lambda marker: ("task", [payload_of(marker)], {})

    kinds: list[tuple[str, str, Callable[[str], Any]]] = [
        ("missing-product-id", "malformed_event", task(lambda m: event(m, product_id=_DROP))),
        ("bad-product-id", "malformed_event", task(lambda m: event(m, product_id="has spaces/and slashes"))),
        ("empty-category", "malformed_event", task(lambda m: event(m, category=""))),
        ("unknown-category", "unknown_category", task(lambda m: event(m, category="spaceships"))),
        ("not-an-s3-uri", "malformed_event", task(lambda m: event(m, image="http://example.com/x.jpg"))),
        ("other-bucket", "image_source_not_allowed", task(lambda m: event(m, image="s3://someone-else/uploads/x.jpg"))),
        ("own-results-prefix", "image_source_not_allowed",
         task(lambda m: event(m, image=f"s3://{bucket}/results/pans/x.json"))),
        ("missing-object", "object_missing", task(lambda m: event(m, image=f"s3://{bucket}/uploads/pans/{m}.jpg"))),
        ("future-submitted-at", "submitted_in_future",
         task(lambda m: event(m, submitted_at=(now + timedelta(days=30)).isoformat()))),
        ("extra-field", "malformed_event", task(lambda m: event(m, colour="red"))),
        ("schema-version-2", "malformed_event", task(lambda m: event(m, schema_version=2))),
        ("bad-timestamp", "malformed_event", task(lambda m: event(m, submitted_at="yesterday-ish"))),
        ("event-too-large", "event_too_large", task(lambda m: event(m, notes="x" * 20_000))),
        ("list-payload", "malformed_event", task(lambda m: [m, "pans"])),
        ("string-payload", "malformed_event", task(lambda m: f"{m} is not json")),
        ("two-positional-args", "malformed_event", lambda m: ("task", [event(m), {"again": m}], {})),
        ("unexpected-kwargs", "malformed_event", lambda m: ("task", [event(m)], {"priority_hint": m})),
        ("unknown-task", "malformed_event", lambda m: ("unknown", [{"marker": m}], {})),
        ("not-a-task-message", "malformed_event", lambda m: ("raw-json", {"marker": m}, {})),
        ("pickle-body", "malformed_event", lambda m: ("raw-pickle", pickle.dumps({"marker": m}), {})),
    ]
    image_codes = {
        "truncated-jpeg": "undecodable_image", "random-bytes": "undecodable_image",
        "eps": "image_format_not_allowed", "pdf": "image_format_not_allowed", "svg": "image_format_not_allowed",
        "heic": "image_format_not_allowed", "psd": "image_format_not_allowed", "empty": "undecodable_image",
        "text": "undecodable_image", "too-many-frames": "image_too_many_frames",
        "too-many-pixels": "image_too_many_pixels", "too-large": "image_too_large",
    }
    for kind, code in image_codes.items():
        kinds.append((f"image-{kind}", code, task(lambda m, k=kind: event(m, image=uris[f"bad:{k}"]))))
    return kinds


class _Drop:
    pass


_DROP: Any = _Drop()


# --- the producer ----------------------------------------------------------------------------------
class Producer:
    """Sends events at a steady pace, retrying each send until the broker takes it (a Redis
    restart must not lose what the producer meant to send)."""

    def __init__(self, world: World, plan: Plan, rng: random.Random, uris: dict[str, str]) -> None:
        self.world, self.plan, self.rng, self.uris = world, plan, rng, uris
        self.app = create_celery_app(world.settings)
        self.sent: list[Sent] = []
        self.kinds = bad_kinds(world.settings.bucket, uris)
        self.done = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        n_bad = max(len(self.kinds), int(self.plan.events * self.plan.bad_fraction))
        bad_slots = set(self.rng.sample(range(self.plan.events), min(n_bad, self.plan.events)))
        bad_index = 0
        for i in range(self.plan.events):
            due = start + self.plan.send_seconds * i / self.plan.events
            time.sleep(max(0.0, due - time.monotonic()))
            if i in bad_slots:
                kind, code, make = self.kinds[bad_index % len(self.kinds)]
                bad_index += 1
                marker = f"bad-{i:05d}-{uuid.uuid4().hex[:6]}"
                self._send_retrying(lambda make=make, marker=marker: self._send_bad(make(marker), marker))
                self.sent.append(Sent(marker, time.time(), code, kind=kind))
            else:
                category = CATEGORIES[i % 2]
                event_id = f"good-{i:05d}-{uuid.uuid4().hex[:6]}"
                image = self.uris[f"good:{category}:{self.rng.randrange(12)}"]
                payload = {"event_id": event_id, "product_id": f"prod-{i:05d}", "category": category,
                           "image": image, "submitted_at": datetime.now(UTC).isoformat()}
                self._send_retrying(lambda payload=payload: self.app.send_task(
                    EXTRACT_TASK, args=[payload], task_id=payload["event_id"]))
                self.sent.append(Sent(event_id, time.time(), None, category=category))
        self.done.set()

    def _send_bad(self, spec: tuple[str, Any, dict[str, Any]], marker: str) -> None:
        how, body, kwargs = spec
        queue = self.world.settings.extract_queue
        if how == "task":
            self.app.send_task(EXTRACT_TASK, args=body, kwargs=kwargs, task_id=marker)
        elif how == "unknown":
            self.app.send_task("shelfsight.no_such_task", args=body, queue=queue, task_id=marker)
        else:
            with self.app.producer_or_acquire() as producer:
                if how == "raw-json":
                    producer.publish(body, routing_key=queue, serializer="json")
                else:
                    producer.publish(body, routing_key=queue, content_type="application/x-python-serialize",
                                     content_encoding="binary")

    @staticmethod
    def _send_retrying(send: Callable[[], Any]) -> None:
        for attempt in range(200):
            try:
                send()
                return
            except Exception as exc:  # noqa: BLE001 - broker restarting: try again
                if attempt % 10 == 0:
                    log(f"send failed ({type(exc).__name__}: {str(exc)[:80]}); retrying")
                time.sleep(0.1)
        raise RuntimeError("the broker refused an event for 20 s")


# --- chaos -----------------------------------------------------------------------------------------
@dataclass
class Chaos:
    kills: list[tuple[float, set[str]]] = field(default_factory=list)  # (time, unacked event ids)
    redis_restarts: int = 0
    s3_fault_s: float = 0.0
    s3_fault_windows: list[tuple[float, float]] = field(default_factory=list)
    promoted: str | None = None
    baseline: str | None = None
    rolled_back_at: float | None = None
    promoted_at: float | None = None
    promotion_served: bool = False
    training: dict[str, Any] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)


def unacked_event_ids(world: World) -> set[str]:
    try:
        client = redis.Redis(port=world.redis_port, socket_timeout=5)
        values = client.hvals("unacked")
    except redis.RedisError:
        return set()
    ids = set()
    for raw in values:
        try:
            payload = json.loads(raw)[0]
            ids.add(str(payload.get("headers", {}).get("id") or ""))
        except (ValueError, KeyError, TypeError, IndexError):
            continue
    return ids


def run_chaos(world: World, plan: Plan, producer: Producer, chaos: Chaos, rng: random.Random) -> None:
    """The fault schedule, in one thread, against the clock started with the producer."""
    start = time.monotonic()
    actions: list[tuple[float, str]] = []
    actions += [(plan.kill_start_s + k * plan.kill_every_s, "kill") for k in range(plan.kills)]
    if plan.redis_restart_at_s is not None:
        actions.append((plan.redis_restart_at_s, "redis"))
    actions += [(plan.s3_fault_at_s + p * plan.s3_fault_phase_s, f"s3:{mode}")
                for p, mode in enumerate(plan.s3_fault_modes)]
    actions.append((plan.s3_fault_at_s + plan.s3_fault_s, "s3:clear"))
    if plan.promote_at_s is not None:
        actions.append((plan.promote_at_s, "promote"))  # and then, once it serves, the rollback
    if plan.train:
        actions.append((plan.kill_start_s + 1.0, "train"))
    operators: list[threading.Thread] = []
    for at, action in sorted(actions):
        time.sleep(max(0.0, start + at - time.monotonic()))
        chaos.log.append(f"{time.monotonic() - start:6.1f}s {action}")
        log(action)
        if action == "kill":
            slot = rng.randrange(plan.workers)
            chaos.log.append(f"{time.time():.3f} kill worker{slot} pid {world.workers[slot].pid}")
            held = unacked_event_ids(world)
            _kill(world.workers[slot])
            chaos.kills.append((time.time(), held))
            start_worker(world, slot, plan)
        elif action == "redis":
            _kill(world.redis_proc)
            time.sleep(plan.redis_down_s)
            start_redis(world)
            chaos.redis_restarts += 1
        elif action.startswith("s3:"):
            mode = action[3:]
            if mode == "clear":
                world.proxy.clear()
                if chaos.s3_fault_windows:
                    chaos.s3_fault_windows[-1] = (chaos.s3_fault_windows[-1][0], time.time())
            else:
                if not chaos.s3_fault_windows or chaos.s3_fault_windows[-1][1] != math.inf:
                    chaos.s3_fault_windows.append((time.time(), math.inf))
                world.proxy.set(mode, slow_s=4.0)
                chaos.s3_fault_s += plan.s3_fault_phase_s
        elif action in ("promote", "train"):  # operator commands take seconds: not inline
            thread = threading.Thread(target=_operator, args=(world, plan, chaos, action), daemon=True)
            thread.start()
            operators.append(thread)
    for thread in operators:
        thread.join(timeout=240)


def _operator(world: World, plan: Plan, chaos: Chaos, action: str) -> None:
    """An operator's commands, in order: promote; once a worker serves it (and not before the
    planned time), roll back. Under load a CLI call takes seconds, so times are not exact."""
    if action == "promote":
        started = time.monotonic()
        if cli(world, plan, "models", "promote", "pans", chaos.promoted or "", "--reason", "chaos: mid-run") is None:
            return
        chaos.promoted_at = time.time()
        wait_s = (plan.rollback_at_s or 0.0) - (plan.promote_at_s or 0.0)
        deadline = started + wait_s + 60.0
        while time.monotonic() < deadline and not (
                _served(world, chaos.promoted or "?") and time.monotonic() >= started + wait_s):
            time.sleep(0.5)
        chaos.promotion_served = _served(world, chaos.promoted or "?")
        if cli(world, plan, "models", "rollback", "pans") is not None:
            chaos.rolled_back_at = time.time()
    else:
        chaos.training = {"enqueued": cli(world, plan, "train", "--category", "tops")}  # type: ignore[assignment]


def _served(world: World, version: str) -> bool:
    """Some worker has swapped to `version` (its log says model.swapped with that version)."""
    for slot in world.workers:
        path = world.root / f"worker{slot}.log"
        with contextlib.suppress(OSError):
            if any('"model.swapped"' in line and version in line for line in path.read_text(errors="replace").splitlines()):
                return True
    return False


# --- setup: a baseline model, a candidate, labels for the trainer ----------------------------------
def publish_version(settings: Settings, store: S3ObjectStore, category: str, seed: int) -> str:
    """A distinct checkpoint of the tiny model, uploaded as a registry version (not promoted)."""
    import torch
    from safetensors.torch import save as save_safetensors

    from shelfsight.shared.model_factory import create_clip, sha256_bytes
    from shelfsight.shared.registry import Manifest, ModelRegistry, new_version
    from shelfsight.shared.taxonomy import load_taxonomy

    bundle = create_clip(settings.model_arch, "none")
    generator = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone().contiguous() for k, v in bundle.model.state_dict().items()}
    state["visual.proj"] += 0.5 * torch.randn(state["visual.proj"].shape, generator=generator)
    weights = save_safetensors(state)
    cat = load_taxonomy(settings.taxonomy_path).category(category)
    version = new_version()
    ModelRegistry(store, settings.bucket, settings.models_prefix).upload_version(Manifest(
        category=category, version=version, architecture=settings.model_arch, base_weights="none",
        taxonomy_version="chaos", values={n: a.value_names for n, a in cat.attributes.items()},
        captions={n: a.captions() for n, a in cat.attributes.items()},
        weights_sha256=sha256_bytes(weights), weights_bytes=len(weights),
    ), weights)
    return version


def write_labels(world: World, uris: dict[str, str], rng: random.Random) -> Path:
    from shelfsight.shared.taxonomy import load_taxonomy

    cat = load_taxonomy(world.direct.taxonomy_path).category("tops")
    lines = []
    for i in range(24):
        attributes = {name: rng.choice(attr.value_names) for name, attr in cat.attributes.items()}
        lines.append(json.dumps({"product_id": f"lab-{i}", "category": "tops", "image": uris[f"good:tops:{i % 12}"],
                                 "attributes": attributes}))
    path = world.root / "labels.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def training_outcome(world: World, timeout_s: float = 180.0) -> dict[str, Any]:
    """What the trainer made of its run (the version's report), waiting for it a while."""
    from shelfsight.shared.registry import ModelRegistry

    registry = ModelRegistry(S3ObjectStore(world.direct), world.direct.bucket)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        versions = registry.versions("tops")
        if versions:
            report = json.loads(registry.store.get(world.direct.bucket,
                                                   registry.key("tops", versions[-1], "report.json")).body)
            decision = report.get("decision") or {}
            return {"version": versions[-1], "promoted": decision.get("promoted"),
                    "reason": str(decision.get("reason", ""))[:200]}
        time.sleep(2)
    return {"version": None, "note": f"no trained version after {timeout_s:.0f}s (see trainer.log)"}


# --- accounting ------------------------------------------------------------------------------------
def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def _overlap(start: float, end: float, windows: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in windows)


def world_visibility(world: World) -> float:
    return float(world.visibility_timeout_s)


def account(world: World, sent: list[Sent], chaos: Chaos) -> dict[str, Any]:
    """Match every S3 record to an event sent; the figures of the last line."""
    store = S3ObjectStore(world.direct)
    bucket = world.direct.bucket
    results: dict[str, list[dict[str, Any]]] = {}
    for key in store.list_keys(bucket, "results/"):
        record = json.loads(store.get(bucket, key).body)
        if "/_superseded/" in key:
            results.setdefault(record["event_id"], []).append({"superseded": True, **record})
        else:
            results.setdefault(record["event_id"], []).append(record)
    by_key = {s.key: s for s in sent}
    letters: dict[str, list[dict[str, Any]]] = {}
    unmatched = 0
    for key in store.list_keys(bucket, "dead-letters/"):
        record = json.loads(store.get(bucket, key).body)
        owner = record.get("event_id") if record.get("event_id") in by_key else None
        if owner is None:
            found = MARKER.search(json.dumps(record.get("event"), default=str))
            owner = found.group(0) if found and found.group(0) in by_key else None
        if owner is None:
            unmatched += 1
            continue
        letters.setdefault(owner, []).append(record)

    lost, double, wrong, unexpected_codes, bad_with_result = [], [], [], [], []
    latencies: list[float] = []
    outcome_at: dict[str, float] = {}
    versions: Counter[str] = Counter()
    after_rollback: Counter[str] = Counter()  # pans results finished 10 s or more after the rollback
    for item in sent:
        got_result = item.key in results
        got_letter = item.key in letters
        if not got_result and not got_letter:
            lost.append(f"{item.key}:{item.kind}")
        if got_result and got_letter:
            double.append(item.key)
        if got_result:
            record = results[item.key][0]
            finished = _parse_time((record.get("timings") or {}).get("finished_at")) or _parse_time(
                record.get("recorded_at"))
            if finished is not None:
                outcome_at[item.key] = finished
                if item.expected is None and not record.get("superseded"):
                    latencies.append((finished - item.sent_at) * 1000)
            if item.expected is None and record.get("category") == "pans":
                version = (record.get("model") or {}).get("version", "?")
                versions[version] += 1
                if chaos.rolled_back_at is not None and finished is not None and finished > chaos.rolled_back_at + 10:
                    after_rollback[version] += 1
            if item.expected is not None:
                bad_with_result.append(f"{item.key}:{item.kind}")
        if got_letter:
            codes = {letter["error_code"] for letter in letters[item.key]}
            failed = min(filter(None, (_parse_time(letter.get("failed_at")) for letter in letters[item.key])),
                         default=None)
            if failed is not None:
                outcome_at.setdefault(item.key, failed)
            if item.expected is None and codes - TRANSIENT_CODES:
                wrong.append(f"{item.key}:{sorted(codes)}")
            if item.expected is not None and item.expected not in codes:
                unexpected_codes.append(f"{item.kind}:{sorted(codes)}!={item.expected}")
    recoveries: list[float] = []
    raw_recoveries: list[float] = []
    for killed_at, held in chaos.kills:
        spans = [(outcome_at[e] - killed_at, _overlap(killed_at, outcome_at[e], chaos.s3_fault_windows))
                 for e in held if e in outcome_at]
        if spans:
            raw_recoveries.append(max(total for total, _ in spans))
            # time the victim's events spent waiting for S3 to come back is the outage's, not the kill's
            recoveries.append(max(total - in_outage for total, in_outage in spans))
    latencies.sort()
    p95 = latencies[max(0, math.ceil(0.95 * len(latencies)) - 1)] if latencies else None
    n_results = sum(1 for s in sent if s.key in results)
    n_letters = sum(1 for s in sent if s.key in letters)
    return {
        "events": len(sent), "results": n_results, "dead_letters": n_letters,
        "lost": len(lost), "double_outcome": len(double), "wrong_dead_letters": len(wrong),
        "worker_kills": len(chaos.kills), "redis_restarts": chaos.redis_restarts,
        "s3_fault_s": round(chaos.s3_fault_s, 1),
        "max_recovery_s": round(max(recoveries), 1) if recoveries else None,
        "p95_latency_ms": round(p95, 1) if p95 is not None else None,
        "details": {
            "bad_events": sum(1 for s in sent if s.expected is not None),
            "bad_kinds": len({s.kind for s in sent if s.expected is not None}),
            "recovery_bound_s": round(1.1 * world_visibility(world) + 10, 1),
            "max_recovery_including_s3_outage_s": round(max(raw_recoveries), 1) if raw_recoveries else None,
            "unexpected_codes": sorted(set(unexpected_codes))[:20], "bad_with_result": bad_with_result[:20],
            "unmatched_dead_letters": unmatched, "lost_ids": lost[:20], "double_ids": double[:20],
            "wrong_ids": wrong[:20], "pans_result_versions": dict(versions),
            "promoted": chaos.promoted, "baseline": chaos.baseline,
            "promotion_served": chaos.promotion_served, "rolled_back": chaos.rolled_back_at is not None,
            "pans_versions_after_rollback": dict(after_rollback), "training": chaos.training,
            "proxy_requests": dict(world.proxy.counts), "schedule": chaos.log,
        },
    }


class Progress:
    """Which events sent have a record in S3 yet (results by product id, dead letters read once)."""

    def __init__(self, world: World, sent: list[Sent]) -> None:
        self.store = S3ObjectStore(world.direct)
        self.bucket = world.direct.bucket
        self.sent = sent
        self.seen_letters: dict[str, str | None] = {}

    def missing(self) -> int:
        products = {k.rsplit("/", 1)[-1].removesuffix(".json") for k in self.store.list_keys(self.bucket, "results/")}
        for key in self.store.list_keys(self.bucket, "dead-letters/"):
            if key not in self.seen_letters:
                record = json.loads(self.store.get(self.bucket, key).body)
                found = MARKER.search(json.dumps(record.get("event"), default=str))
                self.seen_letters[key] = record.get("event_id") if record.get("event_id", "").startswith(
                    ("good-", "bad-")) else (found.group(0) if found else None)
        owners = set(self.seen_letters.values())
        return sum(1 for s in self.sent if s.key not in owners
                   and f"prod-{s.key[5:10]}" not in products and f"p-{s.key}" not in products)


def wait_quiet(world: World, sent: list[Sent], timeout_s: float) -> None:
    """Until every event sent has a record in S3 (or the timeout): the world is quiet."""
    progress = Progress(world, sent)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        missing = progress.missing()
        if missing == 0:
            time.sleep(2)  # let the last acks land before the processes are stopped
            return
        log(f"{missing} events without an outcome yet")
        time.sleep(3)
    log(f"not quiet after {timeout_s:.0f}s; accounting anyway")


# --- the run ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def running_world(plan: Plan, keep: bool) -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="shelfsight-chaos-"))
    redis_port, moto_port = free_port(), free_port()
    proxy = FaultProxy(f"http://127.0.0.1:{moto_port}").start()
    bucket = f"chaos-{uuid.uuid4().hex[:8]}"
    common = {
        "broker_url": f"redis://127.0.0.1:{redis_port}/0", "result_backend": f"redis://127.0.0.1:{redis_port}/1",
        "s3_access_key_id": "test", "s3_secret_access_key": "test", "bucket": bucket,
        "model_arch": "shelfsight-tiny", "model_weights": "none", "device": "cpu",
        "max_image_bytes": 2 * 1024 * 1024, "max_image_pixels": 20_000_000,
    }
    world = World(root, redis_port, moto_port, proxy,
                  Settings(s3_endpoint_url=proxy.url, **common),
                  Settings(s3_endpoint_url=f"http://127.0.0.1:{moto_port}", **common))
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in previous:
        signal.signal(sig, stop)
    try:
        world.visibility_timeout_s = plan.visibility_timeout_s
        start_redis(world)
        start_moto(world)
        yield world
    finally:
        for proc in [*world.workers.values(), world.trainer]:
            _kill(proc, signal.SIGTERM)
        _kill(world.redis_proc)
        _kill(world.moto_proc)
        proxy.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if keep:
            log(f"logs and data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _monitor(world: World, stop: threading.Event) -> None:
    """Debugging: every Redis command that names an event, to monitor.log (reconnects after restarts)."""
    with (world.root / "monitor.log").open("a") as out:
        while not stop.is_set():
            try:
                client = redis.Redis(port=world.redis_port)
                with client.monitor() as monitor:
                    for command in monitor.listen():
                        line = command.get("command", "")
                        if "bad-" in line or "good-" in line or line.startswith(("HDEL unacked", "ZREM")):
                            out.write(f"{command.get('time')} {line}\n")
                        if stop.is_set():
                            return
            except (redis.RedisError, OSError):
                time.sleep(0.2)


def run(plan: Plan, *, seed: int = 0, keep: bool = False, monitor: bool = False) -> dict[str, Any]:
    """One chaos run; returns the summary (the last line's JSON)."""
    rng = random.Random(seed)
    started = time.monotonic()
    stop_monitor = threading.Event()
    with running_world(plan, keep) as world:
        if monitor:
            threading.Thread(target=_monitor, args=(world, stop_monitor), daemon=True).start()
        store = S3ObjectStore(world.direct)
        store.ensure_bucket(world.direct.bucket)
        uris = upload_inputs(store, world.direct.bucket, rng, world.direct)
        chaos = Chaos()
        if plan.promote_at_s is not None:
            from shelfsight.shared.registry import ModelRegistry

            chaos.baseline = publish_version(world.direct, store, "pans", seed=1)
            ModelRegistry(store, world.direct.bucket).promote("pans", chaos.baseline, reason="chaos: baseline")
            chaos.promoted = publish_version(world.direct, store, "pans", seed=2)
        for slot in range(plan.workers):
            start_worker(world, slot, plan)
        if plan.train:
            start_trainer(world, plan)
            cli(world, plan, "labels", "import", str(write_labels(world, uris, rng)))
        _wait_workers_ready(world, timeout_s=120)
        log(f"{plan.workers} workers ready; sending {plan.events} events over {plan.send_seconds:.0f}s")
        producer = Producer(world, plan, rng, uris)
        sender = threading.Thread(target=producer.run, name="producer", daemon=True)
        sender.start()
        run_chaos(world, plan, producer, chaos, rng)
        sender.join()
        log(f"sent {len(producer.sent)}; waiting for quiet")
        wait_quiet(world, producer.sent, plan.quiet_timeout_s)
        (world.root / "sent.json").write_text(json.dumps([s.__dict__ for s in producer.sent], indent=1))
        if plan.train:
            chaos.training.update(training_outcome(world))
        summary = account(world, producer.sent, chaos)
        summary["details"]["wall_s"] = round(time.monotonic() - started, 1)
        stop_monitor.set()
        return summary


def _wait_workers_ready(world: World, timeout_s: float) -> None:
    """Every worker's log says it is ready (the bootstep built its service)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        logs = [(world.root / f"worker{slot}.log") for slot in world.workers]
        if all(p.exists() and "worker.ready" in p.read_text(errors="replace") for p in logs):
            return
        dead = [slot for slot, proc in world.workers.items() if proc.poll() is not None]
        if dead:
            raise RuntimeError(f"worker(s) {dead} exited at startup; see {world.root}")
        time.sleep(0.5)
    raise TimeoutError("workers not ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="1,000 events, every fault (this VM: ~5 min)")
    size.add_argument("--ci", action="store_true", help="the suite's size: 120 events, one kill, one Redis restart")
    parser.add_argument("--events", type=int, help="override the number of events")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep logs and data (printed at the end)")
    parser.add_argument("--monitor", action="store_true", help="debugging: log Redis commands naming events")
    args = parser.parse_args(argv)
    plan = CI if args.ci else QUICK if args.quick else FULL
    if args.events:
        plan.events = args.events
    summary = run(plan, seed=args.seed, keep=args.keep or args.monitor, monitor=args.monitor)
    print(json.dumps(summary["details"], indent=2), file=sys.stderr)
    headline = {k: v for k, v in summary.items() if k != "details"}
    print(json.dumps({**headline, "details": summary["details"]}))
    ok = summary["lost"] == summary["double_outcome"] == summary["wrong_dead_letters"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
