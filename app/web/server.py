"""Serving HTTP with hypercorn's protocol code, but with our own listener and lifetimes.

`hypercorn.trio.serve` ties two things together that the drain must keep apart: when its
shutdown trigger fires it stops accepting *and* marks itself terminated, after which every
kept-alive connection is closed after its next response. API.md wants the listener closed
at once but a request on a connection opened before SIGTERM answered (503 for new work,
`/ready` draining). So this module runs hypercorn's per-connection `TCPServer` itself:

    lifespan (Quart's startup/shutdown)
    └── connections nursery                  lives until the drain is over
        └── accepting nursery                lives until the drain starts
            └── serve_listeners(listener)    closing it closes the listening socket

At the drain the accepting nursery is cancelled: `serve_listeners` leaves the listener's
`async with`, which closes our copy of the socket (the supervisor and the other web
processes close theirs). Connections carry on until nothing is in flight (an idle
keep-alive connection does not count) or the deadline, then they are cancelled.

Two changes to hypercorn's per-connection code, both in `Connection`:

- hypercorn writes each piece of a response in a shielded scope (a write cancelled halfway
  would corrupt the connection). A client that stopped reading then holds the process
  forever: its socket buffer is full and the shielded write never returns. Ours are
  shielded too, but `abort` cancels them when the drain is over, and the connection closes.
- an SSE body is many small writes, and hypercorn's path for each one (the ASGI message, its
  protocol events, h11's framing, a lock, the shielded write) costs more CPU than the rest
  of the relay (notes/stack.md). `RawBody` frames the chunks itself and writes them to the
  socket directly: one `os.write` per write, and no checkpoint unless the socket is full.
"""

from __future__ import annotations

import os
import socket
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.events import Closed, RawData
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, MutableMapping

    from hypercorn.config import Config
    from hypercorn.events import Event

    from app.web.app import WebState

#: Once idle, how long connections may still finish writing (e.g. a final chunk).
CLOSE_GRACE_S = 0.2
#: The end of a chunked body, as h11 writes it for a response without trailers.
TERMINATOR = b"0\r\n\r\n"
EXTENSION = "agentd.connection"


class Connection(TCPServer):
    """hypercorn's connection handler, with writes that can be aborted and a raw body path.

    It puts itself in each request's ``scope["extensions"]``, so that a streaming response
    can write its body through `RawBody`, and is in ``open_connections`` while it runs, so
    that the server can `abort` it when the drain is over.
    """

    def __init__(self, app: Any, config: Config, context: WorkerContext, state: Any,
                 stream: Any, *, open_connections: set[Connection]) -> None:
        super().__init__(partial(_with_connection, app, self), config, context, state, stream)
        self._open = open_connections
        self._write_scope: trio.CancelScope | None = None
        self.terminator_written = False

    async def run(self) -> None:
        self._open.add(self)
        try:
            await super().run()
        finally:
            self._open.discard(self)

    async def protocol_send(self, event: Event) -> None:
        if not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        if self.terminator_written and event.data == TERMINATOR:
            self.terminator_written = False  # RawBody.finish wrote it with the last event
            return
        failed = False
        async with self.send_lock:
            with trio.CancelScope(shield=True) as self._write_scope:
                try:
                    await self.stream.send_all(event.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    failed = True
            failed = failed or self._write_scope.cancelled_caught
            self._write_scope = None
        if failed:
            await self.protocol.handle(Closed())

    def abort(self) -> None:
        """Give up on a write the client is not reading: the drain is over."""
        if self._write_scope is not None:
            self._write_scope.cancel()


class RawBody:
    """A chunked response body written straight to the connection's socket.

    For HTTP/1.1 responses on a plain TCP connection, once hypercorn has sent the headers
    (h11 chose chunked framing: no content-length). `finish` writes the last piece and the
    chunked terminator in one write, then tells hypercorn the body is over, which ends the
    request for h11 (and `Connection` drops the terminator h11 writes again).

    `try_write` writes without waiting, from any task (the event hub's, for a live stream):
    what the socket does not take at once is kept, and the next `write` sends it first.
    A write cancelled halfway leaves a chunk cut short: that happens only when the client
    left or the drain is over, and the connection is then closed, never reused. A client
    that went away makes writes no-ops; its disconnect arrives on the read side.
    """

    __slots__ = ("_connection", "_fd", "_send", "_pending", "_waiting", "ended", "finishing",
                 "written_at")

    def __init__(self, connection: Connection, send: Callable[[MutableMapping[str, Any]],
                                                              Awaitable[None]]) -> None:
        self._connection = connection
        self._fd = connection.stream.socket.fileno()
        self._send = send
        self._pending = b""  # what try_write could not write at once
        self._waiting = False  # a write is waiting for the socket
        self.ended = False
        self.finishing = False
        self.written_at = trio.current_time()

    @staticmethod
    def of(scope: MutableMapping[str, Any], send: Callable[[MutableMapping[str, Any]],
                                                           Awaitable[None]]) -> RawBody | None:
        """The raw path for this request, when it can take it."""
        connection = (scope.get("extensions") or {}).get(EXTENSION)
        if (connection is None or scope.get("http_version") != "1.1"
                or scope.get("method") == "HEAD"
                or not isinstance(connection.stream, trio.SocketStream)):
            return None
        return RawBody(connection, send)

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def try_write(self, body: bytes) -> bool:
        """Write now, without waiting: True once the bytes are the connection's (written, or
        kept for the next `write`); False, nothing done, while another write is under way."""
        if self._pending or self._waiting or self.finishing or self.ended:
            return False
        if not body:
            return True
        data = _chunk(body)
        self._pending = data[self._write_now(data):]
        self.written_at = trio.current_time()
        return True

    async def write(self, body: bytes) -> None:
        """Write, waiting for the socket if it is full; with an empty `body`, just send what
        `try_write` kept."""
        await self._write(_chunk(body) if body else b"")

    async def finish(self, body: bytes) -> None:
        self.finishing = True
        await self._write((_chunk(body) if body else b"") + TERMINATOR)
        self.ended = True
        self._connection.terminator_written = True
        try:
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._connection.terminator_written = False  # never carried to another response

    async def _write(self, data: bytes) -> None:
        data, self._pending = self._pending + data, b""
        if not data:
            return
        self.written_at = trio.current_time()
        if not self._connection.send_lock.locked():
            data = data[self._write_now(data):]
            if not data:
                return
        # The socket is full (a slow reader): wait for it, cancellably, like any write.
        self._waiting = True
        try:
            async with self._connection.send_lock:
                await self._connection.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        finally:
            self._waiting = False

    def _write_now(self, data: bytes) -> int:
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError:
            return len(data)  # the client went away: nothing more to write


def _chunk(body: bytes) -> bytes:
    """One piece of a chunked body: its size in hex, the bytes, CRLF after each."""
    return b"%x\r\n%b\r\n" % (len(body), body)


async def _with_connection(app: Any, connection: Connection, scope: MutableMapping[str, Any],
                           *args: Any) -> None:
    scope.setdefault("extensions", {})[EXTENSION] = connection
    await app(scope, *args)


async def serve_http(app: Any, config: Config, fd: int, state: WebState,
                     *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    life = state.life
    wrapped = wrap_app(app, config.wsgi_max_body_size, None)
    lifespan = Lifespan(wrapped, config, {})
    context = WorkerContext(None)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    open_connections: set[Connection] = set()
    handler = partial(Connection, wrapped, config, context, ConnectionState({}),
                      open_connections=open_connections)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(partial(trio.serve_listeners, handler, [listener],
                                             handler_nursery=connections))
                task_status.started()
                await life.draining.wait()
                accepting.cancel_scope.cancel()
            with trio.move_on_at(state.close_connections_at()):
                await state.idle_or_deadline()
            # From now on hypercorn closes each connection after its response.
            await context.terminated.set()
            with trio.move_on_at(min(trio.current_time() + CLOSE_GRACE_S, life.deadline)):
                await state.idle_or_deadline()
            for connection in list(open_connections):
                connection.abort()
            connections.cancel_scope.cancel()
        with trio.move_on_at(min(trio.current_time() + 1, life.deadline)):
            await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
