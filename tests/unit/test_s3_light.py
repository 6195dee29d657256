"""The light S3 path signs exactly as botocore does, and as AWS documents."""

from __future__ import annotations

from datetime import UTC, datetime
from unittest import mock

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from shelfsight.shared.settings import Settings
from shelfsight.worker.s3_light import (
    EMPTY_SHA256,
    LightS3ObjectStore,
    SigV4Signer,
    host_header,
    object_path,
    worker_object_store,
)

NOW = datetime(2026, 11, 27, 15, 4, 5, tzinfo=UTC)


def botocore_headers(method: str, url: str, headers: dict[str, str], body: bytes, creds: Credentials,
                     region: str) -> dict[str, str]:
    request = AWSRequest(method=method, url=url, headers=dict(headers), data=body)
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        S3SigV4Auth(creds, "s3", region).add_auth(request)
    return dict(request.headers.items())


@pytest.mark.parametrize(("method", "key", "headers", "body", "token"), [
    ("GET", "uploads/tops/img00001.jpg", {}, b"", None),
    ("GET", "uploads/a b/ü+x=1&y~z.jpg", {}, b"", "session-token/with+chars="),
    ("PUT", "results/tops/p 1.json", {"Content-Type": "application/json", "If-None-Match": "*"}, b'{"a": 1}', None),
    ("PUT", "results/tops/p1.json", {"Content-Type": "application/json", "If-Match": '"0123abcd"'}, b"{}", "tok"),
])
def test_signature_matches_botocore(method: str, key: str, headers: dict[str, str], body: bytes,
                                    token: str | None) -> None:
    import hashlib

    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    endpoint = "http://127.0.0.1:9000"
    path = object_path("", "my-bucket", key)
    payload = hashlib.sha256(body).hexdigest() if method == "PUT" else EMPTY_SHA256
    headers = {**headers, "Content-Length": str(len(body))} if method == "PUT" else headers
    ours = SigV4Signer("eu-west-3").sign(method, host_header(endpoint), path, headers, payload,
                                         creds.access_key, creds.secret_key, creds.token, NOW)
    theirs = botocore_headers(method, endpoint + path, headers, body, creds, "eu-west-3")
    assert ours["Authorization"] == theirs["Authorization"]
    assert ours["X-Amz-Date"] == theirs["X-Amz-Date"]
    assert ours["X-Amz-Content-SHA256"] == theirs["X-Amz-Content-SHA256"]
    assert ours.get("X-Amz-Security-Token") == theirs.get("X-Amz-Security-Token")


def test_signature_matches_the_aws_documented_example() -> None:
    # "Example: GET Object" of the S3 SigV4 header-signing documentation.
    signer = SigV4Signer("us-east-1")
    signed = signer.sign("GET", "examplebucket.s3.amazonaws.com", "/test.txt", {"Range": "bytes=0-9"}, EMPTY_SHA256,
                         "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", None,
                         datetime(2013, 5, 24, tzinfo=UTC))
    assert signed["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_signing_key_is_rederived_when_the_day_or_secret_changes() -> None:
    signer = SigV4Signer("us-east-1")
    one = signer.sign("GET", "h", "/b/k", {}, EMPTY_SHA256, "A", "s1", None, NOW)
    again = signer.sign("GET", "h", "/b/k", {}, EMPTY_SHA256, "A", "s1", None, NOW)
    rotated = signer.sign("GET", "h", "/b/k", {}, EMPTY_SHA256, "A", "s2", None, NOW)
    next_day = signer.sign("GET", "h", "/b/k", {}, EMPTY_SHA256, "A", "s1", None, NOW.replace(day=28))
    assert one == again
    assert len({one["Authorization"], rotated["Authorization"], next_day["Authorization"]}) == 3


def test_host_header_and_path_encoding() -> None:
    assert host_header("http://127.0.0.1:9000") == "127.0.0.1:9000"
    assert host_header("https://s3.eu-west-3.amazonaws.com") == "s3.eu-west-3.amazonaws.com"
    assert host_header("https://s3.example:443") == "s3.example"
    assert host_header("http://[::1]:9000") == "[::1]:9000"
    assert object_path("", "b", "a b/c+d~e.jpg") == "/b/a%20b/c%2Bd~e.jpg"
    assert object_path("/prefix/", "b", "k") == "/prefix/b/k"


def test_light_client_uses_the_settings_endpoint_and_steps_aside_for_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(s3_endpoint_url="http://127.0.0.1:9", s3_access_key_id="a", s3_secret_access_key="b")
    store = worker_object_store(settings)
    assert isinstance(store, LightS3ObjectStore) and store.light
    assert store.endpoint == "http://127.0.0.1:9"
    monkeypatch.setenv("http_proxy", "http://proxy.internal:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert not LightS3ObjectStore(settings).light
    off = settings.model_copy(update={"s3_light_client": False})
    assert not isinstance(worker_object_store(off), LightS3ObjectStore)
