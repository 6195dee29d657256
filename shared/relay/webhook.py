"""The relay's HTTP endpoint (stdlib server: one thread per request, no extra dependency)."""

from __future__ import annotations

import hmac
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog

from shelfsight.shared.relay import metrics
from shelfsight.shared.relay.core import Relay, RelayUnavailable

log = structlog.get_logger()


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # shutdown waits for requests in flight (their notification is being enqueued)
    block_on_close = True
    relay: Relay
    token: bytes
    max_bytes: int


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 15  # seconds to send a request: a stalled client cannot hold a thread forever
    server_version = "shelfsight-relay"
    sys_version = ""

    def do_GET(self) -> None:  # http.server's naming
        if self.path.rstrip("/") == "/healthz":
            self._reply(200, {"status": "ok"})
        else:
            self._reply(404, {"error": "not found"})

    def do_HEAD(self) -> None:  # MinIO probes the endpoint before it sends events
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()

    def do_POST(self) -> None:
        if not self._authorized():
            metrics.WEBHOOK_REJECTED.labels(reason="unauthorized").inc()
            length = self._content_length()
            if length is not None and length <= self.server.max_bytes:
                self.rfile.read(length)  # so closing does not reset the connection under the reply
            self._reply(401, {"error": "missing or wrong bearer token"},
                        {"WWW-Authenticate": 'Bearer realm="shelfsight-relay"'})
            return
        length = self._content_length()
        if length is None:
            metrics.WEBHOOK_REJECTED.labels(reason="length_required").inc()
            self._reply(411, {"error": "Content-Length required"})
            return
        if length > self.server.max_bytes:
            metrics.WEBHOOK_REJECTED.labels(reason="too_large").inc()
            self._reply(413, {"error": f"body over {self.server.max_bytes} bytes"})
            return
        body = self.rfile.read(length)
        try:
            handled = self.server.relay.handle(body, "webhook")
        except RelayUnavailable as exc:
            self._reply(503, {"error": str(exc)[:300]}, {"Retry-After": "5"})
            return
        self._reply(200, {"enqueued": handled.event_ids, "dead_letters": handled.dead_letters,
                          "skipped": handled.skipped})

    def _authorized(self) -> bool:
        """`Authorization: Bearer <token>` (MinIO sends the token with or without the scheme)."""
        header = self.headers.get("Authorization", "").strip()
        presented = header[7:].strip() if header.lower().startswith("bearer ") else header
        return hmac.compare_digest(presented.encode(), self.server.token)

    def _content_length(self) -> int | None:
        if self.headers.get("Transfer-Encoding"):
            return None  # chunked bodies have no length to check before reading
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return None
        return length if length >= 0 else None

    def _reply(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        # One request per connection: an idle keep-alive connection would hold shutdown (which
        # waits for request threads) until its timeout, and an unread body must never be taken
        # for the next request. Notifications are few; a reconnect costs nothing.
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # stdlib signature
        log.debug("relay.webhook.request", client=self.client_address[0], line=format % args)


def make_server(host: str, port: int, relay: Relay, token: str, max_bytes: int) -> _Server:
    """A bound, not yet serving, webhook server (port 0 picks a free port)."""
    server = _Server((host, port), _Handler)
    server.relay = relay
    server.token = token.encode()
    server.max_bytes = max_bytes
    return server
