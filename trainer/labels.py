"""The label log: validate label lines, append them to S3, read back the latest label per product.

Storage is append-only. Each import batch becomes immutable JSONL objects, one per category:

    <labels_prefix>/<category>/<UTC timestamp>-<random>.jsonl

Nothing is ever rewritten. Reading a category means reading all its objects, in key order
(timestamp first, so import order), and keeping for each product and attribute the value with
the latest ``labeled_at``; ties go to the later import, then to the later line. A partial
relabel (some attributes) keeps the product's other attributes (see `latest_labels`).

Rejections are never silent: each bad line comes back with its 1-based line number and the
reason (malformed JSON, schema error, unknown category/attribute/value, missing image). The
good lines of a file with bad lines are still stored; the caller reports the rejections
(the CLI exits non-zero).

Three input formats (`LABEL_FORMATS`), all turned into the same label dicts and validated the
same way:
- jsonl: one LabelRecord per line.
- csv: a header row with product_id, category, image (optional group_id, labeled_at) and one
  column per attribute; an empty cell means "not labeled". Rejections name the CSV line.
- label-studio: a Label Studio JSON export (a list of tasks). Each task's latest annotation that
  was not cancelled gives the label: each `choices` result is an attribute (from_name) and its
  value; product_id, category and the s3:// image come from the task's data (as
  `shelfsight review export` writes them). Rejections name the task's position and id.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from pydantic import TypeAdapter, ValidationError

from shelfsight.shared.events import LabelRecord, UtcDatetime, parse_s3_uri
from shelfsight.shared.image_sources import ImageSourcePolicy, ImageSourceRefused
from shelfsight.shared.review import (
    DATA_CATEGORY,
    DATA_GROUP_ID,
    DATA_IMAGE,
    DATA_IMAGE_URI,
    DATA_PRODUCT_ID,
)
from shelfsight.shared.storage import ObjectStore
from shelfsight.shared.taxonomy import Taxonomy

log = structlog.get_logger()

_EXISTS_THREADS = 16

LABEL_FORMATS = ("jsonl", "csv", "label-studio")
CSV_COLUMNS = ("product_id", "category", "image", "group_id", "labeled_at")
"""CSV columns that are not attributes; the first three are required."""
_DATETIME: TypeAdapter[datetime] = TypeAdapter(UtcDatetime)


class LabelFileTooLarge(ValueError):
    """The label file exceeds settings.max_label_file_bytes; nothing was imported."""


@dataclass(frozen=True)
class Rejection:
    """A label line that was not imported, and why."""

    line: int
    reason: str
    task_id: str | None = None  # label-studio: the task's id; `line` is then its position (1-based)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"line": self.line, "reason": self.reason}
        if self.task_id is not None:
            out["task_id"] = self.task_id
        return out


@dataclass
class ImportResult:
    """What an import did: counts per category, the objects written and every rejected line."""

    accepted: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    per_category: dict[str, int] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "rejected": len(self.rejected),
            "rejections": [r.as_dict() for r in self.rejected],
            "per_category": dict(self.per_category),
            "keys": list(self.keys),
        }


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "record"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts)


def parse_line(raw: str | Mapping[str, Any], taxonomy: Taxonomy,
               sources: ImageSourcePolicy | None = None, max_future_skew_s: float | None = None) -> LabelRecord:
    """One label from a JSON line or dict, validated against the schema, the taxonomy and, if
    given, the image allowlist (checked before any S3 request, so it reveals nothing) and the
    clock (a labeled_at far in the future would win over every later label of the product).

    Raises ValueError with a reason a person can act on.
    """
    if isinstance(raw, str):
        try:
            payload = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"malformed JSON: {exc.msg} at column {exc.colno}") from None
    else:
        payload = raw
    if not isinstance(payload, Mapping):
        raise ValueError(f"a label must be a JSON object, got {type(payload).__name__}")
    try:
        record = LabelRecord.model_validate(payload)
    except ValidationError as exc:
        raise ValueError(f"invalid label: {_describe(exc)}") from None
    try:
        taxonomy.check_labels(record.category, record.attributes)
    except KeyError as exc:
        raise ValueError(str(exc.args[0])) from None
    skew = max_future_skew_s
    if skew is not None and skew >= 0 and record.labeled_at > datetime.now(UTC) + timedelta(seconds=skew):
        raise ValueError(f"labeled_at {record.labeled_at.isoformat()} is in the future (SHELFSIGHT_MAX_FUTURE_SKEW_S)")
    if sources is not None:
        try:
            sources.check(record.image)
        except ImageSourceRefused as exc:
            raise ValueError(str(exc)) from None
    return record


def _iter_lines(source: bytes | str | Sequence[Mapping[str, Any]]) -> Iterable[tuple[int, str | Mapping[str, Any]]]:
    """(1-based line number, raw line) pairs; blank lines are skipped but keep their numbers."""
    if isinstance(source, bytes | str):
        text = source.decode("utf-8", errors="replace") if isinstance(source, bytes) else source
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                yield number, line
    else:
        yield from enumerate(source, start=1)


# --- CSV and Label Studio: turned into label dicts, numbered by CSV line or task position --------

Numbered = list[tuple[int, str | Mapping[str, Any]]]


def _text_of(source: bytes | str) -> str:
    """Text of a file; a UTF-8 byte order mark (spreadsheet exports write one) is dropped."""
    return source.decode("utf-8-sig", errors="replace") if isinstance(source, bytes) else source.lstrip("\ufeff")


def csv_labels(source: bytes | str) -> tuple[Numbered, list[Rejection]]:
    """(CSV line number, label dict) per data row, and the rows rejected before validation.

    Header: product_id, category, image, optional group_id and labeled_at, then one column per
    attribute (any category's: a cell left empty is simply not labeled). Raises ValueError when
    the header itself is unusable, since then no row can be read.
    """
    reader = csv.DictReader(io.StringIO(_text_of(source), newline=""))
    if not reader.fieldnames:
        raise ValueError("the CSV file is empty; its first line must be a header: product_id,category,image,<attribute>...")
    names = [name.strip() for name in reader.fieldnames]
    reader.fieldnames = names
    missing = [c for c in CSV_COLUMNS[:3] if c not in names]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if missing or duplicated or "" in names:
        problem = (f"lacks the column(s) {missing}" if missing else
                   f"repeats the column(s) {duplicated}" if duplicated else "has a column without a name")
        raise ValueError(f"the CSV header {problem}; it needs product_id, category, image and one column per attribute")
    attribute_columns = [n for n in names if n not in CSV_COLUMNS]
    rows: Numbered = []
    rejected: list[Rejection] = []
    try:
        for row in reader:
            line = reader.line_num
            if None in row:  # DictReader keeps surplus cells under the key None
                rejected.append(Rejection(line, f"{len(row[None])} more cell(s) than the header has columns"))
                continue
            cells = {name: (value or "").strip() for name, value in row.items()}
            attributes = {name: cells[name] for name in attribute_columns if cells.get(name)}
            if not attributes:
                rejected.append(Rejection(line, "no attribute labeled: every attribute cell is empty"))
                continue
            label: dict[str, Any] = {k: cells[k] for k in CSV_COLUMNS if cells.get(k)}
            label["attributes"] = attributes
            rows.append((line, label))
    except csv.Error as exc:
        raise ValueError(f"CSV line {reader.line_num}: {exc}") from None
    return rows, rejected


def _timestamp(value: Any) -> datetime | None:
    try:
        return _DATETIME.validate_python(value) if value else None
    except ValidationError:
        return None


def _latest_annotation(task: Mapping[str, Any]) -> Mapping[str, Any]:
    """The task's most recent annotation that was not cancelled (skipped); ValueError if none."""
    annotations = task.get("annotations") or []
    if not isinstance(annotations, list):
        raise ValueError("'annotations' must be a list")
    live = [(i, a) for i, a in enumerate(annotations) if isinstance(a, Mapping) and not a.get("was_cancelled")]
    if not live:
        raise ValueError("every annotation was cancelled (the task was skipped)" if annotations
                         else "no annotation: the task was not labeled")
    floor = datetime.min.replace(tzinfo=UTC)

    def recency(pair: tuple[int, Mapping[str, Any]]) -> tuple[datetime, int]:
        index, annotation = pair
        when = _timestamp(annotation.get("updated_at")) or _timestamp(annotation.get("created_at"))
        return when or floor, index

    return max(live, key=recency)[1]


def _choices(annotation: Mapping[str, Any]) -> dict[str, str]:
    """attribute -> value from the annotation's `choices` results (other result types are ignored)."""
    attributes: dict[str, str] = {}
    for item in annotation.get("result") or []:
        if not isinstance(item, Mapping) or item.get("type") != "choices":
            continue
        name, value = item.get("from_name"), item.get("value")
        choices = value.get("choices") if isinstance(value, Mapping) else None
        if not isinstance(name, str) or not isinstance(choices, list):
            raise ValueError("a choices result needs from_name and value.choices")
        if len(choices) > 1:
            raise ValueError(f"{name}: {len(choices)} values chosen {choices}; an attribute takes one")
        if choices:
            attributes[name] = str(choices[0])
    if not attributes:
        raise ValueError("the annotation chose no value for any attribute")
    return attributes


def label_from_task(task: Any) -> dict[str, Any]:
    """The label a labeled Label Studio task gives; ValueError with the reason when it gives none."""
    if not isinstance(task, Mapping):
        raise ValueError(f"a task must be a JSON object, got {type(task).__name__}")
    data = task.get("data")
    if not isinstance(data, Mapping):
        raise ValueError("the task has no 'data' object: export the project as JSON (not JSON-MIN or CSV)")
    annotation = _latest_annotation(task)
    attributes = _choices(annotation)
    missing = [k for k in (DATA_PRODUCT_ID, DATA_CATEGORY) if not data.get(k)]
    if missing:
        raise ValueError(f"the task data lacks {missing} (tasks written by `shelfsight review export` have them)")
    image = data.get(DATA_IMAGE_URI) or data.get(DATA_IMAGE)
    if not isinstance(image, str) or not image.startswith("s3://"):
        raise ValueError(f"missing image: the task data needs an s3:// URI in {DATA_IMAGE_URI!r} or {DATA_IMAGE!r}")
    label: dict[str, Any] = {"product_id": str(data[DATA_PRODUCT_ID]), "category": str(data[DATA_CATEGORY]),
                             "image": image, "attributes": attributes}
    if data.get(DATA_GROUP_ID):
        label["group_id"] = str(data[DATA_GROUP_ID])
    labeled_at = _timestamp(annotation.get("updated_at")) or _timestamp(annotation.get("created_at"))
    if labeled_at is not None:
        label["labeled_at"] = labeled_at.isoformat()
    return label


def label_studio_labels(source: bytes | str) -> tuple[Numbered, list[Rejection], dict[int, str]]:
    """(task position, label dict) per labeled task of a Label Studio JSON export, the tasks
    rejected before validation (no annotation, cancelled, no choices, no product or image...),
    and each task's id by position (for the rejections validation adds later).

    Raises ValueError when the file is not a JSON task list at all.
    """
    try:
        payload = json.loads(_text_of(source))
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a Label Studio JSON export: {exc.msg} at line {exc.lineno}") from None
    tasks = [payload] if isinstance(payload, Mapping) else payload
    if not isinstance(tasks, list):
        raise ValueError("a Label Studio JSON export is a list of tasks")
    labels: Numbered = []
    rejected: list[Rejection] = []
    task_ids: dict[int, str] = {}
    for number, task in enumerate(tasks, start=1):
        if isinstance(task, Mapping) and task.get("id") is not None:
            task_ids[number] = str(task["id"])
        try:
            labels.append((number, label_from_task(task)))
        except ValueError as exc:
            rejected.append(Rejection(number, str(exc), task_ids.get(number)))
    return labels, rejected, task_ids


def _numbered(source: bytes | str | Sequence[Mapping[str, Any]], label_format: str
              ) -> tuple[Numbered, list[Rejection], dict[int, str]]:
    """The source as numbered raw labels in the given format, what was rejected on the way, and
    the Label Studio task ids by position (empty for the other formats)."""
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"unknown label format {label_format!r}; one of {list(LABEL_FORMATS)}")
    if not isinstance(source, bytes | str) or label_format == "jsonl":
        return list(_iter_lines(source)), [], {}
    if label_format == "csv":
        return (*csv_labels(source), {})
    return label_studio_labels(source)


def validate_labels(
    source: bytes | str | Sequence[Mapping[str, Any]],
    taxonomy: Taxonomy,
    store: ObjectStore,
    sources: ImageSourcePolicy | None = None,
    max_future_skew_s: float | None = None,
    label_format: str = "jsonl",
) -> tuple[list[tuple[int, LabelRecord]], list[Rejection]]:
    """Parse and validate every line (row, task), then check each allowed image exists. Nothing is written.

    Raises ValueError when the source as a whole cannot be read in `label_format`.
    """
    numbered, rejected, task_ids = _numbered(source, label_format)
    parsed: list[tuple[int, LabelRecord]] = []
    for number, raw in numbered:
        try:
            parsed.append((number, parse_line(raw, taxonomy, sources, max_future_skew_s)))
        except ValueError as exc:
            rejected.append(Rejection(number, str(exc), task_ids.get(number)))
    uris = sorted({record.image for _, record in parsed})
    with ThreadPoolExecutor(max_workers=min(_EXISTS_THREADS, max(1, len(uris)))) as pool:
        found = dict(zip(uris, pool.map(lambda uri: _image_exists(store, uri), uris), strict=True))
    accepted = []
    for number, record in parsed:
        if found[record.image] is True:
            accepted.append((number, record))
        else:
            rejected.append(Rejection(number, str(found[record.image]), task_ids.get(number)))
    rejected.sort(key=lambda r: r.line)
    return accepted, rejected


def _image_exists(store: ObjectStore, uri: str) -> bool | str:
    """True, or the reason the image cannot be used."""
    bucket, key = parse_s3_uri(uri)
    try:
        return True if store.exists(bucket, key) else f"image {uri} does not exist"
    except Exception as exc:  # noqa: BLE001 - reported per line, not raised
        return f"cannot check image {uri}: {exc}"


def batch_key(labels_prefix: str, category: str, now: datetime | None = None) -> str:
    """Key of a new immutable label object; sorts by time, so key order is import order."""
    now = now or datetime.now(UTC)
    return f"{labels_prefix.strip('/')}/{category}/{now:%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(4)}.jsonl"


def import_labels(
    source: bytes | str | Sequence[Mapping[str, Any]],
    *,
    store: ObjectStore,
    bucket: str,
    labels_prefix: str,
    taxonomy: Taxonomy,
    max_bytes: int,
    sources: ImageSourcePolicy | None = None,
    max_future_skew_s: float | None = None,
    label_format: str = "jsonl",
) -> ImportResult:
    """Validate labels and append the good ones to the label log; report every rejected line.

    Args:
        source: file bytes/text in `label_format` (see LABEL_FORMATS), or a list of label dicts.
        store, bucket, labels_prefix: where the label log lives.
        taxonomy: the categories, attributes and values labels must use.
        max_bytes: a JSONL source larger than this is refused whole (LabelFileTooLarge).
        sources: the image allowlist; a line whose image is outside it is rejected.
        max_future_skew_s: a line whose labeled_at is further ahead than this is rejected.
        label_format: jsonl, csv (a line per row) or label-studio (a JSON export; "line" is
            the task's position and the rejection carries its task_id).

    Returns:
        ImportResult with accepted/rejected counts, rejections (line, reason), keys written.

    Raises:
        LabelFileTooLarge; ValueError when the file as a whole cannot be read in that format.
    """
    if isinstance(source, bytes | str):
        size = len(source.encode() if isinstance(source, str) else source)
        if size > max_bytes:
            raise LabelFileTooLarge(
                f"label file is {size} bytes; the limit is {max_bytes} "
                "(SHELFSIGHT_MAX_LABEL_FILE_BYTES). Split it into smaller files."
            )
    accepted, rejected = validate_labels(source, taxonomy, store, sources, max_future_skew_s, label_format)
    result = ImportResult(rejected=rejected)
    by_category: dict[str, list[LabelRecord]] = {}
    for _, record in accepted:
        by_category.setdefault(record.category, []).append(record)
    for category, records in sorted(by_category.items()):
        key = batch_key(labels_prefix, category)
        body = "".join(r.model_dump_json() + "\n" for r in records).encode()
        store.put(bucket, key, body, content_type="application/x-ndjson")
        result.keys.append(key)
        result.per_category[category] = len(records)
        result.accepted += len(records)
    log.info(
        "labels.imported",
        format=label_format,
        accepted=result.accepted,
        rejected=len(result.rejected),
        per_category=result.per_category,
    )
    return result


def label_categories(store: ObjectStore, bucket: str, labels_prefix: str) -> list[str]:
    """Categories that have at least one label object."""
    prefix = labels_prefix.strip("/") + "/"
    keys = store.list_keys(bucket, prefix)
    return sorted({k[len(prefix):].split("/")[0] for k in keys if k.endswith(".jsonl")})


def latest_labels(records: Iterable[LabelRecord]) -> dict[str, LabelRecord]:
    """The current label of each product, merged per attribute: the latest value of each attribute wins.

    Order: labeled_at, ties to the later record in iteration order (import order, then line
    order). A relabel that names only some attributes keeps the others from earlier labels, as
    long as they were given for the same image: a label for a new image of the product starts
    afresh, because attributes describe a photo. The merged record carries the latest label's
    image, group_id and labeled_at.
    """
    latest: dict[str, LabelRecord] = {}
    values: dict[str, dict[str, tuple[datetime, int, str]]] = {}
    for order, record in enumerate(records):
        previous = latest.get(record.product_id)
        if previous is None or record.labeled_at >= previous.labeled_at:
            latest[record.product_id] = record
        per_attribute = values.setdefault(record.product_id, {})
        for attribute, value in record.attributes.items():
            seen = per_attribute.get(f"{record.image}\n{attribute}")
            if seen is None or (record.labeled_at, order) >= seen[:2]:
                per_attribute[f"{record.image}\n{attribute}"] = (record.labeled_at, order, value)
    merged = {}
    for product_id, record in latest.items():
        prefix = f"{record.image}\n"
        attributes = {key[len(prefix):]: value for key, (_, _, value) in sorted(values[product_id].items())
                      if key.startswith(prefix)}
        merged[product_id] = record.model_copy(update={"attributes": attributes})
    return merged


def label_keys(store: ObjectStore, bucket: str, labels_prefix: str, category: str) -> list[str]:
    """The category's label objects, in import order."""
    prefix = f"{labels_prefix.strip('/')}/{category}/"
    return [k for k in store.list_keys(bucket, prefix) if k.endswith(".jsonl")]


def read_labels(store: ObjectStore, bucket: str, keys: Sequence[str]) -> list[LabelRecord]:
    """Every label in the given objects, in key order, then line order."""
    records: list[LabelRecord] = []
    for key in keys:
        for line in store.get(bucket, key).body.decode().splitlines():
            if line.strip():
                records.append(LabelRecord.model_validate_json(line))
    return records


@dataclass(frozen=True)
class LabelSet:
    """The current label of each product of a category, and the label objects it came from."""

    category: str
    records: list[LabelRecord]
    keys: list[str]

    def snapshot(self) -> dict[str, Any]:
        """What a model was trained on: label object keys, product count, digest of the labels."""
        digest = hashlib.sha256()
        for record in self.records:
            digest.update(
                json.dumps(
                    [record.product_id, record.image, record.attributes, record.labeled_at.isoformat()]
                    + ([record.group_id] if record.group_id else []),  # digests of labels without one unchanged
                    sort_keys=True,
                ).encode()
            )
            digest.update(b"\n")
        return {"keys": list(self.keys), "count": len(self.records), "sha256": digest.hexdigest()}


def load_category_labels(store: ObjectStore, bucket: str, labels_prefix: str, category: str) -> LabelSet:
    """The latest label of each product of a category, sorted by product id."""
    keys = label_keys(store, bucket, labels_prefix, category)
    latest = latest_labels(read_labels(store, bucket, keys))
    return LabelSet(category=category, records=[latest[pid] for pid in sorted(latest)], keys=keys)
