"""SIGTERM with 1,000 open streams (DESIGN.md I1-I3, I5; API.md: Signals and exit, Precise
points): among them clients that stopped reading (full socket buffers), runs blocked on a
hung upstream, runs in the middle of a tool call (a search engine that never answers), runs
that finish during the drain; plus idle keep-alive connections and a large ingest in flight.

The supervisor must exit within the budget + 1 s with status 0; every client that reads gets
exactly one `end`, last, on a properly ended body; after a restart on the same data dir every
run is final (none `running`) and stores exactly what its client was streamed.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from tests.chaos.conftest import (
    count_statuses,
    dead_endpoint,
    not_final,
    open_stalled,
    runs_by_status,
    summary,
)
from tests.e2e.conftest import (
    FINAL,
    Ev,
    LiveChat,
    StreamResult,
    assistant_message,
    eventually,
    nonce,
    read_stream,
)

if TYPE_CHECKING:
    from tests.chaos.conftest import Stalled

pytestmark = pytest.mark.slow

TIMEOUT = 15  # AGENTD_SHUTDOWN_TIMEOUT: a 10 s drain, then the 5 s reserve
#: kind → (streams, directive). Streams are slow (1 token/s) so a thousand stay cheap.
KINDS: dict[str, tuple[int, str]] = {
    "slow": (700, "tokens=400 rate=1"),
    "follow": (100, "tokens=400 rate=1"),  # POST /api/runs, then GET /api/runs/{id}/events
    "hung": (50, "tokens=400 hang_after=2"),  # the upstream goes quiet after 2 chunks
    "tool": (50, 'tokens=400 rate=1 tool=web_search:{"query":"chaos"}'),
    "finishing": (50, "tokens=10 rate=2"),  # opened last: they complete during the drain
}
#: Clients that read the first event, then nothing: half of their runs complete at once (the
#: web's writes block on a full buffer), half are still running at SIGTERM.
STALLED = {"stalled_done": (25, "tokens=3000"), "stalled_running": (25, "tokens=3000 rate=20")}
IDLE = 50  # keep-alive connections, idle since a GET /live
INGEST_BYTES = 200_000
OPENING = 40  # streams being opened at once (until their first event)


def ready_for_sigterm(kind: str, events: list[Ev]) -> bool:
    if kind == "hung":
        return sum(e.type == "token" for e in events) >= 2
    if kind == "tool":
        return any(e.type == "tool_call" for e in events)
    return any(e.type == "token" for e in events)


def big_text() -> str:
    sentences, size, i = [], 0, 0
    while size < INGEST_BYTES:
        sentence = f"Chaos ingest sentence {i} about shard {i % 97} and lemma {i * 7919 % 10007}. "
        sentences.append(sentence)
        size += len(sentence)
        i += 1
    return "".join(sentences)


async def test_sigterm_with_1000_streams_exits_in_budget_and_loses_nothing(start_tree,
                                                                          llm_process):
    with summary("sigterm_1000_streams") as tally, dead_endpoint() as search_url:
        tree = start_tree(
            AGENTD_SHUTDOWN_TIMEOUT=str(TIMEOUT), AGENTD_WEB_WORKERS="2",
            AGENTD_AGENT_WORKERS="2", AGENTD_MAX_CONCURRENT_RUNS="1500",
            AGENTD_LLM_MAX_CONNECTIONS="1500", AGENTD_MAX_QUEUED_RUNS="5000",
            AGENTD_RUN_TIMEOUT="600", AGENTD_WEB_SEARCH_URL=search_url,
            # Its own LLM process; a hung upstream stays hung until the drain ends.
            AGENTD_LLM_BASE_URL=llm_process, AGENTD_LLM_TIMEOUT="300",
        )
        seen: dict[tuple[str, int], list[Ev]] = {}
        results: dict[tuple[str, int], StreamResult] = {}
        stalled: dict[tuple[str, int], Stalled] = {}
        ingest: dict[str, Any] = {}
        opening = trio.CapacityLimiter(OPENING)
        timeout = httpx.Timeout(60, connect=30)
        limits = httpx.Limits(max_connections=1200, max_keepalive_connections=1200)
        one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        idle = [httpx.AsyncClient(base_url=tree.base_url, timeout=10, limits=one)
                for _ in range(IDLE)]
        async with httpx.AsyncClient(base_url=tree.base_url, timeout=timeout,
                                     limits=limits) as client:

            async def reader(kind: str, i: int, directive: str) -> None:
                key = (kind, i)
                token = object()
                await opening.acquire_on_behalf_of(token)
                held = True

                def on_event(events: list[Ev]) -> None:
                    nonlocal held
                    seen[key] = events
                    if held:
                        held = False
                        opening.release_on_behalf_of(token)

                try:
                    message = f"{kind} {i} {nonce()} [[script {directive}]]"
                    if kind == "follow":
                        created = await client.post("/api/runs", json={"message": message})
                        assert created.status_code == 202, created.text
                        url, method, kw = f"/api/runs/{created.json()['run_id']}/events", "GET", {}
                    else:
                        url, method, kw = "/api/chat/stream", "POST", {"json": {"message": message}}
                    results[key] = await read_stream(client, method, url, on_event=on_event, **kw)
                finally:
                    if held:
                        opening.release_on_behalf_of(token)

            async def stall(kind: str, i: int, directive: str) -> None:
                async with opening:
                    body = {"message": f"{kind} {i} {nonce()} [[script {directive}]]"}
                    stalled[(kind, i)] = await open_stalled(tree.port, body)

            async def ingest_big() -> None:
                began = time.monotonic()
                try:
                    response = await client.post("/api/documents", json={
                        "text": big_text(), "source": "chaos-ingest"})
                    ingest["status"] = response.status_code
                    ingest["body"] = response.text[:300]
                except httpx.HTTPError as e:
                    ingest["status"] = type(e).__name__
                ingest["s"] = round(time.monotonic() - began, 1)

            def all_ready() -> bool:
                return len(stalled) == sum(n for n, _ in STALLED.values()) and all(
                    ready_for_sigterm(kind, seen.get((kind, i), []))
                    for kind, (n, _) in KINDS.items() if kind != "finishing" for i in range(n))

            with trio.fail_after(240):
                async with trio.open_nursery() as nursery:
                    for kind, (n, directive) in [*KINDS.items(), *STALLED.items()]:
                        if kind == "finishing":
                            continue
                        for i in range(n):
                            task = stall if kind.startswith("stalled") else reader
                            nursery.start_soon(task, kind, i, directive)
                    for c in idle:
                        assert (await c.get("/live")).status_code == 200
                    await eventually(all_ready, 150, interval=0.2)
                    nursery.start_soon(ingest_big)
                    n, directive = KINDS["finishing"]
                    for i in range(n):
                        nursery.start_soon(reader, "finishing", i, directive)
                    await eventually(lambda: all(
                        ready_for_sigterm("finishing", seen.get(("finishing", i), []))
                        for i in range(n)), 30, interval=0.1)
                    tally.extra["opened_s"] = round(time.monotonic() - tally.began, 1)
                    tree.sigterm()
                    status, took = await tree.wait_exit(TIMEOUT + 5)
                    tally.extra.update(exit=status, shutdown_s=round(took, 2))
                    # Every client has its answer once the tree is gone.
                    with trio.fail_after(10):
                        while len(results) < sum(n for n, _ in KINDS.values()) or not ingest:
                            await trio.sleep(0.05)
            for c in idle:
                await c.aclose()
        for s in stalled.values():
            s.close()

        for key, result in results.items():
            tally.count_stream(key[0], result)
        for key in stalled:
            tally.streams[key[0]] += 1
        tally.extra["idle"] = IDLE
        tally.extra["ingest"] = ingest.get("status")
        summary_event = tree.events("shutdown_complete")[-1]
        tally.extra["killed"] = summary_event["killed"]
        persist_timeouts = len(tree.events("run_persist_timeout"))
        tally.extra["persist_timeouts"] = persist_timeouts

        # Every invariant is checked, and all that fail are reported together.
        problems = tally.problems
        if status != 0 or summary_event["killed"]:
            problems.append(f"exit {status}, killed {summary_event['killed']}")
        if took > TIMEOUT + 1:
            problems.append(f"exit {took:.1f} s after SIGTERM (budget {TIMEOUT} s + 1)")
        if persist_timeouts:
            problems.append(f"{persist_timeouts} runs could not store their partial in time")
        wrong_ends = []
        for (kind, i), result in sorted(results.items()):
            types = [e.type for e in result.events]
            want = "completed" if kind == "finishing" else "server_shutdown"
            if (result.status != 200 or not result.clean or types.count("end") != 1
                    or types[-1] != "end" or result.events[-1].data["reason"] != want):
                wrong_ends.append((kind, i, result.status, result.clean, types[-3:]))
        if wrong_ends:
            problems.append(f"{len(wrong_ends)} streams without exactly one `end` (or cut), "
                            f"e.g. {wrong_ends[:3]}")

        # What is stored, after a restart on the same data dir.
        await trio.to_thread.run_sync(tree.start)
        stalled_ids = [s.run_id for s in stalled.values()]
        assert all(stalled_ids), "a stalled client never saw its run event"
        async with httpx.AsyncClient(base_url=tree.base_url, timeout=30) as client:
            with trio.fail_after(120):
                running_at_start = (await client.get("/api/status")).json()["runs"]
                runs = await runs_by_status(
                    client, [r.run_id for r in results.values()] + stalled_ids)
                tally.runs.update(count_statuses(runs.values()))
                tools = [r for (kind, _i), r in results.items() if kind == "tool"]
                stored_tools = [await assistant_message(client, r.session_id, r.run_id)
                                for r in tools if runs[r.run_id]["status"] in FINAL]
                documents = (await client.get("/api/documents")).json()["documents"]
        if running_at_start.get("running", 0):
            problems.append(f"{running_at_start['running']} runs left `running` at exit")
        if not_final(runs):
            problems.append(f"{len(not_final(runs))} of our runs not final after the restart")
        # (A client whose stream was cut got less than was streamed: only whole streams.)
        cut = {(w[0], w[1]) for w in wrong_ends}
        wrong = [key for key, r in results.items()
                 if key not in cut and runs[r.run_id]["output"] != r.tokens]
        if wrong:
            problems.append(f"{len(wrong)} stored partials differ from the stream, "
                            f"e.g. {wrong[:3]}")
        finishing = [r for (kind, _i), r in results.items() if kind == "finishing"]
        if any(runs[r.run_id]["status"] != "completed" for r in finishing):
            problems.append("a run that finished during the drain is not `completed`")
        if any(m["status"] != "interrupted" or not m["tool_calls"] for m in stored_tools):
            problems.append("a run interrupted in a tool call lost its tool calls")
        mine = [d for d in documents if d.get("source") == "chaos-ingest"]
        if ingest.get("status") == 201:
            if len(mine) != 1 or mine[0]["chunks"] != json.loads(ingest["body"])["chunks"]:
                problems.append(f"the ingest answered 201 but the store has {mine}")
        elif any(d["chunks"] for d in mine):  # cut: absent, or listed as not indexed
            problems.append(f"the ingest was cut ({ingest}) yet its document is indexed")
        assert not problems, problems
        assert tree.stop(timeout=TIMEOUT + 5) == 0


async def test_client_that_stopped_reading_does_not_hold_the_shutdown_past_its_budget(
    start_tree,
):
    with summary("sigterm_slow_reader") as tally:
        tree = start_tree(AGENTD_SHUTDOWN_TIMEOUT=str(TIMEOUT))
        async with httpx.AsyncClient(base_url=tree.base_url, timeout=60) as client:
            chat = LiveChat(client, "tokens=400 rate=5")
            with trio.fail_after(TIMEOUT + 40):
                # Its run completes at once; the web's writes to it block on a full buffer.
                stalled = await open_stalled(tree.port, {
                    "message": f"{nonce()} [[script tokens=3000]]"})
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(chat.read)
                    await eventually(lambda: chat.tokens() >= 1, 15)
                    await trio.sleep(1)
                    tree.sigterm()
                    status, took = await tree.wait_exit(TIMEOUT + 5)
            stalled.close()
        result = chat.result
        assert result is not None
        tally.count_stream("reading", result)
        tally.streams["stalled"] += 1
        event = tree.events("shutdown_complete")[-1]
        tally.extra.update(exit=status, shutdown_s=round(took, 2), killed=event["killed"])
        assert result.ends and result.ends[-1].data["reason"] == "server_shutdown"
        assert (status, event["killed"]) == (0, []), event
        assert took <= TIMEOUT + 1
