"""SIGTERM to the supervisor with clients connected: every stream ends once, with a reason;
what each client got is what is stored; queued work survives the restart; the drain refuses
new work; idle connections do not hold the shutdown open (DESIGN.md I1-I5; API.md, Precise
points: Drain timing, Clean ends, Why it ended → what is stored, Resume)."""

from __future__ import annotations

import time

import httpx
import pytest
import trio

from tests.e2e.conftest import (
    FINAL,
    LiveChat,
    StreamResult,
    assistant_message,
    eventually,
    nonce,
    read_stream,
    run_final,
)
from tests.support.scripted_llm import token_text

pytestmark = pytest.mark.slow

# AGENTD_SHUTDOWN_TIMEOUT: a 5.3 s drain, then the 2.7 s reserve. (At 6 s, the 2 s reserve
# is sometimes too short for the embedding process, stopped after web and agent: it needs
# ~0.6 s to release the model and store and ~0.3 s more to exit, and gets SIGKILLed.)
TIMEOUT = 8


def one_end_last(result: StreamResult) -> dict:
    types = [e.type for e in result.events]
    assert types[0] == "run", types
    assert types.count("end") == 1 and types[-1] == "end", types
    return result.events[-1].data


async def restart(tree) -> None:
    await trio.to_thread.run_sync(tree.start)


async def test_sigterm_ends_each_of_50_streams_once_and_stores_what_each_client_got(start_tree):
    tree = start_tree(AGENTD_SHUTDOWN_TIMEOUT=str(TIMEOUT))
    # 40 streams far from done at SIGTERM (40 s each) and 10 that finish during the drain.
    long_ones = set(range(40))
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=tree.base_url, timeout=30, limits=limits) as client:
        chats = [LiveChat(client, "tokens=400 rate=10" if i in long_ones else "tokens=20 rate=10")
                 for i in range(50)]
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for chat in chats:
                    nursery.start_soon(chat.read)
                await eventually(lambda: all(chat.tokens() >= 1 for chat in chats), 30)
                tree.sigterm()
                status, took = await tree.wait_exit(TIMEOUT + 5)
    results = {i: chat.result for i, chat in enumerate(chats) if chat.result is not None}
    assert status == 0, tree.text()[-3000:]
    assert took <= TIMEOUT + 1, took
    summary = tree.events("shutdown_complete")[-1]
    assert summary["exit_status"] == 0 and summary["killed"] == []

    assert len(results) == 50
    for i, result in results.items():
        end = one_end_last(result)
        assert result.clean, f"stream {i} was cut"
        if i in long_ones:
            assert end["reason"] == "server_shutdown", (i, end)
            assert end["resumable"] is True and end["detail"]
            assert token_text(400).startswith(result.tokens) and result.tokens
        else:
            assert end["reason"] == "completed", (i, end)
            assert result.tokens == token_text(20)

    await restart(tree)
    async with httpx.AsyncClient(base_url=tree.base_url, timeout=30) as client:
        with trio.fail_after(60):
            for i, result in results.items():
                run = (await client.get(f"/api/runs/{result.run_id}")).json()
                stored = await assistant_message(client, result.session_id, result.run_id)
                assert stored["content"] == result.tokens, i
                if i in long_ones:
                    assert run["status"] == "interrupted" and stored["status"] == "interrupted"
                else:
                    assert run["status"] == "completed" and stored["status"] == "complete"
    assert tree.stop() == 0


async def test_run_queued_at_sigterm_completes_after_restart_and_resumes_by_last_event_id(
    start_tree,
):
    tree = start_tree(AGENTD_SHUTDOWN_TIMEOUT=str(TIMEOUT), AGENTD_MAX_CONCURRENT_RUNS="1")
    streams: dict[str, StreamResult] = {}
    async with httpx.AsyncClient(base_url=tree.base_url, timeout=30) as client:
        long_chat = LiveChat(client, "tokens=400 rate=10")

        async def follow(run_id: str) -> None:
            streams["queued"] = await read_stream(client, "GET", f"/api/runs/{run_id}/events")

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_chat.read)
                await eventually(lambda: long_chat.tokens() >= 2, 10)
                created = await client.post("/api/runs", json={
                    "message": f"{nonce()} [[script tokens=6 rate=20]]"})
                assert created.status_code == 202, created.text
                queued = created.json()["run_id"]
                nursery.start_soon(follow, queued)
                await trio.sleep(0.5)
                run = (await client.get(f"/api/runs/{queued}")).json()
                assert run["status"] == "queued"  # the only run slot is taken
                tree.sigterm()
                status, took = await tree.wait_exit(TIMEOUT + 5)
    assert status == 0 and took <= TIMEOUT + 1, (status, took)
    assert long_chat.result is not None
    streams["long"] = long_chat.result
    assert one_end_last(streams["long"])["reason"] == "server_shutdown"
    # A stream whose run is still queued is an open stream too: it is ended, resumably.
    end = one_end_last(streams["queued"])
    assert end["reason"] == "server_shutdown" and end["resumable"] is True
    assert not streams["queued"].tokens

    await restart(tree)
    async with httpx.AsyncClient(base_url=tree.base_url, timeout=30) as client:
        run = await run_final(client, queued, 20)
        assert run["status"] == "completed" and run["output"] == token_text(6)
        with trio.fail_after(20):
            full = await read_stream(client, "GET", f"/api/runs/{queued}/events")
        assert one_end_last(full)["reason"] == "completed"
        assert full.tokens == token_text(6)
        assert [e.type for e in full.events[:3]] == ["run", "thinking", "token"]
        after = full.events[2]  # resume after the first token
        with trio.fail_after(20):
            resumed = await read_stream(client, "GET", f"/api/runs/{queued}/events",
                                        headers={"Last-Event-ID": after.id})
        assert resumed.events[0].type == "run"
        assert [(e.id, e.type, e.data) for e in resumed.events[1:]] == [
            (e.id, e.type, e.data) for e in full.events[3:]]
        assert resumed.tokens == token_text(5, start=1) and resumed.clean
        long_run = streams["long"]
        stored = await assistant_message(client, long_run.session_id, long_run.run_id)
        assert stored["status"] == "interrupted" and stored["content"] == long_run.tokens
        assert (await client.get(f"/api/runs/{long_run.run_id}")).json()["status"] in FINAL
    assert tree.stop() == 0


async def test_idle_keep_alive_connection_does_not_hold_the_shutdown_open(start_tree):
    tree = start_tree(AGENTD_SHUTDOWN_TIMEOUT="10")
    async with httpx.AsyncClient(base_url=tree.base_url, timeout=30) as client:
        with trio.fail_after(10):
            assert (await client.get("/live")).status_code == 200
            # The connection now sits idle in the client's pool, kept alive.
            tree.sigterm()
            status, took = await tree.wait_exit(15)
    assert status == 0
    assert took < 4, f"shutdown took {took:.1f} s of a 10 s budget with nothing to do"


async def open_kept(tree, count: int) -> list[httpx.AsyncClient]:
    """Clients of one connection each, opened (by a GET /live) before SIGTERM."""
    one_connection = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(base_url=tree.base_url, timeout=10, limits=one_connection)
               for _ in range(count)]
    for client in clients:
        assert (await client.get("/live")).status_code == 200
    return clients


async def drain_with_one_stream(tree, during_drain) -> tuple[StreamResult, int, float]:
    """Keep one stream open (so the web stays up), SIGTERM, wait 0.6 s, run `during_drain`,
    then wait for the exit."""
    async with httpx.AsyncClient(base_url=tree.base_url, timeout=30) as streaming:
        chat = LiveChat(streaming, "tokens=400 rate=10")
        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(chat.read)
                await eventually(lambda: chat.tokens() >= 2, 10)
                tree.sigterm()
                await trio.sleep(0.6)
                await during_drain()
                status, took = await tree.wait_exit(30)
    assert chat.result is not None
    return chat.result, status, took


async def test_draining_answers_503_on_old_connections_and_refuses_new_ones(start_tree):
    tree = start_tree(AGENTD_SHUTDOWN_TIMEOUT=str(TIMEOUT))
    kept_ready, kept_chat = await open_kept(tree, 2)
    seen: dict[str, object] = {}

    async def during_drain() -> None:
        seen["ready"] = await kept_ready.get("/ready")
        seen["chat"] = await kept_chat.post("/api/chat", json={"message": "hi"})
        async with httpx.AsyncClient(timeout=5) as fresh:
            try:
                seen["fresh"] = await fresh.get(f"{tree.base_url}/ready")
            except httpx.ConnectError:
                seen["fresh"] = "refused"
        seen["at"] = time.monotonic() - tree.sigterm_at

    try:
        stream, status, took = await drain_with_one_stream(tree, during_drain)
    finally:
        for client in (kept_ready, kept_chat):
            await client.aclose()
    ready, chat, fresh = seen["ready"], seen["chat"], seen["fresh"]
    assert ready.status_code == 503 and ready.json() == {"status": "draining"}
    assert chat.status_code == 503, chat.text
    assert chat.headers["retry-after"].isdigit()
    assert chat.json()["error"]["code"] == "draining" and chat.json()["error"]["message"]
    assert fresh == "refused" or fresh.status_code == 503
    assert seen["at"] < TIMEOUT  # all of it while the web was still draining
    assert status == 0 and took <= TIMEOUT + 1
    assert one_end_last(stream)["reason"] == "server_shutdown"


async def test_kept_alive_connection_gets_503_for_every_request_while_draining(start_tree):
    tree = start_tree(AGENTD_SHUTDOWN_TIMEOUT=str(TIMEOUT))
    [kept] = await open_kept(tree, 1)
    answers: list[httpx.Response] = []

    async def during_drain() -> None:
        try:
            answers.append(await kept.get("/ready"))
            answers.append(await kept.post("/api/chat", json={"message": "hi"}))
        except httpx.TransportError as e:
            answers.append(e)  # type: ignore[arg-type]

    try:
        await drain_with_one_stream(tree, during_drain)
    finally:
        await kept.aclose()
    assert [getattr(a, "status_code", repr(a)) for a in answers] == [503, 503]
