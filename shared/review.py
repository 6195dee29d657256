"""The review queue: results the model was unsure of, ordered by how much a label would teach it.

The worker XADDs one entry to settings.review_stream per result that needs review (string
fields: event_id, product_id, category, image, result, model_version, uncertainty, attributes
as JSON, submitted_at). This module reads that stream and turns it into work for people:

- `parse_entry`, `read_review_stream`: entries to `ReviewItem`s; a malformed entry is skipped
  and reported, never fatal (the stream is a notification; the result file stays the truth).
- `review_queue`: the latest entry per product, minus products labeled since, of one category
  if asked, most uncertain first (ties: the older request first), cut to a budget.
- `labeling_config`, `label_studio_task`, `label_studio_export`: Label Studio tasks with the
  current predictions as pre-annotations, and the labeling config (XML) generated from the
  taxonomy, one project per category (categories have different attributes).

Why margin: the entry's `uncertainty` is `clip_math.product_uncertainty` (1 - (p1 - p2) of the
least decided attribute, on calibrated probabilities). A small margin between the two best
values is where the decision boundary runs, so a label there moves it most; entropy would also
rank images whose probability is spread over values the model already ranks right.

Pure functions and plain Redis/S3 reads; nothing here imports the worker or the trainer.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Protocol

import structlog
from pydantic import TypeAdapter, ValidationError

from shelfsight.shared.events import LabelRecord, UtcDatetime, parse_s3_uri
from shelfsight.shared.storage import ObjectStore
from shelfsight.shared.taxonomy import Taxonomy

log = structlog.get_logger()

# Label Studio names shared by the export (tasks, config) and the import (trainer.labels).
IMAGE_TAG = "image"
"""Name of the <Image> object tag; every <Choices> points at it (toName)."""
DATA_IMAGE = "image"
"""Task data key the <Image> tag shows: the s3:// URI, or a presigned https URL."""
DATA_IMAGE_URI = "image_uri"
"""Task data key that always holds the s3:// URI, so a presigned URL still imports back."""
DATA_PRODUCT_ID, DATA_CATEGORY, DATA_GROUP_ID = "product_id", "category", "group_id"

_PAGE = 1000
_DATETIME: TypeAdapter[datetime] = TypeAdapter(UtcDatetime)


class MalformedEntry(ValueError):
    """A review stream entry that cannot be used; the reason says which field is wrong."""


@dataclass(frozen=True)
class AttributePrediction:
    """The model's answer for one attribute of one image."""

    value: str
    confidence: float
    needs_review: bool = False
    scores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ReviewItem:
    """One review stream entry, parsed."""

    entry_id: str
    event_id: str
    product_id: str
    category: str
    image: str
    result: str
    model_version: str
    uncertainty: float
    attributes: dict[str, AttributePrediction]
    submitted_at: datetime

    @property
    def review_attributes(self) -> list[str]:
        """The attributes that made this result need review (all of them if none is flagged)."""
        flagged = [name for name, a in self.attributes.items() if a.needs_review]
        return flagged or list(self.attributes)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["submitted_at"] = self.submitted_at.isoformat()
        return out


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _attribute(name: str, raw: Any) -> AttributePrediction:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("value"), str):
        raise MalformedEntry(f"attributes.{name}: needs a string 'value'")
    try:
        scores = {str(k): float(v) for k, v in (raw.get("scores") or {}).items()}
        return AttributePrediction(value=raw["value"], confidence=float(raw.get("confidence", 0.0)),
                                   needs_review=bool(raw.get("needs_review", False)), scores=scores)
    except (TypeError, ValueError, AttributeError) as exc:
        raise MalformedEntry(f"attributes.{name}: {exc}") from None


def parse_entry(entry_id: bytes | str, fields: Mapping[bytes | str, bytes | str]) -> ReviewItem:
    """A review stream entry (as redis-py returns it) as a ReviewItem; MalformedEntry if unusable."""
    values = {_text(k): _text(v) for k, v in fields.items()}
    missing = [k for k in ("product_id", "category", "image", "uncertainty", "attributes", "submitted_at")
               if not values.get(k)]
    if missing:
        raise MalformedEntry(f"missing field(s) {missing}")
    try:
        parse_s3_uri(values["image"])
        uncertainty = float(values["uncertainty"])
        submitted_at = _DATETIME.validate_python(values["submitted_at"])
        raw_attributes = json.loads(values["attributes"])
    except (ValueError, ValidationError) as exc:
        raise MalformedEntry(str(exc).splitlines()[0]) from None
    if not isinstance(raw_attributes, Mapping) or not raw_attributes:
        raise MalformedEntry("attributes must be a non-empty JSON object")
    if not 0.0 <= uncertainty <= 1.0:  # also refuses NaN
        raise MalformedEntry(f"uncertainty {uncertainty} is outside [0, 1]")
    return ReviewItem(
        entry_id=_text(entry_id), event_id=values.get("event_id", ""), product_id=values["product_id"],
        category=values["category"], image=values["image"], result=values.get("result", ""),
        model_version=values.get("model_version", ""), uncertainty=uncertainty,
        attributes={str(name): _attribute(str(name), raw) for name, raw in raw_attributes.items()},
        submitted_at=submitted_at,
    )


class StreamReader(Protocol):
    def xrange(self, name: str, min: str = "-", max: str = "+", count: int | None = None) -> Any: ...


def read_review_stream(client: StreamReader, stream: str, page: int = _PAGE
                       ) -> tuple[list[ReviewItem], list[tuple[str, str]]]:
    """Every entry of the stream, oldest first, and the (entry id, reason) of each malformed one."""
    items: list[ReviewItem] = []
    skipped: list[tuple[str, str]] = []
    start = "-"
    while True:
        batch = client.xrange(stream, min=start, max="+", count=page)
        for entry_id, fields in batch:
            try:
                items.append(parse_entry(entry_id, fields))
            except MalformedEntry as exc:
                skipped.append((_text(entry_id), str(exc)))
        if len(batch) < page:
            break
        start = "(" + _text(batch[-1][0])  # exclusive: the next page starts after the last id seen
    if skipped:
        log.warning("review.entries_skipped", stream=stream, count=len(skipped), first=skipped[0])
    return items, skipped


def latest_per_product(items: Iterable[ReviewItem]) -> list[ReviewItem]:
    """One item per product: the one published last (stream order), which describes its current result."""
    latest: dict[str, ReviewItem] = {}
    for item in items:
        latest[item.product_id] = item
    return list(latest.values())


def review_order(items: Iterable[ReviewItem]) -> list[ReviewItem]:
    """Most uncertain first; ties go to the older request (it has waited longer), then product id."""
    return sorted(items, key=lambda i: (-i.uncertainty, i.submitted_at, i.product_id))


def review_queue(
    items: Iterable[ReviewItem], *, category: str | None = None, limit: int | None = None,
    labeled_at: Mapping[str, datetime] | None = None,
) -> list[ReviewItem]:
    """What to label next: latest entry per product, of `category` if given, without products
    labeled at or after the entry's submitted_at (`labeled_at`: product id -> latest label time),
    ordered by `review_order`, at most `limit` (None or 0: all)."""
    labeled_at = labeled_at or {}
    queue = [
        item for item in latest_per_product(items)
        if (category is None or item.category == category)
        and not (item.product_id in labeled_at and labeled_at[item.product_id] >= item.submitted_at)
    ]
    ordered = review_order(queue)
    return ordered[:limit] if limit else ordered


def latest_label_times(store: ObjectStore, bucket: str, labels_prefix: str,
                       categories: Iterable[str]) -> dict[str, datetime]:
    """product id -> its latest labeled_at in the label log (<labels_prefix>/<category>/*.jsonl)."""
    latest: dict[str, datetime] = {}
    for category in sorted(set(categories)):
        prefix = f"{labels_prefix.strip('/')}/{category}/"
        for key in store.list_keys(bucket, prefix):
            if not key.endswith(".jsonl"):
                continue
            for line in store.get(bucket, key).body.decode().splitlines():
                if line.strip():
                    record = LabelRecord.model_validate_json(line)
                    if record.product_id not in latest or record.labeled_at > latest[record.product_id]:
                        latest[record.product_id] = record.labeled_at
    return latest


# --- Label Studio ---------------------------------------------------------------------------------
# Formats: https://labelstud.io/guide/task_format (tasks, predictions, annotations),
# https://labelstud.io/guide/predictions (pre-annotations), https://labelstud.io/tags/choices.


def labeling_config(taxonomy: Taxonomy, category: str) -> str:
    """The Label Studio labeling config of a category: the image, and one single-choice
    <Choices> per attribute (name = attribute, one <Choice> per taxonomy value)."""
    cat = taxonomy.category(category)
    view = ET.Element("View")
    ET.SubElement(view, "Image", name=IMAGE_TAG, value=f"${DATA_IMAGE}", zoom="true")
    ET.SubElement(view, "Header", value=f"${DATA_PRODUCT_ID}")
    for attribute, spec in cat.attributes.items():
        ET.SubElement(view, "Header", value=attribute, size="5")
        choices = ET.SubElement(view, "Choices", name=attribute, toName=IMAGE_TAG, choice="single",
                                showInline="true")
        for value in spec.value_names:
            ET.SubElement(choices, "Choice", value=value)
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def _known_predictions(item: ReviewItem, taxonomy: Taxonomy) -> dict[str, str]:
    """attribute -> predicted value, for the attributes and values the taxonomy still has."""
    cat = taxonomy.category(item.category)
    known = {}
    for name, prediction in item.attributes.items():
        spec = cat.attributes.get(name)
        if spec is not None and prediction.value in spec.value_names:
            known[name] = prediction.value
        else:  # the model predates a taxonomy change: no pre-annotation rather than an invalid one
            log.warning("review.prediction_dropped", product_id=item.product_id, attribute=name,
                        value=prediction.value, taxonomy=taxonomy.version)
    return known


def label_studio_task(item: ReviewItem, taxonomy: Taxonomy, image_url: str | None = None) -> dict[str, Any]:
    """One Label Studio task: the image and product in `data`, the model's answers as a prediction.

    data.image is what Label Studio loads: `image_url` (e.g. a presigned https URL) or the s3://
    URI, which Label Studio resolves through an S3 source storage connected to the project.
    data.image_uri, product_id and category carry what `labels import --format label-studio`
    needs to turn the labeled task back into a label. The prediction's score is 1 - uncertainty,
    so Label Studio's "sort by prediction score" puts the most uncertain task first.
    """
    predictions = _known_predictions(item, taxonomy)
    result = [
        {"id": f"{name}", "from_name": name, "to_name": IMAGE_TAG, "type": "choices",
         "value": {"choices": [value]}}
        for name, value in predictions.items()
    ]
    return {
        "data": {
            DATA_IMAGE: image_url or item.image,
            DATA_IMAGE_URI: item.image,
            DATA_PRODUCT_ID: item.product_id,
            DATA_CATEGORY: item.category,
            "event_id": item.event_id,
            "submitted_at": item.submitted_at.isoformat(),
            "uncertainty": round(item.uncertainty, 6),
            "review_attributes": ", ".join(item.review_attributes),
        },
        "predictions": [{
            "model_version": item.model_version or "unknown",
            "score": round(min(1.0, max(0.0, 1.0 - item.uncertainty)), 6),
            "result": result,
        }],
    }


@dataclass(frozen=True)
class LabelStudioProject:
    """What to import into one Label Studio project: its tasks and its labeling config."""

    category: str
    tasks: list[dict[str, Any]]
    config: str


def label_studio_export(items: Sequence[ReviewItem], taxonomy: Taxonomy,
                        image_url: Callable[[str], str] | None = None) -> list[LabelStudioProject]:
    """Tasks grouped by category (one Label Studio project each), in queue order.

    `image_url` maps an s3:// URI to the URL Label Studio should load (None: the URI itself).
    Items of a category the taxonomy no longer has are left out (and logged).
    """
    by_category: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        if item.category not in taxonomy.categories:
            log.warning("review.unknown_category", product_id=item.product_id, category=item.category)
            continue
        url = image_url(item.image) if image_url else None
        by_category.setdefault(item.category, []).append(label_studio_task(item, taxonomy, url))
    return [LabelStudioProject(category, tasks, labeling_config(taxonomy, category))
            for category, tasks in sorted(by_category.items())]
