"""The review queue: stream entries parsed, latest per product, most uncertain first, a budget;
Label Studio tasks and labeling config checked against Label Studio's documented import format."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shelfsight.shared.events import LabelRecord
from shelfsight.shared.review import (
    MalformedEntry,
    label_studio_export,
    label_studio_task,
    labeling_config,
    latest_label_times,
    parse_entry,
    read_review_stream,
    review_order,
    review_queue,
)
from shelfsight.shared.settings import DEFAULT_TAXONOMY
from shelfsight.shared.storage import InMemoryObjectStore
from shelfsight.shared.taxonomy import Taxonomy, load_taxonomy
from tests.label_studio_format import parse_config, validate_import

TAXONOMY = load_taxonomy(DEFAULT_TAXONOMY)
T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def entry(pid: str, uncertainty: float, *, category: str = "pans", minutes: int = 0,
          attributes: dict[str, Any] | None = None, **extra: str) -> dict[bytes, bytes]:
    """A review stream entry as the worker writes it and redis-py returns it (bytes)."""
    attributes = attributes or {
        "lid": {"value": "yes", "confidence": 0.55, "needs_review": True, "scores": {"yes": 0.55, "no": 0.45}},
        "handle": {"value": "no", "confidence": 0.97, "needs_review": False, "scores": {"yes": 0.03, "no": 0.97}},
    }
    fields = {"event_id": f"ev-{pid}", "product_id": pid, "category": category,
              "image": f"s3://shelfsight/uploads/{pid}.jpg", "result": f"s3://shelfsight/results/{category}/{pid}.json",
              "model_version": "20261127T000000Z-abc", "uncertainty": str(uncertainty),
              "attributes": json.dumps(attributes), "submitted_at": (T0 + timedelta(minutes=minutes)).isoformat(),
              **extra}
    return {k.encode(): v.encode() for k, v in fields.items()}


def items(*entries: dict[bytes, bytes]) -> list:
    return [parse_entry(f"{n}-0".encode(), fields) for n, fields in enumerate(entries, start=1)]


def test_an_entry_parses_from_the_worker_fields() -> None:
    [item] = items(entry("p1", 0.9))
    assert (item.entry_id, item.product_id, item.category, item.uncertainty) == ("1-0", "p1", "pans", 0.9)
    assert item.submitted_at == T0 and item.submitted_at.tzinfo is not None
    assert item.attributes["lid"].scores == {"yes": 0.55, "no": 0.45}
    assert item.review_attributes == ["lid"]  # the flagged one, not every attribute
    assert json.loads(json.dumps(item.as_dict()))["submitted_at"] == T0.isoformat()


@pytest.mark.parametrize(("change", "reason"), [
    ({"uncertainty": b""}, "missing field(s) ['uncertainty']"),
    ({"uncertainty": b"high"}, "could not convert"),
    ({"uncertainty": b"1.5"}, "outside [0, 1]"),
    ({"uncertainty": b"nan"}, "outside [0, 1]"),
    ({"image": b"https://example.com/p.jpg"}, "not an s3://bucket/key URI"),
    ({"attributes": b"{not json"}, "Expecting property name"),
    ({"attributes": b"[]"}, "non-empty JSON object"),
    ({"attributes": b'{"lid": {"confidence": 0.5}}'}, "attributes.lid: needs a string 'value'"),
    ({"submitted_at": b"yesterday"}, "datetime"),
])
def test_a_malformed_entry_is_refused_with_the_field_at_fault(change: dict, reason: str) -> None:
    with pytest.raises(MalformedEntry, match=None) as caught:
        parse_entry(b"1-0", {**entry("p1", 0.5), **{k.encode(): v for k, v in change.items()}})
    assert reason in str(caught.value)


def test_queue_is_latest_per_product_most_uncertain_first_ties_to_the_older_request() -> None:
    queue = review_queue(items(
        entry("p1", 0.40, minutes=0),
        entry("p2", 0.80, minutes=5),
        entry("p3", 0.80, minutes=1),   # same uncertainty as p2, requested earlier: first
        entry("p4", 0.95, minutes=2),
        entry("p1", 0.99, minutes=9),   # p1 re-extracted: only this (latest) entry counts
        entry("p4", 0.10, minutes=10),  # p4's newer result is confident: it sinks
    ))
    assert [(i.product_id, i.uncertainty) for i in queue] == [
        ("p1", 0.99), ("p3", 0.80), ("p2", 0.80), ("p4", 0.10)]


def test_queue_budget_category_and_products_labeled_since() -> None:
    all_items = items(entry("p1", 0.9), entry("p2", 0.8, minutes=1), entry("p3", 0.7, minutes=2),
                      entry("t1", 0.99, category="tops", attributes={
                          "neckline": {"value": "V-neck", "confidence": 0.5, "needs_review": True}}))
    assert [i.product_id for i in review_queue(all_items, limit=2)] == ["t1", "p1"]
    assert [i.product_id for i in review_queue(all_items, category="pans", limit=0)] == ["p1", "p2", "p3"]
    labeled = {"p1": T0 + timedelta(minutes=1),   # labeled after its entry: done, left out
               "p2": T0}                           # labeled before this entry (minute 1): still to review
    assert [i.product_id for i in review_queue(all_items, category="pans", labeled_at=labeled)] == ["p2", "p3"]
    assert review_order([]) == []


class _PagedStream:
    """xrange over a list of (id, fields), honouring '(' exclusive starts and count."""

    def __init__(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        self.entries = entries
        self.calls = 0

    def xrange(self, name: str, min: str = "-", max: str = "+", count: int | None = None) -> list:
        self.calls += 1
        after = None if min == "-" else min.lstrip("(")
        start = 0 if after is None else next(i for i, (e, _) in enumerate(self.entries) if e.decode() == after) + 1
        return self.entries[start:start + (count or len(self.entries))]


def test_the_whole_stream_is_read_in_pages_and_malformed_entries_reported() -> None:
    stream = _PagedStream([(f"{n}-0".encode(), entry(f"p{n}", n / 10)) for n in range(1, 6)])
    stream.entries.insert(2, (b"2-1", {b"product_id": b"broken"}))
    found, skipped = read_review_stream(stream, "shelfsight:review", page=2)
    assert [i.product_id for i in found] == ["p1", "p2", "p3", "p4", "p5"]
    assert skipped == [("2-1", "missing field(s) ['category', 'image', 'uncertainty', 'attributes', 'submitted_at']")]
    assert stream.calls == 4  # 6 entries in pages of 2, and the empty page that ends it


def test_latest_label_times_reads_the_label_log() -> None:
    store = InMemoryObjectStore()

    def label(pid: str, minutes: int) -> str:
        return LabelRecord(product_id=pid, category="pans", image=f"s3://bucket/{pid}.jpg", attributes={"lid": "no"},
                           labeled_at=T0 + timedelta(minutes=minutes)).model_dump_json() + "\n"

    store.put("b", "labels/pans/1.jsonl", (label("p1", 5) + label("p2", 1)).encode(), "application/x-ndjson")
    store.put("b", "labels/pans/2.jsonl", label("p1", 3).encode(), "application/x-ndjson")
    store.put("b", "labels/tops/1.jsonl", label("x", 1).encode(), "application/x-ndjson")
    assert latest_label_times(store, "b", "labels", ["pans"]) == {"p1": T0 + timedelta(minutes=5),
                                                                  "p2": T0 + timedelta(minutes=1)}


def test_labeling_config_has_one_single_choice_per_attribute_with_the_taxonomy_values() -> None:
    for category, spec in TAXONOMY.categories.items():
        root = ET.fromstring(labeling_config(TAXONOMY, category))  # noqa: S314 - our own output
        [image] = root.findall("Image")
        assert (image.get("name"), image.get("value")) == ("image", "$image")
        choices = {c.get("name"): c for c in root.findall("Choices")}
        assert list(choices) == list(spec.attributes)
        for name, attribute in spec.attributes.items():
            assert choices[name].get("toName") == "image" and choices[name].get("choice") == "single"
            assert [c.get("value") for c in choices[name].findall("Choice")] == attribute.value_names
        assert parse_config(labeling_config(TAXONOMY, category))[1] == []


def test_labeling_config_escapes_values_xml_would_misread() -> None:
    odd = Taxonomy.model_validate({"version": "t", "categories": {"mugs": {"attributes": {
        "print": {"values": [{"value": 'says "hi" & <bye>'}, {"value": "plain"}]}}}}})
    root = ET.fromstring(labeling_config(odd, "mugs"))  # noqa: S314 - our own output
    assert [c.get("value") for c in root.iter("Choice")] == ['says "hi" & <bye>', "plain"]


def test_exported_tasks_are_accepted_by_label_studios_import_format() -> None:
    queue = review_queue(items(
        entry("p1", 0.9), entry("p2", 0.3),
        entry("t1", 0.7, category="tops", attributes={
            "sleeve_length": {"value": "Sleeveless", "confidence": 0.4, "needs_review": True},
            "neckline": {"value": "V-neck", "confidence": 0.9},
            "main_colour": {"value": "Red", "confidence": 0.8}}),
    ))
    projects = {p.category: p for p in label_studio_export(queue, TAXONOMY)}
    assert sorted(projects) == ["pans", "tops"]
    for project in projects.values():
        tasks = json.loads(json.dumps(project.tasks))  # as written to the file
        assert validate_import(tasks, project.config) == []
    pans = projects["pans"].tasks
    assert [t["data"]["product_id"] for t in pans] == ["p1", "p2"]  # queue order kept
    assert pans[0]["data"]["image"] == pans[0]["data"]["image_uri"] == "s3://shelfsight/uploads/p1.jpg"
    assert pans[0]["predictions"][0]["score"] == pytest.approx(0.1)  # 1 - uncertainty: LS sorts lowest first
    assert {r["from_name"]: r["value"]["choices"] for r in pans[0]["predictions"][0]["result"]} == {
        "lid": ["yes"], "handle": ["no"]}


def test_the_format_check_is_not_vacuous() -> None:
    """Each kind of mistake the exporter could make is caught by the format check."""
    [item] = items(entry("p1", 0.9))
    config = labeling_config(TAXONOMY, "pans")
    good = label_studio_task(item, TAXONOMY)
    assert validate_import([good], config) == []

    def broken(change: Any) -> list[str]:
        task = json.loads(json.dumps(good))
        change(task)
        return validate_import([task], config)

    assert "from_name 'colour' not found" in " ".join(broken(
        lambda t: t["predictions"][0]["result"][0].update(from_name="colour")))
    assert "is not a <Choice>" in " ".join(broken(
        lambda t: t["predictions"][0]["result"][0]["value"].update(choices=["ajar"])))
    assert "between 0.00 and 1.00" in " ".join(broken(lambda t: t["predictions"][0].update(score=1.2)))
    assert "does not match expected type" in " ".join(broken(
        lambda t: t["predictions"][0]["result"][0].update(type="labels")))
    assert '"image" key is expected' in " ".join(broken(lambda t: t["data"].pop("image")))
    assert "not a URL Label Studio can load" in " ".join(broken(lambda t: t["data"].update(image="/tmp/p1.jpg")))
    assert "unexpected key" in " ".join(broken(lambda t: t.update(completions=[])))
    assert validate_import([], config) != []


def test_a_prediction_the_taxonomy_no_longer_has_is_left_out_not_exported_invalid() -> None:
    [item] = items(entry("p1", 0.9, attributes={
        "lid": {"value": "ajar", "confidence": 0.5, "needs_review": True},
        "rim": {"value": "round", "confidence": 0.5},
        "handle": {"value": "yes", "confidence": 0.5}}))
    task = label_studio_task(item, TAXONOMY, image_url="https://s3.example/p1.jpg?X-Amz-Signature=x")
    assert [r["from_name"] for r in task["predictions"][0]["result"]] == ["handle"]
    assert task["data"]["image"].startswith("https://") and task["data"]["image_uri"].startswith("s3://")
    assert validate_import([task], labeling_config(TAXONOMY, "pans")) == []


def test_review_commands_exit_2_when_the_stream_cannot_be_read(capsys: pytest.CaptureFixture) -> None:
    from shelfsight.shared.settings import Settings
    from tests.helpers import run_cli

    unreachable = Settings(broker_url="redis://127.0.0.1:1/0", broker_connect_timeout_s=0.5)
    assert run_cli(unreachable, "review", "list") == 2
    assert "cannot read the review stream" in capsys.readouterr().err
    assert run_cli(unreachable, "review", "export", "--limit", "-1") == 2  # a budget below 0 is a usage error
