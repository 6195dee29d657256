"""The four throughput measurements: (a) bare model, (b) in-memory pipeline, (c)/(d) through
Celery, plus the memory of resident per-category models. See throughput.py for what each means.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import statistics
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import torch
from _throughput_harness import say

CATEGORY = "tops"


# --- images --------------------------------------------------------------------------------------------


@dataclass
class Images:
    jpegs: list[bytes]
    size_px: int
    mean_bytes: float


def make_images(unique: int, size_px: int) -> Images:
    """`unique` distinct synthetic product JPEGs (tops), reused round robin by every phase."""
    from shelfsight.shared.dev.samples import generate_products

    started = time.perf_counter()
    products = generate_products(CATEGORY, unique, seed=7, size=size_px)
    jpegs = [p.image for p in products]
    say(f"generated {unique} synthetic product JPEGs {size_px}x{size_px} q90 "
        f"(mean {statistics.mean(map(len, jpegs)) / 1024:.1f} KiB) in {time.perf_counter() - started:.1f}s")
    return Images(jpegs, size_px, statistics.mean(map(len, jpegs)))


def upload_images(s3: Any, bucket: str, images: Images) -> list[str]:
    """Put the JPEGs once at uploads/tops/img<n>.jpg (the layout of samples.upload_products)."""
    s3.ensure_bucket(bucket)

    def put(i: int) -> str:
        key = f"uploads/{CATEGORY}/img{i:05d}.jpg"
        s3.put(bucket, key, images.jpegs[i], "image/jpeg")
        return f"s3://{bucket}/{key}"

    with ThreadPoolExecutor(16) as pool:
        uris = list(pool.map(put, range(len(images.jpegs))))
    say(f"uploaded {len(uris)} JPEGs to s3://{bucket}/uploads/{CATEGORY}/ (moto)")
    return uris


# --- (a) bare model ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_bare(model: Any, batch: int, min_seconds: float, min_batches: int) -> float:
    """Images/s of CategoryModel.score on pre-decoded tensors already in the model's memory."""
    pixels = torch.randn(batch, 3, model.image_size, model.image_size, device=model.device)
    for _ in range(2):
        model.score(pixels)
    _sync(model.device)
    done, started = 0, time.perf_counter()
    while done < min_batches or time.perf_counter() - started < min_seconds:
        out = model.score(pixels)
        done += 1
    next(iter(out.values())).cpu()
    _sync(model.device)
    return batch * done / (time.perf_counter() - started)


# --- (b) in-memory pipeline ----------------------------------------------------------------------------


def bench_pipeline(service: Any, model: Any, images: Images, n: int, batch: int, decode_threads: int) -> float:
    """JPEG bytes -> prepare (thread pool) -> _run_batch -> ResultRecord, double-buffered."""
    from shelfsight.shared.events import UploadEvent
    from shelfsight.worker.batcher import BatchItem

    events = [UploadEvent(product_id=f"pipe-{i}", category=CATEGORY, image=f"s3://bench/uploads/{i % len(images.jpegs)}.jpg")
              for i in range(n)]
    jpegs = [images.jpegs[i % len(images.jpegs)] for i in range(n)]
    starts = list(range(0, n, batch))
    records = 0
    with ThreadPoolExecutor(decode_threads, thread_name_prefix="pipeline-decode") as pool:
        def submit(start: int) -> list[Any]:
            return [pool.submit(service.prepare, data, model) for data in jpegs[start:start + batch]]

        started = time.perf_counter()
        pending = submit(starts[0])
        for k, start in enumerate(starts):
            prepared = [f.result() for f in pending]
            if k + 1 < len(starts):
                pending = submit(starts[k + 1])  # decode the next batch while this one runs
            items = [BatchItem(CATEGORY, p) for p in prepared]
            scored = service._run_batch(CATEGORY, items)
            for i, (p, s) in enumerate(zip(prepared, scored, strict=True)):
                data = jpegs[start + i]
                record = service._record(events[start + i], "bench-etag", len(data), p, s)
                records += bool(record.attributes)
        elapsed = time.perf_counter() - started
    assert records == n, f"pipeline produced {records} records for {n} images"
    return n / elapsed


# --- (c)/(d) through Celery ----------------------------------------------------------------------------


@dataclass
class PhaseResult:
    images: int
    seconds: float
    img_s: float
    latencies_ms: list[float]
    dead_letters: int
    batch_sizes: list[int]
    cpu_s: dict[str, float] = field(default_factory=dict)
    stage_ms: dict[str, float] = field(default_factory=dict)
    versions: list[tuple[datetime, str]] = field(default_factory=list)  # (finished_at, model version)
    first_enqueue: datetime | None = None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank), rounded to 0.1; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))], 1)


@contextlib.contextmanager
def no_draft_decode() -> Iterator[None]:
    """The naive worker: PIL decodes the full-size image (no DCT-domain downscale, no simplejpeg)."""
    import numpy as np

    import shelfsight.worker.extractor as extractor
    from shelfsight.shared import imaging

    original = extractor.decode_rgb

    def full_decode(data: bytes, header: Any, *, max_pixels: int, draft_size: int | None = None) -> Any:
        return np.array(imaging.decode_image(data, max_bytes=len(data), max_pixels=max_pixels))  # Pillow, full size

    extractor.decode_rgb = full_decode
    try:
        yield
    finally:
        extractor.decode_rgb = original


@contextlib.contextmanager
def forward_off_cpu(seconds_per_image: float) -> Iterator[None]:
    """The worker's model forward waits instead of computing while the block runs: each batch
    sleeps as long as the bare forward takes for it (`seconds_per_image` x its size), then gets
    probabilities from fixed random features through the model's real heads.

    The plumbing as it is on a GPU host, where the forward leaves the CPU to the task threads: a
    measure of what the model's CPU forward costs the plumbing by sharing the cores, not a speed
    of any model. Only the in-process worker (c) is switched.
    """
    from shelfsight.shared import clip_math
    from shelfsight.worker.model_cache import CategoryModel

    real_score = CategoryModel.score
    features_by_dim: dict[int, torch.Tensor] = {}

    def waiting_score(self: Any, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        time.sleep(seconds_per_image * len(pixels))
        dim = int(self.heads[0].text_features.shape[-1])
        if dim not in features_by_dim:
            features_by_dim[dim] = torch.randn(256, dim, generator=torch.Generator().manual_seed(dim))
        features = features_by_dim[dim][torch.arange(len(pixels)) % 256].to(self.heads[0].text_features.device)
        return clip_math.score_heads(features, self.heads, self.logit_scale, self.temperatures)

    CategoryModel.score = waiting_score  # type: ignore[method-assign]
    try:
        yield
    finally:
        CategoryModel.score = real_score  # type: ignore[method-assign]


_PRODUCER_APP: Any = None


def _producer_init(settings: Any) -> None:
    """In each producer process: one Celery app, as an upload pipeline's process has."""
    global _PRODUCER_APP
    from shelfsight.shared.celery_app import create_celery_app

    _PRODUCER_APP = create_celery_app(settings)


def _produce(events: list[tuple[str, str]]) -> int:
    """Enqueue (product id, image) events through `enqueue_event`, as `_Burst.run` does inline."""
    from shelfsight.shared.enqueue import enqueue_event
    from shelfsight.shared.events import UploadEvent

    for product_id, image in events:
        enqueue_event(_PRODUCER_APP, UploadEvent(product_id=product_id, category=CATEGORY, image=image))
    return len(events)


def producer_pool(settings: Any, processes: int) -> Any:
    """Spawned producer processes, started and warm before any timing: one Python producer sends
    about 500 events/s, less than N worker processes on a 16-core GPU machine take."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_producer_init, initargs=(settings,))
    list(pool.map(_produce, [[] for _ in range(processes)]))  # every process up
    return pool


class _Burst:
    """Enqueue events through a producer app and wait for their outcomes on the streams (shared by
    the in-process and the multi-process worker phases)."""

    settings: Any
    uris: list[str]
    label: str
    app: Any
    client: Any
    store: Any
    _seq: int = 0
    producers: Any = None  # a producer_pool for bursts (None: this process enqueues)

    def _last_ids(self) -> dict[str, str]:
        ids = {}
        for stream in (self.settings.results_stream, self.settings.dead_letter_stream):
            last = self.client.xrevrange(stream, count=1)
            ids[stream] = last[0][0].decode() if last else "0-0"
        return ids

    def run(self, n: int, *, rate: float | None = None, timeout_s: float = 900.0,
            during: Any = None, during_after: int = 0) -> PhaseResult:
        """Enqueue n events (all at once, or at `rate` per second); wait for n results/dead letters.

        `during`: called once `during_after` events have been enqueued (the hot swap under load)."""
        from datetime import UTC

        from shelfsight.shared.enqueue import enqueue_event
        from shelfsight.shared.events import ResultRecord, UploadEvent

        cursors = self._last_ids()
        product_ids: list[str] = []
        tag = f"{self.label}{self._seq}"
        self._seq += 1
        first_enqueue = datetime.now(UTC)
        t0 = time.perf_counter()
        if self.producers is not None and rate is None and during is None:
            pairs = [(f"{tag}-{i:06d}", self.uris[i % len(self.uris)]) for i in range(n)]
            product_ids = [pid for pid, _ in pairs]
            sent = sum(self.producers.map(_produce, [pairs[k:k + 64] for k in range(0, n, 64)]))
            assert sent == n, f"producers sent {sent} of {n}"
        else:
            for i in range(n):
                if rate:
                    delay = t0 + i / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                if during is not None and i == during_after:
                    during()
                pid = f"{tag}-{i:06d}"
                product_ids.append(pid)
                enqueue_event(self.app, UploadEvent(product_id=pid, category=CATEGORY,
                                                    image=self.uris[i % len(self.uris)]))
        enqueued_s = time.perf_counter() - t0
        seen = {"result": 0, "dead": 0}
        deadline = time.monotonic() + timeout_s
        while seen["result"] + seen["dead"] < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.label}: {seen} of {n} after {timeout_s}s")
            got = self.client.xread(cursors, block=1000, count=1000)
            for stream, entries in got or []:
                name = stream.decode()
                cursors[name] = entries[-1][0].decode()
                seen["result" if name == self.settings.results_stream else "dead"] += len(entries)
        done_wall = time.perf_counter() - t0
        # Read every result file back (after timing) for finished_at, batch size and stage timings.

        def fetch(pid: str) -> ResultRecord | None:
            key = f"{self.settings.results_prefix}/{CATEGORY}/{pid}.json"
            try:
                return ResultRecord.model_validate_json(self.store.get(self.settings.bucket, key).body)
            except Exception:  # noqa: BLE001 - a dead letter has no result file
                return None

        with ThreadPoolExecutor(16) as pool:
            records = [r for r in pool.map(fetch, product_ids) if r is not None]
        finished = [datetime.fromisoformat(r.timings["finished_at"]) for r in records]
        latencies = [(f - r.submitted_at).total_seconds() * 1000 for f, r in zip(finished, records, strict=True)]
        seconds = (max(finished) - first_enqueue).total_seconds() if finished else done_wall
        stages = {}
        for stage in ("fetch_ms", "decode_ms", "queue_ms", "model_ms"):
            values = [float(r.timings[stage]) for r in records if stage in r.timings]
            if values:
                stages[stage] = round(statistics.median(values), 1)
        say(f"{self.label}: {len(records)} results, {seen['dead']} dead letters, enqueue took {enqueued_s:.2f}s, "
            f"last result after {seconds:.2f}s")
        return PhaseResult(
            images=len(records), seconds=seconds, img_s=len(records) / seconds if seconds > 0 else 0.0,
            latencies_ms=latencies, dead_letters=seen["dead"],
            batch_sizes=[int(r.timings.get("batch_size", 0)) for r in records], stage_ms=stages,
            versions=[(f, r.model.version) for f, r in zip(finished, records, strict=True)],
            first_enqueue=first_enqueue,
        )


class CeleryPhase(_Burst):
    """One in-process Celery worker (threads pool) with the real extract task, on its own Redis db."""

    def __init__(self, settings: Any, concurrency: int, uris: list[str], label: str) -> None:
        self.settings = settings
        self.concurrency = concurrency
        self.uris = uris
        self.label = label

    def __enter__(self) -> CeleryPhase:
        import redis
        from celery.contrib.testing.worker import start_worker

        from shelfsight.worker.app import create_worker_app
        from shelfsight.worker.runtime import runtime_of

        self.app = create_worker_app(self.settings)
        self.client = redis.Redis.from_url(self.settings.broker_url)
        self.client.flushdb()
        # the extract queue only, as `shelfsight worker` consumes (the transport polls one queue at a time)
        self._ctx = start_worker(self.app, pool="threads", concurrency=self.concurrency, queues=[self.settings.extract_queue, self.settings.backfill_queue],
                                 perform_ping_check=False, shutdown_timeout=120, loglevel="WARNING")
        self._ctx.__enter__()
        self.service = runtime_of(self.app).service
        self.store = self.service.store
        self.service.models.get(CATEGORY)  # base model + caption features, before timing
        self._seq = 0
        return self

    def __exit__(self, *exc: object) -> None:
        from shelfsight.worker.runtime import runtime_of

        try:
            self._ctx.__exit__(*exc)
        finally:
            runtime_of(self.app).shutdown()
            self.client.close()


def settings_env(settings: Any) -> dict[str, str]:
    """SHELFSIGHT_* environment variables that rebuild `settings` in a child process."""
    import json

    from pydantic import SecretStr

    env = {}
    for name, value in settings.model_dump(exclude_defaults=True).items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, list | dict):
            value = json.dumps(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"SHELFSIGHT_{name.upper()}"] = str(value)
    return env


class ProcessPhase(_Burst):
    """`shelfsight worker --processes N` as a real command (the supervisor and its N processes),
    on its own Redis db; the bench is only the producer. CPU is taken from the process tree."""

    def __init__(self, settings: Any, processes: int, uris: list[str], label: str, log_path: Any,
                 producers: int = 0) -> None:
        self.settings = settings
        self.processes = processes
        self.producer_processes = producers
        self.uris = uris
        self.label = label
        self.log_path = log_path

    def __enter__(self) -> ProcessPhase:
        import sys

        import redis

        from shelfsight.shared.celery_app import create_celery_app
        from shelfsight.shared.dev.processes import spawn
        from shelfsight.shared.storage import S3ObjectStore

        self.app = create_celery_app(self.settings)
        self.client = redis.Redis.from_url(self.settings.broker_url)
        self.client.flushdb()
        self.store = S3ObjectStore(self.settings)
        self.proc = spawn([sys.executable, "-m", "shelfsight.shared.cli", "worker", "--processes", str(self.processes)],
                          settings_env(self.settings), self.log_path)
        from _throughput_harness import register_child

        register_child(self.proc)
        started = time.perf_counter()
        if self.producer_processes > 1:
            self.producers = producer_pool(self.settings, self.producer_processes)
        self._wait_ready(timeout_s=300)
        say(f"{self.label}: {self.processes} worker process(es) consuming after {time.perf_counter() - started:.1f}s")
        self._seq = 0
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        """Every process answers a Celery ping once it consumes (its model is built before that)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label}: the worker exited with {self.proc.returncode}; see {self.log_path}")
            replies = self.app.control.ping(timeout=1.0) or []
            if len(replies) >= self.processes:
                return
        raise TimeoutError(f"{self.label}: {self.processes} processes not all consuming after {timeout_s}s")

    def processes_tree(self) -> list[Any]:
        import psutil

        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def cpu_s(self) -> float:
        """CPU seconds of the supervisor and every worker process so far."""
        import psutil

        total = 0.0
        for proc in self.processes_tree():
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                continue
        return total

    def rss_mb(self) -> float:
        import psutil

        total = 0
        for proc in self.processes_tree():
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        return round(total / 2**20, 1)

    def __exit__(self, *exc: object) -> None:
        import signal

        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # forwarded to every process: soft shutdown
                try:
                    self.proc.wait(timeout=120)
                except Exception:  # noqa: BLE001 - then it goes the hard way
                    self.proc.kill()
        finally:
            from _throughput_harness import cleanup_child

            cleanup_child(self.proc)
            self.client.close()
            if self.producers is not None:
                self.producers.shutdown()


# --- a new model version, promoted and announced as the trainer does (the hot swap) ------------------


def publish_version(settings: Any, store: Any, arch: str, seed: int) -> str:
    """Upload a distinct checkpoint of `arch` as a registry version of CATEGORY, promote and announce it."""
    import redis
    from safetensors.torch import save as save_safetensors

    from shelfsight.shared.model_factory import create_clip, sha256_bytes
    from shelfsight.shared.registry import Manifest, ModelRegistry, new_version
    from shelfsight.shared.streams import announce_model
    from shelfsight.shared.taxonomy import load_taxonomy

    bundle = create_clip(arch, "none")
    generator = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone().contiguous() for k, v in bundle.model.state_dict().items()}
    # the image tower's output projection (or its last float weight): every score changes
    proj = "visual.proj" if "visual.proj" in state else [k for k, v in state.items()
                                                         if k.startswith("visual.") and v.is_floating_point()][-1]
    state[proj] += 0.5 * torch.randn(state[proj].shape, generator=generator)
    weights = save_safetensors(state)
    category = load_taxonomy(settings.taxonomy_path).category(CATEGORY)
    version = new_version()
    registry = ModelRegistry(store, settings.bucket, settings.models_prefix)
    registry.upload_version(Manifest(
        category=CATEGORY, version=version, architecture=arch, base_weights="none", taxonomy_version="bench",
        values={n: a.value_names for n, a in category.attributes.items()},
        captions={n: a.captions() for n, a in category.attributes.items()},
        weights_sha256=sha256_bytes(weights), weights_bytes=len(weights),
    ), weights)
    registry.promote(CATEGORY, version, reason="bench hot swap")
    announce_model(redis.Redis.from_url(settings.broker_url), settings.model_events_channel, CATEGORY, version)
    return version


# --- resident fp16 models --------------------------------------------------------------------------------


def resident_models(device: torch.device, arch: str, bench_model: Any, n_target: int = 100) -> dict[str, Any]:
    """Bytes of one fp16 per-category model (image tower + caption features) and whether 100 fit in 40 GB."""
    from shelfsight.worker.model_cache import module_bytes

    head_bytes = sum(h.text_features.numel() * 2 for h in bench_model.heads)  # fp16 caption features
    info: dict[str, Any] = {"architecture": arch}
    if device.type == "cuda":
        visual = bench_model.visual
        per_param = module_bytes(visual) * 2 // next(visual.parameters()).element_size()
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        n = int(min(n_target, (free * 0.8) // max(1, per_param + head_bytes)))
        before = torch.cuda.memory_allocated()
        copies = []
        for _ in range(n):
            tower = copy.deepcopy(visual).half()
            heads = [h.text_features.half().clone() for h in bench_model.heads]
            copies.append((tower, heads))
        torch.cuda.synchronize()
        measured = (torch.cuda.memory_allocated() - before) / max(1, n)
        del copies
        gc.collect()
        torch.cuda.empty_cache()
        info.update(method=f"measured: {n} fp16 copies of the image tower + caption features resident on {torch.cuda.get_device_name()}",
                    models_resident=n, bytes_per_model=int(measured), param_bytes_per_model=int(per_param + head_bytes))
        per = measured
    else:
        import open_clip

        model = open_clip.create_model(arch, pretrained=None)
        visual_params = sum(t.numel() for t in [*model.visual.parameters(), *model.visual.buffers()])
        embed = model.text_projection.shape[-1] if getattr(model, "text_projection", None) is not None else 512
        values = 11  # tops: 3 + 2 + 6 attribute values
        per = visual_params * 2 + values * embed * 2
        info.update(method="estimated from parameter bytes (no GPU): fp16 image tower params+buffers + caption features",
                    bytes_per_model=int(per), visual_params=int(visual_params))
        del model
        gc.collect()
    info["fits_100_in_40GB"] = bool(100 * per <= 40e9)
    info["gb_for_100"] = round(100 * per / 1e9, 2)
    return info


