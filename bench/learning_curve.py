"""Data-efficiency benchmark: test accuracy and macro-F1 against the number of labeled images.

Reproduces the client's reference figure with the trainer's own `fit` on three tasks:

- visible:   pans' lid and handle (shared.samples), clearly visible features;
- ambiguous: main colour of multi-coloured tops (shared.samples, multicolour=True);
- fashion:   Fashion-MNIST product type, real product images (Debian dataset-fashion-mnist),
             counted in labeled images per class.

For each labeled budget n, the n labeled images are split train/val with the trainer's own
`assign_splits` (val keeps the lowest-val-loss checkpoint), a fresh model is built with
`create_clip` (offline default: EfficientNet-Lite0 ImageNet image tower, random text tower),
fine-tuned with `trainer.train.fit`, and scored with `trainer.evaluate.evaluate` on a separate
held-out test set. Hyper-parameters take the production path: the flags become a Settings,
and TrainConfig.from_settings builds the run's config from it (as the trainer service does).

    .venv/bin/python bench/learning_curve.py --quick      # < 15 min on a 2-core CPU

Prints one JSON object as its last line: {"task": {"n": {"accuracy": ..., "macro_f1": ...}}}.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from open_clip import image_transform
from PIL import Image

from shelfsight.shared.dev.samples import generate_products
from shelfsight.shared.events import LabelRecord
from shelfsight.shared.imaging import decode_image
from shelfsight.shared.logs import configure_logging
from shelfsight.shared.model_factory import ClipBundle, create_clip
from shelfsight.shared.settings import DEFAULT_TAXONOMY, Settings
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.trainer.dataset import LabeledImages, assign_splits, target_indices
from shelfsight.trainer.evaluate import HeadSpec, evaluate
from shelfsight.trainer.train import TrainConfig, fit

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
MAX_IMAGE_BYTES, MAX_PIXELS = 20 << 20, 40_000_000
Item = tuple[str, Image.Image, dict[str, str]]  # (product id, image, attributes)


@dataclasses.dataclass
class Task:
    """One benchmark task: a labeled pool (first n used), a fixed test set, the classifier spec."""

    name: str
    spec: HeadSpec
    pool: list[Item]  # budget order
    test: list[Item]
    budgets: list[int]
    unit: str  # "labels" or "labels per class"
    per_class: int = 1  # pool entries per budget unit


def _taxonomy_spec(category: str, attributes: Sequence[str]) -> HeadSpec:
    cat = load_taxonomy(DEFAULT_TAXONOMY).category(category)
    return HeadSpec({a: cat.attributes[a].value_names for a in attributes},
                    {a: cat.attributes[a].captions() for a in attributes})


def _samples(
    category: str, count: int, seed: int, size: int, multicolour: bool, attributes: Sequence[str]
) -> list[Item]:
    products = generate_products(category, count, seed, size=size, multicolour=multicolour)
    return [(p.product_id, decode_image(p.image, max_bytes=MAX_IMAGE_BYTES, max_pixels=MAX_PIXELS),
             {a: p.attributes[a] for a in attributes}) for p in products]


def _idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not)."""
    if not path.exists() and path.with_suffix(path.suffix + ".gz").exists():
        path = path.with_suffix(path.suffix + ".gz")
    if path.suffix == ".gz":
        with gzip.open(path) as compressed:
            raw = compressed.read()
    else:
        raw = path.read_bytes()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion(split: str, per_class: int, seed: int, invert: bool = False) -> list[Item]:
    """`per_class` images of each class, interleaved by class so any prefix of k*10 is balanced."""
    prefix = "train" if split == "train" else "t10k"
    images = _idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte")
    labels = _idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte")
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)]
    out = []
    for rank in range(per_class):
        for c in range(10):
            i = int(chosen[c][rank])
            pixels = 255 - images[i] if invert else images[i]
            out.append((f"{prefix}-{i}", Image.fromarray(pixels).convert("RGB"), {"type": FASHION_CLASSES[c]}))
    return out


def build_tasks(quick: bool, size: int, only: Sequence[str], invert_fashion: bool = False) -> list[Task]:
    tasks = []
    test_count = 200 if quick else 600
    if "visible" in only:
        budgets = [10, 30, 60, 120] if quick else [10, 30, 60, 120, 250, 500]
        attrs = ["lid", "handle"]
        tasks.append(Task("visible", _taxonomy_spec("pans", attrs), _samples("pans", max(budgets), 0, size, False, attrs),
                          _samples("pans", test_count, 1, size, False, attrs), budgets, "labels"))
    if "ambiguous" in only:
        budgets = [10, 30, 60, 120, 250] if quick else [10, 30, 60, 120, 250, 500, 1000]
        attrs = ["main_colour"]
        tasks.append(Task("ambiguous", _taxonomy_spec("tops", attrs),
                          _samples("tops", max(budgets), 0, size, True, attrs),
                          _samples("tops", test_count, 1, size, True, attrs), budgets, "labels"))
    if "fashion" in only:
        budgets = [10, 50, 100] if quick else [10, 50, 100, 600]
        spec = HeadSpec({"type": FASHION_CLASSES}, {"type": FASHION_CLASSES})
        tasks.append(Task("fashion", spec, _fashion("train", max(budgets), 0, invert_fashion),
                          _fashion("test", 100 if quick else 1000, 1, invert_fashion), budgets, "labels per class", per_class=10))
    return tasks


def _labeled(items: Sequence[Item], spec: HeadSpec) -> LabeledImages:
    records = [LabelRecord(product_id=i, category="bench", image="s3://bench/x", attributes=a) for i, _, a in items]
    return LabeledImages([im for _, im, _ in items], target_indices(records, spec.values), [i for i, _, _ in items])


def _split(items: Sequence[Item], val_fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    records = [LabelRecord(product_id=i, category="bench", image="s3://bench/x", attributes=a) for i, _, a in items]
    assignment = assign_splits(records, {}, val_fraction=val_fraction, test_fraction=0.0, seed=seed)
    return ([it for it in items if assignment[it[0]] == "train"], [it for it in items if assignment[it[0]] == "val"])


def bundle_at(size: int, arch: str, weights: str, hflip: bool = False, crop_scale: float = 0.9) -> ClipBundle:
    """The offline default model from the one factory; preprocessing at `size` px if not native.

    The EfficientNet tower is fully convolutional with average pooling, so it accepts any input
    size; only the resize in the preprocessing changes (same mean/std as create_clip's).
    `hflip` adds random horizontal flips to the training transform (used with --augment), and
    `crop_scale` sets the smallest random-resized-crop area (open_clip's default is 0.9).
    """
    bundle = create_clip(arch, weights, device="auto", precision="fp32")
    if size != bundle.image_size or crop_scale != 0.9:
        bundle = dataclasses.replace(
            bundle, image_size=size,
            preprocess=image_transform(size, is_train=False, mean=bundle.mean, std=bundle.std),
            preprocess_train=image_transform(size, is_train=True, mean=bundle.mean, std=bundle.std,
                                             aug_cfg={"scale": (crop_scale, 1.0)}),
        )
    if hflip:
        from torchvision.transforms import Compose, RandomHorizontalFlip

        bundle = dataclasses.replace(bundle, preprocess_train=Compose([RandomHorizontalFlip(), bundle.preprocess_train]))
    return bundle


def bench_settings(args: argparse.Namespace) -> Settings:
    """The trainer's Settings with the benchmark's training flags in place of the train_* defaults."""
    return Settings(
        train_epochs=args.epochs, train_batch_size=args.batch_size, train_lr=args.lr,
        train_weight_decay=args.weight_decay, train_warmup_steps=args.warmup_steps, train_patience=args.patience,
        train_mode=args.mode, train_last_n_blocks=args.last_n_blocks, train_seed=args.seed,
    )


def run_point(task: Task, n: int, settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    labeled = task.pool[: n * task.per_class]
    train, val = _split(labeled, args.val_fraction, settings.train_seed)
    bundle = bundle_at(args.image_size, args.arch, args.weights, hflip=args.augment, crop_scale=args.crop_scale)
    # what Settings does not carry (see trainer.train's constants) is overridden here
    config = TrainConfig.from_settings(
        settings, head_lr_scale=args.head_lr_scale, augment=args.augment,
        steps_per_epoch=max(args.min_steps_per_epoch, math.ceil(len(train) / settings.train_batch_size)),
    )
    started = time.monotonic()
    result = fit(bundle, task.spec, _labeled(train, task.spec), _labeled(val, task.spec), config)
    scores = evaluate(bundle, task.spec, _labeled(task.test, task.spec))
    point = {"accuracy": round(scores.accuracy, 4), "macro_f1": round(scores.macro_f1, 4), "train": len(train),
             "val": len(val), "test": len(task.test), "epochs_run": len(result.history),
             "best_epoch": result.best_epoch, "seconds": round(time.monotonic() - started, 1)}
    print(f"{task.name} n={n}: {json.dumps(point)}", file=sys.stderr, flush=True)
    return point


def plot(results: dict[str, dict[str, dict[str, Any]]], tasks: Sequence[Task], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    titles = {"visible": "Visible features (pan lid, handle)", "ambiguous": "Ambiguous (main colour, multi-coloured tops)",
              "fashion": "Fashion-MNIST product type"}
    for ax, task in zip(axes[0], tasks, strict=True):
        xs = [int(n) for n in results[task.name]]
        for metric, marker in (("accuracy", "o"), ("macro_f1", "s")):
            ax.plot(xs, [results[task.name][str(n)][metric] for n in xs], marker=marker, label=metric)
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(f"labeled training images ({task.unit})")
        ax.set_title(titles.get(task.name, task.name), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle("Fine-tuned CLIP (EfficientNet-Lite0 ImageNet tower, random text tower): test scores vs labels")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer budgets and test images (< 15 min on 2 CPUs)")
    parser.add_argument("--tasks", default="visible,ambiguous,fashion")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--arch", default="shelfsight-effnet-lite0")
    parser.add_argument("--weights", default="imagenet-tower")
    parser.add_argument("--image-size", type=int, default=96, help="model input size (native: 224)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--min-steps-per-epoch", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--head-lr-scale", type=float, default=1.0,
                        help="LR multiplier of text tower, projections, logit scale; >= 3 collapsed the "
                        "random text tower here (all captions alike, loss stuck at ln K)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--mode", default="full", choices=["full", "last_n", "frozen_text"])
    parser.add_argument("--last-n-blocks", type=int, default=2)
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="no random flips / resized crops (faster, ~2 points worse on Fashion-MNIST)")
    parser.add_argument("--crop-scale", type=float, default=0.9, help="smallest random crop area, with --augment")
    parser.add_argument("--invert-fashion", action="store_true",
                        help="show Fashion-MNIST dark-on-light, as the shop photos it was made from")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every task at every budget; write JSON and PNG; print the summary JSON last."""
    args = parse_args(argv)
    settings = bench_settings(args)
    configure_logging("console", "WARNING")  # logs on stderr: stdout's last line is the summary
    torch.manual_seed(args.seed)
    started = time.monotonic()
    tasks = build_tasks(args.quick, args.image_size, args.tasks.split(","), args.invert_fashion)
    print(f"data ready in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for task in tasks:
        results[task.name] = {str(n): run_point(task, n, settings, args) for n in task.budgets}
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "quick" if args.quick else "full"
    meta = {"date": str(date.today()), "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, "
            f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
            "seconds": round(time.monotonic() - started, 1), "command": " ".join(sys.argv),
            "config": {k: str(v) for k, v in vars(args).items()}}
    (args.out / f"learning_curve_{suffix}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, tasks, args.out / f"learning_curve_{suffix}.png")
    print(f"total {meta['seconds']}s; wrote {args.out}/learning_curve_{suffix}.json and .png", file=sys.stderr)
    summary = {t: {n: {"accuracy": p["accuracy"], "macro_f1": p["macro_f1"]} for n, p in r.items()}
               for t, r in results.items()}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
