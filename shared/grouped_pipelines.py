"""Redis pipelines of many threads sent as one round trip (group commit).

The extraction worker's task threads each make two Redis round trips per event: the delivery's
`begin` before the fetch, and the stream entries with the delivery's outcome after the write.
In a burst they make them at the same moments (a batch pop starts several events at once; a
micro-batch's results are written together), and each round trip costs redis-py about 0.1 ms of
Python around the socket, more when 16 threads share one GIL. `GroupedPipelines.execute` queues a
caller's commands; whoever finds no round trip in flight sends every queued caller's commands in
one pipeline, while the callers that arrive meanwhile wait for it and then go in the next one,
sent by the first of them. A caller waits for at most the round trip already in flight and its
own; alone, it sends at once (a single command as a plain command, not a pipeline).

Each caller gets exactly its own replies, in order. A command Redis refuses (a ResponseError)
fails only its caller; a round trip that fails (connection lost, timeout) fails every caller in
it, as their own round trips would have failed; a caller whose queueing function raises is left
out of the round trip and gets its exception.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import redis
from redis.client import Pipeline


class _Call:
    __slots__ = ("queue", "done", "replies", "error", "lead")

    def __init__(self, queue: Callable[[Pipeline], object]) -> None:
        self.queue = queue
        self.done: threading.Event | None = None  # made only for a caller that has to wait
        self.replies: list[Any] = []
        self.error: BaseException | None = None
        self.lead = False  # woken to send the next round trip, not with its replies


class GroupedPipelines:
    """One client's pipelines, grouped across threads (see the module docstring)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._queued: list[_Call] = []
        self._in_flight = False

    def execute(self, queue: Callable[[Pipeline], object]) -> list[Any]:
        """Run `queue(pipe)` (it queues this caller's commands on a non-transactional pipeline) and
        return the replies to those commands. Raises what a pipeline of them alone would raise."""
        call = _Call(queue)
        with self._lock:
            self._queued.append(call)
            lead = not self._in_flight
            self._in_flight = True
            if not lead:
                call.done = threading.Event()
        if call.done is not None:
            call.done.wait()
            if call.lead:  # the previous round trip is back, and this caller sends the next one
                lead = True
        if lead:
            self._send_round()
        if call.error is not None:
            raise call.error
        return call.replies

    def _send_round(self) -> None:
        with self._lock:
            calls, self._queued = self._queued, []
        successor: _Call | None = None
        try:
            self._send(calls)
        finally:
            with self._lock:
                if self._queued:
                    successor = self._queued[0]
                else:
                    self._in_flight = False
            for call in calls:
                if call.done is not None:
                    call.done.set()
            if successor is not None and successor.done is not None:  # it waits: it was queued in flight
                successor.lead = True
                successor.done.set()

    def _send(self, calls: list[_Call]) -> None:
        pipe = self.client.pipeline(transaction=False)
        sent: list[tuple[_Call, int, int]] = []
        for call in calls:
            start = len(pipe.command_stack)
            try:
                call.queue(pipe)
            except Exception as exc:  # noqa: BLE001 - this caller's own bug: only it fails
                del pipe.command_stack[start:]
                call.error = exc
                continue
            sent.append((call, start, len(pipe.command_stack)))
        if not sent:
            return
        try:
            if len(pipe.command_stack) == 1:  # one caller, one command: no pipeline to build and parse
                args, options = pipe.command_stack[0]
                try:
                    replies = [self.client.execute_command(*args, **options)]
                except redis.ResponseError as refused:
                    replies = [refused]
            else:
                replies = pipe.execute(raise_on_error=False)
        except Exception as exc:  # noqa: BLE001 - the round trip failed: so did every caller's
            for call, _, _ in sent:
                call.error = exc
            return
        for call, start, end in sent:
            mine = replies[start:end]
            call.error = next((r for r in mine if isinstance(r, Exception)), None)
            call.replies = mine
