"""A light S3 client for the two requests every event makes: GET the image, PUT the result.

boto3 costs about 2.2 ms of CPU per request here (event hooks, endpoint rules, serializers,
parsers, retry handlers), twice per image: more than half of the worker's plumbing per image
(docs/performance.md). `LightS3ObjectStore` sends those two requests itself: SigV4 signed by
hand (the signing key is derived once per day), each task thread over its own keep-alive
HTTP/1.1 connection (`shelfsight.worker.http1`: a third of urllib3's CPU per request: no pool,
no retry object, no `email` header parser), with the same error vocabulary (`shelfsight.shared.storage`), the same
retry budget and timeouts as the boto3 client. Everything else (exists, list, delete,
buckets) goes to the boto3 store it wraps.

What it takes from boto3, so that both agree: the credentials (the default chain, refreshed
when they are temporary: instance roles, web identity, SSO), the resolved endpoint URL and
region, and the CA bundle. Requests are path-style, as the boto3 client is configured
(`s3={"addressing_style": "path"}`). When a proxy applies to the endpoint (HTTP(S)_PROXY), the
light path steps aside and boto3 serves every request; `SHELFSIGHT_S3_LIGHT_CLIENT=false` does
the same on purpose (an S3-compatible store that needs something only boto3 does).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import os
import random
import re
import select
import socket
import ssl
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, urlsplit

import boto3
import structlog
from botocore.config import Config
from botocore.exceptions import ClientError, NoCredentialsError
from botocore.httpsession import get_cert_path

from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import (
    AccessDenied,
    ObjectStore,
    ObjectTooLarge,
    S3ObjectStore,
    StorageError,
    StoredObject,
    TransientStorageError,
    _translate,
)
from shelfsight.worker.http1 import BodyTooLarge, Connection, Response

log = structlog.get_logger()

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_RETRY_CAP_S = 20.0  # botocore's standard mode caps its backoff here too
_RETRIED_400 = frozenset({"RequestTimeout", "Throttling", "ThrottlingException", "SlowDown", "TooManyRequests"})
_UNSIGNED = frozenset({"user-agent", "expect", "x-amzn-trace-id"})  # as botocore leaves them out


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


class SigV4Signer:
    """AWS Signature Version 4 for S3 request headers (the `Authorization` header form).

    Signs every header it is given, plus `host`, `x-amz-date`, `x-amz-content-sha256` and, with
    temporary credentials, `x-amz-security-token`; the canonical URI is not normalised, as S3
    requires. The derived signing key is cached per (secret, date, region).
    """

    def __init__(self, region: str, service: str = "s3") -> None:
        self.region = region
        self.service = service
        self._key: tuple[tuple[str, str], bytes] | None = None

    def _signing_key(self, secret: str, day: str) -> bytes:
        cached = self._key
        if cached is not None and cached[0] == (secret, day):
            return cached[1]
        key = _hmac(f"AWS4{secret}".encode(), day)
        for part in (self.region, self.service, "aws4_request"):
            key = _hmac(key, part)
        self._key = ((secret, day), key)
        return key

    def sign(self, method: str, host: str, path: str, headers: dict[str, str], payload_sha256: str,
             access_key: str, secret_key: str, token: str | None, now: datetime) -> dict[str, str]:
        """`headers` plus the date, payload hash, token and Authorization headers.

        `path` is the URI path as sent (already percent-encoded); the query string is empty.
        """
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        signed = {k.lower(): " ".join(str(v).split()) for k, v in headers.items() if k.lower() not in _UNSIGNED}
        signed["host"] = host
        signed["x-amz-date"] = stamp
        signed["x-amz-content-sha256"] = payload_sha256
        if token:
            signed["x-amz-security-token"] = token
        names = sorted(signed)
        canonical = "\n".join([
            method, path, "", *(f"{name}:{signed[name]}" for name in names), "", ";".join(names), payload_sha256,
        ])
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        signature = hmac.new(self._signing_key(secret_key, day), to_sign.encode(), hashlib.sha256).hexdigest()
        out = dict(headers)
        out.update({"X-Amz-Date": stamp, "X-Amz-Content-SHA256": payload_sha256})
        if token:
            out["X-Amz-Security-Token"] = token
        out["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                                f"SignedHeaders={';'.join(names)}, Signature={signature}")
        return out


def object_path(base_path: str, bucket: str, key: str) -> str:
    """Path-style request path, percent-encoded once (S3's canonical URI is not normalised)."""
    return f"{base_path.rstrip('/')}/{quote(bucket, safe='')}/{quote(key, safe='/~')}"


def host_header(url: str) -> str:
    """The Host header for `url`, as botocore signs it and sends it: no default port."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    return host if parts.port in (None, default_port) else f"{host}:{parts.port}"


class _Unusual(Exception):
    """A response the light path does not interpret (a redirect to another region, a 400 it
    has no mapping for): the request is sent again through boto3, which knows them all."""


def proxy_applies(url: str) -> bool:
    """True when the environment's proxy settings would route `url` through a proxy."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    if not proxies.get(parts.scheme):
        return False
    return not urllib.request.proxy_bypass(parts.hostname or "")


def _readable(sock: socket.socket) -> bool:
    """True if the socket has something to read right now (on an idle keep-alive connection: the
    server's close, or bytes nobody asked for; either way it is not reused)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


@dataclass
class _Response:
    """What the light path keeps of a successful S3 response: its ETag and its body."""

    etag: str
    body: bytes


class LightS3ObjectStore:
    """ObjectStore whose get/put are signed HTTP/1.1 requests; the rest is the wrapped boto3 store.

    Thread-safe: each thread has its own keep-alive connection (a task thread has at most one
    request in flight), opened on first use and replaced after any error; one signer.
    """

    def __init__(self, settings: Settings, fallback: S3ObjectStore | None = None) -> None:
        self.settings = settings
        self.fallback = fallback or S3ObjectStore(settings)
        session = boto3.session.Session(
            aws_access_key_id=settings.s3_access_key_id.get_secret_value() if settings.s3_access_key_id else None,
            aws_secret_access_key=(settings.s3_secret_access_key.get_secret_value()
                                   if settings.s3_secret_access_key else None),
            region_name=settings.s3_region,
        )
        # Endpoint, region and CA bundle resolved by botocore itself, as for the boto3 store.
        client = session.client("s3", endpoint_url=settings.s3_endpoint_url or None,
                                config=Config(s3={"addressing_style": "path"}))
        self._credentials = session.get_credentials()
        self.endpoint = client.meta.endpoint_url
        parts = urlsplit(self.endpoint)
        self._scheme, self._base_path, self._host = parts.scheme, parts.path, host_header(self.endpoint)
        self._hostname = parts.hostname or ""
        self._port = parts.port or (443 if self._scheme == "https" else 80)
        self._signer = SigV4Signer(client.meta.region_name or settings.s3_region)
        self._attempts = max(1, settings.s3_retries)
        self._tls: ssl.SSLContext | None = None
        if self._scheme == "https":  # the CA bundle botocore uses: AWS_CA_BUNDLE, else its default
            self._tls = ssl.create_default_context(cafile=get_cert_path(os.environ.get("AWS_CA_BUNDLE") or True))
        self._local = threading.local()
        self.light = settings.s3_light_client and not proxy_applies(self.endpoint)
        if settings.s3_light_client and not self.light:
            log.info("s3.light_client_off", reason="a proxy applies to the endpoint", endpoint=self.endpoint)

    # --- the hot path -----------------------------------------------------------------------
    def get(self, bucket: str, key: str, max_bytes: int | None = None) -> StoredObject:
        if not self.light:
            return self.fallback.get(bucket, key, max_bytes)
        path = object_path(self._base_path, bucket, key)
        try:
            response = self._request("GET", path, {}, b"", EMPTY_SHA256, bucket, key, max_bytes=max_bytes)
        except _Unusual as unusual:
            log.warning("s3.light_client_deferred", request="GET", reason=str(unusual))
            return self.fallback.get(bucket, key, max_bytes)
        return StoredObject(body=response.body, etag=response.etag)

    def put(
        self, bucket: str, key: str, body: bytes, content_type: str = "application/json",
        *, if_none_match: bool = False, if_match: str | None = None,
    ) -> str:
        if not self.light:
            return self.fallback.put(bucket, key, body, content_type, if_none_match=if_none_match, if_match=if_match)
        headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
        if if_none_match:
            headers["If-None-Match"] = "*"
        if if_match:
            headers["If-Match"] = f'"{if_match}"'
        path = object_path(self._base_path, bucket, key)
        try:
            response = self._request("PUT", path, headers, body, hashlib.sha256(body).hexdigest(), bucket, key)
        except _Unusual as unusual:
            log.warning("s3.light_client_deferred", request="PUT", reason=str(unusual))
            return self.fallback.put(bucket, key, body, content_type, if_none_match=if_none_match,
                                     if_match=if_match)
        return response.etag

    # --- everything else: boto3 -------------------------------------------------------------
    def exists(self, bucket: str, key: str) -> bool:
        return self.fallback.exists(bucket, key)

    def list_keys(self, bucket: str, prefix: str) -> list[str]:
        return self.fallback.list_keys(bucket, prefix)

    def delete(self, bucket: str, key: str) -> None:
        self.fallback.delete(bucket, key)

    def ensure_bucket(self, bucket: str) -> None:
        self.fallback.ensure_bucket(bucket)

    def close(self) -> None:
        """Close this thread's connection (the others close with their threads' garbage)."""
        self._drop_connection()

    # --- one request, with botocore's retry budget ------------------------------------------
    def _request(self, method: str, path: str, headers: dict[str, str], body: bytes, payload_sha256: str,
                 bucket: str, key: str, *, max_bytes: int | None = None) -> _Response:
        """Send, retrying transient failures (5xx, throttling, timeouts, resets) up to
        `s3_retries` attempts in all, with full-jitter exponential backoff; anything else is
        raised at once as the storage error boto3's store would raise."""
        for attempt in range(1, self._attempts + 1):
            try:
                return self._send_once(method, path, headers, body, payload_sha256, bucket, key, max_bytes)
            except AccessDenied:
                raise
            except TransientStorageError:
                if attempt >= self._attempts:
                    raise
                time.sleep(random.uniform(0, min(_RETRY_CAP_S, 2 ** (attempt - 1))))  # noqa: S311 - jitter
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self) -> Connection:
        """This thread's connection; a new one if it has none, or if the server closed it while it
        was idle (readable with nothing asked: its end of the connection, as urllib3 checks)."""
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None and not _readable(conn.sock):
            return conn
        self._drop_connection()
        conn = Connection(self._hostname, self._port, tls=self._tls, connect_timeout=self.settings.s3_connect_timeout_s,
                          read_timeout=self.settings.s3_read_timeout_s)
        self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _send_once(self, method: str, path: str, headers: dict[str, str], body: bytes, payload_sha256: str,
                   bucket: str, key: str, max_bytes: int | None) -> _Response:
        credentials = self._credentials.get_frozen_credentials() if self._credentials is not None else None
        if credentials is None or not credentials.access_key:
            raise StorageError(f"s3://{bucket}/{key}: {NoCredentialsError()}")
        signed = self._signer.sign(method, self._host, path, headers, payload_sha256, credentials.access_key,
                                   credentials.secret_key, credentials.token, datetime.now(UTC))
        signed["Host"] = self._host  # what was signed, as sent
        response: Response | None = None
        try:
            conn = self._connection()
            response = conn.request(method, path, signed, body)
            if response.status < 300:
                return self._read_success(response, bucket, key, max_bytes)
            data = response.read(64 * 1024)  # S3 error bodies are small
        except BodyTooLarge as too_large:  # an error document over 64 KiB is not S3's
            raise TransientStorageError(f"s3://{bucket}/{key}: {too_large}") from too_large
        except (http.client.HTTPException, OSError) as exc:  # connect/read timeout, reset, refused, cut short
            raise TransientStorageError(f"s3://{bucket}/{key}: {type(exc).__name__}") from exc
        finally:
            if response is None or not response.reusable:
                self._drop_connection()  # no answer, a body left unread, or the server closes: never reused
        match = _ERROR_CODE.search(data or b"")
        code = match.group(1).decode("ascii", "replace") if match else ""
        if 300 <= response.status < 400 or (response.status == 400 and code not in _RETRIED_400):
            raise _Unusual(f"{response.status} {code}".strip())
        error = ClientError({"Error": {"Code": code, "Message": ""},
                             "ResponseMetadata": {"HTTPStatusCode": response.status}},
                            "GetObject" if method == "GET" else "PutObject")
        translated = _translate(error, bucket, key)
        if code in _RETRIED_400 or response.status == 429:
            translated = TransientStorageError(f"s3://{bucket}/{key}: {code or response.status}")
        raise translated from error

    @staticmethod
    def _read_success(response: Response, bucket: str, key: str, max_bytes: int | None) -> _Response:
        try:
            data = response.read(max_bytes)
        except BodyTooLarge as exc:  # the body is left unread: the connection goes
            if exc.length is None:  # no Content-Length: counted as it came
                raise ObjectTooLarge(f"s3://{bucket}/{key} exceeds {max_bytes} bytes") from exc
            raise ObjectTooLarge(f"s3://{bucket}/{key} is {exc.length} bytes; the limit is {max_bytes}") from exc
        return _Response(response.header("ETag").strip('"'), data)


def worker_object_store(settings: Settings) -> ObjectStore:
    """The extraction worker's store: the light client for get/put unless turned off."""
    store = S3ObjectStore(settings)
    if not settings.s3_light_client:
        return store
    return LightS3ObjectStore(settings, fallback=store)
