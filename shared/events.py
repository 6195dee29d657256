"""Wire formats: upload events, result files, dead letters and labels. All versioned pydantic."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

_S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(?P<key>.{1,1024})$")
_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/key` into (bucket, key); ValueError if it is not one."""
    match = _S3_URI.match(uri)
    if not match:
        raise ValueError(f"not an s3://bucket/key URI: {uri[:200]!r}")
    return match["bucket"], match["key"]


def _check_s3_uri(uri: str) -> str:
    parse_s3_uri(uri)
    return uri


S3Uri = Annotated[str, AfterValidator(_check_s3_uri)]
"""A string that is an `s3://bucket/key` URI (validated with `parse_s3_uri`)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: datetime) -> datetime:
    # A naive timestamp is taken as UTC: comparing it with an aware one would raise.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]
"""A datetime normalised to UTC; a naive one is taken to be UTC already."""


class UploadEvent(BaseModel):
    """Enqueued when a product image is uploaded."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex, pattern=_ID)
    product_id: str = Field(pattern=_ID)
    category: str = Field(min_length=1, max_length=64)
    image: S3Uri = Field(description="s3://bucket/key of the product image")
    submitted_at: UtcDatetime = Field(default_factory=utcnow)


class AttributeResult(BaseModel):
    value: str
    confidence: float = Field(description="The value's probability, calibrated with the model's temperature "
                              "for this attribute (schema 2; schema 1: the raw softmax)")
    scores: dict[str, float]
    needs_review: bool = Field(False, description="confidence below the attribute's review threshold "
                               "(schema 2; absent in schema 1). The value is given either way.")


RESULT_SCHEMA_VERSION: Literal[2] = 2


class ImageInfo(BaseModel):
    uri: str
    etag: str
    bytes: int
    width: int
    height: int


class ModelInfo(BaseModel):
    architecture: str
    version: str = Field(description="Registry version, or 'zero-shot' for the base model")
    mode: Literal["fine_tuned", "zero_shot"]
    weights_sha256: str
    taxonomy_version: str


class ResultRecord(BaseModel):
    """The result file at s3://<bucket>/<results-prefix>/<category>/<product_id>.json.

    Schema 2 (written now) adds `needs_review`, per attribute and for the result (any attribute),
    and its confidences and scores are calibrated probabilities. Schema 1 files still parse (as
    needs_review false).
    """

    schema_version: Literal[1, 2] = RESULT_SCHEMA_VERSION
    event_id: str
    product_id: str
    category: str
    submitted_at: UtcDatetime = Field(description="From the event; an older event never overwrites a newer result")
    image: ImageInfo
    model: ModelInfo
    attributes: dict[str, AttributeResult]
    needs_review: bool = Field(False, description="True when any attribute needs review (schema 2)")
    timings: dict[str, Any] = Field(
        default_factory=dict,
        description="fetch/decode/queue/model ms and finished_at: the only part that varies on re-run",
    )

    def content_fingerprint(self) -> dict[str, Any]:
        """Everything but timings: equal for a redelivered event."""
        return self.model_dump(mode="json", exclude={"timings"})


ErrorCode = Literal[
    "malformed_event",
    "event_too_large",
    "unknown_category",
    "bucket_not_allowed",  # before image sources had prefixes; kept so old records still parse
    "image_source_not_allowed",
    "submitted_in_future",
    "object_missing",
    "image_too_large",
    "image_too_many_pixels",
    "image_too_many_frames",
    "image_format_not_allowed",
    "undecodable_image",
    "transient_exhausted",
    "poison",  # started this many times and never finished: the worker died each time
    "internal_error",
]


class DeadLetter(BaseModel):
    """Why an event produced no result. Written to S3 and to the dead-letter stream."""

    schema_version: Literal[1] = 1
    event_id: str
    product_id: str | None
    category: str | None
    error_code: ErrorCode
    message: str
    attempts: int
    event: Any = Field(description="The event as received (truncated if huge)")
    failed_at: UtcDatetime = Field(default_factory=utcnow)
    worker: str = ""


class SupersededRecord(BaseModel):
    """An event that produced no result file because a newer upload of its product already had one.

    Written to `<results-prefix>/_superseded/<day>/<event_id>.json` and announced on the results
    stream with status "superseded": an outcome, recorded like the others.
    """

    schema_version: Literal[1] = 1
    event_id: str
    product_id: str
    category: str
    image: str
    submitted_at: UtcDatetime
    superseded_by: str = Field(description="event_id of the newer result that stays")
    newer_submitted_at: UtcDatetime
    recorded_at: UtcDatetime = Field(default_factory=utcnow)
    worker: str = ""


class LabelRecord(BaseModel):
    """A human label for one product image."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    product_id: str = Field(pattern=_ID)
    category: str = Field(min_length=1, max_length=64)
    image: S3Uri
    attributes: dict[str, str] = Field(min_length=1)
    labeled_at: UtcDatetime = Field(default_factory=utcnow)
    group_id: str | None = Field(
        None, pattern=_ID, description="Products sharing a group_id (variants of one product) are "
        "kept in one split by the trainer, as are products whose images have the same bytes."
    )


def result_key(results_prefix: str, category: str, product_id: str) -> str:
    """Key of a product's result file. Deterministic, so redelivery overwrites in place."""
    return f"{results_prefix.strip('/')}/{category}/{product_id}.json"


def superseded_key(results_prefix: str, recorded_at: datetime, event_id: str) -> str:
    """Key of the record of a superseded event (a folder no category can be named: `_superseded`)."""
    return f"{results_prefix.strip('/')}/_superseded/{recorded_at:%Y-%m-%d}/{event_id}.json"


def dead_letter_key(prefix: str, failed_at: datetime, event_id: str) -> str:
    """Key of a dead-letter record, grouped by day for operators."""
    return f"{prefix.strip('/')}/{failed_at:%Y-%m-%d}/{event_id}.json"
