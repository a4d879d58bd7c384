"""The LLM client's HTTP/1.1 transport (app/agent/transport.py): framing, keep-alive, errors.

The framing is pure and tested on bytes. The rest runs against local trio servers on the
real clock (an autojump clock would leap over the time spent waiting on sockets): a bare
one scripted per test, and the scripted LLM for what llm.py's retry and stall code sees.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import subprocess
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx2 as httpx
import openai
import pytest
import trio

from app.agent.llm import LLMError, LLMStalled, OpenAIProvider
from app.agent.transport import (
    CHUNKED,
    UNTIL_CLOSE,
    ChunkedDecoder,
    LLMTransport,
    head_end,
    llm_transport,
    parse_head,
)
from app.config import Settings
from tests.support.scripted_llm import open_scripted_llm, token_text

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=4)
OK_HELLO = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


# ------------------------------------------------------------------------------ framing


def test_a_head_is_parsed_with_its_fields_and_body_framing():
    head = parse_head(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\n"
                      b"Content-Length: 12", "POST")
    assert (head.status, head.reason, head.version) == (429, b"Too Many Requests", b"HTTP/1.1")
    assert head.headers == [(b"Retry-After", b"1"), (b"Content-Length", b"12")]
    assert (head.length, head.keep_alive) == (12, True)


@pytest.mark.parametrize(("head", "method", "length", "keep_alive"), [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", "POST", CHUNKED, True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\nContent-Length: 3", "GET", CHUNKED, True),
    (b"HTTP/1.1 200 OK", "GET", UNTIL_CLOSE, False),
    (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 3", "GET", 3, False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 3", "GET", 3, False),
    (b"HTTP/1.1 204 No Content", "DELETE", 0, True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3", "HEAD", 0, True),
])
def test_body_framing_follows_rfc_9112(head, method, length, keep_alive):
    parsed = parse_head(head, method)
    assert (parsed.length, parsed.keep_alive) == (length, keep_alive)


@pytest.mark.parametrize("head", [
    b"HTTP/2 200 OK",
    b"HTTP/1.1 20 OK",
    b"HTTP/1.1 200 OK\r\nno colon here",
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4",
    b"HTTP/1.1 200 OK\r\nContent-Length: -3",
])
def test_malformed_heads_are_remote_protocol_errors(head):
    with pytest.raises(httpx.RemoteProtocolError):
        parse_head(head, "GET")


def test_head_end_finds_the_blank_line_with_crlf_or_bare_lf():
    assert head_end(b"HTTP/1.1 200 OK\r\nA: b\r\n") is None
    assert head_end(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody") == (21, 25)
    assert head_end(b"HTTP/1.1 200 OK\nA: b\n\nbody") == (20, 22)


BODY = chunk(b"data: one\n\n") + chunk(b"x" * 300) + b"1;ext=1\r\n!\r\n0\r\nTrailer: t\r\n\r\n"
DATA = b"data: one\n\n" + b"x" * 300 + b"!"


def test_chunked_body_decodes_the_same_whole_or_a_byte_at_a_time():
    whole = ChunkedDecoder()
    assert (whole.feed(BODY), whole.done, whole.extra) == (DATA, True, False)
    bytewise = ChunkedDecoder()
    pieces = [bytewise.feed(BODY[i:i + 1]) for i in range(len(BODY))]
    assert b"".join(pieces) == DATA
    assert bytewise.done and not bytewise.extra
    assert not any(len(p) > 1 for p in pieces)  # each byte of data handed on as it came


def test_chunked_body_marks_bytes_after_its_end_and_is_done_only_at_the_terminator():
    decoder = ChunkedDecoder()
    assert decoder.feed(chunk(b"abc") + b"0\r\n") == b"abc"
    assert not decoder.done
    decoder.feed(b"\r\nHTTP/1.1 200 OK")
    assert decoder.done and decoder.extra


@pytest.mark.parametrize("body", [b"zz\r\n", b"3\r\nabcXY", b"0x3\r\nabc\r\n", b"+3\r\n"])
def test_bad_chunked_framing_is_a_remote_protocol_error(body):
    with pytest.raises(httpx.RemoteProtocolError):
        ChunkedDecoder().feed(body)


def test_llm_transport_leaves_proxied_setups_to_httpx2(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert isinstance(llm_transport(LIMITS), LLMTransport)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert llm_transport(LIMITS) is None


# ------------------------------------------------------------------------ a bare server


@dataclass
class Server:
    url: str
    connections: int = 0
    gone: list[float] = field(default_factory=list)  # when each connection's client left
    changed: trio.Event = field(default_factory=trio.Event)

    def note(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self.changed.wait()


async def read_request(stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
    """One request's head (the body is read past by Content-Length); None at EOF."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(buffer) < end + length:
        buffer += await stream.receive_some(65536)
    del buffer[:end + length]
    return head


async def until_eof(stream: trio.SocketStream) -> None:
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass


def reset(stream: trio.SocketStream) -> None:
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


@asynccontextmanager
async def serve(handler: Callable[[trio.SocketStream, bytearray], Awaitable[None]]
                ) -> AsyncIterator[Server]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server = Server(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")

    async def connection(stream: trio.SocketStream) -> None:
        server.connections += 1
        server.note()
        try:
            await handler(stream, bytearray())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            server.gone.append(time.monotonic())
            server.note()
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, connection, listeners)
        yield server
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client(limits: httpx.Limits = LIMITS, **kwargs) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=LLMTransport(limits, **kwargs), timeout=5) as c:
        yield c


async def answer_each(reply: bytes, stream: trio.SocketStream, buffer: bytearray) -> None:
    while await read_request(stream, buffer) is not None:
        await stream.send_all(reply)


async def test_a_content_length_body_is_read_whole_and_its_connection_kept():
    async def handler(stream, buffer):
        await answer_each(OK_HELLO, stream, buffer)

    with trio.fail_after(5):
        async with serve(handler) as server, client() as c:
            texts = [(await c.post(server.url + "/v1", content=b"{}")).text for _ in range(3)]
    assert texts == ["hello"] * 3
    assert server.connections == 1


async def test_a_chunked_body_comes_piece_by_piece_as_sent_then_the_connection_is_kept():
    sent = [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]
    next_piece = trio.Semaphore(0)

    async def handler(stream, buffer):
        while await read_request(stream, buffer) is not None:
            await stream.send_all(CHUNKED_HEAD)
            for piece in sent:
                await next_piece.acquire()
                await stream.send_all(chunk(piece))
            await stream.send_all(b"0\r\n\r\n")

    with trio.fail_after(5):
        async with serve(handler) as server, client() as c:
            for _ in range(2):
                got = []
                async with c.stream("POST", server.url) as response:
                    next_piece.release()
                    async for piece in response.aiter_raw():
                        got.append(piece)
                        next_piece.release()
                assert got == sent
    assert server.connections == 1


async def test_a_reset_mid_body_is_a_read_error_and_the_next_request_reconnects():
    async def handler(stream, buffer):
        if server.connections == 1:
            await read_request(stream, buffer)
            await stream.send_all(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
            await trio.sleep(0.05)
            reset(stream)
        else:
            await answer_each(OK_HELLO, stream, buffer)

    with trio.fail_after(5):
        async with serve(handler) as server, client() as c:
            async with c.stream("GET", server.url) as response:
                with pytest.raises(httpx.ReadError):
                    async for _ in response.aiter_raw():
                        pass
            assert (await c.get(server.url)).text == "hello"
    assert server.connections == 2


async def test_eof_mid_body_is_a_remote_protocol_error():
    async def handler(stream, buffer):
        await read_request(stream, buffer)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")

    with trio.fail_after(5):
        async with serve(handler) as server, client() as c:
            with pytest.raises(httpx.RemoteProtocolError):
                await c.get(server.url)


async def test_a_body_closed_early_closes_its_connection_at_once():
    async def handler(stream, buffer):
        while await read_request(stream, buffer) is not None:
            if server.connections == 1:
                await stream.send_all(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
                await until_eof(stream)
                return
            await stream.send_all(OK_HELLO)

    with trio.fail_after(5):
        async with serve(handler) as server, client() as c:
            async with c.stream("GET", server.url) as response:
                async for _ in response.aiter_raw():
                    break
                closed = time.monotonic()
            with trio.fail_after(1):
                await server.wait_for(lambda: bool(server.gone))
            assert server.gone[0] - closed < 1
            assert (await c.get(server.url)).text == "hello"
    assert server.connections == 2


async def test_a_body_whose_end_arrived_with_the_last_piece_keeps_its_connection():
    async def handler(stream, buffer):
        while await read_request(stream, buffer) is not None:
            await stream.send_all(CHUNKED_HEAD)
            await trio.sleep(0.02)
            await stream.send_all(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    with trio.fail_after(5):
        async with serve(handler) as server, client() as c:
            for _ in range(2):
                async with c.stream("GET", server.url) as response:
                    async for piece in response.aiter_raw():
                        if b"[DONE]" in piece:
                            break  # as llm.py does: the terminator is not waited for
    assert server.connections == 1


async def test_a_connection_the_server_closed_while_idle_is_not_reused():
    async def handler(stream, buffer):
        await read_request(stream, buffer)
        await stream.send_all(OK_HELLO)  # keep-alive, but then the server changes its mind

    with trio.fail_after(5):
        async with serve(handler) as server, client() as c:
            assert (await c.get(server.url)).text == "hello"
            await server.wait_for(lambda: bool(server.gone))
            assert (await c.get(server.url)).text == "hello"
    assert server.connections == 2


async def test_requests_beyond_max_connections_wait_for_a_free_one():
    release = trio.Event()

    async def handler(stream, buffer):
        while await read_request(stream, buffer) is not None:
            await release.wait()
            await stream.send_all(OK_HELLO)

    one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with trio.fail_after(5):
        async with serve(handler) as server, client(one) as c, trio.open_nursery() as nursery:
            nursery.start_soon(c.get, server.url)
            await server.wait_for(lambda: server.connections == 1)
            with pytest.raises(httpx.PoolTimeout):
                await c.get(server.url, timeout=httpx.Timeout(5, pool=0.1))
            release.set()
            assert (await c.get(server.url)).text == "hello"
    assert server.connections == 1


async def test_closing_the_client_closes_every_connection():
    async def handler(stream, buffer):
        await read_request(stream, buffer)
        await stream.send_all(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
        await until_eof(stream)

    with trio.fail_after(5):
        async with serve(handler) as server:
            c = httpx.AsyncClient(transport=LLMTransport(LIMITS))
            response = await c.send(c.build_request("GET", server.url), stream=True)
            await c.aclose()
            await server.wait_for(lambda: bool(server.gone))
            with pytest.raises(httpx.ReadError):
                await response.aread()


async def test_an_unanswered_request_is_a_read_timeout_and_a_refused_one_a_connect_error():
    async def handler(stream, buffer):
        await until_eof(stream)

    with trio.fail_after(5):
        async with serve(handler) as server, client() as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.get(server.url, timeout=httpx.Timeout(5, read=0.1))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, never listening: refused
        async with client() as c:
            with pytest.raises(httpx.ConnectError):
                await c.get(f"http://127.0.0.1:{port}/")


async def test_an_error_body_is_read_under_the_read_timeout_and_a_stream_is_not():
    async def handler(stream, buffer):
        while (head := await read_request(stream, buffer)) is not None:
            if head.startswith(b"GET /error"):
                await stream.send_all(b"HTTP/1.1 500 Oops\r\nContent-Length: 10\r\n\r\nhalf")
            else:  # a stream whose second chunk comes after more than the read timeout
                await stream.send_all(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
                await trio.sleep(0.3)
                await stream.send_all(chunk(b"data: 2\n\n") + b"0\r\n\r\n")

    with trio.fail_after(5):
        async with serve(handler) as server, client() as c:
            quick = httpx.Timeout(5, read=0.1)
            with pytest.raises(httpx.ReadTimeout):
                await c.get(server.url + "/error", timeout=quick)
            assert (await c.get(server.url + "/stream", timeout=quick)).text == (
                "data: 1\n\ndata: 2\n\n")


async def test_a_connect_that_hangs_is_a_connect_timeout(monkeypatch):
    async def hang(host, port):
        await trio.sleep_forever()

    monkeypatch.setattr(trio, "open_tcp_stream", hang)
    with trio.fail_after(5):
        async with client() as c:
            with pytest.raises(httpx.ConnectTimeout):
                await c.get("http://127.0.0.1:9/", timeout=httpx.Timeout(5, connect=0.1))


async def test_https_through_trio_ssl_keeps_its_connection(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handler(stream, buffer):
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        await answer_each(CHUNKED_HEAD + chunk(b"secret") + b"0\r\n\r\n", tls, buffer)

    with trio.fail_after(10):
        async with serve(handler) as server, client(
                ssl_context=ssl.create_default_context(cafile=str(cert))) as c:
            url = server.url.replace("http:", "https:")
            assert [(await c.get(url)).text for _ in range(2)] == ["secret"] * 2
    assert server.connections == 1


# ------------------------------------------------------------- what llm.py sees through it


@asynccontextmanager
async def provider(**settings) -> AsyncIterator[tuple[OpenAIProvider, object]]:
    async with open_scripted_llm() as llm, client() as http:
        config = Settings(_env_file=None, llm_base_url=llm.base_url, llm_api_key="k",
                          llm_model="scripted", **settings)
        yield OpenAIProvider(config, http), llm


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def test_a_429_with_retry_after_is_retried_after_it_on_the_same_connection():
    tokens: list[str] = []
    with trio.fail_after(10):
        async with provider(llm_max_retries=1) as (p, llm):
            turn = await p.stream_turn(
                user("[[script fail=1 status=429 retry_after=0.3 tokens=4]]"), None, tokens.append)
    assert turn.text == "".join(tokens) == token_text(4)
    first, second = llm.chat_requests
    assert second.at - first.at >= 0.3
    assert llm.connections_total == 1  # the error's body was read whole: the connection kept


async def test_a_reset_mid_stream_fails_the_turn_as_streamed_without_a_retry():
    with trio.fail_after(10):
        async with provider(llm_max_retries=2) as (p, llm):
            with pytest.raises(LLMError) as failed:
                await p.stream_turn(user("[[script tokens=10 rate=100 reset_after=3]]"), None,
                                    lambda _: None)
    assert failed.value.streamed
    assert len(llm.chat_requests) == 1


async def test_a_hang_mid_stream_is_a_stall_after_the_llm_timeout_and_no_later_than_its_slack():
    with trio.fail_after(10):
        async with provider(llm_timeout=0.5) as (p, llm):
            began = trio.current_time()
            with pytest.raises(LLMStalled):
                await p.stream_turn(user("[[script tokens=10 hang_after=2]]"), None,
                                    lambda _: None)
            elapsed = trio.current_time() - began
    assert 0.5 <= elapsed < 0.5 + 0.05 + 0.3


async def test_a_cancelled_turn_is_seen_by_the_llm_within_a_second():
    got: list[str] = []
    with trio.fail_after(10):
        async with provider() as (p, llm):
            with trio.move_on_after(0.3):
                await p.stream_turn(user("[[script tokens=100 rate=20]]"), None, got.append)
            with trio.fail_after(1):
                await llm.wait_until(lambda: llm.streams_closed_by_client == 1)
    assert 0 < len(got) < 100


async def test_connection_errors_reach_llm_py_as_openai_connection_errors():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        with trio.fail_after(5):
            async with client() as http:
                c = openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0, http_client=http)
                with pytest.raises(openai.APIConnectionError):
                    await c.models.list()
