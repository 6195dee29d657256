"""The light S3 path's HTTP/1.1 connection against a loopback server that sends scripted bytes."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shelfsight.worker.http1 import MAX_HEADERS, BadResponse, BodyTooLarge, Connection

CLOSE = b""  # in a script: hang up instead of answering
HOLD = b"HOLD"  # in a script: answer nothing, keep the connection open until the client closes it


class ScriptedServer:
    """Accepts one connection; answers each request with the next scripted bytes, and hangs up
    after the last. Keeps every request it read (head and body)."""

    def __init__(self, answers: list[bytes], tls: ssl.SSLContext | None = None) -> None:
        self.answers = answers
        self.tls = tls
        self.requests: list[tuple[bytes, bytes]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except ssl.SSLError:  # the client refused our certificate
                conn.close()
                return
        with conn, conn.makefile("rb") as reader:
            for answer in self.answers:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline()
                    if not line:
                        return
                    head += line
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.requests.append((head, reader.read(length)))
                if answer == CLOSE:
                    return
                if answer == HOLD:
                    conn.recv(1)  # until the client closes
                    return
                conn.sendall(answer)

    def connect(self, read_timeout: float = 5.0) -> Connection:
        return Connection("127.0.0.1", self.port, connect_timeout=5.0, read_timeout=read_timeout)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[list[ScriptedServer]]:
    servers: list[ScriptedServer] = []
    yield servers
    for server in servers:
        server.close()


def scripted(serve: list[ScriptedServer], *answers: bytes) -> ScriptedServer:
    server = ScriptedServer(list(answers))
    serve.append(server)
    return server


def test_content_length_bodies_keep_the_connection_for_the_next_request(serve: list[ScriptedServer]) -> None:
    server = scripted(serve, b'HTTP/1.1 200 OK\r\nETag: "abc"\r\nContent-Length: 5\r\n\r\nhello',
                      b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    conn = server.connect()
    first = conn.request("GET", "/b/k", {"Host": "h"})
    assert (first.status, first.header("etag"), first.read(), first.reusable) == (200, '"abc"', b"hello", True)
    second = conn.request("PUT", "/b/r", {"Host": "h", "Content-Length": "7"}, b'{"a":1}')
    assert (second.status, second.read(), second.reusable) == (200, b"", True)
    assert server.requests[0][0].startswith(b"GET /b/k HTTP/1.1\r\nHost: h\r\n")
    assert server.requests[1] == (b"PUT /b/r HTTP/1.1\r\nHost: h\r\nContent-Length: 7\r\n\r\n", b'{"a":1}')
    conn.close()


def test_a_large_body_is_sent_whole(serve: list[ScriptedServer]) -> None:
    body = bytes(range(256)) * 1000  # over the one-write size
    server = scripted(serve, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    conn = server.connect()
    conn.request("PUT", "/b/big", {"Content-Length": str(len(body))}, body).read()
    assert server.requests[0][1] == body
    conn.close()


def test_chunked_body_with_extensions_and_trailer(serve: list[ScriptedServer]) -> None:
    server = scripted(serve, b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5;ext=1\r\n<Erro\r\n3\r\nr/>\r\n0\r\nX-Trailer: t\r\n\r\n"
                             b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    conn = server.connect()
    response = conn.request("GET", "/b/missing", {})
    assert (response.status, response.read(), response.reusable) == (404, b"<Error/>", True)


def test_a_body_ended_by_close_is_read_and_the_connection_not_reused(serve: list[ScriptedServer]) -> None:
    server = scripted(serve, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
    conn = server.connect()
    response = conn.request("GET", "/b/k", {})
    assert response.will_close
    assert (response.read(), response.reusable) == (b"all of it", False)


def test_http_1_0_without_keep_alive_closes(serve: list[ScriptedServer]) -> None:
    server = scripted(serve, b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx")
    response = server.connect().request("GET", "/", {})
    assert (response.read(), response.will_close, response.reusable) == (b"x", True, False)


def test_interim_answers_are_skipped_and_204_has_no_body(serve: list[ScriptedServer]) -> None:
    server = scripted(serve, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nX-A: 1\r\nX-A: 2\r\n\r\n")
    response = server.connect().request("DELETE", "/b/k", {})
    assert (response.status, response.header("x-a"), response.reusable, response.read()) == (204, "1, 2", True, b"")


def test_a_declared_body_over_the_limit_is_refused_unread(serve: list[ScriptedServer]) -> None:
    server = scripted(serve, b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world")
    response = server.connect().request("GET", "/b/k", {})
    with pytest.raises(BodyTooLarge) as refused:
        response.read(10)
    assert (refused.value.length, refused.value.limit, response.reusable) == (11, 10, False)


def test_a_chunked_body_over_the_limit_is_refused_as_it_comes(serve: list[ScriptedServer]) -> None:
    server = scripted(serve, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n")
    response = server.connect().request("GET", "/b/k", {})
    with pytest.raises(BodyTooLarge) as refused:
        response.read(10)
    assert refused.value.length is None and not response.reusable


@pytest.mark.parametrize(("answer", "says"), [
    (CLOSE, "closed by the server"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", "after 4 of 10"),
    (b"SPDY/3 200 OK\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 2x0 OK\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\n folded: value\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nab", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "cut short"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-H: v\r\n" * (MAX_HEADERS + 1) + b"\r\n", "header lines"),
    (b"HTTP/1.1 200 OK\r\nX-Long: " + b"v" * 70000 + b"\r\n\r\n", "longer than"),
])
def test_malformed_or_cut_answers_are_bad_responses(serve: list[ScriptedServer], answer: bytes, says: str) -> None:
    conn = scripted(serve, answer).connect()
    with pytest.raises(BadResponse, match=says):
        conn.request("GET", "/b/k", {}).read()
    conn.close()


def test_a_server_that_never_answers_times_out(serve: list[ScriptedServer]) -> None:
    server = scripted(serve, HOLD)
    conn = server.connect(read_timeout=0.2)
    with pytest.raises(OSError, match="timed out"):
        conn.request("GET", "/b/k", {})
    conn.close()


def test_https_verifies_the_server_certificate(serve: list[ScriptedServer], tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    server = ScriptedServer([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], tls=server_tls)
    serve.append(server)
    trusting = ssl.create_default_context(cafile=str(cert))
    conn = Connection("localhost", server.port, tls=trusting, connect_timeout=5.0, read_timeout=5.0)
    assert conn.request("GET", "/b/k", {"Host": "localhost"}).read() == b"ok"
    conn.close()

    untrusted = ScriptedServer([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], tls=server_tls)
    serve.append(untrusted)
    with pytest.raises(ssl.SSLCertVerificationError):
        Connection("localhost", untrusted.port, tls=ssl.create_default_context(), connect_timeout=5.0, read_timeout=5.0)
