"""Where images may be read from: an allowlist of `s3://bucket/prefix/` sources.

The worker (upload events), label import and the trainer all check an image URI here before
any S3 request is made, so a refusal says nothing about whether the object exists. The
service's own prefixes in its own bucket (models, results, dead letters, labels) are never
image sources, even when an allowlist entry covers them: an event can never make a worker
read a model, a result or a dead letter and echo its size and ETag into a result file.

    policy = ImageSourcePolicy.from_settings(settings)
    bucket, key = policy.check("s3://uploads/tops/sku-1.jpg")   # or raises ImageSourceRefused
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from shelfsight.shared.events import parse_s3_uri

SETTING = "SHELFSIGHT_ALLOWED_IMAGE_SOURCES"
DEFAULT_UPLOADS_PREFIX = "uploads/"
_SOURCE = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(?P<prefix>.*)$")
_UNSAFE_KEY = re.compile(r"[\x00-\x1f\x7f\\]")


class ImageSourceRefused(ValueError):
    """The URI is outside the image allowlist (or names a service-owned or unsafe key).

    The message names the URI and the setting, never the allowlist's contents or whether
    the object exists.
    """

    code = "image_source_not_allowed"


def _prefix(value: str) -> str:
    """A key prefix that ends at a folder boundary ("" for a whole bucket)."""
    value = value.lstrip("/")
    return value if not value or value.endswith("/") else value + "/"


def parse_source(entry: str) -> tuple[str, str]:
    """`s3://bucket/` or `s3://bucket/prefix/` -> (bucket, prefix). ValueError otherwise.

    A prefix without a trailing slash is taken as a folder: `s3://b/uploads` allows
    `uploads/…`, not `uploads-old/…`.
    """
    match = _SOURCE.match(entry.strip())
    if not match:
        raise ValueError(f"{SETTING} entry {entry!r} is not of the form s3://bucket/ or s3://bucket/prefix/")
    prefix = _prefix(match["prefix"])
    if _unsafe_key(prefix + "x"):
        raise ValueError(f"{SETTING} entry {entry!r} has an empty, '.' or '..' path segment")
    return match["bucket"], prefix


def _unsafe_key(key: str) -> bool:
    """Keys that some S3-compatible servers or proxies would normalise into another key."""
    if key.startswith("/") or _UNSAFE_KEY.search(key):
        return True
    return any(part in ("", ".", "..") for part in key.split("/"))


@dataclass(frozen=True)
class ImageSourcePolicy:
    """Allowed (bucket, prefix) pairs, minus the service's own (bucket, prefix) pairs."""

    sources: tuple[tuple[str, str], ...]
    reserved: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_settings(cls, settings: Any) -> ImageSourcePolicy:
        """From `allowed_image_sources`; else the deprecated `allowed_image_buckets` (whole
        buckets); else the service bucket's `uploads/` prefix. ValueError for a bad entry."""
        entries: list[str] = list(getattr(settings, "allowed_image_sources", []) or [])
        if not entries:
            entries = [f"s3://{b}/" for b in getattr(settings, "allowed_image_buckets", []) or []]
        if not entries:
            entries = [f"s3://{settings.bucket}/{DEFAULT_UPLOADS_PREFIX}"]
        reserved = tuple(
            (settings.bucket, _prefix(p))
            for p in (settings.models_prefix, settings.results_prefix, settings.dead_letter_prefix,
                      settings.labels_prefix)
            if p.strip("/")
        )
        return cls(tuple(parse_source(e) for e in entries), reserved)

    def check(self, uri: str) -> tuple[str, str]:
        """(bucket, key) of an allowed image URI; ImageSourceRefused otherwise. Makes no request."""
        try:
            bucket, key = parse_s3_uri(uri)
        except ValueError as exc:
            raise ImageSourceRefused(str(exc)) from None
        shown = uri[:200]
        if _unsafe_key(key):
            raise ImageSourceRefused(
                f"image {shown!r} has an unsafe key (empty, '.' or '..' segment, backslash or control "
                "character); such keys are never read"
            )
        if any(bucket == b and key.startswith(p) for b, p in self.reserved):
            raise ImageSourceRefused(
                f"image {shown!r} is under one of the service's own prefixes (models, results, "
                "dead letters, labels), which are never read as images"
            )
        if not any(bucket == b and key.startswith(p) for b, p in self.sources):
            raise ImageSourceRefused(f"image {shown!r} is not under an allowed image source ({SETTING})")
        return bucket, key

    def allows(self, uri: str) -> bool:
        """True if `check` would pass."""
        try:
            self.check(uri)
        except ImageSourceRefused:
            return False
        return True

    def describe(self) -> list[str]:
        """The allowlist as s3:// URIs (for operators' logs, not for refusal messages)."""
        return [f"s3://{b}/{p}" for b, p in self.sources]
