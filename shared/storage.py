"""Object storage behind a small interface: S3 (boto3) in production, a dict in unit tests."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from shelfsight.shared.settings import Settings


class StorageError(Exception):
    """Base class of storage failures."""


class ObjectMissing(StorageError):
    """The bucket or key does not exist."""


class ObjectTooLarge(StorageError):
    """The object is bigger than the caller's limit; it was not downloaded."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object exists (If-None-Match) or changed (If-Match)."""


class TransientStorageError(StorageError):
    """5xx, throttling, timeouts, dropped connections: worth retrying."""


class AccessDenied(TransientStorageError):
    """403: credentials expired, rotated or denied. Retried like a transient error, because it is
    the service's access that is wrong, not the event: credentials get renewed, policies fixed."""


@dataclass(frozen=True)
class StoredObject:
    body: bytes
    etag: str


class ObjectStore(Protocol):
    def get(self, bucket: str, key: str, max_bytes: int | None = None) -> StoredObject: ...
    def put(
        self, bucket: str, key: str, body: bytes, content_type: str = "application/json",
        *, if_none_match: bool = False, if_match: str | None = None,
    ) -> str: ...
    def exists(self, bucket: str, key: str) -> bool: ...
    def list_keys(self, bucket: str, prefix: str) -> list[str]: ...
    def delete(self, bucket: str, key: str) -> None: ...


_TRANSIENT_CODES = {
    "500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
    "RequestTimeout", "Throttling", "ThrottlingException", "RequestTimeTooSkewed",
}
_MISSING_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED_CODES = {
    "403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled",
}


def _translate(exc: Exception, bucket: str, key: str) -> StorageError:
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in {"PreconditionFailed", "ConditionalRequestConflict"} or status in {"409", "412"}:
            return PreconditionFailed(f"s3://{bucket}/{key}: {code or status}")
        if code in _DENIED_CODES or status == "403":
            return AccessDenied(f"s3://{bucket}/{key}: access denied ({code or status})")
        if code in _MISSING_CODES or status == "404":
            return ObjectMissing(f"s3://{bucket}/{key} does not exist ({code or status})")
        if code in _TRANSIENT_CODES or status.startswith("5"):
            return TransientStorageError(f"s3://{bucket}/{key}: {code or status}")
        return StorageError(f"s3://{bucket}/{key}: {code} {exc}")
    if isinstance(exc, EndpointConnectionError | BotoConnectionError | ReadTimeoutError):
        return TransientStorageError(f"s3://{bucket}/{key}: {type(exc).__name__}")
    if isinstance(exc, BotoCoreError):
        return TransientStorageError(f"s3://{bucket}/{key}: {type(exc).__name__}: {exc}")
    return StorageError(f"s3://{bucket}/{key}: {exc}")


class S3ObjectStore:
    """boto3 S3 client with one shared connection pool; safe to use from many threads."""

    def __init__(self, settings: Settings) -> None:
        config = Config(
            max_pool_connections=settings.s3_max_pool_connections,
            retries={"max_attempts": settings.s3_retries, "mode": "standard"},
            connect_timeout=settings.s3_connect_timeout_s,
            read_timeout=settings.s3_read_timeout_s,
            s3={"addressing_style": "path"},
            # Per-request CPU matters at thousands of images/s: checksums only where S3 requires
            # them (TLS and Content-MD5/ETag already protect integrity), no client-side re-validation
            # of parameters this code builds itself.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            parameter_validation=False,
        )
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.s3_endpoint_url or None,
            region_name=settings.s3_region,
            aws_access_key_id=(
                settings.s3_access_key_id.get_secret_value() if settings.s3_access_key_id else None
            ),
            aws_secret_access_key=(
                settings.s3_secret_access_key.get_secret_value()
                if settings.s3_secret_access_key
                else None
            ),
            config=config,
        )

    def get(self, bucket: str, key: str, max_bytes: int | None = None) -> StoredObject:
        try:
            resp = self._client.get_object(Bucket=bucket, Key=key)
            length = int(resp.get("ContentLength", 0))
            body = resp["Body"]
            if max_bytes is not None and length > max_bytes:
                body.close()
                raise ObjectTooLarge(f"s3://{bucket}/{key} is {length} bytes; the limit is {max_bytes}")
            data = body.read() if max_bytes is None else body.read(max_bytes + 1)
            if max_bytes is not None and len(data) > max_bytes:
                raise ObjectTooLarge(f"s3://{bucket}/{key} exceeds {max_bytes} bytes")
            return StoredObject(body=data, etag=str(resp.get("ETag", "")).strip('"'))
        except StorageError:
            raise
        except Exception as exc:  # translated into our small error vocabulary
            raise _translate(exc, bucket, key) from exc

    def put(
        self, bucket: str, key: str, body: bytes, content_type: str = "application/json",
        *, if_none_match: bool = False, if_match: str | None = None,
    ) -> str:
        """PUT; with if_none_match only if absent, with if_match only if the ETag is unchanged."""
        conditions: dict[str, str] = {}
        if if_none_match:
            conditions["IfNoneMatch"] = "*"
        if if_match:
            conditions["IfMatch"] = f'"{if_match}"'
        try:
            resp = self._client.put_object(
                Bucket=bucket, Key=key, Body=body, ContentType=content_type, **conditions
            )
            return str(resp.get("ETag", "")).strip('"')
        except Exception as exc:
            raise _translate(exc, bucket, key) from exc

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self._client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception as exc:
            err = _translate(exc, bucket, key)
            if isinstance(err, ObjectMissing):
                return False
            raise err from exc

    def list_keys(self, bucket: str, prefix: str) -> list[str]:
        keys: list[str] = []
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
        except Exception as exc:
            raise _translate(exc, bucket, prefix) from exc
        return sorted(keys)

    def delete(self, bucket: str, key: str) -> None:
        try:
            self._client.delete_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise _translate(exc, bucket, key) from exc

    def ensure_bucket(self, bucket: str) -> None:
        """Create the bucket if it does not exist (dev stack and tests)."""
        try:
            self._client.head_bucket(Bucket=bucket)
        except ClientError:
            self._client.create_bucket(Bucket=bucket)


class InMemoryObjectStore:
    """Dict-backed ObjectStore for unit tests. Same errors as S3ObjectStore."""

    def __init__(self) -> None:
        self._objects: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()
        self.puts = 0

    def get(self, bucket: str, key: str, max_bytes: int | None = None) -> StoredObject:
        with self._lock:
            if (bucket, key) not in self._objects:
                raise ObjectMissing(f"s3://{bucket}/{key} does not exist (NoSuchKey)")
            data = self._objects[(bucket, key)]
        if max_bytes is not None and len(data) > max_bytes:
            raise ObjectTooLarge(f"s3://{bucket}/{key} is {len(data)} bytes; the limit is {max_bytes}")
        return StoredObject(body=data, etag=hashlib.md5(data).hexdigest())  # noqa: S324 - S3 ETag

    def put(
        self, bucket: str, key: str, body: bytes, content_type: str = "application/json",
        *, if_none_match: bool = False, if_match: str | None = None,
    ) -> str:
        with self._lock:
            current = self._objects.get((bucket, key))
            if if_none_match and current is not None:
                raise PreconditionFailed(f"s3://{bucket}/{key} exists")
            if if_match and (current is None or hashlib.md5(current).hexdigest() != if_match):  # noqa: S324
                raise PreconditionFailed(f"s3://{bucket}/{key} changed")
            self._objects[(bucket, key)] = bytes(body)
            self.puts += 1
        return hashlib.md5(body).hexdigest()  # noqa: S324

    def exists(self, bucket: str, key: str) -> bool:
        with self._lock:
            return (bucket, key) in self._objects

    def list_keys(self, bucket: str, prefix: str) -> list[str]:
        with self._lock:
            return sorted(k for b, k in self._objects if b == bucket and k.startswith(prefix))

    def delete(self, bucket: str, key: str) -> None:
        with self._lock:
            self._objects.pop((bucket, key), None)
