#!/usr/bin/env python
"""A small S3 stand-in for the throughput bench: the requests shelfsight makes, at a fraction of
moto's CPU, in several processes.

moto costs about 3 ms of CPU per request and runs in one process (one GIL): two requests per
image cap a bench at a few hundred images/s whatever the worker does, and on a 2-core machine its
CPU is taken from the worker under test. Real S3 runs elsewhere. This server answers the same
REST calls (path-style): object GET/HEAD/PUT/DELETE with ETag = MD5, conditional PUT
(`If-None-Match: *`, `If-Match`), bucket create/HEAD, ListObjectsV2 (prefix, continuation), S3
error documents (NoSuchKey, NoSuchBucket, PreconditionFailed). Like moto by default, it does not
check signatures. HTTP/1.1 keep-alive, as S3.

Objects are files under --root (one folder per bucket, keys percent-encoded into one file name),
so --processes N share one port (the listening socket is bound once, then forked) and one store;
a conditional PUT is atomic across processes (create-if-absent by hard link, compare-and-swap
under a per-key file lock).

    python bench/_s3_standin.py --port 9000 --root /dev/shm/s3 --processes 4
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import signal
import sys
import tempfile
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit
from xml.sax.saxutils import escape

ERROR = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
         "<Resource>{resource}</Resource><RequestId>standin</RequestId></Error>")


class Store:
    """Buckets are folders; objects are files named by their percent-encoded key."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def bucket(self, name: str) -> Path:
        if not name or "/" in name or name in (".", ".."):
            raise KeyError(name)
        return self.root / name

    def path(self, bucket: str, key: str) -> Path:
        return self.bucket(bucket) / quote(key, safe="")

    def tmp(self, bucket: str) -> Path:
        return self.bucket(bucket) / f".tmp-{uuid.uuid4().hex}"


def etag_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()  # noqa: S324 - S3's ETag for a single-part upload


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    store: Store

    def log_message(self, format: str, *args: object) -> None:
        pass

    # --- responses -------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/xml", head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if body or not head:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, resource: str = "") -> None:
        body = ERROR.format(code=code, message=escape(message), resource=escape(resource)).encode()
        self._send(status, b"" if self.command == "HEAD" else body, head=self.command == "HEAD")

    def _target(self) -> tuple[str, str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        bucket, _, key = parts.path.lstrip("/").partition("/")
        return unquote(bucket), unquote(key), parse_qs(parts.query, keep_blank_values=True)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # --- verbs -----------------------------------------------------------------------------------
    def do_GET(self) -> None:
        bucket, key, query = self._target()
        try:
            folder = self.store.bucket(bucket)
        except KeyError:
            return self._error(400, "InvalidBucketName", "bad bucket name", bucket)
        if not folder.is_dir():
            return self._error(404, "NoSuchBucket", "The specified bucket does not exist", bucket)
        if not key:
            return self._list(folder, bucket, query)
        try:
            data = self.store.path(bucket, key).read_bytes()
        except FileNotFoundError:
            return self._error(404, "NoSuchKey", "The specified key does not exist.", key)
        self._send(200, data, {"ETag": f'"{etag_of(data)}"'}, "application/octet-stream", head=self.command == "HEAD")

    do_HEAD = do_GET

    def do_PUT(self) -> None:
        bucket, key, _ = self._target()
        body = self._body()
        try:
            folder = self.store.bucket(bucket)
        except KeyError:
            return self._error(400, "InvalidBucketName", "bad bucket name", bucket)
        if not key:  # CreateBucket
            folder.mkdir(exist_ok=True)
            return self._send(200, headers={"Location": f"/{bucket}"})
        if not folder.is_dir():
            return self._error(404, "NoSuchBucket", "The specified bucket does not exist", bucket)
        target = self.store.path(bucket, key)
        tmp = self.store.tmp(bucket)
        tmp.write_bytes(body)
        try:
            if self.headers.get("If-None-Match", "").strip() == "*":
                try:
                    os.link(tmp, target)  # atomic create-if-absent, across processes
                except FileExistsError:
                    return self._error(412, "PreconditionFailed", "At least one of the pre-conditions you "
                                       "specified did not hold", key)
            elif (wanted := self.headers.get("If-Match")) is not None:
                with self._locked(target):
                    try:
                        current = etag_of(target.read_bytes())
                    except FileNotFoundError:
                        return self._error(404, "NoSuchKey", "The specified key does not exist.", key)
                    if current != wanted.strip().strip('"'):
                        return self._error(412, "PreconditionFailed", "At least one of the pre-conditions you "
                                           "specified did not hold", key)
                    os.replace(tmp, target)
            else:
                os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._send(200, headers={"ETag": f'"{etag_of(body)}"'})

    def do_DELETE(self) -> None:
        bucket, key, _ = self._target()
        with contextlib.suppress(FileNotFoundError, KeyError):
            self.store.path(bucket, key).unlink()
        self._send(204)

    def do_POST(self) -> None:
        self._body()
        self._error(501, "NotImplemented", "not implemented by the bench's S3 stand-in")

    # --- helpers ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, target: Path):  # noqa: ANN202 - a context manager
        lock = target.with_name(f".lock-{target.name}")
        with open(lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _list(self, folder: Path, bucket: str, query: dict[str, list[str]]) -> None:
        prefix = query.get("prefix", [""])[0]
        after = query.get("continuation-token", query.get("start-after", [""]))[0]
        limit = int(query.get("max-keys", ["1000"])[0])
        keys = sorted(k for k in (unquote(p.name) for p in folder.iterdir() if not p.name.startswith("."))
                      if k.startswith(prefix) and k > after)
        page, more = keys[:limit], len(keys) > limit
        items = "".join(f"<Contents><Key>{escape(k)}</Key><Size>{self.store.path(bucket, k).stat().st_size}</Size>"
                        "<StorageClass>STANDARD</StorageClass></Contents>" for k in page)
        token = f"<NextContinuationToken>{escape(page[-1])}</NextContinuationToken>" if more else ""
        body = ('<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(page)}</KeyCount>"
                f"<MaxKeys>{limit}</MaxKeys><IsTruncated>{'true' if more else 'false'}</IsTruncated>{token}{items}"
                "</ListBucketResult>").encode()
        self._send(200, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="S3 stand-in for the throughput bench")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", default=None, help="folder for buckets (default: a new temporary folder)")
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args(argv)
    root = Path(args.root or tempfile.mkdtemp(prefix="s3-standin-"))
    Handler.store = Store(root)
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 1024
    server = ThreadingHTTPServer((args.host, args.port), Handler)  # bound once, shared by the forks
    children = []
    for _ in range(max(0, args.processes - 1)):
        pid = os.fork()
        if pid == 0:
            children = []
            break
        children.append(pid)

    def stop(*_: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
