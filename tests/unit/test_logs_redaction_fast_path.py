"""Redaction's fast path (one search before three substitutions) redacts exactly what the full
path does: every pattern, in any case, and leaves text without a secret word untouched."""

from __future__ import annotations

import pytest

from shelfsight.shared import logs


def _full_path(value: str) -> str:
    value = logs._SECRET_IN_URL.sub(r"\1***@", value)
    value = logs._SECRET_PAIR.sub(rf"\1{logs.REDACTED}", value)
    return logs._BASIC_AUTH.sub(rf"\1{logs.REDACTED}", value)


@pytest.mark.parametrize("text", [
    "redis://user:hunter2@host:6379/0",
    "HTTPS://u:pw0rd@example.com/x",
    "failed: password=hunter2 at login",
    "PassWD: 'hunter2'",
    "db_secret = s3cr3t;",
    "x-amz-security-token:AQoDYXdzEJr",
    "API-KEY=abcd1234", "apikey: abcd1234", "api_key=abcd1234",
    "aws_signing-key=deadbeef",
    "Authorization: Basic YWRtaW46cGFzc3dvcmQ=",
    "BASIC\tYWRtaW46cGFzc3dvcmQ=",
    "s3://bucket/uploads/password=hunter2-in-a-key.jpg",
])
def test_every_secret_pattern_is_still_redacted(text: str) -> None:
    assert logs.redact_text(text) == _full_path(text) != text


@pytest.mark.parametrize("text", [
    "0a1b2c3d4e5f60718293a4b5c6d7e8f9", "prod-000123", "tops", "zero-shot-abc", "s3://bucket/results/tops/p.json",
    "basically fine", "a passage about tokens", "keys and apis",
])
def test_text_without_a_secret_is_unchanged(text: str) -> None:
    assert logs.redact_text(text) == _full_path(text)


def test_secret_field_names_any_case() -> None:
    assert logs._secret_key("AWS_Secret_Access_Key") and logs._secret_key("x_api_key")
    assert not logs._secret_key("product_id") and not logs._secret_key(3)
