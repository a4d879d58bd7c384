"""unix_http.py, the embedding client's HTTP/1.1 pool, against hypercorn on a real unix socket
(and, for a connection that dies between two requests, against a bare trio server)."""

from __future__ import annotations

import json
from functools import partial
from typing import TYPE_CHECKING, Any

import h11
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from app.embedding import protocol
from app.embedding.client import EmbeddingClient, EmbeddingUnavailable
from app.embedding.unix_http import UnixHTTP

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path


class Echo:
    """An ASGI app that answers its request body back as ``{"got": …}``; a body of
    ``"hang"`` waits until `release` is set."""

    def __init__(self) -> None:
        self.release = trio.Event()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await protocol.lifespan(receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if body == b'"hang"':
            await self.release.wait()
        payload = json.dumps({"got": json.loads(body or b"null"), "path": scope["path"]})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload.encode()})


@pytest.fixture
async def served(private_dir: Path) -> AsyncIterator[tuple[str, Echo]]:
    path = str(private_dir / "echo.sock")
    app = Echo()
    config = Config()
    config.bind = [f"unix:{path}"]
    config.accesslog = None
    config.keep_alive_timeout = 0.3
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, app, config))  # type: ignore[arg-type]
        yield path, app
        nursery.cancel_scope.cancel()


async def _post(pool: UnixHTTP, value: object) -> Any:
    body = json.dumps(value).encode()
    response = await pool.request("POST", "/echo", [("content-type", "application/json")], body)
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    return json.loads(response.content)["got"]


async def test_sequential_requests_share_one_kept_alive_connection(served):
    path, _ = served
    pool = UnixHTTP(path)
    with trio.fail_after(10):
        for i in range(20):
            assert await _post(pool, i) == i
        [conn] = pool._idle
        assert conn.requests == 20
        await pool.aclose()


async def test_concurrent_requests_each_get_their_own_answer(served):
    path, _ = served
    pool = UnixHTTP(path, max_connections=16)
    got: dict[int, Any] = {}

    async def one(i: int) -> None:
        got[i] = await _post(pool, {"n": i, "text": "x" * (i * 1000)})  # up to 63 KB

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(one, i)
        assert got == {i: {"n": i, "text": "x" * (i * 1000)} for i in range(64)}
        assert len(pool._idle) == 16  # never more connections than allowed
        await pool.aclose()


async def test_a_connection_closed_by_the_server_while_idle_is_not_reused(served):
    path, _ = served
    pool = UnixHTTP(path)
    with trio.fail_after(10):
        assert await _post(pool, "first") == "first"
        [first] = pool._idle
        await trio.sleep(0.6)  # past hypercorn's keep-alive timeout here: it closed it
        assert await _post(pool, "second") == "second"
        [second] = pool._idle
        assert second is not first and second.requests == 1
        await pool.aclose()


async def test_after_an_idle_spell_every_closed_connection_is_dropped_at_once(served):
    path, _ = served
    pool = UnixHTTP(path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(_post, pool, i)
        assert len(pool._idle) == 8
        await trio.sleep(0.6)  # hypercorn closes all eight
        assert await _post(pool, "next") == "next"
        [fresh] = pool._idle  # not seven dead ones left behind it
        assert fresh.requests == 1
        await pool.aclose()


async def test_a_request_cancelled_half_way_closes_its_connection(served):
    path, app = served
    pool = UnixHTTP(path)
    with trio.fail_after(10):
        assert await _post(pool, "warm") == "warm"
        with trio.move_on_after(0.2) as gave_up:
            await _post(pool, "hang")
        assert gave_up.cancelled_caught
        assert pool._idle == []  # its answer may still come: the connection is not reusable
        app.release.set()
        assert await _post(pool, "after") == "after"
        await pool.aclose()


async def test_the_client_maps_a_timeout_and_a_missing_socket_to_unavailable(served,
                                                                            private_dir):
    path, _ = served
    async with EmbeddingClient(path, timeout=0.2) as client:
        with trio.fail_after(10), pytest.raises(EmbeddingUnavailable, match="timed out"):
            await client._request("POST", "/echo", "hang")  # type: ignore[arg-type]
    async with EmbeddingClient(private_dir / "none.sock") as client:
        with trio.fail_after(10), pytest.raises(EmbeddingUnavailable, match="unreachable"):
            await client.health()


async def test_a_kept_connection_that_dies_before_answering_is_retried_once_on_a_new_one(
    private_dir,
):
    # A bare server that answers the first request of each connection and closes the
    # connection when a second one comes: what a keep-alive timeout racing our request
    # looks like from here.
    path = str(private_dir / "bare.sock")
    connections = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        conn = h11.Connection(h11.SERVER)
        answered = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.EndOfMessage):
                if answered:
                    await stream.aclose()
                    return
                await stream.send_all(
                    conn.send(h11.Response(status_code=200, headers=[("content-length", "2")]))
                    + conn.send(h11.Data(data=b"{}")) + conn.send(h11.EndOfMessage()))
                answered += 1
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return

    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen()
    pool = UnixHTTP(path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handle, [trio.SocketListener(listener)])
            for _ in range(3):
                response = await pool.request("GET", "/", [])
                assert (response.status, response.content) == (200, b"{}")
            nursery.cancel_scope.cancel()
    assert connections == 3  # each later request found its connection dead, retried once
    await pool.aclose()
