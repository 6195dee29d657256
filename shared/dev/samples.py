"""Deterministic synthetic product images (tops and pans) for the demo, tests and benchmarks.

Each image is drawn (drawing.py) from its attribute values, with random position, scale,
rotation, shade and noise so that a model has to generalise rather than memorise pixels.
The same seed gives byte-identical JPEGs. This module is the catalogue: which values exist,
balanced value assignments, product ids, JPEG bytes, upload to S3, and a CLI to eyeball them:

    python -m shelfsight.shared.dev.samples --out /tmp/samples --category tops --count 12
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from PIL import Image

from shelfsight.shared.dev.drawing import draw_pan, draw_top
from shelfsight.shared.storage import ObjectStore

log = structlog.get_logger()

# Attribute values per category, in taxonomy order (shared/taxonomy.json).
CATEGORY_VALUES: dict[str, dict[str, tuple[str, ...]]] = {
    "tops": {
        "sleeve_length": ("Longsleeved", "Shortsleeved", "Sleeveless"),
        "neckline": ("Crew neck", "V-neck"),
        "main_colour": ("Red", "Green", "Blue", "Yellow", "Black", "White"),
    },
    "pans": {
        "lid": ("yes", "no"),
        "handle": ("yes", "no"),
    },
}


@dataclass(frozen=True)
class SampleProduct:
    """One synthetic product: its id, category, true attribute values and JPEG bytes."""

    product_id: str
    category: str
    attributes: dict[str, str]
    image: bytes


# --- public API ----------------------------------------------------------------------------------


def render_product(category: str, attributes: dict[str, str], rng: random.Random, size: int = 224,
                   multicolour: bool = False) -> Image.Image:
    """Draw one product with the given attribute values as an RGB image of size x size.

    Random draws (position, scale, shade, noise) come from `rng` and do not depend on the
    attribute values, so two calls with equal rng states differ only where the values do.
    `multicolour` adds accent stripes or blocks to tops (ignored for pans).
    """
    _check_attributes(category, attributes)
    if category == "tops":
        return draw_top(attributes, rng, size, multicolour)
    return draw_pan(attributes, rng, size)


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of an RGB image (deterministic for identical pixels)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def product_id(category: str, seed: int, index: int) -> str:
    """`tops-000123` for seed 0; other seeds shift the number by seed x 1,000,000."""
    return f"{category}-{seed * 1_000_000 + index:06d}"


def balanced_attributes(category: str, count: int, seed: int = 0) -> list[dict[str, str]]:
    """`count` attribute dicts; each attribute's values cycle (counts differ by at most 1),
    then are shuffled independently with the seed so attributes are not correlated."""
    values = _values(category)
    rng = random.Random(f"shelfsight-labels:{category}:{seed}")
    columns: dict[str, list[str]] = {}
    for attribute, options in values.items():
        column = [options[i % len(options)] for i in range(count)]
        rng.shuffle(column)
        columns[attribute] = column
    return [{attribute: columns[attribute][i] for attribute in values} for i in range(count)]


def generate_products(category: str, count: int, seed: int = 0, *, size: int = 224,
                      multicolour: bool = False) -> list[SampleProduct]:
    """`count` synthetic products of `category` with balanced attribute values.

    Same arguments give byte-identical JPEGs. Values match shared/taxonomy.json.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    products = []
    for index, attributes in enumerate(balanced_attributes(category, count, seed)):
        rng = random.Random(f"shelfsight-image:{category}:{seed}:{index}")
        image = render_product(category, attributes, rng, size, multicolour)
        products.append(SampleProduct(
            product_id=product_id(category, seed, index),
            category=category,
            attributes=attributes,
            image=encode_jpeg(image),
        ))
    return products


def upload_products(products: Sequence[SampleProduct], store: ObjectStore, bucket: str,
                    prefix: str = "uploads") -> list[str]:
    """Put each image at `{prefix}/{category}/{product_id}.jpg`; return the s3:// URIs in order."""
    uris = []
    for product in products:
        key = f"{prefix.strip('/')}/{product.category}/{product.product_id}.jpg"
        store.put(bucket, key, product.image, content_type="image/jpeg")
        uris.append(f"s3://{bucket}/{key}")
    log.info("samples.uploaded", bucket=bucket, prefix=prefix, count=len(uris))
    return uris


def _values(category: str) -> dict[str, tuple[str, ...]]:
    try:
        return CATEGORY_VALUES[category]
    except KeyError:
        raise ValueError(f"no sample generator for category {category!r}; "
                         f"choose one of {sorted(CATEGORY_VALUES)}") from None


def _check_attributes(category: str, attributes: dict[str, str]) -> None:
    for attribute, options in _values(category).items():
        if attributes.get(attribute) not in options:
            raise ValueError(f"{category}.{attribute} must be one of {list(options)}, "
                             f"got {attributes.get(attribute)!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Write sample JPEGs and a truth.jsonl to a directory, for eyeballing."""
    parser = argparse.ArgumentParser(prog="python -m shelfsight.shared.dev.samples", description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--category", choices=sorted(CATEGORY_VALUES), default="tops")
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--multicolour", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    products = generate_products(args.category, args.count, args.seed, size=args.size,
                                 multicolour=args.multicolour)
    with (args.out / "truth.jsonl").open("w") as truth:
        for product in products:
            name = f"{product.product_id}.jpg"
            (args.out / name).write_bytes(product.image)
            truth.write(json.dumps({"product_id": product.product_id, "category": product.category,
                                    "attributes": product.attributes, "file": name}) + "\n")
    print(f"wrote {len(products)} {args.category} images and truth.jsonl to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
