#!/usr/bin/env python
"""Throughput of the extraction worker, four ways, in ONE run, same model and batch size.

(a) bare      pre-decoded tensors -> CategoryModel.score, batch B                       images/s
(b) pipeline  JPEG bytes in memory -> ExtractionService.prepare (CPU: PIL draft decode +
              preprocess in a thread pool; CUDA: JPEG header only) -> ExtractionService._run_batch
              (CUDA: nvJPEG decode_batch) -> ResultRecord per image, as the worker builds them  images/s
(c) e2e       Redis -> Celery worker (threads pool, the real `extract` task + ExtractionService)
              -> S3 GET (moto server on loopback) -> decode -> micro-batched model -> S3 PUT of
              the result file. Timed from the first enqueue to the last result's
              timings.finished_at.                                                         images/s
              Latency per event = result timings.finished_at - event submitted_at (the event is
              built right before it is enqueued), in a burst and in a paced run.
(d) naive     the same worker configured naively: one image per batch (batch_size=1,
              batch_max_wait_ms=0), concurrency 1, PIL decode without draft mode.           images/s

Also: peak RSS (and CUDA max_memory_allocated), CPU seconds per image by process and by
thread (model vs task threads vs moto vs redis), and the memory of N resident fp16
per-category image towers (measured on CUDA, estimated from parameter bytes on CPU).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/throughput.py --quick            # 2-core CPU, < 10 min
    python bench/throughput.py --device cuda --model ViT-B-32 --weights none  # GPU (bench/gpu_check.sh)

Progress goes to stderr; the LAST line of stdout is one JSON object. This file is the run and
its report; the measurements are in _throughput_phases.py, the child processes, CPU meter and
profiler in _throughput_harness.py (siblings, imported from the script's own folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# Before torch, open_clip or boto3 is imported (by this script or its sibling modules):
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")

# Siblings in bench/ (the script's own folder is first on sys.path when run as a script).
import torch
from _throughput_harness import (
    CpuMeter,
    cleanup_children,
    peak_rss_mb,
    py_spy,
    say,
    services,
    services_rss,
    summarize_profile,
)
from _throughput_phases import (
    CATEGORY,
    CeleryPhase,
    PhaseResult,
    bench_bare,
    bench_pipeline,
    make_images,
    no_draft_decode,
    percentile,
    resident_models,
    upload_images,
)

OUT_DIR = Path(__file__).resolve().parent / "out"
MOTO_KEY = "test"  # moto accepts any credentials; this is the conventional dummy one


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cuda if available)")
    p.add_argument("--model", default=None, help="open_clip architecture (CPU default shelfsight-effnet-lite0, GPU ViT-B-32)")
    p.add_argument("--weights", default=None, help="CPU default imagenet-tower, GPU default none (random init)")
    p.add_argument("--precision", default="auto", help="auto = fp16 on CUDA, fp32 on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="CPU default 8, GPU 256")
    p.add_argument("--images", type=int, default=None, help="images for the e2e burst (and pipeline)")
    p.add_argument("--naive-images", type=int, default=None)
    p.add_argument("--paced-images", type=int, default=None, help="images for the paced latency run (0 skips)")
    p.add_argument("--paced-load", type=float, default=0.6, help="paced rate as a fraction of the burst e2e rate")
    p.add_argument("--image-px", type=int, default=None, help="JPEG side in pixels (CPU default 400, GPU 400)")
    p.add_argument("--unique-images", type=int, default=None, help="distinct JPEGs generated (reused round robin)")
    p.add_argument("--concurrency", type=int, default=None, help="worker threads (default 2 x batch size)")
    p.add_argument("--max-wait-ms", type=float, default=None, help="batch_max_wait_ms (default: Settings default)")
    p.add_argument("--torch-threads", type=int, default=None, help="settings.torch_threads for the e2e worker (CPU default: torch's default, all cores)")
    p.add_argument("--decode-threads", type=int, default=None, help="pipeline decode pool (CPU default: cores)")
    p.add_argument("--quick", action="store_true", help="small run for the 2-core CPU (< 10 min)")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="interleaved (bare, e2e) pairs; the ratio is their median")
    p.add_argument("--profile", action="store_true", help="py-spy the e2e burst (this process and moto)")
    p.add_argument("--out", default=None, help="directory for logs/profile/result JSON (default bench/out or $OUT)")
    return p.parse_args(argv)


def fill_defaults(args: argparse.Namespace, gpu: bool, cores: int, default_threads: int) -> None:
    """Replace every unset option with its CPU or GPU default, in place."""
    args.model = args.model or ("ViT-B-32" if gpu else "shelfsight-effnet-lite0")
    args.weights = args.weights or ("none" if gpu else ("imagenet-tower" if args.model == "shelfsight-effnet-lite0" else "none"))
    # CPU: batch 8, not 32: this tower runs fewer images/s per core at 32 (cache-bound depthwise
    # convs); measured in docs/performance.md. GPU: 256, where the anchors peak.
    args.batch_size = args.batch_size or (256 if gpu else 8)
    if args.images is None:
        args.images = (4096 if args.quick else 16384) if gpu else (384 if args.quick else 1024)
    if args.naive_images is None:
        args.naive_images = (512 if gpu else 48) if args.quick else (1024 if gpu else 128)
    if args.paced_images is None:
        args.paced_images = (1024 if gpu else 96) if args.quick else (2048 if gpu else 192)
    args.image_px = args.image_px or 400
    args.unique_images = args.unique_images or (512 if gpu else 64)
    args.concurrency = args.concurrency or 2 * args.batch_size
    args.decode_threads = args.decode_threads or (8 if gpu else cores)
    # The worker keeps torch's default intra-op threads (all cores), like the bare baseline;
    # interleaved pairs measured e2e faster at 2 threads than at 1 here (docs/performance.md).
    args.torch_threads = args.torch_threads if args.torch_threads is not None else (0 if gpu else default_threads)


def route_worker_logs(out_dir: Path) -> IO[str]:
    """The worker's own per-event logs, rendered as in production (JSON), but into worker.log:
    the console carries only the bench's progress lines."""
    from shelfsight.shared.logs import configure_logging

    configure_logging("json", "INFO")
    worker_log = open(out_dir / "worker.log", "w")  # noqa: SIM115 - closed by main after the report
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(worker_log)
    return worker_log


@dataclass
class Measured:
    """What the phases found, filled in as they run; `report` turns it into the result JSON."""

    bare: dict[int, float] = field(default_factory=dict)  # images/s by torch threads (0: default)
    pipeline: float = 0.0
    pipeline_cuda_mb: float | None = None
    pairs: list[tuple[float, float]] = field(default_factory=list)  # (bare, e2e) images/s, interleaved
    burst: PhaseResult | None = None
    paced: PhaseResult | None = None
    naive: PhaseResult | None = None
    bare_after: float = 0.0
    profile: dict[str, float] = field(default_factory=dict)
    services_rss: dict[str, float] = field(default_factory=dict)
    resident: dict[str, Any] = field(default_factory=dict)
    precision: str = ""
    loadavg: dict[str, list[float]] = field(default_factory=dict)

    def load(self, tag: str) -> None:
        """Note the load average now: other tenants of this machine skew every number."""
        self.loadavg[tag] = [round(x, 2) for x in os.getloadavg()]


def main(argv: Sequence[str] | None = None) -> int:
    """Run every phase, print progress to stderr and the result JSON as stdout's last line."""
    args = parse_args(argv)
    from shelfsight.shared.model_factory import resolve_device
    from shelfsight.shared.settings import Settings

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    cores = os.cpu_count() or 1
    default_threads = torch.get_num_threads()
    fill_defaults(args, gpu, cores, default_threads)
    out_dir = Path(args.out or os.environ.get("OUT") or OUT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    worker_log = route_worker_logs(out_dir)

    def handle_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handle_signal)

    base = Settings()
    max_wait_ms = args.max_wait_ms if args.max_wait_ms is not None else base.batch_max_wait_ms
    say(f"device {device}, model {args.model} weights {args.weights}, batch {args.batch_size}, "
        f"e2e images {args.images}, concurrency {args.concurrency}, max wait {max_wait_ms} ms, "
        f"torch threads {args.torch_threads or default_threads} (default {default_threads}), cores {cores}")
    m = Measured()

    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    images = make_images(args.unique_images, args.image_px)

    with tempfile.TemporaryDirectory() as tmp, services(Path(tmp)) as svc:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"

        def settings_for(phase: str, db: int, **over: Any) -> Settings:
            fields: dict[str, Any] = dict(
                broker_url=f"{svc.redis_url}/{db}", result_backend=f"{svc.redis_url}/{db}",
                s3_endpoint_url=svc.s3_endpoint, s3_access_key_id=MOTO_KEY, s3_secret_access_key=MOTO_KEY,
                bucket=bucket, allowed_image_buckets=[bucket], model_arch=args.model, model_weights=args.weights,
                device=str(device), precision=args.precision, batch_size=args.batch_size,
                batch_max_wait_ms=max_wait_ms, worker_concurrency=args.concurrency,
                torch_threads=args.torch_threads, results_prefix=f"results-{phase}",
                results_stream=f"bench:{phase}:results", dead_letter_stream=f"bench:{phase}:dead",
                dead_letter_prefix=f"dead-{phase}", model_poll_interval_s=3600.0,
                s3_max_pool_connections=max(64, args.concurrency + 16), log_format="json",
            )
            fields.update(over)
            return Settings(**fields)

        from shelfsight.shared.registry import ModelRegistry
        from shelfsight.shared.storage import InMemoryObjectStore, S3ObjectStore
        from shelfsight.shared.streams import InMemoryPublisher
        from shelfsight.shared.taxonomy import load_taxonomy
        from shelfsight.worker.extractor import ExtractionService
        from shelfsight.worker.model_cache import ModelCache

        uris = upload_images(S3ObjectStore(settings_for("setup", 1)), bucket, images)

        # (a) + (b): the worker's own classes, in memory (no broker, no S3).
        pipe_settings = settings_for("pipeline", 1)
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        taxonomy = load_taxonomy(pipe_settings.taxonomy_path)
        mem_store = InMemoryObjectStore()
        models = ModelCache(pipe_settings, taxonomy, mem_store, ModelRegistry(mem_store, bucket))
        t = time.perf_counter()
        model = models.get(CATEGORY)
        m.precision = str(model.dtype).removeprefix("torch.")
        say(f"model {model.architecture} ({model.dtype}, {model.device}, input {model.image_size}px) ready in {time.perf_counter() - t:.1f}s")
        service = ExtractionService(pipe_settings, taxonomy, mem_store, InMemoryPublisher(), models)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        min_s = 3.0 if args.quick else 8.0
        m.load("bare_start")
        for threads in sorted({default_threads, args.torch_threads or default_threads}) if not gpu else [0]:
            if threads:
                torch.set_num_threads(threads)
            m.bare[threads] = bench_bare(model, args.batch_size, min_s, 3 if not gpu else 20)
            say(f"(a) bare: {m.bare[threads]:.1f} images/s (batch {args.batch_size}, torch threads {threads or 'default'})")
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        n_pipe = args.images if not gpu else max(args.images, 8 * args.batch_size)
        m.load("pipeline_start")
        service.prepare(images.jpegs[0], model)  # warm
        m.pipeline = bench_pipeline(service, model, images, n_pipe, args.batch_size, args.decode_threads)
        say(f"(b) pipeline: {m.pipeline:.1f} images/s ({n_pipe} images, decode threads {args.decode_threads}, "
            f"{'nvJPEG decode_batch' if gpu and pipe_settings.decode_on_gpu else 'PIL draft decode'})")
        service.close()
        m.pipeline_cuda_mb = round(torch.cuda.max_memory_allocated() / 2**20, 1) if gpu else None

        # (c) end to end, burst then paced.
        meter = CpuMeter({"moto_server": svc.moto.pid, "redis_server": svc.redis.pid})
        with CeleryPhase(settings_for("e2e", 2), args.concurrency, uris, "e2e") as phase:
            say(f"(c) e2e worker up: threads pool x{args.concurrency}; warming up with {args.batch_size} events")
            phase.run(min(args.batch_size, args.images))
            # Interleave bare and e2e measurements and take the median of the adjacent pairs'
            # ratios: this machine's speed drifts by up to 2x within minutes (other tenants).
            for repeat in range(args.repeats):
                torch.set_num_threads(default_threads if not gpu else torch.get_num_threads())
                bare_now = bench_bare(model, args.batch_size, min_s, 3 if not gpu else 20)
                m.load("e2e_start")
                meter.start()
                profile_to = out_dir / "profile-e2e" if args.profile and repeat == 0 else None
                with py_spy(profile_to, [os.getpid(), svc.moto.pid]) as files:
                    run = phase.run(args.images)
                run.cpu_s = meter.stop()
                m.load("e2e_end")
                if repeat == 0:
                    m.burst, prof_files = run, files
                m.pairs.append((bare_now, run.img_s))
                say(f"(c) pair {repeat + 1}/{args.repeats}: bare {bare_now:.1f} images/s, e2e {run.img_s:.1f} images/s, "
                    f"ratio {run.img_s / bare_now:.3f}")
            burst = m.burst
            assert burst is not None, "--repeats must be at least 1"
            say(f"(c) e2e burst: {burst.img_s:.1f} images/s over {burst.images} images in {burst.seconds:.1f}s; "
                f"burst latency p50 {percentile(burst.latencies_ms, 50)} ms p95 {percentile(burst.latencies_ms, 95)} ms; "
                f"median batch {statistics.median(burst.batch_sizes) if burst.batch_sizes else 0}; stages {burst.stage_ms}")
            say(f"(c) CPU seconds during burst: {burst.cpu_s}")
            if args.paced_images:
                rate = max(1.0, args.paced_load * burst.img_s)
                m.paced = phase.run(args.paced_images, rate=rate)
                say(f"(c) e2e paced at {rate:.1f} events/s ({args.paced_load:.0%} of burst): latency p50 "
                    f"{percentile(m.paced.latencies_ms, 50)} ms p95 {percentile(m.paced.latencies_ms, 95)} ms")
            m.services_rss = services_rss(svc)
        m.profile = summarize_profile(prof_files) if args.profile else {}
        if m.profile:
            say(f"(c) py-spy samples by bucket (% of non-idle samples, this process + moto): {m.profile}")

        # (d) naive: the same worker, one image per task, no draft, no batching, concurrency 1.
        if not args.skip_naive:
            naive_settings = settings_for("naive", 3, batch_size=1, batch_max_wait_ms=0.0, worker_concurrency=1,
                                          torch_threads=default_threads if not gpu else 0)
            with no_draft_decode(), CeleryPhase(naive_settings, 1, uris, "naive") as phase:
                phase.run(4)
                m.load("naive_start")
                m.naive = phase.run(args.naive_images)
                m.load("naive_end")
            say(f"(d) naive: {m.naive.img_s:.1f} images/s over {m.naive.images} images "
                f"(batch 1, concurrency 1, full PIL decode); stages {m.naive.stage_ms}")

        # Bare again, to catch drift from anything else running on this machine.
        torch.set_num_threads(default_threads if not gpu else torch.get_num_threads())
        m.load("bare_after_start")
        m.bare_after = bench_bare(model, args.batch_size, min_s, 3 if not gpu else 20)
        say(f"(a') bare again at the end: {m.bare_after:.1f} images/s (torch threads {default_threads})")
        m.resident = resident_models(device, "ViT-B-32" if not gpu else args.model, model)
        say(f"resident fp16 models: {m.resident}")
        models.stop()

    result = report(m, args, device, cores=cores, default_threads=default_threads, max_wait_ms=max_wait_ms,
                    image_kib=round(images.mean_bytes / 1024, 1))
    (out_dir / "throughput.json").write_text(json.dumps(result, indent=2))
    worker_log.close()
    print(json.dumps(result), flush=True)
    return 0


def report(m: Measured, args: argparse.Namespace, device: torch.device, *, cores: int, default_threads: int,
           max_wait_ms: float, image_kib: float) -> dict[str, Any]:
    """The result JSON: headline rates and ratios first, then what they were measured with."""
    gpu = device.type == "cuda"
    burst, paced, naive, pairs = m.burst, m.paced, m.naive, m.pairs
    assert burst is not None
    bare_best = max([*m.bare.values(), m.bare_after])
    pair_ratios = sorted(e2e / b for b, e2e in pairs)
    median_pair = sorted(pairs, key=lambda p: p[1] / p[0])[len(pairs) // 2]
    lat = paced.latencies_ms if paced else burst.latencies_ms
    return {
        "device": (torch.cuda.get_device_name(device) if gpu else f"cpu ({cores} cores)"),
        "model": args.model,
        "bare_img_s": round(bare_best, 1),
        "pipeline_img_s": round(m.pipeline, 1),
        "e2e_img_s": round(statistics.median(e for _, e in pairs), 1),
        "naive_img_s": round(naive.img_s, 1) if naive else None,
        "e2e_over_bare": round(statistics.median(pair_ratios), 3),
        "e2e_over_bare_pairs": [round(r, 3) for r in pair_ratios],
        "e2e_over_best_bare": round(max(e for _, e in pairs) / bare_best, 3),
        "bare_img_s_median_pair": round(median_pair[0], 1),
        "e2e_over_naive": round(statistics.median(e for _, e in pairs) / naive.img_s, 2) if naive else None,
        "p50_ms": percentile(lat, 50),
        "p95_ms": percentile(lat, 95),
        "latency": ("result timings.finished_at - event submitted_at (event built just before enqueue); "
                    + (f"paced run, {paced.images} events at {args.paced_load:.0%} of the burst rate" if paced
                       else "burst run (includes queueing behind the backlog)")),
        "burst_p50_ms": percentile(burst.latencies_ms, 50),
        "burst_p95_ms": percentile(burst.latencies_ms, 95),
        "naive_p50_ms": percentile(naive.latencies_ms, 50) if naive else None,
        "weights": args.weights,
        "precision": m.precision,
        "batch_size": args.batch_size,
        "batch_max_wait_ms": max_wait_ms,
        "worker_concurrency": args.concurrency,
        "torch_threads_e2e": args.torch_threads or default_threads,
        "bare_img_s_by_threads": {str(k or "default"): round(v, 1) for k, v in m.bare.items()},
        "bare_after_img_s": round(m.bare_after, 1),
        "images": burst.images,
        "naive_images": naive.images if naive else 0,
        "dead_letters": burst.dead_letters + (naive.dead_letters if naive else 0),
        "image_px": args.image_px,
        "image_kib": image_kib,
        "e2e_median_batch": statistics.median(burst.batch_sizes) if burst.batch_sizes else None,
        "e2e_stage_median_ms": burst.stage_ms,
        "e2e_cpu_s": burst.cpu_s,
        "e2e_seconds": round(burst.seconds, 2),
        "profile_pct": m.profile,
        "peak_rss_mb": peak_rss_mb(),
        "services_rss_mb": m.services_rss,
        "cuda_max_memory_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if gpu else None,
        "pipeline_cuda_max_memory_allocated_mb": m.pipeline_cuda_mb,
        "resident_fp16_models": m.resident,
        "loadavg": m.loadavg,
        "s3_server": "moto on loopback (own process)",
        "redis": "redis-server on loopback",
        "worker": "celery threads pool, in-process (celery.contrib.testing.worker.start_worker), real extract task",
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    try:
        code = main()
    finally:
        cleanup_children()
    sys.exit(code)
