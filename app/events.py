"""Run events in Redis streams: the agent appends, any web process reads, by event id.

One stream per run, ``agentd:run:<run_id>``; each entry has two fields: ``t`` (the event
type) and ``d`` (its JSON data, already serialised: web relays it without parsing). Stream
ids (``<ms>-<seq>``) are the SSE event ids: they sort in event order, so a client resumes
with ``Last-Event-ID`` by reading after it (API.md, Resume).

The hot path is batched at both ends (notes/stack.md): `EventWriter` buffers appends and
flushes them in one pipeline every few milliseconds (an ``end`` flushes at once), and
`EventHub` runs one reader task per web process that multiplexes every open stream over a
single multi-key XREAD.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import trio

if TYPE_CHECKING:
    from collections.abc import Sequence

    from app.redis import RedisClient

log = structlog.get_logger("events")

FLUSH_INTERVAL = 0.05
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


class EventWriter:
    """Batched XADDs. `append` never waits for Redis; `flush` writes what is buffered.

    A background task (`serve`) flushes every `FLUSH_INTERVAL`. `append_now` writes at once
    and returns the event id, for events whose durability a caller waits on (``end``).
    """

    def __init__(self, redis: RedisClient, ttl: float) -> None:
        self._redis = redis
        self._ttl = max(1, math.ceil(ttl))
        self._buffer: list[tuple[str, str, str]] = []
        self._wake = trio.Event()
        self._lock = trio.Lock()
        self._append = redis.register_script(APPEND_SCRIPT)

    def append(self, run_id: str, event_type: str, data_json: str) -> None:
        self._buffer.append((run_id, event_type, data_json))
        self._wake.set()

    async def append_now(self, run_id: str, event_type: str, data_json: str,
                         *, expire: bool = False) -> str:
        """Write every buffered event, then this one; return its id."""
        # Buffer it only once we hold the lock: appended earlier, a flush already under way
        # (another run's `end`, or the background flush) could take it, leaving our own
        # flush an empty batch and no id to return.
        async with self._lock:
            self._buffer.append((run_id, event_type, data_json))
            ids = await self._flush_locked(expire_runs={run_id} if expire else set())
        return ids[-1]

    async def flush(self, expire_runs: set[str] | None = None) -> list[str]:
        async with self._lock:
            return await self._flush_locked(expire_runs)

    async def _flush_locked(self, expire_runs: set[str] | None) -> list[str]:
        batch, self._buffer = self._buffer, []
        if not batch:
            return []
        keys = [stream_key(run_id) for run_id, _, _ in batch]
        keys += [stream_key(run_id) for run_id in expire_runs or ()]
        args: list[str] = [str(len(batch)), str(self._ttl)]
        for _, t, d in batch:
            args += (t, d)
        ids: Any = await self._append(keys=keys, args=args)
        return [_decode(i) for i in ids]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                await trio.sleep(FLUSH_INTERVAL)
                await self.flush()
        finally:
            # Whatever is still buffered is part of a stream a client reads: write it.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 2):
                await self.flush()


async def read_after(redis: RedisClient, run_id: str, after: str | None,
                     count: int = 1000) -> list[Event]:
    """Events of a run after ``after`` (exclusive), or from the start."""
    start = "-" if not after else f"({after}"
    return to_events(await redis.xrange(stream_key(run_id), start, "+", count=count))


class Subscription:
    """One open stream's view of the hub: events arrive on `receive`."""

    def __init__(self, hub: EventHub, run_id: str, last_id: str) -> None:
        self.hub = hub
        self.run_id = run_id
        self.last_id = last_id
        self.send, self.receive = trio.open_memory_channel[list[Event]](math.inf)

    def close(self) -> None:
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
        sub.send.close()

    def wake_all(self) -> None:
        """Hand every subscriber an empty batch, so that a stream waiting for its next event
        (or its keep-alive, up to 10 s away) looks again now: the drain has begun and its
        deadline to end on its own is sooner than that."""
        for subs in self._subs.values():
            for sub in subs:
                sub.send.send_nowait([])

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
                    sub.send.send_nowait(fresh)


def id_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)
