"""Label import from the tools people use: a CSV with a column per attribute, and a Label Studio JSON
export (the review export, labeled). Each rejection names its CSV line or task and the reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from shelfsight.shared.review import label_studio_task, parse_entry
from shelfsight.shared.settings import DEFAULT_TAXONOMY
from shelfsight.shared.storage import InMemoryObjectStore
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.trainer.labels import (
    csv_labels,
    import_labels,
    label_studio_labels,
    load_category_labels,
)
from tests.label_studio_format import labeled_export
from tests.unit.test_review import entry

BUCKET = "shelfsight"
TAXONOMY = load_taxonomy(DEFAULT_TAXONOMY)


@pytest.fixture
def mem_store() -> InMemoryObjectStore:
    store = InMemoryObjectStore()
    for pid in ("p1", "p2", "p3", "p4", "t1", "t2"):
        store.put(BUCKET, f"uploads/{pid}.jpg", b"jpeg", "image/jpeg")
    return store


def _import(store: InMemoryObjectStore, source: bytes, label_format: str):
    return import_labels(source, store=store, bucket=BUCKET, labels_prefix="labels", taxonomy=TAXONOMY,
                         max_bytes=1 << 20, label_format=label_format)


def _stored(store: InMemoryObjectStore, category: str) -> dict[str, dict[str, str]]:
    return {r.product_id: r.attributes for r in load_category_labels(store, BUCKET, "labels", category).records}


# --- CSV ------------------------------------------------------------------------------------------

CSV_GOOD = (
    "\ufeffproduct_id,category,image,group_id,lid,handle,sleeve_length,neckline\n"   # BOM: a spreadsheet export
    "p1,pans,s3://shelfsight/uploads/p1.jpg,g1,yes,no,,\n"
    "p2,pans,s3://shelfsight/uploads/p2.jpg,,no,,,\n"                              # handle not labeled
    't1,tops,s3://shelfsight/uploads/t1.jpg,,,,"Sleeveless",V-neck\n'              # another category's columns
)


def test_csv_rows_become_labels_and_an_empty_cell_is_not_labeled(mem_store: InMemoryObjectStore) -> None:
    result = _import(mem_store, CSV_GOOD.encode(), "csv")
    assert result.rejected == [] and result.per_category == {"pans": 2, "tops": 1}
    assert _stored(mem_store, "pans") == {"p1": {"lid": "yes", "handle": "no"}, "p2": {"lid": "no"}}
    assert _stored(mem_store, "tops") == {"t1": {"sleeve_length": "Sleeveless", "neckline": "V-neck"}}
    [p1] = [r for r in load_category_labels(mem_store, BUCKET, "labels", "pans").records if r.product_id == "p1"]
    assert p1.group_id == "g1"


def test_each_bad_csv_row_is_rejected_with_its_line_and_reason(mem_store: InMemoryObjectStore) -> None:
    text = (
        "product_id,category,image,labeled_at,lid,handle,neckline\n"          # 1 header
        "p1,pans,s3://shelfsight/uploads/p1.jpg,,yes,no,\n"                   # 2 ok
        "p2,pans,s3://shelfsight/uploads/p2.jpg,,,,\n"                        # 3 nothing labeled
        "p3,pans,s3://shelfsight/uploads/p3.jpg,,ajar,,\n"                    # 4 unknown value
        "p4,pans,s3://shelfsight/uploads/p4.jpg,,yes,,V-neck\n"               # 5 a tops attribute on a pan
        "p9,pans,s3://shelfsight/uploads/p9.jpg,,yes,,\n"                     # 6 image does not exist
        "p2,pans,,,yes,,\n"                                                   # 7 no image
        "p2,pans,s3://shelfsight/uploads/p2.jpg,,yes,no,,extra\n"             # 8 surplus cells
        "p2,pans,s3://shelfsight/uploads/p2.jpg,2099-01-01T00:00:00Z,yes,,\n"  # 9 labeled in the future
        "\n"                                                                  # 10 blank: skipped
        "p2,pans,s3://shelfsight/uploads/p2.jpg,2026-11-27T10:00:00Z,no,yes,\n"  # 11 ok
    )
    result = import_labels(text.encode(), store=mem_store, bucket=BUCKET, labels_prefix="labels", taxonomy=TAXONOMY,
                           max_bytes=1 << 20, label_format="csv", max_future_skew_s=300)
    reasons = {r.line: r.reason for r in result.rejected}
    assert sorted(reasons) == [3, 4, 5, 6, 7, 8, 9]
    assert "no attribute labeled" in reasons[3]
    assert "unknown value 'ajar'" in reasons[4]
    assert "unknown attribute 'neckline' for category 'pans'" in reasons[5]
    assert "does not exist" in reasons[6]
    assert "image" in reasons[7]
    assert "1 more cell(s) than the header" in reasons[8]
    assert "in the future" in reasons[9]
    assert result.accepted == 2
    assert _stored(mem_store, "pans") == {"p1": {"lid": "yes", "handle": "no"}, "p2": {"lid": "no", "handle": "yes"}}


@pytest.mark.parametrize(("text", "reason"), [
    ("", "the CSV file is empty"),
    ("product_id,category,lid\np1,pans,yes\n", "lacks the column(s) ['image']"),
    ("product_id,category,image,lid,lid\n", "repeats the column(s) ['lid']"),
    ("product_id,category,image,,lid\n", "a column without a name"),
])
def test_an_unusable_csv_header_refuses_the_whole_file(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match="CSV") as caught:
        csv_labels(text)
    assert reason in str(caught.value)


# --- Label Studio ---------------------------------------------------------------------------------


def _exported_tasks(*pids: str) -> list[dict[str, Any]]:
    """Review export tasks for pans products (what `shelfsight review export` writes)."""
    return [label_studio_task(parse_entry(b"1-0", entry(pid, 0.9)), TAXONOMY) for pid in pids]


def test_a_labeled_label_studio_export_imports_the_latest_live_annotation(mem_store: InMemoryObjectStore) -> None:
    tasks = _exported_tasks("p1", "p2", "p3")
    export = labeled_export(tasks, {
        "p1": [{"choices": {"lid": "no", "handle": "yes"}, "updated_at": "2026-11-27T19:00:00Z"},
               {"choices": {"lid": "yes"}, "updated_at": "2026-11-27T19:05:00Z"}],   # relabeled later: wins
        "p2": [{"choices": {"lid": "no"}, "updated_at": "2026-11-27T19:10:00Z"},
               {"choices": {"lid": "yes"}, "updated_at": "2026-11-27T19:20:00Z", "was_cancelled": True}],
        "p3": [{"choices": {"lid": "yes", "handle": None}}],                          # handle left empty
    })
    result = _import(mem_store, json.dumps(export).encode(), "label-studio")
    assert result.rejected == [] and result.accepted == 3
    assert _stored(mem_store, "pans") == {"p1": {"lid": "yes"}, "p2": {"lid": "no"}, "p3": {"lid": "yes"}}
    records = {r.product_id: r for r in load_category_labels(mem_store, BUCKET, "labels", "pans").records}
    assert records["p1"].labeled_at == datetime(2026, 11, 27, 19, 5, tzinfo=UTC)  # when the labeler answered
    assert records["p1"].image == "s3://shelfsight/uploads/p1.jpg"


def test_a_presigned_image_url_imports_back_through_image_uri() -> None:
    [task] = _exported_tasks("p1")
    task["data"]["image"] = "https://shelfsight.s3.amazonaws.com/uploads/p1.jpg?X-Amz-Signature=abc"
    labels, rejected, _ = label_studio_labels(json.dumps(labeled_export([task], {"p1": [{"choices": {"lid": "no"}}]})))
    assert rejected == [] and labels[0][1]["image"] == "s3://shelfsight/uploads/p1.jpg"


def test_each_unusable_task_is_rejected_with_its_position_id_and_reason(mem_store: InMemoryObjectStore) -> None:
    tasks = _exported_tasks("p1", "p2", "p3", "p4", "p1", "p2", "p3", "p4", "p1")
    export = labeled_export(tasks, {"p1": [{"choices": {"lid": "yes"}}], "p2": [{"choices": {"lid": "no"}}],
                                    "p3": [{"choices": {"lid": "yes"}}], "p4": [{"choices": {"lid": "no"}}]},
                            start_id=100)
    export[1]["annotations"] = []                                                   # 2: never labeled
    export[2]["annotations"][0]["was_cancelled"] = True                             # 3: skipped
    export[3]["annotations"][0]["result"][0]["value"]["choices"] = ["yes", "no"]    # 4: two values
    export[4]["annotations"][0]["result"][0]["value"]["choices"] = ["ajar"]         # 5: unknown value
    export[5]["annotations"][0]["result"][0]["from_name"] = "colour"                # 6: unknown attribute
    del export[6]["data"]["image"], export[6]["data"]["image_uri"]                  # 7: no image
    del export[7]["data"]["product_id"]                                             # 8: no product
    export[8]["annotations"][0]["result"] = [{"type": "textarea", "from_name": "note", "to_name": "image",
                                              "value": {"text": ["blurry"]}}]      # 9: no choice made
    export.append({"id": 200, "image": "s3://shelfsight/uploads/p1.jpg", "lid": "yes"})  # 10: JSON-MIN row
    result = _import(mem_store, json.dumps(export).encode(), "label-studio")
    found = {r.line: (r.task_id, r.reason) for r in result.rejected}
    assert sorted(found) == list(range(2, 11))
    assert found[2] == ("101", "no annotation: the task was not labeled")
    assert found[3] == ("102", "every annotation was cancelled (the task was skipped)")
    assert "lid: 2 values chosen" in found[4][1]
    assert "unknown value 'ajar'" in found[5][1] and found[5][0] == "104"
    assert "unknown attribute 'colour'" in found[6][1]
    assert "missing image" in found[7][1]
    assert "lacks ['product_id']" in found[8][1]
    assert "chose no value" in found[9][1]
    assert found[10][0] == "200" and "export the project as JSON" in found[10][1]
    assert result.accepted == 1 and _stored(mem_store, "pans") == {"p1": {"lid": "yes"}}
    assert result.as_dict()["rejections"][0] == {"line": 2, "reason": found[2][1], "task_id": "101"}


@pytest.mark.parametrize(("text", "reason"), [
    ("[{", "not a Label Studio JSON export"),
    ('"tasks"', "a list of tasks"),
])
def test_a_file_that_is_not_a_task_list_is_refused_whole(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        label_studio_labels(text)
