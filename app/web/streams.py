"""SSE relay of a run's events, as raw ASGI: the lean hot path (notes/stack.md).

Per event the work is a dict lookup and one write: events arrive from the process's single
`EventHub` reader already serialised, and are framed by `sse.encode_event`. Another wire
format over the same runs (OpenAI's chunks on /v1, web/openai_compat.py) passes its own
`Framing`; everything else here (replay, keep-alives, the drain's own `end`, a client that
leaves) is the same for both.

    stream ─┬─ relay: replay (XRANGE after Last-Event-ID), then live events from the hub,
            │         keep-alive comments when idle; at the drain deadline, an `end` of
            │         our own if the agent has not sent one (never a second one)
            └─ watch_disconnect: the client left → cancel the relay (and the run, if asked)
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog
import trio

from app import metrics
from app.db import runs as q
from app.db.pool import DatabaseError
from app.events import CONTROL_STREAM, Event, EventHub, Subscription, id_key, read_after
from app.redis import RedisUnavailable
from app.web.server import RawBody
from app.web.sse import KEEPALIVE, encode_event

if TYPE_CHECKING:
    from app.web.app import WebState

log = structlog.get_logger("web")
T = TypeVar("T")

KEEPALIVE_S = 10.0
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
               (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class Framing(Protocol):
    """How a stream's bytes are written: its opening, each run event, and its closing."""

    def start(self, run_id: str, session_id: str, status: str) -> bytes: ...

    def event(self, event_id: str | None, event_type: str, data_json: str) -> bytes: ...

    def close(self) -> bytes: ...


class RunEvents:
    """The /api framing (API.md, Run events): a `run` event first, then the events as stored."""

    def start(self, run_id: str, session_id: str, status: str) -> bytes:
        run_event = json.dumps({"type": "run", "run_id": run_id, "session_id": session_id,
                                "status": status})
        return encode_event(None, "run", run_event)

    # The hot path: the encoder itself, no wrapper call per event.
    event = staticmethod(encode_event)

    def close(self) -> bytes:
        return b""


RUN_EVENTS = RunEvents()


async def unless_client_leaves(receive: Receive, work: Callable[[], Awaitable[T]]
                               ) -> tuple[bool, T | None]:
    """Run ``work`` while watching the request: (True, None) when the client left first
    (``work`` is then cancelled), else (False, its result)."""
    result: T | None = None
    left = False
    async with trio.open_nursery() as nursery:

        async def watch_disconnect() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            left = True
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_disconnect)
        result = await work()
        nursery.cancel_scope.cancel()
    return left, (None if left else result)


async def request_cancel(state: WebState, run_id: str) -> None:
    """Ask whichever agent holds the run to stop (or end it here if it is still queued)."""
    from app.web.api import cancel_queued

    if not await cancel_queued(state, run_id):
        await state.redis.xadd(CONTROL_STREAM, {"run_id": run_id}, trim_strategy=None)


class AsgiBody:
    """The body through the ASGI server's `send`: any server, any HTTP version."""

    __slots__ = ("_send", "ended", "written_at")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.ended = False
        self.written_at = trio.current_time()

    async def write(self, body: bytes) -> None:
        if body:
            self.written_at = trio.current_time()
            await self._send({"type": "http.response.body", "body": body, "more_body": True})

    async def finish(self, body: bytes) -> None:
        await self._send({"type": "http.response.body", "body": body, "more_body": False})
        self.ended = True


class Body(Protocol):
    """Where a stream's bytes go: `RawBody` (web/server.py) when it can, else `AsgiBody`.

    `ended` turns true once the last write is out: the server then reports the request as
    over (`http.disconnect`), which must not pass for a client that left early.
    `written_at` is when the last write began (trio's clock): keep-alives count from it."""

    ended: bool
    written_at: float

    async def write(self, body: bytes) -> None: ...

    async def finish(self, body: bytes) -> None: ...


async def stream(state: WebState, scope: MutableMapping[str, Any], receive: Receive, send: Send,
                 *, run_id: str, session_id: str, status: str, last_id: str | None,
                 on_disconnect: str, extra_headers: list[tuple[bytes, bytes]] | None = None,
                 framing: Framing = RUN_EVENTS) -> None:
    hub: EventHub = state.hub
    await send({"type": "http.response.start", "status": 200,
                "headers": [*SSE_HEADERS, *(extra_headers or [])]})
    body: Body = RawBody.of(scope, send) or AsgiBody(send)
    await body.write(framing.start(run_id, session_id, status))
    state.open_streams += 1
    metrics.open_streams.inc()
    left = False
    try:
        left, _ = await unless_client_leaves(
            receive, partial(_relay, state, hub, body, framing, run_id, last_id))
    finally:
        ended = body.ended
        state.open_streams -= 1
        metrics.open_streams.dec()
        if left and not ended:
            log.info("stream_client_left", run_id=run_id, on_disconnect=on_disconnect)
            if on_disconnect == "cancel":
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 2):
                    await request_cancel(state, run_id)
    if not left and not ended:
        # The chunked terminator, then hypercorn closes (or keeps) the connection cleanly.
        await body.finish(framing.close())


async def _relay(state: WebState, hub: EventHub, body: Body, framing: Framing, run_id: str,
                 last_id: str | None) -> bool:
    """Send events until `end`; return True when an `end` was sent."""
    sub = hub.subscribe(run_id, last_id or "0-0")
    sent = last_id or "0-0"  # the last event id this task has sent
    try:
        replay = await read_after(state.redis, run_id, last_id, count=100_000)
        if replay:
            sent = replay[-1].id
            # Only forward: the hub may already have dispatched past it, and moving its
            # position back would make it dispatch those events to us a second time.
            sub.last_id = max(sub.last_id, sent, key=id_key)
            if await _send_events(state, body, framing, replay):
                return True
        if isinstance(body, RawBody):
            sub.direct = partial(_write_from_hub, sub, body, framing)
        life = state.life
        while True:
            # Events the hub wrote itself count as activity: a keep-alive only after
            # KEEPALIVE_S of silence.
            wake_at = body.written_at + KEEPALIVE_S
            if life.draining.is_set():
                wake_at = min(wake_at, state.stream_cutoff())
            batch: list[Event] | None = None
            # Only the wait is bounded: a write cancelled halfway would cut a chunk short.
            with trio.move_on_at(wake_at):
                batch = await sub.get()
            if batch is not None:
                if batch and id_key(batch[0].id) <= id_key(sent):  # [] = a wake-up
                    # Queued by the hub while the replay above was reading and sending the
                    # same events: send each event once.
                    batch = [e for e in batch if id_key(e.id) > id_key(sent)]
                if batch:
                    sent = batch[-1].id
                    if await _send_events(state, body, framing, batch):
                        return True
                else:
                    await body.write(b"")  # what the hub's write left behind, if anything
                continue
            now = trio.current_time()
            if life.draining.is_set() and now >= state.stream_cutoff():
                await _send_own_end(state, body, framing, run_id)
                return True
            if sub.queued or now < body.written_at + KEEPALIVE_S:
                continue
            # Silent for a keep-alive, and everything dispatched is written.
            sent = max(sent, sub.last_id, key=id_key)
            ending = await _ending_of_final_run(state, framing, run_id, sent)
            if ending is not None:
                await body.finish(ending)
                return True
            await body.write(KEEPALIVE)
    finally:
        sub.close()


def _write_from_hub(sub: Subscription, body: RawBody, framing: Framing, events: list[Event]
                    ) -> bool:
    """`Subscription.direct` for a live stream: the hub's task writes the batch itself,
    unless it holds the `end` (the stream's task finishes the body and counts it) or the
    socket is busy. False leaves the batch to the stream's task."""
    if events[-1].type == "end":
        return False
    encode = framing.event
    if not body.try_write(b"".join([encode(e.id, e.type, e.data) for e in events])):
        return False
    if body.pending:
        sub.wake()  # the socket took part of it: the stream's task waits to write the rest
    return True


async def _send_events(state: WebState, body: Body, framing: Framing, events: list[Event]
                       ) -> bool:
    """Write events in one write (the hub hands over what arrived together); the `end`, if
    there, with the chunked terminator. True when the stream has ended."""
    encode = framing.event
    pieces = []
    for event in events:
        pieces.append(encode(event.id, event.type, event.data))
        if event.type == "end":
            pieces.append(framing.close())
            # The `end` and the chunked terminator in one write: a stream is never left
            # with its `end` but without a clean end of body (a process killed between two
            # writes). Nothing is stored after an `end`.
            state.count_end(str(event.payload().get("reason")))
            await body.finish(b"".join(pieces))
            return True
    await body.write(b"".join(pieces))
    return False


async def _ending_of_final_run(state: WebState, framing: Framing, run_id: str, sent: str
                               ) -> bytes | None:
    """For a stream idle for a keep-alive: the bytes that end it if its run is final in
    PostgreSQL although no `end` came (Redis lost it, or was away when the run ended): what
    Redis holds after ``sent`` up to its `end`, if it turns up, else an `end` made from
    what is stored. None while the run goes on, or when that cannot be told now."""
    try:
        run = await state.db.run(partial(q.run_status, run_id=run_id))
        if run is None or run["status"] not in q.FINAL:
            return None
        rest = await read_after(state.redis, run_id, sent)
    except (DatabaseError, RedisUnavailable) as e:
        log.warning("stream_end_check_failed", run_id=run_id, error=str(e))
        return None
    pieces = []
    for event in rest:
        pieces.append(framing.event(event.id, event.type, event.data))
        if event.type == "end":
            state.count_end(str(event.payload().get("reason")))
            return b"".join(pieces) + framing.close()
    reason = run["reason"] or "error"
    end = {"type": "end", "run_id": run_id, "reason": reason, "message_id": run["message_id"],
           "resumable": reason == "server_shutdown"}
    end.update({k: run[k] for k in ("detail", "fallback") if run[k]})
    log.warning("stream_ended_from_database", run_id=run_id, reason=reason)
    state.count_end(reason)
    return b"".join(pieces) + framing.event(None, "end", json.dumps(end)) + framing.close()


async def _send_own_end(state: WebState, body: Body, framing: Framing, run_id: str) -> None:
    """The agent could not end this stream in time (queued run, or agent gone): we do.

    Not written to the run's stream: a queued run continues after the restart, and its
    stream must then end once, with its real end.
    """
    data = json.dumps({
        "type": "end", "run_id": run_id, "reason": "server_shutdown", "message_id": None,
        "resumable": True,
        "detail": ("agentd is shutting down; this run is kept and continues after the restart. "
                   f"Follow it with GET /api/runs/{run_id}/events and Last-Event-ID."),
    })
    state.count_end("server_shutdown")
    await body.finish(framing.event(None, "end", data) + framing.close())
