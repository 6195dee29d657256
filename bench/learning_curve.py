"""Data-efficiency benchmark: test accuracy and macro-F1 against the number of labeled images.

The model is the offline default, `shelfsight-effnet-lite0` with weights `imagenet-tower`: an
ImageNet-1k EfficientNet-Lite0 image tower and a randomly initialised text tower, joined
CLIP-style. It is not a pretrained CLIP; no CLIP weights can be had offline here.

Three tasks, with the trainer's own code:

- visible:   pans' lid and handle (shared.dev.samples), clearly visible features;
- ambiguous: main colour of multi-coloured tops (shared.dev.samples, multicolour=True);
- fashion:   Fashion-MNIST product type, real product images (Debian dataset-fashion-mnist),
             counted in labeled images per class.

One configuration path: the flags become a Settings (the same `train_*` fields production reads,
flip, minimum steps per epoch and image size included), TrainConfig.from_settings builds the
run's config from it and create_clip builds the model at settings.train_image_size, as the
trainer service does. Nothing is overridden behind the settings.

For each labeled budget n and each seed s (>= 5 seeds): a labeled pool drawn with seed s, its
first n split train/val with the trainer's `assign_splits` (split seed s; val keeps the
lowest-val-loss checkpoint), a fresh model fine-tuned with `trainer.train.fit` (training seed
s), scored with `trainer.evaluate.evaluate` on a held-out test set that no run trains or
chooses on. Each point is the mean over seeds with its standard error.

Choices (learning rate, flip, ...) are made with `--select`, on a selection split drawn apart
from both the labeled pools and the test set, never on test:

    .venv/bin/python bench/learning_curve.py --select     # compare candidate configs on the selection split
    .venv/bin/python bench/learning_curve.py --quick      # < 30 min on a 2-core CPU, 5 seeds per point

Prints one JSON object as its last line:
{"task": {"n": {"accuracy", "accuracy_se", "macro_f1", "macro_f1_se", "seeds"}}}.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from shelfsight.shared.dev.samples import generate_products
from shelfsight.shared.events import LabelRecord
from shelfsight.shared.imaging import decode_image
from shelfsight.shared.logs import configure_logging
from shelfsight.shared.model_factory import create_clip
from shelfsight.shared.settings import DEFAULT_TAXONOMY, Settings
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.trainer.dataset import LabeledImages, assign_splits, target_indices
from shelfsight.trainer.evaluate import HeadSpec, evaluate
from shelfsight.trainer.train import TrainConfig, fit

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
FASHION_POOL_END = 50_000  # train-file images [0, 50k) feed the labeled pools, [50k, 60k) the selection split
MAX_IMAGE_BYTES, MAX_PIXELS = 20 << 20, 40_000_000
MIN_SEEDS = 5
MODEL_NAME = "EfficientNet-Lite0 (ImageNet-1k) image tower + randomly initialised text tower (not CLIP)"
Item = tuple[str, Image.Image, dict[str, str]]  # (product id, image, attributes)

# --select: candidate configurations (flag overrides), compared on the selection split only.
CANDIDATES: list[dict[str, Any]] = [
    {"lr": 1e-4, "flip": True},
    {"lr": 2e-4, "flip": True},
    {"lr": 5e-5, "flip": True},
    {"lr": 1e-4, "flip": False},
]


@dataclasses.dataclass
class Task:
    """One benchmark task: labeled pools (one per seed, budget order), a test set, a selection set."""

    name: str
    spec: HeadSpec
    pool: Callable[[int, int], list[Item]]  # (seed, size) -> pool in budget order
    test: list[Item]
    selection: list[Item]
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


_FASHION: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _fashion_file(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    if prefix not in _FASHION:
        _FASHION[prefix] = (_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte"),
                            _idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte"))
    return _FASHION[prefix]


def _fashion(prefix: str, per_class: int, seed: int, index_range: tuple[int, int] | None = None) -> list[Item]:
    """`per_class` images of each class, interleaved by class so any prefix of k*10 is balanced."""
    images, labels = _fashion_file(prefix)
    low, high = index_range or (0, len(labels))
    rng = np.random.default_rng(seed)
    candidates = np.arange(low, high)
    chosen = [rng.permutation(candidates[labels[low:high] == c])[:per_class] for c in range(10)]
    out = []
    for rank in range(per_class):
        for c in range(10):
            i = int(chosen[c][rank])
            out.append((f"{prefix}-{i}", Image.fromarray(images[i]).convert("RGB"), {"type": FASHION_CLASSES[c]}))
    return out


def build_tasks(quick: bool, size: int, only: Sequence[str]) -> list[Task]:
    """The tasks; pools are drawn per seed (seed + 100 for synthetic products), test and selection are fixed."""
    tasks = []
    test_count = 200 if quick else 600
    if "visible" in only:
        attrs = ["lid", "handle"]
        tasks.append(Task(
            "visible", _taxonomy_spec("pans", attrs),
            lambda seed, n, attrs=attrs: _samples("pans", n, 100 + seed, size, False, attrs),
            _samples("pans", test_count, 1, size, False, attrs), _samples("pans", 200, 2, size, False, attrs),
            [30, 60] if quick else [10, 30, 60, 120, 250, 500], "labels"))
    if "ambiguous" in only:
        attrs = ["main_colour"]
        tasks.append(Task(
            "ambiguous", _taxonomy_spec("tops", attrs),
            lambda seed, n, attrs=attrs: _samples("tops", n, 100 + seed, size, True, attrs),
            _samples("tops", test_count, 1, size, True, attrs), _samples("tops", 200, 2, size, True, attrs),
            [30, 120] if quick else [10, 30, 60, 120, 250, 500, 1000], "labels"))
    if "fashion" in only:
        spec = HeadSpec({"type": FASHION_CLASSES}, {"type": FASHION_CLASSES})
        tasks.append(Task(
            "fashion", spec,
            lambda seed, n: _fashion("train", n // 10, 100 + seed, (0, FASHION_POOL_END)),
            _fashion("t10k", 100 if quick else 1000, 1),
            _fashion("train", 50, 2, (FASHION_POOL_END, 60_000)),
            [10, 100] if quick else [10, 50, 100, 600], "labels per class", per_class=10))
    return tasks


def _records(items: Sequence[Item]) -> list[LabelRecord]:
    return [LabelRecord(product_id=i, category="bench", image="s3://bench/x", attributes=a) for i, _, a in items]


def _labeled(items: Sequence[Item], spec: HeadSpec) -> LabeledImages:
    return LabeledImages([im for _, im, _ in items], target_indices(_records(items), spec.values),
                         [i for i, _, _ in items])


def _split(items: Sequence[Item], settings: Settings) -> tuple[list[Item], list[Item]]:
    """Train/val with the trainer's own split (no test share: the test set is separate)."""
    assignment = assign_splits(_records(items), {}, val_fraction=settings.train_val_fraction, test_fraction=0.0,
                               seed=settings.train_split_seed)
    return ([it for it in items if assignment[it[0]] == "train"], [it for it in items if assignment[it[0]] == "val"])


def bench_settings(args: argparse.Namespace, seed: int) -> Settings:
    """The trainer's Settings with the benchmark's flags in place of the train_* defaults."""
    return Settings(
        train_epochs=args.epochs, train_batch_size=args.batch_size, train_lr=args.lr,
        train_weight_decay=args.weight_decay, train_warmup_steps=args.warmup_steps, train_patience=args.patience,
        train_mode=args.mode, train_last_n_blocks=args.last_n_blocks, train_seed=seed, train_split_seed=seed,
        train_val_fraction=args.val_fraction, train_augment=args.augment, train_crop_scale=args.crop_scale,
        train_flip=args.flip, train_min_steps_per_epoch=args.min_steps_per_epoch, train_image_size=args.image_size,
    )


def run_once(task: Task, n: int, settings: Settings, args: argparse.Namespace, on: str) -> dict[str, Any]:
    """One fine-tuning run at budget n with the settings' seeds, scored on `on` ("test" or "selection")."""
    labeled = task.pool(settings.train_seed, n * task.per_class)[: n * task.per_class]
    train, val = _split(labeled, settings)
    bundle = create_clip(args.arch, args.weights, device="auto", precision="fp32",
                         image_size=settings.train_image_size or None)  # as trainer.service builds it
    config = TrainConfig.from_settings(settings)  # as trainer.gate does: nothing overridden
    started = time.monotonic()
    result = fit(bundle, task.spec, _labeled(train, task.spec), _labeled(val, task.spec), config)
    scores = evaluate(bundle, task.spec, _labeled(task.test if on == "test" else task.selection, task.spec))
    return {"seed": settings.train_seed, "accuracy": round(scores.accuracy, 4), "macro_f1": round(scores.macro_f1, 4),
            "train": len(train), "val": len(val), "epochs_run": len(result.history), "best_epoch": result.best_epoch,
            "seconds": round(time.monotonic() - started, 1)}


def _se(values: Sequence[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def run_point(task: Task, n: int, args: argparse.Namespace, on: str = "test") -> dict[str, Any]:
    """Mean and standard error over args.seeds runs (seeds 0..k-1)."""
    runs = [run_once(task, n, bench_settings(args, seed), args, on) for seed in range(args.seeds)]
    point = {
        "accuracy": round(statistics.fmean(r["accuracy"] for r in runs), 4),
        "accuracy_se": round(_se([r["accuracy"] for r in runs]), 4),
        "macro_f1": round(statistics.fmean(r["macro_f1"] for r in runs), 4),
        "macro_f1_se": round(_se([r["macro_f1"] for r in runs]), 4),
        "seeds": len(runs), "evaluated_on": on, "eval_size": len(task.test if on == "test" else task.selection),
        "runs": runs,
    }
    print(f"{task.name} n={n} ({on}): macro-F1 {point['macro_f1']:.4f} ± {point['macro_f1_se']:.4f}, "
          f"accuracy {point['accuracy']:.4f} ± {point['accuracy_se']:.4f} over {len(runs)} seeds, "
          f"{sum(r['seconds'] for r in runs):.0f}s", file=sys.stderr, flush=True)
    return point


def select(tasks: Sequence[Task], args: argparse.Namespace) -> dict[str, Any]:
    """Score each candidate configuration on the selection split (never test) at one budget per task."""
    budgets = {"visible": 30, "ambiguous": 60, "fashion": 30}
    table = []
    for candidate in CANDIDATES:
        trial = argparse.Namespace(**{**vars(args), **candidate})
        scores = {t.name: run_point(t, budgets[t.name], trial, on="selection") for t in tasks}
        mean = statistics.fmean(s["macro_f1"] for s in scores.values())
        table.append({"candidate": candidate, "mean_macro_f1": round(mean, 4),
                      "tasks": {name: {k: s[k] for k in ("macro_f1", "macro_f1_se", "seeds")}
                                for name, s in scores.items()}})
    best = max(table, key=lambda row: row["mean_macro_f1"])
    return {"budgets": {t.name: budgets[t.name] for t in tasks}, "candidates": table, "chosen": best["candidate"]}


def plot(results: dict[str, dict[str, dict[str, Any]]], tasks: Sequence[Task], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4.3), squeeze=False)
    titles = {"visible": "Visible features (pan lid, handle)", "ambiguous": "Ambiguous (main colour, multi-coloured tops)",
              "fashion": "Fashion-MNIST product type"}
    for ax, task in zip(axes[0], tasks, strict=True):
        xs = [int(n) for n in results[task.name]]
        for metric, marker in (("accuracy", "o"), ("macro_f1", "s")):
            ax.errorbar(xs, [results[task.name][str(n)][metric] for n in xs],
                        yerr=[results[task.name][str(n)][f"{metric}_se"] for n in xs],
                        marker=marker, capsize=3, label=f"{metric} (mean ± SE)")
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(f"labeled training images ({task.unit})")
        ax.set_title(titles.get(task.name, task.name), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    seeds = next(iter(next(iter(results.values())).values()))["seeds"]
    fig.suptitle(f"Fine-tuned {MODEL_NAME}\ntest scores vs labels, mean ± standard error over {seeds} seeds",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer budgets and test images (< 30 min on 2 CPUs)")
    parser.add_argument("--select", action="store_true",
                        help="compare the candidate configurations on the selection split instead (never on test)")
    parser.add_argument("--seeds", type=int, default=MIN_SEEDS, help=f"seeds per point (at least {MIN_SEEDS} "
                        "for a reported figure)")
    parser.add_argument("--tasks", default="visible,ambiguous,fashion")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--arch", default="shelfsight-effnet-lite0")
    parser.add_argument("--weights", default="imagenet-tower")
    parser.add_argument("--image-size", type=int, default=None,
                        help="SHELFSIGHT_TRAIN_IMAGE_SIZE (native: 224); default 96, 64 with --quick")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--min-steps-per-epoch", type=int, default=4, help="SHELFSIGHT_TRAIN_MIN_STEPS_PER_EPOCH")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--mode", default="full", choices=["full", "last_n", "frozen_text"])
    parser.add_argument("--last-n-blocks", type=int, default=2)
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="no random resized crops or flips (SHELFSIGHT_TRAIN_AUGMENT=false)")
    parser.add_argument("--flip", action="store_true",
                        help="SHELFSIGHT_TRAIN_FLIP=true (off by default: --select chose it off, see docs)")
    parser.add_argument("--crop-scale", type=float, default=0.9, help="SHELFSIGHT_TRAIN_CROP_SCALE")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every task at every budget over the seeds (or --select); write JSON and PNG; print the summary last."""
    args = parse_args(argv)
    if args.image_size is None:  # --quick trades resolution for time: 5 seeds in < 30 min on a shared 2-core box
        args.image_size = 64 if args.quick else 96
    configure_logging("console", "WARNING")  # logs on stderr: stdout's last line is the summary
    if args.seeds < MIN_SEEDS:
        print(f"warning: {args.seeds} seeds per point; a reported figure needs at least {MIN_SEEDS}", file=sys.stderr)
    started = time.monotonic()
    tasks = build_tasks(args.quick, args.image_size, args.tasks.split(","))
    print(f"data ready in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    meta = {"date": str(date.today()), "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, "
            f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
            "command": " ".join(sys.argv), "model": MODEL_NAME, "config": {k: str(v) for k, v in vars(args).items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.select:
        selection = select(tasks, args)
        meta["seconds"] = round(time.monotonic() - started, 1)
        (args.out / "learning_curve_selection.json").write_text(json.dumps({"meta": meta, **selection}, indent=2))
        print(json.dumps({"chosen": selection["chosen"],
                          "candidates": [(r["candidate"], r["mean_macro_f1"]) for r in selection["candidates"]]}))
        return 0
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for task in tasks:
        results[task.name] = {str(n): run_point(task, n, args) for n in task.budgets}
    suffix = "quick" if args.quick else "full"
    meta["seconds"] = round(time.monotonic() - started, 1)
    (args.out / f"learning_curve_{suffix}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, tasks, args.out / f"learning_curve_{suffix}.png")
    print(f"total {meta['seconds']}s; wrote {args.out}/learning_curve_{suffix}.json and .png", file=sys.stderr)
    keys = ("accuracy", "accuracy_se", "macro_f1", "macro_f1_se", "seeds")
    print(json.dumps({t: {n: {k: p[k] for k in keys} for n, p in r.items()} for t, r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
