"""A fault-injecting HTTP proxy for an S3 endpoint on loopback (the moto server), for the chaos
benchmark and the reliability tests.

Clients (the workers under test) talk to the proxy; it forwards each request to the upstream
endpoint, or, while a fault is set, answers it with that fault instead:

- `error_503`: 503 ServiceUnavailable (an S3 error document), at once;
- `reset`: the connection is reset (RST) without a response;
- `slow`: no response for `slow_s` seconds (set it beyond the client's read timeout), then a
  closed connection;
- `deny`: 403 AccessDenied, as S3 answers expired or revoked credentials.

A fault can be limited to requests matching a predicate (method, path) and to the next N of
them. The proxy parses HTTP/1.1 per request (keep-alive included), so a fault applies to
requests on connections opened before it was set, as a real outage does.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import urlsplit

FaultMode = Literal["pass", "error_503", "reset", "slow", "deny"]
FAULT_MODES: tuple[FaultMode, ...] = ("error_503", "reset", "slow", "deny")
RequestMatch = Callable[[str, str], bool]

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}
_ERROR_BODY = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
               "<RequestId>fault-proxy</RequestId></Error>")


class FaultProxy:
    """HTTP forwarder to `upstream` (http://host:port) on 127.0.0.1:`port` (0: any free port)."""

    def __init__(self, upstream: str, port: int = 0) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._lock = threading.Lock()
        self._mode: FaultMode = "pass"
        self._match: RequestMatch | None = None
        self._remaining: int | None = None
        self.slow_s = 5.0
        self.counts: Counter[str] = Counter()  # requests answered per mode
        self._stopping = threading.Event()
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def set(self, mode: FaultMode, *, match: RequestMatch | None = None, count: int | None = None,
            slow_s: float | None = None) -> None:
        """Answer matching requests with `mode` from now on (the next `count` only, if given)."""
        with self._lock:
            self._mode, self._match, self._remaining = mode, match, count
            if slow_s is not None:
                self.slow_s = slow_s

    def clear(self) -> None:
        """Forward everything again."""
        self.set("pass")

    @property
    def mode(self) -> FaultMode:
        with self._lock:
            return self._mode

    def _decide(self, method: str, path: str) -> FaultMode:
        with self._lock:
            mode = self._mode
            if mode == "pass" or (self._match is not None and not self._match(method, path)):
                self.counts["pass"] += 1
                return "pass"
            if self._remaining is not None:
                self._remaining -= 1
                if self._remaining <= 0:
                    self._mode, self._match, self._remaining = "pass", None, None
            self.counts[mode] += 1
            return mode


class _ProxyHandler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        mode = self.owner._decide(self.command, self.path)
        if mode == "pass":
            self._forward(body)
        elif mode == "error_503":
            self._error(503, "ServiceUnavailable", "injected by the fault proxy")
        elif mode == "deny":
            self._error(403, "AccessDenied", "Access Denied (injected by the fault proxy)")
        elif mode == "reset":
            self._reset()
        else:  # slow: longer than the client waits, then nothing
            self.owner._stopping.wait(self.owner.slow_s)
            self._reset()

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:  # the client gave up (its timeout, a reset): nothing left to answer
            self.close_connection = True

    def _forward(self, body: bytes) -> None:
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except OSError:
            self._error(502, "InternalError", "upstream unreachable")
            return
        finally:
            conn.close()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        data = _ERROR_BODY.format(code=code, message=message).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _reset(self) -> None:
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass
        self.close_connection = True
