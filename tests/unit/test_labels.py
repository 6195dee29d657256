"""Label import: validation with line numbers, append-only storage, latest label wins."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from shelfsight.shared.settings import DEFAULT_TAXONOMY
from shelfsight.shared.storage import InMemoryObjectStore
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.trainer.labels import (
    LabelFileTooLarge,
    import_labels,
    label_categories,
    latest_labels,
    load_category_labels,
)

BUCKET = "shelfsight"
TAXONOMY = load_taxonomy(DEFAULT_TAXONOMY)


def _label(pid: str, lid: str = "yes", handle: str = "no", image: str | None = None, **extra: object) -> dict:
    return {"product_id": pid, "category": "pans", "image": image or f"s3://{BUCKET}/img/{pid}.jpg",
            "attributes": {"lid": lid, "handle": handle}, **extra}


@pytest.fixture
def mem_store() -> InMemoryObjectStore:
    store = InMemoryObjectStore()
    for pid in ("p1", "p2", "p3", "p4"):
        store.put(BUCKET, f"img/{pid}.jpg", b"jpeg", "image/jpeg")
    return store


def _import(store: InMemoryObjectStore, source: object, max_bytes: int = 1 << 20):
    return import_labels(source, store=store, bucket=BUCKET, labels_prefix="labels", taxonomy=TAXONOMY,
                         max_bytes=max_bytes)


def test_each_bad_line_is_rejected_with_its_line_number_and_reason(mem_store: InMemoryObjectStore) -> None:
    lines = [
        json.dumps(_label("p1")),                                        # 1 ok
        '{"product_id": "p2", "category": ',                             # 2 malformed JSON
        json.dumps({**_label("p2"), "category": "boats"}),               # 3 unknown category
        json.dumps({**_label("p2"), "attributes": {"colour": "Red"}}),   # 4 unknown attribute
        json.dumps(_label("p2", lid="maybe")),                           # 5 unknown value
        json.dumps(_label("p9")),                                        # 6 image missing
        "",                                                              # 7 blank: skipped, keeps numbering
        json.dumps({"category": "pans", "image": "s3://shelfsight/img/p3.jpg", "attributes": {"lid": "no"}}),  # 8
        json.dumps(_label("p3", image="http://example.com/x.jpg")),     # 9 not an s3 URI
        "[1, 2]",                                                        # 10 not an object
        json.dumps(_label("p4", handle="yes")),                          # 11 ok
    ]
    result = _import(mem_store, "\n".join(lines).encode())
    reasons = {r.line: r.reason for r in result.rejected}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 8, 9, 10]
    assert "malformed JSON" in reasons[2]
    assert "unknown category 'boats'" in reasons[3]
    assert "unknown attribute 'colour'" in reasons[4]
    assert "unknown value 'maybe'" in reasons[5]
    assert "does not exist" in reasons[6] and "p9.jpg" in reasons[6]
    assert "product_id" in reasons[8]
    assert "s3://" in reasons[9]
    assert "JSON object" in reasons[10]
    assert result.accepted == 2 and result.per_category == {"pans": 2}
    stored = load_category_labels(mem_store, BUCKET, "labels", "pans")
    assert [r.product_id for r in stored.records] == ["p1", "p4"]


def test_storage_is_append_only_one_immutable_object_per_batch(mem_store: InMemoryObjectStore) -> None:
    first = _import(mem_store, [_label("p1"), _label("p2")])
    [first_key] = first.keys
    first_body = mem_store.get(BUCKET, first_key).body
    second = _import(mem_store, [_label("p1", lid="no")])
    [second_key] = second.keys
    assert first_key != second_key and first_key < second_key  # key order is import order
    assert first_key.startswith("labels/pans/") and first_key.endswith(".jsonl")
    assert mem_store.get(BUCKET, first_key).body == first_body  # never rewritten
    assert mem_store.list_keys(BUCKET, "labels/") == [first_key, second_key]
    assert label_categories(mem_store, BUCKET, "labels") == ["pans"]
    labels = load_category_labels(mem_store, BUCKET, "labels", "pans")
    assert {r.product_id: r.attributes["lid"] for r in labels.records} == {"p1": "no", "p2": "yes"}
    assert labels.snapshot()["keys"] == [first_key, second_key] and labels.snapshot()["count"] == 2


def test_latest_label_wins_by_labeled_at_then_import_order(mem_store: InMemoryObjectStore) -> None:
    newer, older = datetime(2026, 11, 2, tzinfo=UTC).isoformat(), datetime(2026, 11, 1, tzinfo=UTC).isoformat()
    _import(mem_store, [_label("p1", lid="yes", labeled_at=newer), _label("p2", lid="yes", labeled_at=older)])
    # imported later but labeled earlier: must not win; same labeled_at: the later import wins
    _import(mem_store, [_label("p1", lid="no", labeled_at=older), _label("p2", lid="no", labeled_at=older)])
    labels = {r.product_id: r.attributes["lid"] for r in load_category_labels(mem_store, BUCKET, "labels", "pans").records}
    assert labels == {"p1": "yes", "p2": "no"}
    # within one batch, a later line wins a tie
    from shelfsight.shared.events import LabelRecord

    a = LabelRecord.model_validate(_label("p3", lid="yes", labeled_at=older))
    b = LabelRecord.model_validate(_label("p3", lid="no", labeled_at=older))
    assert latest_labels([a, b])["p3"].attributes["lid"] == "no"


def test_oversized_file_is_refused_whole(mem_store: InMemoryObjectStore) -> None:
    body = (json.dumps(_label("p1")) + "\n").encode() * 10
    with pytest.raises(LabelFileTooLarge, match="limit"):
        _import(mem_store, body, max_bytes=len(body) - 1)
    assert mem_store.list_keys(BUCKET, "labels/") == []


def test_a_file_with_only_bad_lines_writes_nothing(mem_store: InMemoryObjectStore) -> None:
    result = _import(mem_store, b"not json\n")
    assert result.accepted == 0 and [r.line for r in result.rejected] == [1]
    assert mem_store.list_keys(BUCKET, "labels/") == []
