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

Active learning and few-shot methods (issue #11), Fashion-MNIST only:

    .venv/bin/python bench/learning_curve.py --methods --tasks fashion --seeds 2   # LP-FT, WiSE-FT, Tip-Adapter
    .venv/bin/python bench/learning_curve.py --active --quick --tasks none         # the active-learning curve

`--methods` compares the few-shot methods at one budget on the selection split (test scores
are recorded alongside, never used to choose). `--active` starts each seed from the bench's
balanced 10 labels per class and adds labels in rounds, chosen from a candidate pool by the
review-queue ordering (clip_math.product_uncertainty of the round's model, uncalibrated) or
at random (class-agnostic), at equal budgets and with the same seeds.

Prints one JSON object as its last line:
{"task": {"n": {"accuracy", "accuracy_se", "macro_f1", "macro_f1_se", "seeds"}}}, with --active
also {"active": {"labels": {...}}, "active_random": {"labels": {...}}} (labels: total labels).
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
from collections.abc import Callable, Collection, Sequence
from datetime import date
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from shelfsight.shared.clip_math import (
    accuracy_and_macro_f1,
    confusion_matrix,
    normalize,
    product_uncertainty,
)
from shelfsight.shared.dev.samples import generate_products
from shelfsight.shared.events import LabelRecord
from shelfsight.shared.imaging import decode_image
from shelfsight.shared.logs import configure_logging
from shelfsight.shared.model_factory import create_clip
from shelfsight.shared.settings import DEFAULT_TAXONOMY, Settings
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.trainer.dataset import LabeledImages, assign_splits, target_indices
from shelfsight.trainer.evaluate import (
    EVAL_BATCH_SIZE,
    HeadSpec,
    PreprocessedImages,
    evaluate,
    text_features,
)
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
        train_lp_epochs=args.lp_epochs, train_lp_lr=args.lp_lr,
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


# --- active learning and few-shot methods (issue #11) ------------------------------------------------

TIP_ALPHAS = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0)
TIP_BETAS = (1.0, 3.0, 5.5, 10.0)
WISE_ALPHAS = (0.25, 0.5, 0.75)


def pick_uncertain(uncertainty: Sequence[float], labeled: Collection[int], budget: int) -> list[int]:
    """The `budget` pool positions of highest uncertainty that are not labeled yet, most uncertain first.

    Class-agnostic: the labeler does not know an image's class before labeling it. Ties go to the
    lower position (a round is deterministic); fewer come back when the pool runs out.
    """
    taken = set(labeled)
    order = sorted((i for i in range(len(uncertainty)) if i not in taken), key=lambda i: (-float(uncertainty[i]), i))
    return order[: max(0, budget)]


def pick_random(order: Sequence[int], labeled: Collection[int], budget: int) -> list[int]:
    """The next `budget` positions of a fixed random `order` that are not labeled yet (nested budgets)."""
    taken = set(labeled)
    return [i for i in order if i not in taken][: max(0, budget)]


def tip_adapter_logits(
    features: torch.Tensor, classes: torch.Tensor, scale: float, keys: torch.Tensor, values: torch.Tensor,
    alpha: float, beta: float,
) -> torch.Tensor:
    """Tip-Adapter (Zhang et al. 2022): the model's logits plus alpha x a cache of the labeled images.

    features [B, D] and keys [K, D] are L2-normalised image features, classes [V, D] the caption
    features, values [K, V] the labels one-hot; the cache's affinity is exp(-beta (1 - cos)).
    """
    affinity = torch.exp(-beta * (1.0 - features @ keys.T))
    return scale * features @ classes.T + alpha * affinity @ values


@torch.no_grad()
def _image_features(bundle: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """L2-normalised image features [N, D] with the serving transform, in batches."""
    bundle.model.eval()
    pre = PreprocessedImages(images, bundle.preprocess, bundle.image_size)
    chunks = [normalize(bundle.model.encode_image(pre.get(range(i, min(len(images), i + EVAL_BATCH_SIZE)))
                                                  .to(bundle.device)).float())
              for i in range(0, len(images), EVAL_BATCH_SIZE)]
    return torch.cat(chunks).cpu()


@torch.no_grad()
def _class_features(bundle: Any, spec: HeadSpec) -> torch.Tensor:
    tokens = bundle.tokenizer(spec.all_captions()).to(bundle.device)
    return text_features(bundle.model, tokens, spec)["type"].float().cpu()


def _metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    accuracy, macro_f1 = accuracy_and_macro_f1(confusion_matrix(logits.argmax(-1), targets, logits.shape[-1]))
    return {"accuracy": round(accuracy, 4), "macro_f1": round(macro_f1, 4)}


def _targets(items: Sequence[Item]) -> torch.Tensor:
    return torch.tensor([FASHION_CLASSES.index(a["type"]) for _, _, a in items])


class _Scorer:
    """A trained model's features on fixed image sets, for the plain, Tip-Adapter and WiSE-FT variants."""

    def __init__(self, bundle: Any, spec: HeadSpec, labeled: Sequence[Item], sets: dict[str, Sequence[Item]]) -> None:
        self.bundle, self.spec, self.sets = bundle, spec, sets
        self.scale = float(bundle.model.logit_scale.exp().clamp(max=100))
        self.classes = _class_features(bundle, spec)
        self.keys = _image_features(bundle, [im for _, im, _ in labeled])
        self.values = torch.nn.functional.one_hot(_targets(labeled), len(FASHION_CLASSES)).float()
        self.features = {name: _image_features(bundle, [im for _, im, _ in items]) for name, items in sets.items()}
        self.truth = {name: _targets(items) for name, items in sets.items()}

    def plain(self, name: str) -> dict[str, float]:
        return _metrics(self.scale * self.features[name] @ self.classes.T, self.truth[name])

    def tip(self, name: str, alpha: float, beta: float) -> dict[str, float]:
        logits = tip_adapter_logits(self.features[name], self.classes, self.scale, self.keys, self.values, alpha, beta)
        return _metrics(logits, self.truth[name])

    def wise(self, start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> dict[str, Any]:
        """WiSE-FT (Wortsman et al. 2022): scores of (1 - alpha) start + alpha end; the model keeps `end`."""
        mixed = {k: (1 - alpha) * start[k] + alpha * v if v.is_floating_point() else v for k, v in end.items()}
        self.bundle.model.load_state_dict(mixed)
        classes = _class_features(self.bundle, self.spec)
        scale = float(self.bundle.model.logit_scale.exp().clamp(max=100))
        out = {name: _metrics(scale * _image_features(self.bundle, [im for _, im, _ in items]) @ classes.T,
                              self.truth[name]) for name, items in self.sets.items()}
        self.bundle.model.load_state_dict(end)
        return out

    @torch.no_grad()
    def uncertainty(self, items: Sequence[Item]) -> torch.Tensor:
        """The review-queue priority (clip_math.product_uncertainty) of each item, uncalibrated (T = 1)."""
        features = _image_features(self.bundle, [im for _, im, _ in items])
        return product_uncertainty({"type": (self.scale * features @ self.classes.T).softmax(-1)})


def _train(labeled: Sequence[Item], spec: HeadSpec, settings: Settings, args: argparse.Namespace) -> tuple[Any, Any]:
    """A fresh model fine-tuned on `labeled` (split train/val by the trainer), as run_once does."""
    train, val = _split(labeled, settings)
    bundle = create_clip(args.arch, args.weights, device="auto", precision="fp32",
                         image_size=settings.train_image_size or None)
    start = {k: v.detach().clone() for k, v in bundle.model.state_dict().items()}
    result = fit(bundle, spec, _labeled(train, spec), _labeled(val, spec), TrainConfig.from_settings(settings))
    result.initial_state = start
    return bundle, result


def _fashion_task(args: argparse.Namespace) -> Task:
    return next(t for t in build_tasks(args.quick, args.image_size, ["fashion"]))


def _mean_point(runs: Sequence[dict[str, Any]], key: str = "") -> dict[str, Any]:
    values = [r[key] if key else r for r in runs]
    return {"accuracy": round(statistics.fmean(v["accuracy"] for v in values), 4),
            "accuracy_se": round(_se([v["accuracy"] for v in values]), 4),
            "macro_f1": round(statistics.fmean(v["macro_f1"] for v in values), 4),
            "macro_f1_se": round(_se([v["macro_f1"] for v in values]), 4), "seeds": len(values)}


def methods(args: argparse.Namespace) -> dict[str, Any]:
    """LP-FT vs plain fine-tuning, each with WiSE-FT and Tip-Adapter variants, at one budget.

    Variants are chosen on the selection split (mean over seeds); test scores ride along.
    """
    task = _fashion_task(args)
    n = args.methods_budget
    table: dict[str, list[dict[str, Any]]] = {}
    for lp_epochs in (args.lp_epochs,) if args.methods_lp_only else (0, args.lp_epochs):
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            settings = bench_settings(args, seed).model_copy(update={"train_lp_epochs": lp_epochs})
            labeled = task.pool(seed, n * task.per_class)[: n * task.per_class]
            started = time.monotonic()
            bundle, result = _train(labeled, task.spec, settings, args)
            scorer = _Scorer(bundle, task.spec, labeled, {"selection": task.selection, "test": task.test})
            base = "lp-ft" if lp_epochs else "ft"
            rows = {base: {s: scorer.plain(s) for s in ("selection", "test")}}
            for alpha in TIP_ALPHAS[1:]:
                for beta in TIP_BETAS:
                    rows[f"{base}+tip(a={alpha},b={beta})"] = {s: scorer.tip(s, alpha, beta) for s in ("selection", "test")}
            start = result.lp_state_dict if lp_epochs else result.initial_state
            for alpha in WISE_ALPHAS:
                rows[f"{base}+wise(a={alpha})"] = scorer.wise(start, result.state_dict, alpha)
            for name, row in rows.items():
                table.setdefault(name, []).append({"seed": seed, **row})
            print(f"methods {base} seed {seed}: selection {rows[base]['selection']['macro_f1']:.4f}, "
                  f"test {rows[base]['test']['macro_f1']:.4f}, {time.monotonic() - started:.0f}s",
                  file=sys.stderr, flush=True)
    summary = {name: {"selection": _mean_point([r["selection"] for r in runs]),
                      "test": _mean_point([r["test"] for r in runs]), "runs": runs} for name, runs in table.items()}
    best = max(summary, key=lambda name: summary[name]["selection"]["macro_f1"])
    return {"budget_per_class": n, "lp_epochs": args.lp_epochs, "lp_lr": args.lp_lr, "variants": summary,
            "chosen_on_selection": best}


def active_curve(args: argparse.Namespace) -> dict[str, Any]:
    """Active (review-queue order) vs random choice of labels, at the same budgets and seeds.

    Seed s: the bench's balanced first round (the first rounds[0] per class of the seed's pool),
    a candidate pool of args.pool_size other images of train indices [0, 50k), and per round a
    fresh model fine-tuned on all labels so far. The active arm labels the candidates its
    round's model is least sure of (top product_uncertainty), the random arm a random draw.
    """
    task = _fashion_task(args)
    images, labels = _fashion_file("train")
    rounds = [int(r) for r in args.active_rounds.split(",")]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"active": {}, "random": {}}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        settings = bench_settings(args, seed)
        first = task.pool(seed, rounds[0] * task.per_class)[: rounds[0] * task.per_class]
        taken = {int(i.split("-")[1]) for i, _, _ in first}
        rng = np.random.default_rng(1000 + seed)
        pool_ids = rng.choice(np.setdiff1d(np.arange(FASHION_POOL_END), sorted(taken)), args.pool_size, replace=False)
        pool = [(f"train-{i}", Image.fromarray(images[i]).convert("RGB"), {"type": FASHION_CLASSES[labels[i]]})
                for i in pool_ids]
        random_order = [int(i) for i in np.random.default_rng(2000 + seed).permutation(len(pool))]
        chosen: dict[str, list[int]] = {"active": [], "random": []}
        arms = args.arms.split(",")
        for r, per_class in enumerate(rounds):
            total = per_class * task.per_class
            for arm in arms:
                if r == 0 and arm == "random" and "active" in arms:  # one shared first round
                    runs["random"].setdefault(str(total), []).append(runs["active"][str(total)][-1])
                    continue
                if arms == ["random"] and args.train_at and total not in args.train_at:
                    chosen["random"] += pick_random(random_order, chosen["random"],
                                                    rounds[r + 1] * task.per_class - total if r + 1 < len(rounds) else 0)
                    continue  # random picks need no model: train only where asked
                labeled = [*first, *(pool[i] for i in chosen[arm])]
                started = time.monotonic()
                bundle, result = _train(labeled, task.spec, settings, args)
                scorer = _Scorer(bundle, task.spec, labeled, {"test": task.test, "selection": task.selection})
                run = {"seed": seed, "labels": len(labeled), "ft": scorer.plain("test"),
                       "ft_selection": scorer.plain("selection")["macro_f1"],
                       "class_counts": np.bincount(_targets(labeled).numpy(), minlength=10).tolist(),
                       "epochs_run": len(result.history), "seconds": 0.0,
                       "tip_grid": {f"{a},{b}": {"selection": scorer.tip("selection", a, b)["macro_f1"],
                                                 "test": scorer.tip("test", a, b)}
                                    for a in TIP_ALPHAS[1:] for b in TIP_BETAS}}
                if r + 1 < len(rounds):
                    need = rounds[r + 1] * task.per_class - len(labeled)
                    if arm == "active":
                        chosen["active"] += pick_uncertain(scorer.uncertainty(pool).tolist(), chosen["active"], need)
                    if r == 0 or arm == "random":
                        chosen["random"] += pick_random(random_order, chosen["random"], need)
                run["seconds"] = round(time.monotonic() - started, 1)
                runs[arm].setdefault(str(total), []).append(run)
                print(f"active-learning seed {seed} {arm} {len(labeled)} labels: test macro-F1 "
                      f"{run['ft']['macro_f1']:.4f}, {run['seconds']:.0f}s", file=sys.stderr, flush=True)
                args.out.mkdir(parents=True, exist_ok=True)  # a partial record survives an interrupted run
                (args.out / "learning_curve_active.partial.json").write_text(json.dumps({"runs": runs}))
    return summarize_active(runs, rounds, args)


def summarize_active(runs: dict[str, dict[str, list[dict[str, Any]]]], rounds: Sequence[int],
                     args: argparse.Namespace) -> dict[str, Any]:
    """Mean ± SE per arm and budget; the Tip-Adapter (alpha, beta) is chosen once, on the selection split.

    One (alpha, beta) for every run: the highest mean selection macro-F1 over all runs of both arms.
    The kept variant ("tip" or "ft") is the one with the higher mean selection macro-F1.
    """
    first = str(min((int(t) for t in runs["active"]), default=-1))  # the shared first round counts once
    every = [r for arm, by_total in runs.items() for t, rs in by_total.items() for r in rs
             if not (arm == "random" and t == first)]
    grid = {key: statistics.fmean(r["tip_grid"][key]["selection"] for r in every) for key in every[0]["tip_grid"]}
    key = max(grid, key=grid.__getitem__)
    for by_total in runs.values():
        for rs in by_total.values():
            for r in rs:
                r["tip"] = r["tip_grid"][key]["test"]
    plain = statistics.fmean(r["ft_selection"] for r in every)
    variant = "tip" if args.tip_alpha >= 0 and grid[key] > plain else "ft"
    alpha, beta = (float(x) for x in key.split(","))
    return {"rounds_per_class": list(rounds), "pool_size": args.pool_size, "variant": variant,
            "tip": {"alpha": alpha, "beta": beta, "selection_macro_f1": round(grid[key], 4),
                    "plain_selection_macro_f1": round(plain, 4)},
            "lp_epochs": args.lp_epochs,
            "curves": {arm: {total: {"ft": _mean_point(rs, "ft"), "tip": _mean_point(rs, "tip"), "runs": rs}
                             for total, rs in by_total.items()} for arm, by_total in runs.items()}}


@torch.no_grad()
def _trunk_features(bundle: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """The pretrained image trunk's pooled features (before the random projection), L2-normalised."""
    bundle.model.eval()
    pre = PreprocessedImages(images, bundle.preprocess, bundle.image_size)
    return torch.cat([normalize(bundle.model.visual.trunk(pre.get(range(i, min(len(images), i + EVAL_BATCH_SIZE)))))
                      for i in range(0, len(images), EVAL_BATCH_SIZE)])


def linear_probe(features: torch.Tensor, targets: torch.Tensor, weight_decay: float, classes: int = 10) -> torch.Tensor:
    """Multinomial logistic regression (L-BFGS, L2 penalty) on frozen features; returns weights [D + 1, V]."""
    torch.manual_seed(0)
    x = torch.cat([features * 10.0, torch.ones(len(features), 1)], dim=1)
    weights = torch.zeros(x.shape[1], classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(x @ weights, targets) + weight_decay * (weights[:-1] ** 2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return weights.detach()


def _probe_logits(weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return torch.cat([features * 10.0, torch.ones(len(features), 1)], dim=1) @ weights


def frozen_probe_curve(args: argparse.Namespace) -> dict[str, Any]:
    """The same rounds, pools and seeds as `active_curve`, with a linear probe on the frozen trunk's features.

    Cheap enough for many seeds: it asks whether the review-queue ordering picks better labels
    than random on this data at all, apart from the noise of fine-tuning. L2 strength chosen on
    the selection split (seed 0, balanced first round, all rounds' random labels); never on test.
    """
    task = _fashion_task(args)
    images, labels = _fashion_file("train")
    rounds = [int(r) for r in args.active_rounds.split(",")]
    bundle = create_clip(args.arch, args.weights, device="auto", precision="fp32", image_size=args.image_size)
    test, test_y = _trunk_features(bundle, [im for _, im, _ in task.test]), _targets(task.test)
    sel, sel_y = _trunk_features(bundle, [im for _, im, _ in task.selection]), _targets(task.selection)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"active": {}, "random": {}}
    decays = (1e-4, 1e-3, 1e-2)
    chosen_decay: float | None = None
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        first = task.pool(seed, rounds[0] * task.per_class)[: rounds[0] * task.per_class]
        taken = {int(i.split("-")[1]) for i, _, _ in first}
        rng = np.random.default_rng(1000 + seed)  # the pool active_curve draws for this seed
        pool_ids = rng.choice(np.setdiff1d(np.arange(FASHION_POOL_END), sorted(taken)), args.pool_size, replace=False)
        pool = _trunk_features(bundle, [Image.fromarray(images[i]).convert("RGB") for i in pool_ids])
        pool_y = torch.tensor(labels[pool_ids].astype(np.int64))
        first_x, first_y = _trunk_features(bundle, [im for _, im, _ in first]), _targets(first)
        random_order = [int(i) for i in np.random.default_rng(2000 + seed).permutation(len(pool))]
        if chosen_decay is None:
            some = random_order[: rounds[-1] * task.per_class - len(first)]
            x, y = torch.cat([first_x, pool[some]]), torch.cat([first_y, pool_y[some]])
            scores = {d: _metrics(_probe_logits(linear_probe(x, y, d), sel), sel_y)["macro_f1"] for d in decays}
            chosen_decay = max(scores, key=scores.__getitem__)
        chosen: dict[str, list[int]] = {"active": [], "random": []}
        for r, per_class in enumerate(rounds):
            for arm in ("active", "random"):
                x, y = torch.cat([first_x, pool[chosen[arm]]]), torch.cat([first_y, pool_y[chosen[arm]]])
                weights = linear_probe(x, y, chosen_decay)
                runs[arm].setdefault(str(per_class * task.per_class), []).append(
                    {"seed": seed, "probe": _metrics(_probe_logits(weights, test), test_y)})
                if r + 1 < len(rounds):
                    need = rounds[r + 1] * task.per_class - len(y)
                    if arm == "active":
                        margin = product_uncertainty({"type": _probe_logits(weights, pool).softmax(-1)}).tolist()
                        chosen["active"] += pick_uncertain(margin, chosen["active"], need)
                    else:
                        chosen["random"] += pick_random(random_order, chosen["random"], need)
        print(f"frozen probe seed {seed}: " + ", ".join(
            f"{t} {runs['active'][t][-1]['probe']['macro_f1']:.3f}/{runs['random'][t][-1]['probe']['macro_f1']:.3f}"
            for t in runs["active"]), file=sys.stderr, flush=True)
    return {"weight_decay": chosen_decay, "curves": {arm: {t: {"probe": _mean_point(rs, "probe"), "runs": rs}
                                                           for t, rs in by_total.items()}
                                                     for arm, by_total in runs.items()}}


def merge_active(paths: Sequence[Path], args: argparse.Namespace) -> dict[str, Any]:
    """One curve from the runs of several --active processes (disjoint seeds, the same rounds)."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"active": {}, "random": {}}
    for path in paths:
        record = json.loads(path.read_text())
        part = record["runs"] if "runs" in record else {a: {t: p["runs"] for t, p in c.items()}
                                                        for a, c in record["curves"].items()}
        for arm, by_total in part.items():
            for total, rs in by_total.items():
                runs[arm].setdefault(total, []).extend(rs)
    every_seed = {r["seed"] for by_total in runs.values() for rs in by_total.values() for r in rs}
    for arm, by_total in runs.items():  # a budget some seed has not reached yet (a partial file) is left out
        for total in [t for t, rs in by_total.items() if {r["seed"] for r in rs} != every_seed]:
            print(f"--merge: {arm} {total} labels left out: not every seed reached it", file=sys.stderr)
            del by_total[total]
    rounds = sorted({int(t) // 10 for t in runs["active"]})
    return summarize_active(runs, rounds, args)


def plot_active(curve: dict[str, Any], path: Path, probe: dict[str, Any] | None = None) -> None:
    """Test macro-F1 against total labels, uncertainty vs random choice (mean ± SE); the probe curve beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fine-tuned (the bench's model)", curve, (("ft", "-", "fine-tuned"), ("tip", "--", "+ Tip-Adapter")))]
    if probe:
        panels.append(("linear probe on the frozen image trunk", probe, (("probe", "-", "linear probe"),)))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    for ax, (title, data, variants) in zip(axes[0], panels, strict=True):
        for arm, marker in (("active", "o"), ("random", "s")):
            points = data["curves"][arm]
            xs = sorted(int(t) for t in points)
            for variant, style, name in variants:
                ax.errorbar(xs, [points[str(x)][variant]["macro_f1"] for x in xs],
                            yerr=[points[str(x)][variant]["macro_f1_se"] for x in xs], marker=marker,
                            linestyle=style, capsize=3,
                            label=f"{'uncertainty' if arm == 'active' else 'random'} choice, {name}")
        seeds = max(p[variants[0][0]]["seeds"] for p in data["curves"]["active"].values())
        ax.axhline(0.88, color="grey", linestyle=":", label="target 0.88")
        ax.set_xlabel("total labels (10 classes)")
        ax.set_ylabel("test macro-F1 (mean ± SE over seeds)")
        ax.set_title(f"{title}, up to {seeds} seeds", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Fashion-MNIST: labels chosen by the review-queue ordering vs at random\n{MODEL_NAME}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    parser.add_argument("--active", action="store_true",
                        help="also run the active-learning curve on Fashion-MNIST (issue #11); --tasks none: only it")
    parser.add_argument("--methods", action="store_true",
                        help="compare LP-FT, WiSE-FT and Tip-Adapter on the Fashion-MNIST selection split instead")
    parser.add_argument("--methods-lp-only", action="store_true", help="--methods without the plain fine-tuning arm")
    parser.add_argument("--methods-budget", type=int, default=100, help="labels per class for --methods")
    parser.add_argument("--active-rounds", default="10,20,40,60,100", help="labels per class after each round")
    parser.add_argument("--pool-size", type=int, default=3000, help="candidate images the rounds choose from")
    parser.add_argument("--lp-epochs", type=int, default=0, help="SHELFSIGHT_TRAIN_LP_EPOCHS (LP-FT head stage)")
    parser.add_argument("--lp-lr", type=float, default=1e-3, help="SHELFSIGHT_TRAIN_LP_LR")
    parser.add_argument("--tip-alpha", type=float, default=0.0,
                        help="with --active: a negative value never keeps the Tip-Adapter variant (it is always "
                        "scored; its alpha and beta are chosen on the selection split)")
    parser.add_argument("--frozen-probe", action="store_true",
                        help="the --active rounds with a linear probe on the frozen image trunk instead (cheap)")
    parser.add_argument("--arms", default="active,random", help="with --active: the arms to run")
    parser.add_argument("--train-at", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        help="with --active --arms random: train only at these total-label budgets")
    parser.add_argument("--first-seed", type=int, default=0, help="with --active: seeds first..first+seeds-1")
    parser.add_argument("--merge", type=Path, nargs="*", default=None,
                        help="with --active: summarize the runs of these learning_curve_active(.partial).json files "
                        "(seeds run as separate processes) instead of running")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 is much faster on a CPU shared with other jobs")
    parser.add_argument("--docs", type=Path, default=None, help="with --active: also write the figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every task at every budget over the seeds (or --select); write JSON and PNG; print the summary last."""
    args = parse_args(argv)
    if args.image_size is None:  # --quick trades resolution for time: 5 seeds in < 30 min on a shared 2-core box
        args.image_size = 64 if args.quick else 96
    if args.threads:
        torch.set_num_threads(args.threads)
    configure_logging("console", "WARNING")  # logs on stderr: stdout's last line is the summary
    if args.seeds < MIN_SEEDS:
        print(f"warning: {args.seeds} seeds per point; a reported figure needs at least {MIN_SEEDS}", file=sys.stderr)
    started = time.monotonic()
    tasks = build_tasks(args.quick, args.image_size,
                        [] if args.methods or args.frozen_probe else args.tasks.split(","))
    print(f"data ready in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    meta = {"date": str(date.today()), "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, "
            f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
            "command": " ".join(sys.argv), "model": MODEL_NAME, "config": {k: str(v) for k, v in vars(args).items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.frozen_probe:
        probe = frozen_probe_curve(args)
        meta["seconds"] = round(time.monotonic() - started, 1)
        (args.out / "learning_curve_active_probe.json").write_text(json.dumps({"meta": meta, **probe}, indent=2))
        print(json.dumps({arm: {t: p["probe"] for t, p in c.items()} for arm, c in probe["curves"].items()}))
        return 0
    if args.methods:
        trial = methods(args)
        meta["seconds"] = round(time.monotonic() - started, 1)
        (args.out / "learning_curve_methods.json").write_text(json.dumps({"meta": meta, **trial}, indent=2))
        print(json.dumps({"chosen_on_selection": trial["chosen_on_selection"],
                          "variants": {k: {s: v[s]["macro_f1"] for s in ("selection", "test")}
                                       for k, v in trial["variants"].items()}}))
        return 0
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
    if tasks:  # --active --tasks none: the active curve alone
        (args.out / f"learning_curve_{suffix}.json").write_text(json.dumps({"meta": meta, "results": results},
                                                                            indent=2))
        plot(results, tasks, args.out / f"learning_curve_{suffix}.png")
        print(f"total {meta['seconds']}s; wrote {args.out}/learning_curve_{suffix}.json and .png", file=sys.stderr)
    keys = ("accuracy", "accuracy_se", "macro_f1", "macro_f1_se", "seeds")
    summary: dict[str, Any] = {t: {n: {k: p[k] for k in keys} for n, p in r.items()} for t, r in results.items()}
    if args.active:
        curve = active_curve(args) if args.merge is None else merge_active(args.merge, args)
        meta["seconds"] = round(time.monotonic() - started, 1)
        for folder in {args.out, args.docs or args.out}:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "learning_curve_active.json").write_text(json.dumps({"meta": meta, **curve}, indent=2))
            probe_file = folder / "learning_curve_active_probe.json"
            probe = json.loads(probe_file.read_text()) if probe_file.exists() else None
            plot_active(curve, folder / "learning_curve_active.png", probe)
        for arm, key in (("active", "active"), ("random", "active_random")):
            summary[key] = {t: {k: p[curve["variant"]][k] for k in keys} for t, p in curve["curves"][arm].items()}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
