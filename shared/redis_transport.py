"""kombu's Redis transport, with no message lost when a consumer dies as it receives one.

kombu consumes a Redis queue with BRPOP, then records the message in its unacked index (the
hash the visibility timeout restores from). BRPOP removes the message from Redis at once, so a
consumer killed between the two (kill -9, OOM, a node lost) loses it: Redis has already sent it,
nobody recorded it. A SIGKILLed worker holding a large heap takes tens of milliseconds to die,
and its sockets stay open until the very end, so under a steady stream this is not rare (the
chaos benchmark lost an event in most runs with five kills).

This transport pops with BRPOPLPUSH into an in-flight list of its own consumer instead, then
records the message in the unacked index as kombu does and removes it from the in-flight list in
the same MULTI/EXEC (one round trip; the message is always in exactly one of the two). Each
consumer keeps a heartbeat key alive while it polls; a sweep (run with kombu's own restore sweep)
puts back the in-flight messages of consumers whose heartbeat has expired, at the consuming end
of their queue. At-least-once, and the workers are idempotent. The channel also reuses one Redis
client for its commands where kombu builds a new one per call.

Keys, per queue: `<prefix>:<queue>` (a set of consumer ids), `<prefix>:<queue>:<id>` (the
in-flight list), `<prefix>:<queue>:<id>:alive` (the heartbeat). Messages are read from the
queue's base list only (`priority_steps` [0]; shelfsight never publishes with priorities).

Several queues (an extraction worker takes live uploads from `extract` and re-extractions from
`backfill`): BRPOPLPUSH blocks on one list only, so polling them in turn made a message wait up
to a poll timeout per other queue, and took the queues in turn whatever their order. Instead, a
script pops the first non-empty queue in order (`queue_order_strategy` "priority", and the
`queue_priority` option naming the order, highest first) into its in-flight list, at once; only
when every queue is empty does the consumer block, on the first queue alone. A live upload is
taken the moment a thread is free; a re-extraction waits while live ones are queued, and at
most one poll timeout (1 s) after arriving in an idle worker.

Bursts: from the first queue, that script pops as many messages as the consumer has free
prefetch slots (at most 64) and records each as unacked itself, exactly as kombu's QoS.append
would, in the same atomic step. A burst then costs one round trip per batch instead of two per
message (the pop, then the MULTI/EXEC that records it), and needs no in-flight list: no moment
exists in which a popped message is recorded nowhere. The blocking pop of an idle consumer
and pops from later queues (one at a time, so a live upload that arrives is taken next) keep
the in-flight list.

Selected by `shelfsight.shared.celery_app` for redis:// broker URLs.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

INFLIGHT_PREFIX = "shelfsight:inflight"

# Put back the in-flight messages of consumers whose heartbeat expired. KEYS[1]: the queue's
# consumer set; ARGV[1]: the queue's key prefix for lists; ARGV[2]: the queue (list) to refill.
_REAP = """
local moved = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local list = ARGV[1] .. ':' .. id
  if redis.call('EXISTS', list .. ':alive') == 0 then
    local item = redis.call('LPOP', list)
    while item do
      redis.call('RPUSH', ARGV[2], item)
      moved = moved + 1
      item = redis.call('LPOP', list)
    end
    redis.call('SREM', KEYS[1], id)
  end
end
return moved
"""


# Pop from the first non-empty queue. KEYS: unacked index, unacked hash, then queue1, inflight1,
# queue2, inflight2...; ARGV: up to how many from the first queue, the time (the unacked index's
# score), then the queue names in the same order. From the first queue, up to ARGV[1] messages
# are popped and recorded as unacked here, as kombu's QoS.append records them ([message,
# exchange, routing key] under the delivery tag), in one atomic step: no window in which a
# consumer could die holding them unrecorded, and one round trip for a burst. From any later
# queue, one message goes to the in-flight list (the client records it): a live upload that
# arrives meanwhile is taken next. A message whose envelope cannot be read here goes to the
# in-flight list too, alone, for the client's own path. Returns {queue name, recorded (1 or 0),
# message...} or nil when every queue is empty.
_POP_FIRST = """
local want = tonumber(ARGV[1])
for i = 1, (#KEYS - 2) / 2 do
  local queue, inflight, name = KEYS[2 * i + 1], KEYS[2 * i + 2], ARGV[i + 2]
  if i > 1 or want <= 1 then
    local item = redis.call('RPOPLPUSH', queue, inflight)
    if item then return {name, 0, item} end
  else
    local out = {name, 1}
    while #out - 2 < want do
      local item = redis.call('RPOP', queue)
      if not item then break end
      local ok, m = pcall(cjson.decode, item)
      local props = ok and type(m) == 'table' and m['properties']
      local tag = type(props) == 'table' and props['delivery_tag']
      local info = type(props) == 'table' and props['delivery_info']
      if type(tag) ~= 'string' or type(info) ~= 'table' then
        if #out > 2 then
          redis.call('RPUSH', queue, item)  -- back where it was; the next pop takes it alone
          return out
        end
        redis.call('LPUSH', inflight, item)
        return {name, 0, item}
      end
      redis.call('ZADD', KEYS[1], ARGV[2], tag)
      redis.call('HSET', KEYS[2], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'] or '') .. ','
                 .. cjson.encode(info['routing_key'] or '') .. ']')
      out[#out + 1] = item
    end
    if #out > 2 then return out end
  end
end
return nil
"""
RECORDED = ("recorded", b"")  # `Channel._recording` for a message the pop script already recorded
POP_BATCH_MAX = 64  # most messages one pop takes from the first queue (also bounded by prefetch)


class QoS(kombu_redis.QoS):
    """kombu's QoS; its restore sweep also recovers the in-flight lists of dead consumers, and acks
    made on the event loop's thread are written to Redis together, once per turn of the loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_acks: list[str] = []
        self._ack_flush_failing = False

    def ack(self, delivery_tag: str) -> None:
        """On the event loop's thread (Celery's consumer, where its acks run): free the prefetch
        slot now, and leave the unacked record for `flush_acks`, which the loop runs before it
        next waits (Transport.register_with_event_loop). Elsewhere, kombu's ack as it is. A
        process that dies before the flush leaves the records behind: the messages come back
        after the visibility timeout, and the worker's delivery tracking acks them unprocessed."""
        if not self.channel.defers_acks():
            super().ack(delivery_tag)
            return
        kombu_virtual.QoS.ack(self, delivery_tag)
        self._pending_acks.append(delivery_tag)

    def flush_acks(self) -> None:
        """Remove the deferred acks' unacked records in one round trip of two commands (what
        kombu's ack removes, for every tag at once). On a Redis error they are kept for the next try
        (logged once per outage), never raised into the event loop."""
        tags = self._pending_acks
        if not tags:
            return
        self._pending_acks = []
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags).execute()
        except Exception as exc:  # noqa: BLE001 - the broker is down: try again on the next turn
            self._pending_acks[:0] = tags
            if not self._ack_flush_failing:
                kombu_redis.logger.warning("%d ack(s) not written yet, will retry: %r", len(tags), exc)
            self._ack_flush_failing = True
            return
        self._ack_flush_failing = False

    def restore_unacked(self, client: Any = None) -> None:
        self.flush_acks()  # what was acked must not be restored with the rest
        super().restore_unacked(client)

    def append(self, message: Any, delivery_tag: str) -> None:
        """Record the message as unacked, as kombu does, and in the same MULTI/EXEC take it off the
        in-flight list it was popped into: one round trip instead of two per message, and no window
        in which it is both (a consumer killed there would have it delivered twice)."""
        popped = self.channel._recording
        if popped is None:  # not a pop of ours (kombu's own paths): kombu's bookkeeping alone
            super().append(message, delivery_tag)
            return
        self.channel._recording = None
        if popped is RECORDED:  # the pop script recorded it already, atomically with the pop
            kombu_virtual.QoS.append(self, message, delivery_tag)
            return
        inflight, item = popped
        delivery = message.delivery_info
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}) \
                .hset(self.unacked_key, delivery_tag,
                      dumps([message._raw, delivery["exchange"], delivery["routing_key"]])) \
                .lrem(inflight, 1, item) \
                .execute()
        kombu_virtual.QoS.append(self, message, delivery_tag)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        self.flush_acks()
        super().restore_visible(start=start, num=num, interval=interval)
        self.channel.reap_inflight()


class Channel(kombu_redis.Channel):
    QoS = QoS

    inflight_alive_s = 30  # heartbeat TTL; transport option
    queue_priority: tuple[str, ...] = ()  # queues consumed first, highest first; transport option
    from_transport_options = (*kombu_redis.Channel.from_transport_options,  # type: ignore[assignment]
                              "inflight_alive_s", "queue_priority")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.consumer_id = uuid.uuid4().hex
        self._alive_at: dict[str, float] = {}
        self._reaped_at = 0.0
        self._popping_from: str | None = None
        self._block_next = False  # block only after a non-blocking pop found every queue empty
        self._recording: tuple[str, bytes] | None = None  # (in-flight list, item) while it is delivered
        self._sync_client: Any = None

    @contextlib.contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """kombu builds a new redis.Redis for each call (about 0.1 ms of CPU: it copies some 200
        response callbacks), four or five times per message; one client over the channel's pool
        serves them all (a client is thread-safe: each command takes a pooled connection)."""
        if client:
            yield client
            return
        shared = self._sync_client
        if shared is None or shared.connection_pool is not self.pool:  # the pool is rebuilt on reconnect
            shared = self._sync_client = self._create_client()
        yield shared

    # --- keys ----------------------------------------------------------------------------------
    def _inflight_set(self, queue: str) -> str:
        return f"{INFLIGHT_PREFIX}:{queue}"

    def _inflight_list(self, queue: str, consumer_id: str | None = None) -> str:
        return f"{INFLIGHT_PREFIX}:{queue}:{consumer_id or self.consumer_id}"

    # --- consuming -----------------------------------------------------------------------------
    def _brpop_start(self, timeout: float | None = None) -> None:
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._ordered(self._queue_cycle.consume(len(self.active_queues)))
        if not queues:
            return
        for queue in queues:
            self._keep_alive(queue)
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]
        if not self._block_next:
            # every queue in order, without blocking: up to `want` messages of the highest queue
            self._popping_from = None
            keys = [self.qos.unacked_index_key, self.qos.unacked_key,
                    *[k for queue in queues for k in (self._q_for_pri(queue, 0), self._inflight_list(queue))]]
            room = self.qos.can_consume_max_estimate()
            want = POP_BATCH_MAX if room is None else max(1, min(room, POP_BATCH_MAX))
            self.client.connection.send_command("EVAL", _POP_FIRST, len(keys), *keys, want, time.time(), *queues)
            return
        # all were empty a moment ago: block on the first (BRPOPLPUSH takes one source)
        self._block_next = False
        queue = queues[0]
        self._popping_from = queue
        wait = float(timeout or 1)  # Redis >= 6 takes fractions of a second
        self.client.connection.send_command(
            "BRPOPLPUSH", self._q_for_pri(queue, 0), self._inflight_list(queue), f"{max(0.1, wait):.2f}")

    def _ordered(self, queues: list[str]) -> list[str]:
        """The queues in `queue_priority` order (those not named keep their cycle order, after)."""
        if not self.queue_priority:
            return list(queues)
        rank = {name: i for i, name in enumerate(self.queue_priority)}
        return sorted(queues, key=lambda q: rank.get(q, len(rank)))

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                command = "BRPOPLPUSH" if self._popping_from is not None else "EVAL"
                item = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            queue = self._popping_from
            if queue is None:  # the non-blocking ordered pop: {queue, recorded, message...} or nothing
                if not item:
                    self._block_next = True
                    raise kombu_redis.Empty()
                queue, recorded, items = bytes_to_str(item[0]), int(item[1]), item[2:]
                self._queue_cycle.rotate(queue)  # round robin takes turns; priority keeps its order
                if recorded:
                    self._deliver_recorded(queue, [loads(bytes_to_str(popped)) for popped in items])
                    return True
                item = items[0]
            elif not item:
                raise kombu_redis.Empty()
            self._recording = (self._inflight_list(queue), item)  # QoS.append takes it off the list
            self.connection._deliver(loads(bytes_to_str(item)), queue)  # records it as unacked
            if self._recording is not None:  # delivered without QoS.append (no_ack): clear it here
                with self.conn_or_acquire() as client:
                    client.lrem(self._inflight_list(queue), 1, item)
            return True
        finally:
            self._recording = None
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()

    def _deliver_recorded(self, queue: str, payloads: list[dict[str, Any]]) -> None:
        """Deliver messages the pop script recorded as unacked. One delivered without QoS.append
        (a no_ack consumer) is unrecorded at once; if a delivery raises, the messages not yet
        delivered go back to the consuming end of their queue instead of waiting out the visibility
        timeout."""
        for index, payload in enumerate(payloads):
            tag = payload["properties"]["delivery_tag"]
            self._recording = RECORDED
            try:
                self.connection._deliver(payload, queue)
            except BaseException:
                for rest in reversed(payloads[index + 1:]):  # the next one is pushed last: popped first
                    self.qos.restore_by_tag(rest["properties"]["delivery_tag"])  # to the consuming end
                raise
            if self._recording is RECORDED:  # no QoS.append: nobody will ack it
                self._recording = None
                self.qos._remove_from_indices(tag).execute()

    def _poll_error(self, type: str, **options: Any) -> None:
        if type == "LISTEN":
            self.subclient.parse_response()
        else:
            self.client.parse_response(self.client.connection,
                                       "BRPOPLPUSH" if self._popping_from is not None else "EVAL")

    # --- liveness and recovery -----------------------------------------------------------------
    def _keep_alive(self, queue: str) -> None:
        """Register this consumer and refresh its heartbeat (at most every third of its TTL)."""
        now = time.monotonic()
        if now - self._alive_at.get(queue, 0.0) < self.inflight_alive_s / 3:
            return
        with self.conn_or_acquire() as client:
            pipe = client.pipeline()
            pipe.sadd(self._inflight_set(queue), self.consumer_id)
            pipe.set(f"{self._inflight_list(queue)}:alive", 1, ex=max(1, int(self.inflight_alive_s)))
            pipe.execute()
        self._alive_at[queue] = now

    def reap_inflight(self) -> int:
        """Put back what dead consumers of our queues had popped but not recorded (throttled)."""
        now = time.monotonic()
        if now - self._reaped_at < max(1.0, self.inflight_alive_s / 3):
            return 0
        self._reaped_at = now
        moved = 0
        with self.conn_or_acquire() as client:
            for queue in set(self.active_queues):
                moved += int(client.eval(_REAP, 1, self._inflight_set(queue),
                                         f"{INFLIGHT_PREFIX}:{queue}", self._q_for_pri(queue, 0)))
        if moved:
            kombu_redis.logger.warning("Restored %d message(s) popped by consumers that died", moved)
        return moved

    def defers_acks(self) -> bool:
        """True on the thread of the event loop this channel's transport is registered with."""
        loop = getattr(self.connection, "ack_loop", None)
        return loop is not None and threading.get_ident() == getattr(loop, "_loop_thread", None)

    def close(self) -> None:
        if not self.closed and self._qos is not None:
            self._qos.flush_acks()
        # a clean close: our in-flight lists are empty (every pop was recorded); stop counting us
        if not self.closed:
            try:
                with self.conn_or_acquire() as client:
                    for queue in list(self._alive_at):
                        client.delete(f"{self._inflight_list(queue)}:alive")
            except Exception as exc:  # noqa: BLE001 - closing on a dead connection: the TTL ends it
                kombu_redis.logger.debug("in-flight heartbeat not removed at close: %r", exc)
        super().close()


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the crash-safe Channel above."""

    Channel = Channel
    ack_loop: Any = None  # the event loop whose thread defers acks (QoS.ack)

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)
        self.ack_loop = loop
        loop.on_tick.add(self.flush_acks)  # each turn, before the loop waits

    def flush_acks(self) -> None:
        for channel in list(getattr(self, "channels", None) or ()):
            if channel._qos is not None:
                channel._qos.flush_acks()
