"""One keep-alive HTTP/1.1 client connection, for the light S3 path's GET and PUT.

`http.client` parses every response's headers with the `email` package and sends a request's
headers and body in separate writes: about half of its CPU per S3 request here is that header
parsing (docs/performance.md, issue 12). S3's answers need none of it. This connection sends a
request in one write and reads the answer by hand: the status line, the header lines (at most
`MAX_HEADERS` of at most `MAX_LINE` bytes, as `http.client` allows), then a body delimited by
`Content-Length`, by chunked transfer coding, or by the server's close. Interim 1xx answers are
skipped. Anything else a server sends is a `BadResponse`, which the caller treats like a reset
connection.

One request at a time; a connection whose answer was not read to its end, or whose server said
it closes, must not carry another (`Response.reusable`).
"""

from __future__ import annotations

import http.client
import io
import socket
import ssl
from collections.abc import Mapping

MAX_LINE = 65536
MAX_HEADERS = 100
_NO_BODY_STATUSES = frozenset({204, 304})


class BadResponse(http.client.HTTPException):
    """The server's answer is not well-formed HTTP/1.1, or ended before it was complete."""


class BodyTooLarge(Exception):
    """The body is longer than the reader's limit (it was not read: the connection cannot be reused)."""

    def __init__(self, length: int | None, limit: int) -> None:
        super().__init__(f"body of {length if length is not None else 'more than ' + str(limit)} bytes; "
                         f"the limit is {limit}")
        self.length = length
        self.limit = limit


class Response:
    """A response's status and headers (names lower-case); `read` takes the body, once."""

    def __init__(self, status: int, headers: dict[str, str], will_close: bool, conn: Connection,
                 has_body: bool) -> None:
        self.status = status
        self.headers = headers
        self.will_close = will_close
        self._conn = conn
        self._complete = not has_body

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    @property
    def reusable(self) -> bool:
        """The connection can carry the next request: this body was read whole and the server keeps it open."""
        return self._complete and not self.will_close

    def read(self, limit: int | None = None) -> bytes:
        """The whole body. BodyTooLarge (nothing more read) if it is longer than `limit` bytes."""
        if self._complete:
            return b""
        reader = self._conn.reader
        if "chunked" in self.header("transfer-encoding").lower():
            body = self._read_chunked(limit)
        elif (length := self.header("content-length")) != "":
            size = _content_length(length)
            if limit is not None and size > limit:
                raise BodyTooLarge(size, limit)
            body = reader.read(size)
            if len(body) != size:
                raise BadResponse(f"connection closed after {len(body)} of {size} body bytes")
        else:  # delimited by the server's close
            body = reader.read() if limit is None else reader.read(limit + 1)
            if limit is not None and len(body) > limit:
                raise BodyTooLarge(None, limit)
            self.will_close = True
        self._complete = True
        return body

    def _read_chunked(self, limit: int | None) -> bytes:
        reader, parts, total = self._conn.reader, [], 0
        while True:
            line = _line(reader)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise BadResponse(f"bad chunk size line {line[:40]!r}") from exc
            if size < 0:
                raise BadResponse("negative chunk size")
            if size == 0:
                break
            total += size
            if limit is not None and total > limit:
                raise BodyTooLarge(None, limit)
            chunk = reader.read(size)
            if len(chunk) != size or _line(reader) != b"":
                raise BadResponse("chunked body cut short or malformed")
            parts.append(chunk)
        while _line(reader) != b"":  # trailer fields, ignored
            pass
        return b"".join(parts)


class Connection:
    """A keep-alive connection to one server: `request` sends one request and returns its answer
    with the body still to read. Connect within `connect_timeout`; every read and write then waits
    at most `read_timeout` (socket.timeout, an OSError, when it does not come)."""

    def __init__(self, host: str, port: int, *, tls: ssl.SSLContext | None = None,
                 connect_timeout: float, read_timeout: float) -> None:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host)
            sock.settimeout(read_timeout)
        except BaseException:
            sock.close()
            raise
        self.sock: socket.socket | None = sock
        self.reader: io.BufferedIOBase = sock.makefile("rb")

    def request(self, method: str, target: str, headers: Mapping[str, str], body: bytes = b"") -> Response:
        """Send `method target` with `headers` (Host included by the caller) and `body`; read the
        status line and headers of the answer (interim 1xx answers skipped)."""
        if self.sock is None:
            raise BadResponse("connection is closed")
        head = "".join([f"{method} {target} HTTP/1.1\r\n", *(f"{k}: {v}\r\n" for k, v in headers.items()), "\r\n"])
        data = head.encode("latin-1")
        if len(body) <= 65536:
            self.sock.sendall(data + body)  # one write: the PUT's small result document goes with its headers
        else:
            self.sock.sendall(data)
            self.sock.sendall(body)
        while True:
            response = self._read_head(method)
            if not 100 <= response.status < 200:
                return response

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            self.reader.close()
            sock.close()

    def _read_head(self, method: str) -> Response:
        status_line = _line(self.reader)
        version, _, rest = status_line.partition(b" ")
        code = rest[:3]
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or not code.isdigit() or rest[3:4] not in (b"", b" "):
            raise BadResponse(f"bad status line {status_line[:80]!r}")
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = _line(self.reader)
            if not line:
                break
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise BadResponse(f"bad header line {line[:80]!r}")
            key, text = name.decode("latin-1").lower(), value.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        else:
            raise BadResponse(f"more than {MAX_HEADERS} header lines")
        status = int(code)
        connection = headers.get("connection", "").lower()
        will_close = "close" in connection or (version == b"HTTP/1.0" and "keep-alive" not in connection)
        has_body = not (method == "HEAD" or 100 <= status < 200 or status in _NO_BODY_STATUSES)
        return Response(status, headers, will_close, self, has_body)


def _line(reader: io.BufferedIOBase) -> bytes:
    """One CRLF (or LF) terminated line without its end (b"" for an empty line)."""
    raw = reader.readline(MAX_LINE + 1)
    if not raw:
        raise BadResponse("connection closed by the server")
    if len(raw) > MAX_LINE:
        raise BadResponse(f"line longer than {MAX_LINE} bytes")
    if not raw.endswith(b"\n"):
        raise BadResponse("connection closed in the middle of a line")
    return raw.rstrip(b"\r\n")


def _content_length(text: str) -> int:
    values = {v.strip() for v in text.split(",")}  # a repeated header must agree with itself
    if len(values) != 1 or not (value := values.pop()).isdigit():
        raise BadResponse(f"bad Content-Length {text[:40]!r}")
    return int(value)
