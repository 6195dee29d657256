"""Image sources: allowlisted by bucket and prefix; the service's own prefixes never."""

from __future__ import annotations

import pytest

from shelfsight.shared.image_sources import ImageSourcePolicy, ImageSourceRefused, parse_source
from shelfsight.shared.settings import Settings


def _policy(**fields: object) -> ImageSourcePolicy:
    return ImageSourcePolicy.from_settings(Settings(**fields))  # type: ignore[arg-type]


@pytest.mark.parametrize(("uri", "allowed"), [
    ("s3://uploads/tops/sku-1.jpg", True),
    ("s3://shelfsight/uploads/tops/sku-1.jpg", True),
    ("s3://shelfsight/uploads-old/tops/sku-1.jpg", False),   # a prefix is a folder, not a string prefix
    ("s3://shelfsight/models/tops/v1/model.safetensors", False),
    ("s3://shelfsight/results/tops/sku-1.json", False),
    ("s3://other/uploads/x.jpg", False),
    ("s3://uploads/a/../b.jpg", False),                      # dot segments: never normalised into another key
    ("s3://uploads/a//b.jpg", False),
    ("s3://uploads/a\\b.jpg", False),
    ("s3://uploads/./b.jpg", False),
    ("https://uploads/x.jpg", False),
])
def test_sources_are_bucket_and_prefix(uri: str, allowed: bool) -> None:
    policy = _policy(allowed_image_sources=["s3://uploads/", "s3://shelfsight/uploads"])
    assert policy.allows(uri) is allowed


def test_service_prefixes_are_refused_even_when_the_whole_bucket_is_allowed() -> None:
    policy = _policy(allowed_image_sources=["s3://shelfsight/"])
    assert policy.allows("s3://shelfsight/uploads/x.jpg")
    for prefix in ("models", "results", "dead-letters", "labels"):
        with pytest.raises(ImageSourceRefused, match="service's own prefixes"):
            policy.check(f"s3://shelfsight/{prefix}/x.jpg")
    # the same prefixes in another bucket are someone else's: allowed if listed
    assert _policy(allowed_image_sources=["s3://uploads/"]).allows("s3://uploads/models/x.jpg")


def test_deprecated_bucket_setting_maps_to_whole_buckets_and_the_default_is_uploads_of_the_bucket() -> None:
    legacy = _policy(allowed_image_sources=[], allowed_image_buckets=["media"])
    assert legacy.describe() == ["s3://media/"]
    default = _policy(allowed_image_sources=[], allowed_image_buckets=[], bucket="acme")
    assert default.describe() == ["s3://acme/uploads/"]
    assert not default.allows("s3://acme/models/tops/CURRENT")


def test_refusal_names_neither_the_allowlist_nor_existence() -> None:
    policy = _policy(allowed_image_sources=["s3://secret-bucket-name/private-prefix/"])
    with pytest.raises(ImageSourceRefused) as caught:
        policy.check("s3://other/x.jpg")
    message = str(caught.value)
    assert "secret-bucket-name" not in message and "exist" not in message
    assert "SHELFSIGHT_ALLOWED_IMAGE_SOURCES" in message and caught.value.code == "image_source_not_allowed"


@pytest.mark.parametrize("entry", ["uploads/", "s3://", "s3://b/../x/", "http://b/x/", "s3://UPPER/"])
def test_bad_allowlist_entries_fail_at_startup(entry: str) -> None:
    with pytest.raises(ValueError, match="SHELFSIGHT_ALLOWED_IMAGE_SOURCES"):
        parse_source(entry)
