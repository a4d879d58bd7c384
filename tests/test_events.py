"""EventWriter against a real Redis that is SIGKILLed and started again (app/events.py):
nothing buffered is lost or reordered, the writer's task never fails, one log line per
outage, and its buffer is bounded."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import structlog
import trio

from app.events import EventWriter, encode, encode_token, read_after
from app.redis import open_redis
from tests.support.redis_server import RedisServer, private_redis

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from app.redis import RedisClient


@pytest.fixture
def server() -> Iterator[RedisServer]:
    yield from private_redis()


@pytest.fixture
async def redis(server: RedisServer) -> AsyncIterator[RedisClient]:
    await server.start()
    async with open_redis(server.url, connect_timeout=2) as client:
        yield client


def token(run_id: str, i: int) -> tuple[str, str, str]:
    return run_id, "token", encode("token", run_id, content=f"t{i} ")


async def stream_of(redis: RedisClient, run_id: str, want: int) -> list[tuple[str, str]]:
    """The run's events once it has ``want`` of them (type, content or reason)."""
    with trio.fail_after(10):
        while True:
            events = await read_after(redis, run_id, None)
            if len(events) >= want:
                return [(e.type, e.payload().get("content") or e.payload().get("reason"))
                        for e in events]
            await trio.sleep(0.02)


async def test_a_redis_outage_loses_and_reorders_nothing_and_the_writer_keeps_serving(
        server, redis):
    writer = EventWriter(redis, ttl=60)
    with structlog.testing.capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.serve)
            for i in range(5):
                writer.append(*token("r1", i))
            await stream_of(redis, "r1", 5)

            server.kill()
            for i in range(5, 25):  # the writer tries (and fails) to write these
                writer.append(*token("r1", i))
                await trio.sleep(0.03)
            with trio.move_on_after(0.5) as waited:
                await writer.append_now("r1", "end", encode("end", "r1", reason="completed"),
                                        expire=True)
            assert waited.cancelled_caught, "append_now returned while Redis was down"

            await server.start()
            events = await stream_of(redis, "r1", 26)
            nursery.cancel_scope.cancel()
    assert events == [("token", f"t{i} ") for i in range(25)] + [("end", "completed")]
    assert 0 < await redis.ttl("agentd:run:r1") <= 60  # the end's EXPIRE went out with it
    assert [e["event"] for e in logs if e["event"].startswith("event_append")] == [
        "event_append_failed", "event_append_recovered"]


async def test_append_now_waits_through_an_outage_and_returns_the_id_written(server, redis):
    writer = EventWriter(redis, ttl=60)
    server.kill()
    writer.append(*token("r2", 0))
    got: list[str] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:

            async def end() -> None:
                got.append(await writer.append_now(
                    "r2", "end", encode("end", "r2", reason="completed")))

            nursery.start_soon(end)
            await trio.sleep(0.5)
            assert not got
            await server.start()
        events = await read_after(redis, "r2", None)
    assert [e.type for e in events] == ["token", "end"]
    assert got == [events[-1].id]


async def test_callers_waiting_together_share_one_write(redis):
    writer = EventWriter(redis, ttl=60)
    calls = 0
    write = writer._write

    async def counted(*args: object) -> list[str]:
        nonlocal calls
        calls += 1
        return await write(*args)  # type: ignore[arg-type]

    writer._write = counted  # type: ignore[method-assign]
    for i in range(300):
        writer.append(*token(f"b{i}", 0))
    ends = [(f"b{i}", "end", encode("end", f"b{i}", reason="server_shutdown"))
            for i in range(300)]
    with trio.fail_after(10):
        ids = await writer.append_now_many(ends, expire=True)
    assert calls == 1
    for i in (0, 299):
        events = await read_after(redis, f"b{i}", None)
        assert [e.type for e in events] == ["token", "end"] and events[1].id == ids[i]


async def test_a_full_buffer_asks_the_producers_to_stop(server, redis):
    writer = EventWriter(redis, ttl=60, max_buffered=50)
    asked = trio.Event()
    writer.on_backlog = asked.set
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.serve)
            server.kill()
            for i in range(49):
                writer.append(*token("r3", i))
            await trio.sleep(0.5)
            assert not asked.is_set()
            writer.append(*token("r3", 49))
            await asked.wait()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("content", ["hello", " wörld \"q\" \\ \n\t\u2028", "", "x" * 5000,
                                     "\U0001f600 emoji", "\x00\x1f control"])
def test_the_token_fast_path_writes_the_same_bytes_as_encode(content):
    run_id = "8a1f5b9e-1111-2222-3333-444455556666"
    assert encode_token(run_id, content) == encode("token", run_id, content=content)
