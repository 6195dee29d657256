"""The storage interface: S3 (real moto server) and the in-memory fake behave the same."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from shelfsight.shared.storage import (
    InMemoryObjectStore,
    ObjectMissing,
    ObjectTooLarge,
    PreconditionFailed,
    S3ObjectStore,
    StorageError,
    TransientStorageError,
    _translate,
)


@pytest.fixture(params=["s3", "memory"])
def any_store(request, settings):
    if request.param == "memory":
        return InMemoryObjectStore(), "bucket"
    return S3ObjectStore(settings), settings.bucket


@pytest.mark.integration
def test_put_get_list_delete(any_store) -> None:
    store, bucket = any_store
    etag = store.put(bucket, "a/1.json", b"{}")
    store.put(bucket, "a/2.json", b"[]")
    store.put(bucket, "b/3.json", b"0")
    got = store.get(bucket, "a/1.json")
    assert got.body == b"{}" and got.etag == etag
    assert store.list_keys(bucket, "a/") == ["a/1.json", "a/2.json"]
    assert store.exists(bucket, "b/3.json") and not store.exists(bucket, "b/4.json")
    store.delete(bucket, "b/3.json")
    with pytest.raises(ObjectMissing):
        store.get(bucket, "b/3.json")
    with pytest.raises(ObjectTooLarge):
        store.get(bucket, "a/1.json", max_bytes=1)


@pytest.mark.integration
def test_conditional_writes(any_store) -> None:
    store, bucket = any_store
    first = store.put(bucket, "r.json", b"1", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put(bucket, "r.json", b"2", if_none_match=True)  # exists
    second = store.put(bucket, "r.json", b"3", if_match=first)  # unchanged since we read it
    with pytest.raises(PreconditionFailed):
        store.put(bucket, "r.json", b"4", if_match=first)  # changed by someone else
    assert store.get(bucket, "r.json").body == b"3" and store.get(bucket, "r.json").etag == second


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (_client_error("NoSuchKey", 404), ObjectMissing),
        (_client_error("SlowDown", 503), TransientStorageError),
        (_client_error("InternalError", 500), TransientStorageError),
        (_client_error("PreconditionFailed", 412), PreconditionFailed),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), TransientStorageError),
        (_client_error("AccessDenied", 403), StorageError),
    ],
)
def test_errors_are_translated_for_retry_decisions(error: Exception, kind: type) -> None:
    translated = _translate(error, "bucket", "key")
    assert type(translated) is kind
    assert "s3://bucket/key" in str(translated)
