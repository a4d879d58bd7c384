"""Run events in Redis streams: the agent appends, any web process reads, by event id.

One stream per run, ``agentd:run:<run_id>``; each entry has two fields: ``t`` (the event
type) and ``d`` (its JSON data, already serialised: web relays it without parsing). Stream
ids (``<ms>-<seq>``) are the SSE event ids: they sort in event order, so a client resumes
with ``Last-Event-ID`` by reading after it (API.md, Resume).

The hot path is batched at both ends (notes/stack.md): `EventWriter` buffers appends and
flushes them in one call every few milliseconds (an ``end`` flushes at once), and
`EventHub` runs one reader task per web process that multiplexes every open stream over a
single multi-key XREAD. Neither gives up when Redis goes away: the writer keeps what it
could not write and retries, the hub reads again from where each stream was.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import trio
from coredis.exceptions import RedisError

from app.redis import RedisUnavailable, mapped_errors

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from app.redis import RedisClient

log = structlog.get_logger("events")

FLUSH_INTERVAL = 0.05
#: Events written in one call at most (after an outage the buffer can be long).
MAX_BATCH = 10_000
#: Events buffered while Redis is away before the writer asks for the producers to stop:
#: at ~250 bytes each, ~25 MB; 10 s of 10,000 tokens/s.
MAX_BUFFERED = 100_000
#: Backoff between attempts to write while Redis is away.
RETRY_MIN, RETRY_MAX = 0.05, 1.0
BLOCK_MS = 100
TERMINAL = "end"
CONTROL_STREAM = "agentd:control"


#: One round trip per flush: XADD each event (KEYS[1..n], ARGV pairs after the first two),
#: then EXPIRE the streams of runs that ended (the remaining KEYS). Cheaper per event than a
#: pipeline of XADD commands through the client's command layer (bench/stream.py).
APPEND_SCRIPT = """
local n = tonumber(ARGV[1])
local ids = {}
for i = 1, n do
  ids[i] = redis.call('XADD', KEYS[i], '*', 't', ARGV[2 * i + 1], 'd', ARGV[2 * i + 2])
end
for i = n + 1, #KEYS do
  redis.call('EXPIRE', KEYS[i], tonumber(ARGV[2]))
end
return ids
"""


def stream_key(run_id: str) -> str:
    return f"agentd:run:{run_id}"


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: str
    data: str  # JSON

    def payload(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.data)
        return parsed


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def to_events(entries: Sequence[Any]) -> list[Event]:
    out = []
    for entry in entries:
        fields = entry.field_values
        t = fields.get(b"t", fields.get("t"))
        d = fields.get(b"d", fields.get("d"))
        out.append(Event(_decode(entry.identifier), _decode(t), _decode(d)))
    return out


def encode(event_type: str, run_id: str, **data: Any) -> str:
    return json.dumps({"type": event_type, "run_id": run_id, **data}, separators=(",", ":"))


def encode_token(run_id: str, content: str) -> str:
    """``encode("token", run_id, content=content)``, the same bytes, a third of the CPU: the
    hot path's one event. (`json.dumps` with `separators` builds an encoder per call; a bare
    string takes the C fast path.)"""
    return f'{{"type":"token","run_id":{json.dumps(run_id)},"content":{json.dumps(content)}}}'


class _Waiter:
    """An `append_now` caller: where its events sit in the writer's sequence, their ids once
    written."""

    __slots__ = ("first", "ids")

    def __init__(self, first: int, count: int) -> None:
        self.first = first
        self.ids = [""] * count

    @property
    def end(self) -> int:
        return self.first + len(self.ids)


class EventWriter:
    """Batched XADDs. `append` never waits for Redis; a background task (`serve`) writes what
    is buffered every `FLUSH_INTERVAL`, in one call.

    `append_now` / `append_now_many` write at once and return the ids, for events whose
    durability a caller waits on (``end``). Callers that wait together share one write.

    While Redis is away nothing is dropped: a batch that could not be written goes back to
    the front of the buffer, in order, and is retried with backoff (one log line when the
    outage begins, one when it ends). A caller of `append_now` bounds its wait with its own
    deadline; its events stay buffered and go out when Redis is back. The buffer is bounded
    by `max_buffered`: past it, each failed write calls `on_backlog`, whose owner stops the
    producers (the agent ends its runs), since tokens can be neither dropped nor kept forever.
    """

    def __init__(self, redis: RedisClient, ttl: float, *,
                 max_buffered: int = MAX_BUFFERED) -> None:
        self._redis = redis
        self._ttl = max(1, math.ceil(ttl))
        self._buffer: list[tuple[str, str, str]] = []
        #: Events are numbered in the order they were appended (a waiter knows its own by
        #: number): `_written` were written, the next `_in_flight` are being written, then
        #: come those in `_buffer`.
        self._written = 0
        self._in_flight = 0
        self._expire: set[str] = set()
        self._waiters: list[_Waiter] = []
        self._wake = trio.Event()
        self._lock = trio.Lock()
        self._append = redis.register_script(APPEND_SCRIPT)
        self.max_buffered = max_buffered
        self.on_backlog: Callable[[], None] | None = None
        #: trio times: since when writes have failed (None: they do not), and since when
        #: they have succeeded again.
        self.down_since: float | None = None
        self.up_since = -math.inf

    def append(self, run_id: str, event_type: str, data_json: str) -> None:
        self._buffer.append((run_id, event_type, data_json))
        self._wake.set()

    async def append_now(self, run_id: str, event_type: str, data_json: str,
                         *, expire: bool = False) -> str:
        """Write every buffered event, then this one; return its id."""
        return (await self.append_now_many([(run_id, event_type, data_json)], expire=expire))[0]

    async def append_now_many(self, events: Sequence[tuple[str, str, str]], *,
                              expire: bool = False) -> list[str]:
        """Write every buffered event, then these (``(run_id, type, data_json)``), in one
        call when they fit in one; return their ids. ``expire``: their runs' streams get
        the TTL (they have ended). Waits (with backoff) while Redis is away: bound it."""
        waiter = _Waiter(self._appended(), len(events))
        self._buffer.extend(events)
        self._wake.set()  # should we give up waiting, the background flush takes over
        if expire:
            self._expire.update(run_id for run_id, _, _ in events)
        self._waiters.append(waiter)
        try:
            await self._write_through(waiter.end)
        finally:
            if waiter in self._waiters:  # cancelled: its events stay buffered
                self._waiters.remove(waiter)
        return waiter.ids

    async def flush(self) -> bool:
        """One attempt to write what is buffered; False when Redis failed (it stays buffered)."""
        async with self._lock:
            return await self._flush_locked()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _appended(self) -> int:
        return self._written + self._in_flight + len(self._buffer)

    async def _write_through(self, position: int) -> None:
        """Until every event numbered below ``position`` is written, retrying with backoff."""
        delay = RETRY_MIN
        while self._written < position:
            async with self._lock:
                if self._written >= position or await self._flush_locked():
                    continue
            await trio.sleep(delay)
            delay = min(2 * delay, RETRY_MAX)

    async def _flush_locked(self) -> bool:
        """Write the buffer, oldest first; on a Redis failure keep the unwritten rest, at the
        front and in order, and return False."""
        while self._buffer:
            if len(self._buffer) <= MAX_BATCH:
                batch, self._buffer = self._buffer, []
            else:
                batch = self._buffer[:MAX_BATCH]
                del self._buffer[:MAX_BATCH]
            expire: set[str] = set()
            if not self._buffer:  # the streams to expire go with the last batch: after `end`
                expire, self._expire = self._expire, set()
            self._in_flight = len(batch)
            try:
                ids = await self._write(batch, expire)
            except BaseException as e:
                self._in_flight = 0
                # Back to the front: what was appended meanwhile stays after it. (A reply lost
                # after Redis ran the script would make these events appear twice; nothing
                # tells the two cases apart, and a gap would be no better.)
                self._buffer[:0] = batch
                self._expire |= expire
                if isinstance(e, (RedisUnavailable, RedisError)):
                    self._failed(e)
                    return False
                raise
            self._hand_out(batch, ids)
        if self.down_since is not None:
            log.info("event_append_recovered",
                     down_s=round(trio.current_time() - self.down_since, 3))
            self.down_since = None
            self.up_since = trio.current_time()
        return True

    async def _write(self, batch: list[tuple[str, str, str]], expire: set[str]) -> list[str]:
        keys = [stream_key(run_id) for run_id, _, _ in batch]
        keys += [stream_key(run_id) for run_id in expire]
        args: list[str] = [str(len(batch)), str(self._ttl)]
        for _, t, d in batch:
            args += (t, d)
        with mapped_errors():
            ids: Any = await self._append(keys=keys, args=args)
        return [_decode(i) for i in ids]

    def _hand_out(self, batch: list[tuple[str, str, str]], ids: list[str]) -> None:
        """A batch is written: give waiters the ids of their events in it."""
        first = self._written
        self._written += len(batch)
        self._in_flight = 0
        if not self._waiters:
            return
        for w in self._waiters:
            for n in range(max(w.first, first), min(w.end, self._written)):
                w.ids[n - w.first] = ids[n - first]
        self._waiters = [w for w in self._waiters if w.end > self._written]

    def _failed(self, error: Exception) -> None:
        if self.down_since is None:
            self.down_since = trio.current_time()
            log.warning("event_append_failed", error=str(error), buffered=len(self._buffer),
                        detail="events are kept and written once Redis is back")
        if len(self._buffer) >= self.max_buffered and self.on_backlog is not None:
            self.on_backlog()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                await trio.sleep(FLUSH_INTERVAL)
                await self._write_through(self._appended())
        finally:
            # Whatever is still buffered is part of a stream a client reads: write it.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 2):
                await self._write_through(self._appended())


async def read_after(redis: RedisClient, run_id: str, after: str | None,
                     count: int = 1000) -> list[Event]:
    """Events of a run after ``after`` (exclusive), or from the start; `RedisUnavailable`
    when Redis cannot be reached."""
    start = "-" if not after else f"({after}"
    with mapped_errors():
        entries = await redis.xrange(stream_key(run_id), start, "+", count=count)
    return to_events(entries)


class Subscription:
    """One open stream's view of the hub: batches of events arrive on `get`.

    A live stream may set `direct`: the hub then hands it each batch first, from the hub's
    own task, and only what it declines (returns False) goes to the channel. That saves a
    task switch per event for every open stream (web/streams.py). Order is kept: while a
    batch waits in the channel, later ones wait behind it.
    """

    def __init__(self, hub: EventHub, run_id: str, last_id: str) -> None:
        self.hub = hub
        self.run_id = run_id
        self.last_id = last_id
        self.direct: Callable[[list[Event]], bool] | None = None
        self.queued = 0  # batches in the channel, not yet taken by `get`
        self._send, self._receive = trio.open_memory_channel[list[Event]](math.inf)

    def put(self, events: list[Event]) -> None:
        if not self.queued and self.direct is not None:
            try:
                if self.direct(events):
                    return
            except Exception:  # noqa: BLE001 - the stream's own task meets it again, alone
                self.direct = None
        self.wake(events)

    def wake(self, events: list[Event] | None = None) -> None:
        """Queue a batch for `get`; an empty one just wakes the stream's task."""
        self.queued += 1
        self._send.send_nowait(events or [])

    async def get(self) -> list[Event]:
        batch = await self._receive.receive()
        self.queued -= 1
        return batch

    def close(self) -> None:
        self.direct = None
        self.hub._unsubscribe(self)


class EventHub:
    """One reader task per web process; every open stream subscribes to its run's key."""

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis
        self._subs: dict[str, list[Subscription]] = {}
        self._idle_scope: trio.CancelScope | None = None

    def subscribe(self, run_id: str, last_id: str) -> Subscription:
        sub = Subscription(self, run_id, last_id or "0-0")
        self._subs.setdefault(run_id, []).append(sub)
        self._wake_reader()
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.run_id, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            self._subs.pop(sub.run_id, None)
        sub._send.close()

    def wake_all(self) -> None:
        """Hand every subscriber an empty batch, so that a stream waiting for its next event
        (or its keep-alive, up to 10 s away) looks again now: the drain has begun and its
        deadline to end on its own is sooner than that."""
        for subs in self._subs.values():
            for sub in subs:
                sub.wake()

    def _wake_reader(self) -> None:
        # Only an idle reader (no streams at all) is woken. A blocking XREAD is never
        # cancelled to change its key set: coredis loses a pooled connection when a command
        # is cancelled while it connects, and after enough of those every Redis call of the
        # process waits forever. XREAD blocks for at most BLOCK_MS instead, and the next one
        # carries the new key; the new stream's replay (XRANGE) covers what came before.
        if self._idle_scope is not None:
            self._idle_scope.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        task_status.started()
        while True:
            if not self._subs:
                with trio.CancelScope() as self._idle_scope:
                    await trio.sleep_forever()
                self._idle_scope = None
                continue
            positions = {stream_key(run_id): min((s.last_id for s in subs), key=id_key)
                         for run_id, subs in self._subs.items()}
            try:
                reply = await self._redis.xread(positions, count=500, block=BLOCK_MS)
            except Exception as e:  # noqa: BLE001 - Redis down: log, back off, retry
                log.warning("event_read_failed", error=str(e))
                await trio.sleep(0.5)
                continue
            if reply:
                self._dispatch(reply)

    def _dispatch(self, reply: dict[Any, Any]) -> None:
        for key, entries in reply.items():
            run_id = _decode(key).rpartition(":")[2]
            events = to_events(entries)
            for sub in list(self._subs.get(run_id, ())):
                fresh = [e for e in events if id_key(e.id) > id_key(sub.last_id)]
                if fresh:
                    sub.last_id = fresh[-1].id
                    sub.put(fresh)


def id_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)
