#!/usr/bin/env python
"""What the extraction worker's CPU decode and preprocessing cost per image, on their own: no
Celery, no S3, no Redis, no model. The same functions the worker's task threads call
(`shared.imaging.open_header` + `decode_rgb`, then `shared.framing.preprocess_array`), on the
bench's synthetic 400 px product JPEGs, from 1, 2 and 16 threads at once (16 is the CPU worker's
default concurrency: 2 x batch 8). Each figure is the threads' CPU time per image, the median of
`--repeats` runs.

Also: the float copy and normalisation per image (as the task threads do it) against the same
for a stacked uint8 batch of 8 (as a lane would, if the task threads handed it uint8 pixels),
as the whole process's CPU (torch's intra-op threads included).

    .venv/bin/python bench/decode_cost.py
    .venv/bin/python bench/decode_cost.py --threads 1,16 --images 768 --repeats 5
    .venv/bin/python bench/decode_cost.py --baseline     # and with session 9's savings off, alternating

The last line of stdout is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _plumbing_baselines import BASELINES
from _throughput_phases import make_images

from shelfsight.shared import framing, imaging

SIZE = 224  # the CPU bench model's input (EfficientNet-Lite0 tower) and ViT-B-32's
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # open_clip's
LIMIT = 10**8


def decode(data: bytes) -> Any:
    with imaging.open_header(data, max_bytes=LIMIT, max_pixels=LIMIT) as header:
        return imaging.decode_rgb(data, header, max_pixels=LIMIT, draft_size=SIZE)


def thread_cpu_ms_per_item(items: list[Any], work: Callable[[Any], Any], threads: int, n: int) -> float:
    """`n` calls of `work` over `items` (round robin) from `threads` threads; their CPU ms per call."""
    next_index, lock, spent = [0], threading.Lock(), []

    def body() -> None:
        started = time.thread_time()
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= n:
                break
            work(items[i % len(items)])
        spent.append(time.thread_time() - started)

    pool = [threading.Thread(target=body) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return 1000 * sum(spent) / n


def process_cpu_ms_per_item(items: list[Any], work: Callable[[Any], Any], n: int) -> float:
    """`n` calls of `work` from this thread; the whole process's CPU ms per call (torch's own threads included)."""
    started = time.process_time()
    for i in range(n):
        work(items[i % len(items)])
    return 1000 * (time.process_time() - started) / n


def normalise_one(pixels: torch.Tensor) -> torch.Tensor:
    out = torch.empty(pixels.shape, dtype=torch.float32)
    out.copy_(pixels)
    scaled_mean, scaled_std = framing._normalizer(MEAN, STD, torch.device("cpu"))
    return out.sub_(scaled_mean).div_(scaled_std)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2,16", help="comma-separated thread counts")
    p.add_argument("--images", type=int, default=384, help="images per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image-px", type=int, default=400)
    p.add_argument("--baseline", nargs="?", const="s9", default=None, choices=("s9",),
                   help="also run each stage with session 9's savings off (bench/_plumbing_baselines.py), alternating")
    args = p.parse_args()
    jpegs = make_images(64, args.image_px).jpegs
    rgbs = [decode(data) for data in jpegs]
    stages: dict[str, Callable[[Any], Any]] = {
        "decode": decode,
        "preprocess": lambda rgb: framing.preprocess_array(rgb, SIZE, MEAN, STD),  # looked up per call: a
        "decode+preprocess": lambda data: framing.preprocess_array(decode(data), SIZE, MEAN, STD),  # baseline swaps it
    }
    inputs = {"decode": jpegs, "preprocess": rgbs, "decode+preprocess": jpegs}
    threads = [int(t) for t in args.threads.split(",")]
    out: dict[str, Any] = {"image_px": args.image_px, "input_px": SIZE, "images": args.images,
                           "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    variants = [False, True] if args.baseline else [False]
    for name, work in stages.items():
        for count in threads:
            runs: dict[bool, list[float]] = {False: [], True: []}
            for repeat in range(args.repeats):
                for before in (variants if repeat % 2 == 0 else variants[::-1]):  # A B, B A: drift favours neither
                    with BASELINES[args.baseline or "s9"](before, None):
                        runs[before].append(thread_cpu_ms_per_item(inputs[name], work, count, args.images))
            for before in variants:
                key = f"{name}_ms_per_img_threads_{count}" + (f"_baseline_{args.baseline}" if before else "")
                out[key] = round(statistics.median(runs[before]), 3)
                label = f"baseline {args.baseline}" if before else "as built"
                print(f"{name:18s} {count:3d} threads, {label:11s}: {[round(r, 3) for r in runs[before]]} ms/image",
                      file=sys.stderr, flush=True)

    resized = [torch.from_numpy(rgb).permute(2, 0, 1)[:, :SIZE, :SIZE] for rgb in rgbs]  # channels-last uint8 views
    batches = [resized[i:i + 8] for i in range(0, len(resized), 8)]
    per_image = [process_cpu_ms_per_item(resized, normalise_one, args.images) for _ in range(args.repeats)]
    per_batch = [process_cpu_ms_per_item(batches, lambda b: normalise_one(torch.stack(b)), args.images // 8) / 8
                 for _ in range(args.repeats)]
    out["normalise_ms_per_img_one_by_one"] = round(statistics.median(per_image), 3)
    out["normalise_ms_per_img_stacked_batch_8"] = round(statistics.median(per_batch), 3)
    print(f"normalise: one by one {[round(r, 3) for r in per_image]}, stacked batch of 8 "
          f"{[round(r, 3) for r in per_batch]} ms/image (process CPU, torch threads {torch.get_num_threads()})",
          file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
