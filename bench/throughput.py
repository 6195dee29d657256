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

(c') processes `shelfsight worker --processes N` as a real command, for each N in --processes:
              the same burst, e2e images/s per N (`e2e_by_processes`) and the CPU ms per image
              of all the worker processes together.
(e) hot swap  (--hot-swap) a new version promoted and announced during a burst on the largest
              N: seconds to the first result of the new version and until every result is,
              and failed events (dead letters + missing results: must be 0).

Also: peak RSS (and CUDA max_memory_allocated), CPU seconds per image by process and by
thread (model vs task threads vs S3 server vs redis), the worker's CPU per image outside the
model forward by component (`plumbing_ms_per_img`), and the memory of N resident fp16
per-category image towers (measured on CUDA, estimated from parameter bytes on CPU).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/throughput.py --quick            # 2-core CPU, < 10 min
    python bench/throughput.py --device cuda --model ViT-B-32 --weights none  # GPU (bench/gpu_check.sh)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/throughput.py --dry-run --hot-swap  # every phase, tiny sizes

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
from _plumbing_baselines import BASELINES
from _throughput_harness import (
    CpuMeter,
    cleanup_children,
    peak_rss_mb,
    plumbing_by_component,
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
    ProcessPhase,
    bench_bare,
    bench_pipeline,
    forward_off_cpu,
    make_images,
    no_draft_decode,
    percentile,
    publish_version,
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
    p.add_argument("--profile", action="store_true", help="py-spy the e2e burst (this process and the S3 server)")
    p.add_argument("--processes", default=None,
                   help="comma-separated N for `shelfsight worker --processes N` bursts (quick: 1,2; else 1,2,4); "
                        "'' skips them")
    p.add_argument("--hot-swap", action="store_true",
                   help="promote a new version during a burst on the largest N (time to the new version, failed events)")
    p.add_argument("--s3", choices=("standin", "moto"), default="standin",
                   help="S3 server on loopback: the bench's stand-in (bench/_s3_standin.py, keep-alive, light) or moto")
    p.add_argument("--s3-processes", type=int, default=None, help="stand-in processes (CPU default 1, GPU 4)")
    p.add_argument("--plumbing-baseline", nargs="?", const="s9", default=None,
                   choices=sorted(BASELINES),
                   help="also run the in-process bursts with a change set's per-image savings off, interleaved: "
                        "the before/after plumbing table. s9 (the default): session 9's (the worker's preprocessing op by "
                        "op, not one TorchScript call; OpenMP team calls through ctypes.CDLL); s8: session 8's (Pillow "
                        "opens every image's header) and s9's; s7: session 7's (task events flushed every loop turn, not grouped) and s8's; s6: session 6's (http.client for the "
                        "light S3 client, each thread's Redis round trips apart) and s7's; s5: session 5's (Pillow for every JPEG "
                        "decode, TF.normalize, urllib3 for the light S3 client, the delivery outcome in its own "
                        "round trip, the dead-letter check per event) and s6's; s4: session 4's transport (one "
                        "message per pop, recorded by a second round trip; one ack round trip each) and later; "
                        "s3: session 3's and later "
                        "(kombu's Redis client per command and separate in-flight LREM, full log redaction, strided "
                        "normalize, one XADD per stream entry); s2: session 2's (boto3 for S3, PIL resize, "
                        "task-started events)")
    p.add_argument("--forward-off-cpu", action="store_true",
                   help="also run the in-process bursts with the model forward replaced by a wait as long as the bare "
                        "forward's (interleaved): the plumbing when the forward does not share the CPU, as on a GPU host")
    p.add_argument("--producers", type=int, default=None,
                   help="producer processes enqueueing the --processes bursts (CPU default 1: this process; GPU 4)")
    p.add_argument("--dry-run", action="store_true", help="every phase at tiny sizes (checks the script, not speed)")
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
    if args.dry_run:  # the whole script path in about two minutes, numbers meaningless
        args.images, args.naive_images, args.paced_images = min(args.images, 48), min(args.naive_images, 8), 0
        args.unique_images, args.image_px, args.repeats = min(args.unique_images, 8), min(args.image_px, 200), 1
    if args.processes is None:
        args.processes = "1,2" if args.quick or args.dry_run else ("1,2,4,8" if gpu else "1,2,4")
    args.process_counts = [int(n) for n in str(args.processes).split(",") if n.strip()]
    args.s3_processes = args.s3_processes or (4 if gpu else 1)
    args.producers = args.producers or (4 if gpu else 1)


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
    baseline_cpu: list[dict[str, float]] = field(default_factory=list)  # per burst, --plumbing-baseline
    baseline_pairs: list[tuple[float, float]] = field(default_factory=list)
    plumbing_runs: list[dict[str, float]] = field(default_factory=list)  # plumbing by component, per burst
    off_cpu_runs: list[dict[str, float]] = field(default_factory=list)  # the same, --forward-off-cpu bursts
    off_cpu_img_s: list[float] = field(default_factory=list)
    by_processes: dict[int, dict[str, Any]] = field(default_factory=dict)
    hot_swap: dict[str, Any] = field(default_factory=dict)

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

    with tempfile.TemporaryDirectory() as tmp, services(Path(tmp), args.s3, args.s3_processes) as svc:
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
                metrics_port=0,
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
        # Early, so that a run cut short by its time limit still has it.
        m.resident = resident_models(device, "ViT-B-32" if not gpu else args.model, model)
        say(f"resident fp16 models: {m.resident}")

        # (c) end to end, burst then paced.
        meter = CpuMeter({"s3_server": svc.moto.pid, "redis_server": svc.redis.pid})
        variants = [("e2e", "as built")] + ([("e2e-baseline", "baseline")] if args.plumbing_baseline else []) \
            + ([("e2e-forward-off-cpu", "forward off cpu")] if args.forward_off_cpu else [])
        baseline_off = BASELINES[args.plumbing_baseline or "s2"]  # without a baseline, only its `on=False` is used

        def variant(kind: str, service: Any, bare_img_s: float) -> Any:
            """The switch a burst of this kind runs under (the code as built: none)."""
            if kind == "forward off cpu":
                return forward_off_cpu(1.0 / bare_img_s)
            return baseline_off(kind == "baseline", service)

        with CeleryPhase(settings_for("e2e", 2), args.concurrency, uris, "e2e") as phase:
            say(f"(c) e2e worker up: threads pool x{args.concurrency}; warming up with {args.batch_size} events")
            for _, kind in variants:
                with variant(kind, phase.service, m.bare[max(m.bare)]):
                    phase.run(min(args.batch_size, args.images))
            # Interleave bare and e2e measurements and take the median of the adjacent pairs'
            # ratios: this machine's speed drifts by up to 2x within minutes (other tenants).
            # With a baseline, the order alternates (A B, B A, ...): the machine's drift during a
            # run favours neither side.
            for repeat in range(args.repeats):
                for label, kind in (variants if repeat % 2 == 0 else variants[::-1]):
                    torch.set_num_threads(default_threads if not gpu else torch.get_num_threads())
                    bare_now = bench_bare(model, args.batch_size, min_s, 3 if not gpu else 20)
                    m.load(f"{label}_start")
                    meter.start()
                    profile_to = out_dir / "profile-e2e" if args.profile and repeat == 0 and kind == "as built" else None
                    with variant(kind, phase.service, bare_now), \
                            py_spy(profile_to, [os.getpid(), svc.moto.pid]) as files:
                        run = phase.run(args.images)
                    run.cpu_s = meter.stop()
                    m.load(f"{label}_end")
                    if kind == "baseline":
                        m.baseline_cpu.append(plumbing_by_component(run.cpu_s, run.images))
                        m.baseline_pairs.append((bare_now, run.img_s))
                    elif kind == "forward off cpu":
                        m.off_cpu_runs.append(plumbing_by_component(run.cpu_s, run.images))
                        m.off_cpu_img_s.append(run.img_s)
                    else:
                        if repeat == 0:
                            m.burst, prof_files = run, files
                        m.pairs.append((bare_now, run.img_s))
                        m.plumbing_runs.append(plumbing_by_component(run.cpu_s, run.images))
                    say(f"(c) {label} pair {repeat + 1}/{args.repeats}: bare {bare_now:.1f} images/s, e2e {run.img_s:.1f} "
                        f"images/s, ratio {run.img_s / bare_now:.3f}; plumbing "
                        f"{sum(plumbing_by_component(run.cpu_s, run.images).values()):.2f} ms/image; CPU s {run.cpu_s}")
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

        # (c') `shelfsight worker --processes N`, the real command, for each N; (e) the hot swap on the largest.
        for index, n in enumerate(args.process_counts):
            # torch threads 0: the supervisor shares the cores out among the processes (on CPU)
            n_settings = settings_for(f"procs{n}", 5 + index, torch_threads=0)
            with ProcessPhase(n_settings, n, uris, f"procs{n}", out_dir / f"workers-{n}.log",
                              producers=args.producers) as workers:
                workers.run(min(args.images, args.batch_size * n))  # every process has built its model
                m.load(f"procs{n}_start")
                cpu_before = workers.cpu_s()
                run = workers.run(args.images)
                cpu = workers.cpu_s() - cpu_before
                m.load(f"procs{n}_end")
                m.by_processes[n] = {
                    "img_s": round(run.img_s, 1), "images": run.images, "dead_letters": run.dead_letters,
                    "worker_cpu_ms_per_img": round(1000 * cpu / max(1, run.images), 2),
                    "rss_mb": workers.rss_mb(), "median_batch": statistics.median(run.batch_sizes) if run.batch_sizes else None,
                    "p50_ms": percentile(run.latencies_ms, 50), "p95_ms": percentile(run.latencies_ms, 95),
                }
                say(f"(c') --processes {n}: {run.img_s:.1f} images/s, worker CPU {1000 * cpu / max(1, run.images):.1f} "
                    f"ms/image (model included), RSS {workers.rss_mb()} MB, median batch {m.by_processes[n]['median_batch']}")
                if args.hot_swap and n == max(args.process_counts):
                    m.hot_swap = hot_swap_under_load(workers, n_settings, args, n, rate=run.img_s)

        # Bare again, to catch drift from anything else running on this machine.
        torch.set_num_threads(default_threads if not gpu else torch.get_num_threads())
        m.load("bare_after_start")
        m.bare_after = bench_bare(model, args.batch_size, min_s, 3 if not gpu else 20)
        say(f"(a') bare again at the end: {m.bare_after:.1f} images/s (torch threads {default_threads})")
        models.stop()

    result = report(m, args, device, cores=cores, default_threads=default_threads, max_wait_ms=max_wait_ms,
                    image_kib=round(images.mean_bytes / 1024, 1))
    (out_dir / "throughput.json").write_text(json.dumps(result, indent=2))
    worker_log.close()
    print(json.dumps(result), flush=True)
    return 0


def hot_swap_under_load(phase: ProcessPhase, settings: Any, args: argparse.Namespace, processes: int,
                        rate: float, timeout_s: float = 240.0) -> dict[str, Any]:
    """Events at `rate` per second (the burst's rate: the workers are loaded); a new version is
    promoted and announced from a thread once some results are in. Enqueueing goes on until
    2 x batch x N results in a row carry the new version (every process has swapped), then the
    outcomes are awaited. Times come from the results stream's entry ids (Redis's clock, the
    moment each result was announced)."""
    import threading
    from datetime import UTC, datetime

    from shelfsight.shared.enqueue import enqueue_event
    from shelfsight.shared.events import UploadEvent
    from shelfsight.shared.storage import S3ObjectStore

    client, results, dead = phase.client, settings.results_stream, settings.dead_letter_stream
    cursors = {results: "$", dead: "$"}
    cursors = {name: (e[0][0].decode() if (e := client.xrevrange(name, count=1)) else "0-0") for name in cursors}
    announced: dict[str, Any] = {}

    def promote() -> None:
        started = time.perf_counter()
        announced["version"] = publish_version(settings, S3ObjectStore(settings), args.model, seed=11)
        announced["at_ms"] = int(datetime.now(UTC).timestamp() * 1000)
        announced["publish_s"] = round(time.perf_counter() - started, 2)

    promoter = threading.Thread(target=promote, name="bench-promote")
    entries: list[tuple[int, str]] = []  # (stream time ms, model version)
    dead_letters, sent, streak = 0, 0, 0
    need = 2 * args.batch_size * processes
    t0 = time.perf_counter()

    def drain(block_ms: int) -> None:
        nonlocal dead_letters, streak
        for stream, got in client.xread(cursors, block=block_ms, count=1000) or []:
            name = stream.decode()
            cursors[name] = got[-1][0].decode()
            if name == dead:
                dead_letters += len(got)
                continue
            for entry_id, fields in got:
                version = fields.get(b"model_version", b"").decode()
                entries.append((int(entry_id.decode().split("-")[0]), version))
                streak = streak + 1 if version == announced.get("version") else 0

    while time.perf_counter() - t0 < timeout_s:
        for _ in range(max(1, int((time.perf_counter() - t0) * rate) - sent)):
            enqueue_event(phase.app, UploadEvent(product_id=f"swap-{sent:06d}", category=CATEGORY,
                                                 image=phase.uris[sent % len(phase.uris)]))
            sent += 1
        if not promoter.is_alive() and "version" not in announced and len(entries) >= need:
            promoter.start()  # the workers are busy and warm: promote now
        drain(50)
        if streak >= need:
            break
    promoter.join()
    deadline = time.monotonic() + timeout_s
    while len(entries) + dead_letters < sent and time.monotonic() < deadline:
        drain(1000)
    at, version = announced.get("at_ms"), announced.get("version")
    new = [t for t, v in entries if v == version]
    old_after = [t for t, v in entries if v != version and at is not None and t > at]
    out = {
        "processes": processes, "events": sent, "results": len(entries), "dead_letters": dead_letters,
        "failed_events": sent - len(entries), "version": version, "publish_and_announce_s": announced.get("publish_s"),
        "results_new_version": len(new), "results_old_version_after_announce": len(old_after),
        "announce_to_first_new_s": round((new[0] - at) / 1000, 2) if new and at else None,
        "announce_to_last_old_s": round((old_after[-1] - at) / 1000, 2) if old_after and at else 0.0,
        "every_process_swapped": streak >= need, "rate_events_s": round(rate, 1),
    }
    say(f"(e) hot swap under load: {out}")
    return out


def median_by_component(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each component's median over the bursts (ms per image)."""
    return {k: round(statistics.median(run.get(k, 0.0) for run in runs), 2) for k in sorted({k for run in runs for k in run})}


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
    plumbing = median_by_component(m.plumbing_runs)
    baseline, off_cpu = median_by_component(m.baseline_cpu), median_by_component(m.off_cpu_runs)
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
        "plumbing_ms_per_img": round(sum(plumbing.values()), 2),
        "plumbing_ms_per_img_by_component": plumbing,
        "plumbing_ms_per_img_runs": [round(sum(run.values()), 2) for run in m.plumbing_runs],
        "plumbing_ms_per_img_baseline": round(sum(baseline.values()), 2) if baseline else None,
        "plumbing_ms_per_img_by_component_baseline": baseline or None,
        "e2e_over_bare_baseline": (round(statistics.median(e / b for b, e in m.baseline_pairs), 3)
                                   if m.baseline_pairs else None),
        "plumbing_ms_per_img_forward_off_cpu": round(sum(off_cpu.values()), 2) if off_cpu else None,
        "plumbing_ms_per_img_by_component_forward_off_cpu": off_cpu or None,
        "plumbing_ms_per_img_runs_forward_off_cpu": [round(sum(run.values()), 2) for run in m.off_cpu_runs] or None,
        "e2e_img_s_forward_off_cpu": round(statistics.median(m.off_cpu_img_s), 1) if m.off_cpu_img_s else None,
        "e2e_by_processes": {str(n): r["img_s"] for n, r in m.by_processes.items()},
        "e2e_by_processes_detail": {str(n): r for n, r in m.by_processes.items()},
        "hot_swap": m.hot_swap or None,
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
        "dead_letters": burst.dead_letters + (naive.dead_letters if naive else 0)
                        + sum(r["dead_letters"] for r in m.by_processes.values()),
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
        "s3_server": (f"bench S3 stand-in on loopback ({args.s3_processes} process(es), keep-alive)" if args.s3 == "standin"
                      else "moto on loopback (own process)"),
        "redis": "redis-server on loopback",
        "worker": ("(c) celery threads pool, in-process (celery.contrib.testing.worker.start_worker), real extract "
                   "task; (c') `shelfsight worker --processes N` subprocesses"),
        "dry_run": bool(args.dry_run),
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    try:
        code = main()
    finally:
        cleanup_children()
    sys.exit(code)
