"""The in-memory object store keeps the storage contract; S3 errors are translated for retry decisions."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from shelfsight.shared.storage import (
    AccessDenied,
    InMemoryObjectStore,
    ObjectMissing,
    PreconditionFailed,
    TransientStorageError,
    _translate,
)
from tests.storage_contract import check_conditional_writes, check_put_get_list_delete


def test_in_memory_put_get_list_delete() -> None:
    check_put_get_list_delete(InMemoryObjectStore(), "bucket")


def test_in_memory_conditional_writes() -> None:
    check_conditional_writes(InMemoryObjectStore(), "bucket")


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
        (_client_error("AccessDenied", 403), AccessDenied),  # retried: the service's access is wrong, not the event
    ],
)
def test_errors_are_translated_for_retry_decisions(error: Exception, kind: type) -> None:
    translated = _translate(error, "bucket", "key")
    assert type(translated) is kind
    assert "s3://bucket/key" in str(translated)
