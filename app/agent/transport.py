"""A lean HTTP/1.1 transport for the LLM client: httpx2's interface without its per-read cost.

An LLM stream arrives as one TCP segment per token, and httpx2's default transport spent on
each more CPU than the rest of the agent's per-token work together (httpcore2's `fail_after`
per read, h11's event machinery, the context managers in trio's `SocketStream.receive_some`:
bench/stream.py under py-spy). This transport keeps httpx2's API, so the openai client above
it keeps its auth, base URLs, error types and status errors, and per received segment does
one wait for readability, one ``recv`` and a slice or two of chunked framing.

What it does not do it leaves to httpx2: proxies in the environment make `llm_transport`
return None (httpx2's default transport then honours them), and a URL that is neither http
nor https goes to a default transport made for it. It speaks HTTP/1.1 only, over TCP or TLS
(`trio.SSLStream` with httpx2's default SSL context, ALPN offering only http/1.1).

Timeouts are httpx2's (connect, write, pool, read) except one: reads of a 2xx body have no
deadline of their own. A deadline per read is a cancel scope per token, and the consumer of
those bodies, app/agent/llm.py, bounds the whole stream with a single stall scope that its
chunks push on. The body of an error status, which openai reads whole before it raises, is
read under the read timeout, like the head.

A connection is reused only after a body read to its exact end; a body closed early (a
cancelled run, a client that left) closes its connection at once, so the upstream sees the
disconnect and stops generating. Failures are httpx2's transport errors, which openai maps
to APIConnectionError and llm.py retries.
"""

from __future__ import annotations

import math
import select
import socket
import ssl
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx2 as httpx
import trio

if TYPE_CHECKING:
    from collections.abc import Iterator

RECEIVE_SIZE = 65536
MAX_HEAD = 64 * 1024
MAX_CHUNK_LINE = 4096
DEFAULT_PORTS = {b"http": 80, b"https": 443}
CHUNKED = -1  # `Head.length` of a chunked body
UNTIL_CLOSE = -2  # `Head.length` of a body that ends with the connection

Origin = tuple[bytes, bytes, int]


def llm_transport(limits: httpx.Limits) -> LLMTransport | None:
    """The LLM client's transport, or None (httpx2's default) when a proxy is configured."""
    proxies = urllib.request.getproxies()
    if any(proxies.get(scheme) for scheme in ("http", "https", "all")):
        return None
    return LLMTransport(limits)


# HTTP/1.1 framing: pure functions and decoders, no I/O --------------------------------------


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    reason: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    length: int  # bytes of body, or CHUNKED, or UNTIL_CLOSE
    keep_alive: bool


def encode_head(method: str, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (method.encode("ascii"), target)]
    lines += [b"%s: %s" % field for field in headers]
    if any(b"\r" in line or b"\n" in line for line in lines):
        raise httpx.LocalProtocolError("a line break in the request's target or a header")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def head_end(buffer: bytes) -> tuple[int, int] | None:
    """Where the head in `buffer` ends and its body starts, once it has all arrived."""
    crlf, lf = buffer.find(b"\r\n\r\n"), buffer.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, crlf + 4
    return (lf, lf + 2) if lf >= 0 else None


def parse_head(data: bytes, method: str) -> Head:
    """A response's status line and fields, and how its body is framed (RFC 9112, 6.3)."""
    status_line, *lines = data.split(b"\n")
    version, _, rest = status_line.rstrip(b"\r").partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise httpx.RemoteProtocolError(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
    headers = []
    for line in lines:
        name, colon, value = line.rstrip(b"\r").partition(b":")
        if not colon or not name or name != name.strip() or line[:1] in b" \t":
            raise httpx.RemoteProtocolError(f"malformed response header: {line[:80]!r}")
        headers.append((name, value.strip(b" \t")))
    status = int(code)
    length = _body_length(status, method, headers)
    tokens = b",".join(v for k, v in headers if k.lower() == b"connection").lower()
    keep_alive = (version == b"HTTP/1.1" and b"close" not in tokens.replace(b" ", b"").split(b",")
                  and length != UNTIL_CLOSE)
    return Head(status, reason, version, headers, length, keep_alive)


def _body_length(status: int, method: str, headers: list[tuple[bytes, bytes]]) -> int:
    if method == "HEAD" or status < 200 or status in (204, 304):
        return 0
    codings = b",".join(v for k, v in headers if k.lower() == b"transfer-encoding")
    if codings:
        if [c.strip() for c in codings.lower().split(b",")] != [b"chunked"]:
            raise httpx.RemoteProtocolError(f"unsupported transfer-encoding {codings!r}")
        return CHUNKED
    lengths = {v for k, v in headers if k.lower() == b"content-length"}
    if not lengths:
        return UNTIL_CLOSE
    value = lengths.pop()
    if lengths or not value.isdigit():
        raise httpx.RemoteProtocolError("bad content-length")
    return int(value)


class Decoder:
    """A body of known length: `feed` returns its data; `extra` marks bytes past its end."""

    def __init__(self, length: int) -> None:
        self.left = length
        self.done = length == 0
        self.extra = False

    def feed(self, data: bytes) -> bytes:
        if len(data) <= self.left:
            self.left -= len(data)
            self.done = not self.left
            return data
        self.extra = True
        piece, self.left, self.done = data[:self.left], 0, True
        return piece

    def eof(self) -> None:
        raise httpx.RemoteProtocolError("peer closed connection without sending complete "
                                        "message body")


class UntilClose(Decoder):
    def __init__(self) -> None:
        super().__init__(-1)

    def feed(self, data: bytes) -> bytes:
        return data

    def eof(self) -> None:
        self.done = True


class ChunkedDecoder(Decoder):
    """Chunked transfer coding, decoded as it arrives: each `feed` returns the chunk data in
    it (partial chunks included), so a token is handed on in the read it arrived in."""

    def __init__(self) -> None:
        super().__init__(-1)
        self.left = 0  # data bytes still to come in the current chunk
        self._crlf = b""  # what must follow the current chunk's data, still to come
        self._line = b""  # a size line (or trailer line) begun in an earlier feed
        self._trailers = False

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end and not self.done:
            if self.left:
                take = min(self.left, end - pos)
                out.append(data[pos:pos + take])
                pos += take
                self.left -= take
                if not self.left:
                    self._crlf = b"\r\n"
            elif self._crlf:
                got = data[pos:pos + len(self._crlf)]
                if not self._crlf.startswith(got):
                    raise httpx.RemoteProtocolError("chunk data not followed by CRLF")
                pos += len(got)
                self._crlf = self._crlf[len(got):]
            else:
                pos = self._line_at(data, pos, out)
        self.extra = self.extra or pos < end
        return out[0] if len(out) == 1 else b"".join(out)

    def _line_at(self, data: bytes, pos: int, out: list[bytes]) -> int:
        """Consume a size line or trailer line at `pos` (and the chunk after it, when all of it
        is here: the usual case, one chunk per read); return where that ended."""
        newline = data.find(b"\n", pos)
        if newline < 0:
            self._line += data[pos:]
            if len(self._line) > MAX_CHUNK_LINE:
                raise httpx.RemoteProtocolError("chunk size line too long")
            return len(data)
        line, self._line = (self._line + data[pos:newline]).rstrip(b"\r"), b""
        if self._trailers:
            self.done = not line  # trailer fields are read past, not kept
            return newline + 1
        size = line.split(b";", 1)[0].strip()
        if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
            raise httpx.RemoteProtocolError(f"bad chunk size line {line[:40]!r}")
        self.left = int(size, 16)
        self._trailers = not self.left
        start, stop = newline + 1, newline + 1 + self.left
        if self.left and data[stop:stop + 2] == b"\r\n":
            out.append(data[start:stop])
            self.left = 0
            return stop + 2
        return start


def decoder_for(head: Head) -> Decoder:
    if head.length == CHUNKED:
        return ChunkedDecoder()
    return UntilClose() if head.length == UNTIL_CLOSE else Decoder(head.length)


# Connections --------------------------------------------------------------------------------


@contextmanager
def _deadline(seconds: float | None, error: type[httpx.TimeoutException], what: str
              ) -> Iterator[None]:
    with trio.move_on_after(math.inf if seconds is None else seconds) as scope:
        yield
    if scope.cancelled_caught:
        raise error(f"{what} took over {seconds:g} s")


def _reason(e: BaseException) -> str:
    cause = e.__cause__ or e
    return str(cause) or type(cause).__name__


class _Socket:
    """Plain TCP, read and written on the stdlib socket: trio's `SocketStream.receive_some`
    wraps each read in two context managers, most of a read's cost at a segment a token."""

    def __init__(self, origin: Origin, stream: trio.SocketStream) -> None:
        self.origin = origin
        trio_sock = stream.socket
        self.sock = socket.socket(trio_sock.family, trio_sock.type, trio_sock.proto,
                                  fileno=trio_sock.detach())
        self.sock.setblocking(False)

    async def receive(self) -> bytes:
        while True:
            try:
                await trio.lowlevel.wait_readable(self.sock)
                return self.sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                continue  # woken, but another reader took it or it was spurious
            except (OSError, ValueError, trio.ClosedResourceError) as e:  # ValueError: closed
                raise httpx.ReadError(_reason(e)) from e

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                await trio.lowlevel.wait_writable(self.sock)
                view = view[self.sock.send(view):]
            except BlockingIOError:
                continue
            except (OSError, ValueError, trio.ClosedResourceError) as e:  # ValueError: closed
                raise httpx.WriteError(_reason(e)) from e

    def ready(self) -> bytes | None:
        """What has already arrived, without waiting: b"" at EOF, None if nothing yet."""
        try:
            return self.sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def idle_ok(self) -> bool:
        """An idle connection has nothing to read; EOF or stray bytes mean it is done."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            pass
        return False

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


class _TLS:
    """TLS over TCP: `trio.SSLStream` (records need its state machine)."""

    def __init__(self, origin: Origin, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.origin = origin
        self.stream = stream

    async def receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise httpx.ReadError(_reason(e)) from e
        return bytes(data)

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise httpx.WriteError(_reason(e)) from e

    def ready(self) -> bytes | None:
        return None  # a TLS record may be half here: leave it

    def idle_ok(self) -> bool:
        fd = self.stream.transport_stream.socket.fileno()
        return fd >= 0 and not select.select([fd], [], [], 0)[0]

    def close(self) -> None:
        # No close_notify: it could wait on the peer, which learns from the FIN anyway.
        self.stream.transport_stream.socket.close()


Connection = _Socket | _TLS


class _Pool:
    """Keep-alive connections per origin, at most `max_connections` of them in use, and idle
    ones closed to make room, so that the total stays within `max_connections` too."""

    def __init__(self, limits: httpx.Limits, ssl_context: ssl.SSLContext | None) -> None:
        self._max = limits.max_connections
        self._slots = trio.Semaphore(self._max) if self._max is not None else None
        keep = limits.max_keepalive_connections
        self._max_idle = keep if keep is not None else self._max
        self._expiry = limits.keepalive_expiry
        self._idle: list[tuple[Connection, float]] = []  # oldest first
        self._open: set[Connection] = set()
        self._ssl = ssl_context

    async def acquire(self, origin: Origin, timeouts: dict[str, Any]) -> Connection:
        if self._slots is not None:
            with _deadline(timeouts.get("pool"), httpx.PoolTimeout, "waiting for a connection"):
                await self._slots.acquire()
        try:
            conn = self._take_idle(origin)
            if conn is None:
                if self._max is not None and len(self._open) >= self._max and self._idle:
                    self.discard(self._idle.pop(0)[0])
                with _deadline(timeouts.get("connect"), httpx.ConnectTimeout, "connecting"):
                    conn = await self._connect(origin)
                self._open.add(conn)
            return conn
        except BaseException:
            self._release_slot()
            raise

    def release(self, conn: Connection, *, reusable: bool) -> None:
        room = self._max_idle is None or len(self._idle) < self._max_idle
        if reusable and room and conn in self._open:
            self._idle.append((conn, trio.current_time()))
        else:
            self.discard(conn)
        self._release_slot()

    def discard(self, conn: Connection) -> None:
        self._open.discard(conn)
        conn.close()

    def close_all(self) -> None:
        for conn in list(self._open):
            self.discard(conn)
        self._idle.clear()

    def _release_slot(self) -> None:
        if self._slots is not None:
            self._slots.release()

    def _take_idle(self, origin: Origin) -> Connection | None:
        now = trio.current_time()
        for i in range(len(self._idle) - 1, -1, -1):  # the most recently used first
            conn, since = self._idle[i]
            if self._expiry is not None and now - since >= self._expiry:
                del self._idle[i]
                self.discard(conn)
            elif conn.origin == origin:
                del self._idle[i]
                if conn.idle_ok():
                    return conn
                self.discard(conn)
        return None

    async def _connect(self, origin: Origin) -> Connection:
        scheme, host, port = origin
        name = host.decode("ascii")
        try:
            tcp = await trio.open_tcp_stream(name, port)
        except OSError as e:
            raise httpx.ConnectError(_reason(e)) from e
        if scheme != b"https":
            return _Socket(origin, tcp)
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()
            self._ssl.set_alpn_protocols(["http/1.1"])
        tls = trio.SSLStream(tcp, self._ssl, server_hostname=name, https_compatible=True)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError, OSError) as e:
            tcp.socket.close()
            raise httpx.ConnectError(_reason(e)) from e
        except BaseException:
            tcp.socket.close()
            raise
        return _TLS(origin, tls)


# httpx2's side -------------------------------------------------------------------------------


class _Body(httpx.AsyncByteStream):
    """A response body as the pieces arrive: no buffering, and no generator of its own."""

    def __init__(self, pool: _Pool, conn: Connection, head: Head, first: bytes, *,
                 keep_alive: bool, read_timeout: float | None) -> None:
        self._pool = pool
        self._conn: Connection | None = conn
        self._timeout = read_timeout
        self._decoder = decoder_for(head)
        self._keep_alive = keep_alive and head.keep_alive
        self._first = self._decoder.feed(first) if first else b""

    def __aiter__(self) -> _Body:  # an iterator, not a generator: one layer less per piece
        return self

    async def __anext__(self) -> bytes:
        if self._first:
            piece, self._first = self._first, b""
            return piece
        decoder = self._decoder
        while not decoder.done:
            if self._conn is None:
                raise httpx.ReadError("the response was closed before its end")
            data = await (self._conn.receive() if self._timeout is None else self._timed())
            if not data:
                decoder.eof()  # raises, unless this body ends with the connection
            elif piece := decoder.feed(data):
                return piece
        self._release()
        raise StopAsyncIteration

    async def _timed(self) -> bytes:
        assert self._conn is not None
        with _deadline(self._timeout, httpx.ReadTimeout, "reading the response"):
            return await self._conn.receive()
        raise AssertionError("unreachable: _deadline raises when it cancels")

    async def aclose(self) -> None:
        conn = self._conn
        if conn is not None and not self._decoder.done:
            # The reader stopped at its own end marker (``data: [DONE]``); the body's last
            # bytes have often arrived with it: take them, and the connection can be kept.
            data = conn.ready()
            if data:
                self._decoder.feed(data)
        self._release()

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            done = self._decoder.done and not self._decoder.extra
            self._pool.release(conn, reusable=self._keep_alive and done)


class LLMTransport(httpx.AsyncBaseTransport):
    """httpx2's transport interface over `_Pool` (see the module's docstring). Without an
    `ssl_context`, https uses httpx2's default one, made at the first https connection."""

    def __init__(self, limits: httpx.Limits, *, ssl_context: ssl.SSLContext | None = None
                 ) -> None:
        self._limits = limits
        self._pool = _Pool(limits, ssl_context)
        self._fallback: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.raw_scheme not in DEFAULT_PORTS:
            if self._fallback is None:
                self._fallback = httpx.AsyncHTTPTransport(limits=self._limits)
            return await self._fallback.handle_async_request(request)
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        data = await _encode_request(request)
        origin = (url.raw_scheme, url.raw_host, url.port or DEFAULT_PORTS[url.raw_scheme])
        conn = await self._pool.acquire(origin, timeouts)
        try:
            with _deadline(timeouts.get("write"), httpx.WriteTimeout, "sending the request"):
                await conn.send(data)
            with _deadline(timeouts.get("read"), httpx.ReadTimeout, "waiting for the response"):
                head, rest = await _read_head(conn, request.method)
        except BaseException:
            self._pool.release(conn, reusable=False)
            raise
        keep_alive = "close" not in request.headers.get("connection", "").lower()
        body = _Body(self._pool, conn, head, rest, keep_alive=keep_alive,
                     read_timeout=None if head.status < 300 else timeouts.get("read"))
        return httpx.Response(head.status, headers=head.headers, stream=body, extensions={
            "http_version": head.version, "reason_phrase": head.reason})

    async def aclose(self) -> None:
        self._pool.close_all()
        if self._fallback is not None:
            await self._fallback.aclose()


async def _encode_request(request: httpx.Request) -> bytes:
    """The whole request, head and body, for one send."""
    body = await request.aread()
    head = encode_head(request.method, request.url.raw_path, request.headers.raw)
    if request.headers.get("transfer-encoding", "").lower() == "chunked":
        return head + (b"%x\r\n%b\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    return head + body


async def _read_head(conn: Connection, method: str) -> tuple[Head, bytes]:
    """The final response head (interim 1xx heads skipped) and the bytes after it."""
    buffer = b""
    while True:
        while (end := head_end(buffer)) is None:
            if len(buffer) > MAX_HEAD:
                raise httpx.RemoteProtocolError("the response head is over 64 KiB")
            data = await conn.receive()
            if not data:
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
            buffer += data
        head = parse_head(buffer[:end[0]], method)
        buffer = buffer[end[1]:]
        if head.status == 101:
            raise httpx.RemoteProtocolError("the server switched protocols unasked (101)")
        if not 100 <= head.status < 200:
            return head, buffer
