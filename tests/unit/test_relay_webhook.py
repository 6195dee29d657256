"""`relay --webhook`: bearer token, size limit, and 2xx only after the events are enqueued."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator

import pytest

from shelfsight.shared.relay.sources import WebhookSource
from tests.relay_fixtures import s3_notification, s3_record
from tests.unit.test_relay_core import Harness

TOKEN = "s3cret-token"


@pytest.fixture
def webhook() -> Iterator[tuple[Harness, int]]:
    harness = Harness(max_bytes=4096)
    source = WebhookSource("127.0.0.1", 0, TOKEN, max_bytes=4096)
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(harness.relay, stop))
    thread.start()
    assert source.ready.wait(10) and source.bound is not None
    yield harness, source.bound[1]
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()


def _post(port: int, body: bytes, token: str | None = TOKEN,
          headers: dict[str, str] | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    conn.request("POST", "/", body=body, headers=sent)
    response = conn.getresponse()
    payload = json.loads(response.read() or b"{}")
    conn.close()
    return response.status, payload


BODY = json.dumps(s3_notification(s3_record("uploads", "tops/p1.jpg", "01"),
                                  s3_record("uploads", "bad.jpg", "02"))).encode()


def test_authorized_post_answers_200_with_the_enqueued_event_ids(webhook: tuple[Harness, int]) -> None:
    harness, port = webhook
    status, payload = _post(port, BODY)
    assert status == 200
    assert payload["enqueued"] == [e.event_id for e in harness.enqueued] and len(payload["enqueued"]) == 1
    assert len(payload["dead_letters"]) == 1


def test_minio_style_token_without_scheme_is_accepted(webhook: tuple[Harness, int]) -> None:
    harness, port = webhook
    status, _ = _post(port, BODY, token=None, headers={"Authorization": TOKEN})
    assert status == 200 and len(harness.enqueued) == 1


@pytest.mark.parametrize("token", [None, "wrong", ""])
def test_missing_or_wrong_token_is_401_and_nothing_is_enqueued(webhook: tuple[Harness, int], token: str | None) -> None:
    harness, port = webhook
    status, _ = _post(port, BODY, token=token)
    assert status == 401 and harness.enqueued == [] and harness.dead_letters() == []


def _status_for_headers(port: int, headers: str) -> int:
    """Send only a request's head and read the answer: the server must refuse before any body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"POST / HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {TOKEN}\r\n{headers}\r\n".encode())
        head = conn.makefile("rb").readline().decode()
    return int(head.split()[1])


def test_body_over_the_limit_is_413_before_it_is_read(webhook: tuple[Harness, int]) -> None:
    harness, port = webhook
    assert _status_for_headers(port, "Content-Length: 5000\r\n") == 413
    assert harness.enqueued == [] and harness.dead_letters() == []


def test_chunked_body_without_length_is_411(webhook: tuple[Harness, int]) -> None:
    harness, port = webhook
    assert _status_for_headers(port, "Transfer-Encoding: chunked\r\n") == 411
    assert harness.enqueued == []


def test_broker_down_is_503_so_the_sender_retries(webhook: tuple[Harness, int]) -> None:
    harness, port = webhook
    harness.fail_after = 0
    status, _ = _post(port, BODY)
    assert status == 503
    harness.fail_after = None
    assert _post(port, BODY)[0] == 200 and len(harness.enqueued) == 1


def test_healthz_needs_no_token(webhook: tuple[Harness, int]) -> None:
    _, port = webhook
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200


def test_webhook_refuses_to_start_without_a_token() -> None:
    with pytest.raises(ValueError, match="token"):
        WebhookSource("127.0.0.1", 0, "", max_bytes=1024)
