"""A small HTTP/1.1 client over a unix socket: how EmbeddingClient reaches the service.

Why not httpx here: its connection pool (httpcore 1.0) walks every connection, for every
connection, each time a request starts or ends, so its cost grows with the square of the
connections in use. With 64 requests at once (bench/embed.py: a web process's concurrent
searches look the same) one httpx client cost 2 ms of CPU per request with its default 20
connections kept alive (the rest reconnect each time) and 10 ms with all 64 kept alive; 8
clients of 8 connections 1.3 ms. This one — h11 over a trio socket, idle connections on a
stack — costs 0.3 ms, and the requests reach the service's batcher close enough together
to be encoded in one batch.

It knows just what this internal API needs: one request at a time per connection, bodies
with a Content-Length, keep-alive. An idle connection the service has closed (hypercorn
closes them after 5 s idle, or after 1,000 requests) is noticed before use, and a request
that finds its reused connection dead before any byte of the answer came is retried once on
a new one: every route of the service is idempotent. A request cancelled or failed half-way
closes its connection, never returns it to the pool. Errors are raised as they come (OSError,
trio's stream errors, h11.ProtocolError): client.py maps them, once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import h11
import trio

if TYPE_CHECKING:
    from collections.abc import Sequence

READ_SIZE = 256 * 1024


class Response(NamedTuple):
    status: int
    headers: dict[str, str]  # names lower-case
    content: bytes


class _StaleConnection(Exception):
    """A reused connection was closed by the server before it answered."""


class _Connection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.requests = 0

    def looks_closed(self) -> bool:
        # An idle HTTP connection has nothing to read: readable means the server closed it.
        return self.stream.socket.is_readable()

    async def exchange(self, request: h11.Request, body: bytes) -> Response:
        self.requests += 1
        data = self.h11.send(request) or b""
        if body:
            data += self.h11.send(h11.Data(data=body)) or b""
        data += self.h11.send(h11.EndOfMessage()) or b""
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError:
            if self.requests == 1:
                raise
            raise _StaleConnection from None
        head: h11.Response | None = None
        chunks: list[bytes] = []
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self._receive(answered=head is not None))
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                headers = {name.decode().lower(): value.decode("latin-1")
                           for name, value in head.headers}
                return Response(head.status_code, headers, b"".join(chunks))
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("the service closed the connection mid-answer")

    async def _receive(self, *, answered: bool) -> bytes:
        """The next bytes of the answer; `_StaleConnection` when a reused connection turns
        out to be closed before any of the answer came."""
        try:
            received = await self.stream.receive_some(READ_SIZE)
        except trio.BrokenResourceError:
            if answered or self.requests == 1:
                raise
            raise _StaleConnection from None
        if not received and not answered and self.requests > 1:
            raise _StaleConnection
        return received

    def reusable(self) -> bool:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class UnixHTTP:
    """A pool of keep-alive HTTP/1.1 connections to one unix socket."""

    def __init__(self, path: str, *, max_connections: int = 128) -> None:
        self.path = path
        self._idle: list[_Connection] = []  # a stack: the most recently used is the warmest
        self._slots = trio.CapacityLimiter(max_connections)
        self._closed = False

    async def request(
        self, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes = b""
    ) -> Response:
        if self._closed:
            raise trio.ClosedResourceError("the connection pool is closed")
        all_headers = [("host", "embedding"), *headers]
        if body or method != "GET":
            all_headers.append(("content-length", str(len(body))))
        request = h11.Request(method=method, target=target, headers=all_headers)
        async with self._slots:
            try:
                return await self._exchange(self._take_idle() or await self._connect(),
                                            request, body)
            except _StaleConnection:
                return await self._exchange(await self._connect(), request, body)

    async def _exchange(self, conn: _Connection, request: h11.Request, body: bytes) -> Response:
        reusable = False
        try:
            response = await conn.exchange(request, body)
            reusable = conn.reusable()
            return response
        finally:
            if reusable and not self._closed:
                self._idle.append(conn)
            else:
                await conn.aclose()

    def _take_idle(self) -> _Connection | None:
        if self._idle and self._idle[-1].looks_closed():
            # The warmest was closed (the service's keep-alive timeout): so, likely, were
            # all that have been idle longer. Drop every closed one now, not one per request.
            for conn in self._idle:
                if conn.looks_closed():
                    conn.stream.socket.close()
            self._idle = [conn for conn in self._idle if conn.stream.socket.fileno() != -1]
        return self._idle.pop() if self._idle else None

    async def _connect(self) -> _Connection:
        return _Connection(await trio.open_unix_socket(self.path))

    async def aclose(self) -> None:
        """Close the idle connections; those in use close when their request ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()
