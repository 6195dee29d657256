"""The synthetic product generator: deterministic, balanced, valid per the taxonomy, visibly varied."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shelfsight.shared.dev.samples import (
    generate_products,
    main,
    render_product,
    upload_products,
)
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import InMemoryObjectStore
from shelfsight.shared.taxonomy import load_taxonomy

SIZE = 96  # small images keep the tests fast


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_same_seed_gives_identical_bytes_and_other_seed_differs() -> None:
    a = generate_products("tops", 6, seed=7, size=SIZE)
    b = generate_products("tops", 6, seed=7, size=SIZE)
    c = generate_products("tops", 6, seed=8, size=SIZE)
    assert a == b
    assert [p.image for p in a] != [p.image for p in c]
    assert {p.product_id for p in a}.isdisjoint({p.product_id for p in c})


def test_product_ids() -> None:
    products = generate_products("pans", 3, seed=0, size=SIZE)
    assert [p.product_id for p in products] == ["pans-000000", "pans-000001", "pans-000002"]


@pytest.mark.parametrize("category", ["tops", "pans"])
def test_values_are_valid_per_taxonomy_and_balanced(category: str) -> None:
    taxonomy = load_taxonomy(Settings().taxonomy_path)
    attributes = taxonomy.category(category).attributes
    count = 25
    products = generate_products(category, count, seed=1, size=SIZE)
    assert len(products) == count
    for product in products:
        assert product.category == category
        assert set(product.attributes) == set(attributes)
        taxonomy.check_labels(category, product.attributes)
    for name, attribute in attributes.items():
        counts = Counter(p.attributes[name] for p in products)
        assert set(counts) == set(attribute.value_names)
        assert max(counts.values()) - min(counts.values()) <= 1, (name, counts)


@pytest.mark.parametrize("multicolour", [False, True])
def test_images_decode_as_rgb_jpeg(multicolour: bool) -> None:
    for product in generate_products("tops", 4, size=SIZE, multicolour=multicolour):
        image = Image.open(io.BytesIO(product.image))
        assert image.format == "JPEG"
        assert image.size == (SIZE, SIZE)
        assert image.convert("RGB").getextrema() != ((0, 0), (0, 0), (0, 0))


def _top(sleeve: str, *, colour: str = "Red", neckline: str = "Crew neck", multicolour: bool = False) -> np.ndarray:
    attrs = {"sleeve_length": sleeve, "neckline": neckline, "main_colour": colour}
    return _pixels(render_product("tops", attrs, random.Random(3), SIZE, multicolour))


def test_sleeve_length_changes_the_sleeve_region() -> None:
    long, none = _top("Longsleeved"), _top("Sleeveless")
    diff = np.abs(long - none).sum(axis=2) > 60
    # sleeves sit at the sides; the middle of the torso is the same garment
    sides = np.concatenate([diff[:, : SIZE // 4], diff[:, -SIZE // 4 :]], axis=1)
    middle = diff[SIZE // 2 :, SIZE * 3 // 8 : SIZE * 5 // 8]
    assert sides.mean() > 0.05
    assert middle.mean() < 0.02


def test_neckline_and_colour_change_pixels() -> None:
    crew, vneck = _top("Shortsleeved"), _top("Shortsleeved", neckline="V-neck")
    assert (np.abs(crew - vneck).sum(axis=2) > 60).mean() > 0.005
    red, blue = _top("Shortsleeved"), _top("Shortsleeved", colour="Blue")
    assert (np.abs(red - blue).sum(axis=2) > 100).mean() > 0.2


def test_white_top_is_visible_on_the_background() -> None:
    white = _top("Shortsleeved", colour="White")
    corner = white[:8, :8].mean()
    centre = white[SIZE // 2 - 4 : SIZE // 2 + 4, SIZE // 2 - 4 : SIZE // 2 + 4].mean()
    assert centre - corner > 15  # the background is light grey, never pure white


def test_multicolour_keeps_the_main_colour_in_the_majority() -> None:
    plain, multi = _top("Shortsleeved"), _top("Shortsleeved", multicolour=True)
    red = (plain[..., 0] > 150) & (plain[..., 1] < 90)
    red_multi = (multi[..., 0] > 150) & (multi[..., 1] < 90)
    share = red_multi.sum() / red.sum()
    assert 0.5 < share < 0.9


@pytest.mark.parametrize("attribute", ["lid", "handle"])
def test_pan_attributes_change_pixels(attribute: str) -> None:
    base = {"lid": "yes", "handle": "yes"}
    other = {**base, attribute: "no"}
    yes = _pixels(render_product("pans", base, random.Random(5), SIZE))
    no = _pixels(render_product("pans", other, random.Random(5), SIZE))
    assert (np.abs(yes - no).sum(axis=2) > 60).mean() > 0.01


def test_unknown_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="sleeve_length"):
        render_product("tops", {"sleeve_length": "Medium", "neckline": "V-neck", "main_colour": "Red"},
                       random.Random(0))
    with pytest.raises(ValueError, match="category"):
        generate_products("shoes", 1)


def test_upload_products_puts_jpegs_under_the_prefix() -> None:
    store = InMemoryObjectStore()
    products = generate_products("pans", 2, size=SIZE)
    uris = upload_products(products, store, "bkt")
    assert uris == ["s3://bkt/uploads/pans/pans-000000.jpg", "s3://bkt/uploads/pans/pans-000001.jpg"]
    assert store.get("bkt", "uploads/pans/pans-000001.jpg").body == products[1].image


def test_cli_writes_images_and_truth(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path), "--category", "tops", "--count", "3", "--size", str(SIZE)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "truth.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert (tmp_path / row["file"]).read_bytes()[:2] == b"\xff\xd8"
