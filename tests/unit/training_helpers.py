"""A small category in an in-memory store, for trainer tests that need data but no servers."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any, cast

import redis
from PIL import Image

from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import InMemoryObjectStore, ObjectStore
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.trainer.labels import import_labels
from shelfsight.trainer.resources import TrainerResources

BUCKET = "shelfsight"
CUPS = {
    "version": "test-1",
    "categories": {
        "cups": {
            "zero_shot_template": "a {} cup",
            "attributes": {
                "colour": {"values": [{"value": "red"}, {"value": "blue"}]},
                "handle": {"values": [{"value": "yes"}, {"value": "no"}]},
            },
        }
    },
}
RGB = {"red": (210, 40, 40), "blue": (40, 40, 210)}


def cup_png(colour: str, seed: int, size: int = 48) -> bytes:
    """A cup-coloured square with a little noise, so no two images are byte-identical by accident."""
    rng = random.Random(seed)
    base = RGB[colour]
    image = Image.new("RGB", (size, size), tuple(min(255, c + rng.randrange(-15, 16)) for c in base))
    image.putpixel((rng.randrange(size), rng.randrange(size)), (rng.randrange(256),) * 3)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def taxonomy_file(tmp_path: Path, taxonomy: dict[str, Any] | None = None) -> Path:
    path = tmp_path / "taxonomy.json"
    path.write_text(json.dumps(taxonomy or CUPS))
    return path


def resources(tmp_path: Path, store: ObjectStore | None = None, **overrides: Any) -> TrainerResources:
    """Trainer resources over an in-memory store (no Redis: the gate and the data never touch it)."""
    values: dict[str, Any] = {
        "bucket": BUCKET, "taxonomy_path": taxonomy_file(tmp_path), "model_arch": "shelfsight-tiny",
        "model_weights": "none", "device": "cpu", "train_epochs": 2, "train_batch_size": 8,
        "retry_backoff_s": 0.001, "retry_backoff_max_s": 0.002, "max_retries": 2,
    }
    settings = Settings(**{**values, **overrides})
    store = store or InMemoryObjectStore()
    return TrainerResources(settings=settings, store=store, redis=cast(redis.Redis, None),
                            taxonomy=load_taxonomy(settings.taxonomy_path),
                            registry=ModelRegistry(store, BUCKET, settings.models_prefix))


def add_cups(res: TrainerResources, count: int, start: int = 0, **label_extra: Any) -> list[dict[str, Any]]:
    """Upload `count` cup images (alternating red/blue) and import their labels; returns the labels."""
    labels = []
    for i in range(start, start + count):
        colour = "red" if i % 2 == 0 else "blue"
        key = f"uploads/cups/c{i:04d}.png"
        res.store.put(BUCKET, key, cup_png(colour, i), "image/png")
        labels.append({"product_id": f"c{i:04d}", "category": "cups", "image": f"s3://{BUCKET}/{key}",
                       "attributes": {"colour": colour, "handle": "yes" if i % 3 else "no"}, **label_extra})
    result = import_labels(labels, store=res.store, bucket=BUCKET, labels_prefix=res.settings.labels_prefix,
                           taxonomy=res.taxonomy, max_bytes=1 << 20)
    assert result.accepted == count, result.as_dict()
    return labels
