"""Labels as training reads them: the latest label wins per (product, attribute), an attribute that
left the taxonomy is dropped alone, and naive timestamps cannot break training."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path

from shelfsight.shared.events import LabelRecord
from shelfsight.shared.taxonomy import Taxonomy
from shelfsight.trainer.category_data import split_labels, valid_labels
from shelfsight.trainer.labels import import_labels, latest_labels, load_category_labels
from tests.unit.training_helpers import BUCKET, CUPS, add_cups, resources


def _label(pid: str, attributes: dict[str, str], day: int, image: str | None = None) -> LabelRecord:
    return LabelRecord(product_id=pid, category="cups", image=image or f"s3://{BUCKET}/uploads/cups/{pid}.png",
                       attributes=attributes, labeled_at=datetime(2026, 11, day, tzinfo=UTC))


def test_a_partial_relabel_keeps_the_attributes_labeled_earlier() -> None:
    first = _label("p1", {"colour": "red", "handle": "yes"}, day=1)
    relabel = _label("p1", {"handle": "no"}, day=2)  # fixes one attribute only
    merged = latest_labels([first, relabel])["p1"]
    assert merged.attributes == {"colour": "red", "handle": "no"}  # the old code dropped colour
    assert merged.labeled_at == relabel.labeled_at
    # order of reading does not matter, labeled_at does; an older relabel does not win
    assert latest_labels([relabel, first])["p1"].attributes == {"colour": "red", "handle": "no"}
    stale = _label("p1", {"handle": "yes"}, day=1)
    assert latest_labels([first, relabel, stale])["p1"].attributes["handle"] == "no"
    # a label for a new photo of the product starts afresh: attributes describe a photo
    new_photo = _label("p1", {"handle": "yes"}, day=3, image=f"s3://{BUCKET}/uploads/cups/p1-v2.png")
    assert latest_labels([first, relabel, new_photo])["p1"].attributes == {"handle": "yes"}


def test_a_partial_relabel_survives_the_label_log(tmp_path: Path) -> None:
    res = resources(tmp_path)
    labels = add_cups(res, 4)
    import_labels([{**labels[0], "attributes": {"handle": "yes"}}], store=res.store, bucket=BUCKET,
                  labels_prefix="labels", taxonomy=res.taxonomy, max_bytes=1 << 20)
    stored = {r.product_id: r.attributes for r in load_category_labels(res.store, BUCKET, "labels", "cups").records}
    assert stored["c0000"] == {"colour": "red", "handle": "yes"}


def test_an_attribute_that_left_the_taxonomy_is_ignored_alone() -> None:
    taxonomy = copy.deepcopy(CUPS)
    del taxonomy["categories"]["cups"]["attributes"]["handle"]  # handle is gone today
    taxonomy["categories"]["cups"]["attributes"]["colour"]["values"].append({"value": "green"})
    today = Taxonomy.model_validate(taxonomy)
    records = [_label("p1", {"colour": "red", "handle": "yes"}, 1), _label("p2", {"handle": "no"}, 1),
               LabelRecord(product_id="p3", category="cups", image=f"s3://{BUCKET}/x.png",
                           attributes={"colour": "purple", "handle": "no"})]
    kept, dropped = valid_labels(today, "cups", records)
    assert [(r.product_id, r.attributes) for r in kept] == [("p1", {"colour": "red"})]  # colour kept
    assert dropped == 4  # p1.handle, p2.handle (p2 has nothing left), p3.colour (value gone), p3.handle


def test_a_naive_labeled_at_does_not_break_training(tmp_path: Path) -> None:
    res = resources(tmp_path)
    labels = add_cups(res, 12)
    naive = [{**labels[1], "attributes": {"handle": "no"}, "labeled_at": "2099-01-01T00:00:00"}]
    import_labels(naive, store=res.store, bucket=BUCKET, labels_prefix="labels", taxonomy=res.taxonomy,
                  max_bytes=1 << 20)
    # a line written by an older importer, without a timezone, straight into the log
    res.store.put(BUCKET, "labels/cups/20000101T000000000000Z-old.jsonl",
                  (LabelRecord.model_validate(labels[2]).model_dump_json().replace("+00:00", "")
                   .replace("Z\"", "\"") + "\n").encode())
    records = load_category_labels(res.store, BUCKET, "labels", "cups").records
    assert all(r.labeled_at.tzinfo is not None and r.labeled_at.utcoffset().total_seconds() == 0 for r in records)
    split = split_labels(res, "cups")  # comparing naive and aware timestamps would raise here
    assert len(split.records) == 12

