"""SIGKILL of a child under load, repeated, one role per test: web, agent, embedding,
PostgreSQL, Redis (API.md: Signals and exit → "SIGKILL or SIGSTOP of one child"; DESIGN.md
I3, I4).

Each round puts load on the tree (streams in flight, runs accepted with 202), SIGKILLs one
process of the role (which one, and when, from a seeded random generator: the seed is in
the summary line, and AGENTD_CHAOS_SEED replays it), then checks that:

- the supervisor replaced it (a new pid with the role's command line);
- every stream ends with exactly one `end`; a stream cut with its web process is resumed
  through the shared listener (`GET /api/runs/{id}/events` + `Last-Event-ID`), and what
  the client got before and after the cut is exactly what is stored;
- no accepted run is lost: each reaches a final status (its agent gone: reclaimed and
  interrupted, or requeued and completed);
- the service recovers: /ready, a new chat, and (for the embedding) a search.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from tests.chaos.conftest import Tally, role_procs, summary
from tests.e2e.conftest import (
    FINAL,
    Ev,
    StreamResult,
    eventually,
    nonce,
    read_stream,
    run_final,
    tokens_at_least,
)
from tests.support.scripted_llm import token_text

if TYPE_CHECKING:
    from tests.e2e.conftest import AgentdTree

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("AGENTD_CHAOS_SEED", "20261201"))
ROUNDS = 2  # kills per role, each followed by recovery
STREAMS = 12  # per round: streams in flight when the kill comes
ACCEPTED = 6  # per round: runs accepted (202) just before it
#: A run's lease is 15 s and live agents look for expired ones every 5 s; the replacement
#: agent, or PostgreSQL after crash recovery, needs a few seconds more.
RECOVERY_S = 60
ENV = {
    # Two webs share the listener: a killed one's streams resume through the other.
    "AGENTD_WEB_WORKERS": "2",
    "AGENTD_AGENT_WORKERS": "2",
    "AGENTD_SHUTDOWN_TIMEOUT": "10",
    "AGENTD_LLM_TIMEOUT": "10",
}
COUNTS = {"web": 2, "agent": 2, "embedding": 1, "postgres": 1, "redis": 1}


async def resume(client: httpx.AsyncClient, cut: StreamResult) -> StreamResult:
    """Read the rest of a cut stream, after the last event id it got (through any web)."""
    last = next((e.id for e in reversed(cut.events) if e.id is not None), None)
    headers = {"Last-Event-ID": last} if last else {}
    return await read_stream(client, "GET", f"/api/runs/{cut.run_id}/events", headers=headers)


async def one_round(tree: AgentdTree, role: str, rng: random.Random, tally: Tally,
                    problems: list[str]) -> None:
    victims = role_procs(tree, role)
    assert len(victims) == COUNTS[role], (role, victims)
    victim = rng.choice(victims)
    delay = rng.uniform(0.5, 3.0)
    seen: dict[int, list[Ev]] = {}
    results: dict[int, StreamResult] = {}
    cut_early = [0]
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=tree.base_url, timeout=60, limits=limits) as client:

        async def chat(i: int) -> None:
            tokens = 40 + i  # 8-11 s at 5 tokens/s: most are in flight when the kill comes
            try:
                results[i] = await read_stream(
                    client, "POST", "/api/chat/stream",
                    json={"message": f"{role} {i} {nonce()} [[script tokens={tokens} rate=5]]"},
                    on_event=lambda events: seen.__setitem__(i, events))
            except httpx.TransportError as e:  # cut before the response began: say so
                cut_early[0] += 1
                problems.append(f"stream {i} failed before its first byte: {e!r}")

        with trio.fail_after(RECOVERY_S + 60):
            async with trio.open_nursery() as nursery:
                for i in range(STREAMS):
                    nursery.start_soon(chat, i)
                await eventually(lambda: len(seen) == STREAMS and all(
                    tokens_at_least(1)(events) for events in seen.values()), 30)
                accepted = []
                for i in range(ACCEPTED):
                    created = await client.post("/api/runs", json={
                        "message": f"{role} run {i} {nonce()} [[script tokens=20 rate=10]]"})
                    assert created.status_code == 202, created.text
                    accepted.append(created.json()["run_id"])
                await trio.sleep(delay)
                os.kill(victim.pid, signal.SIGKILL)
                killed_at = time.monotonic()
                before = {p.pid for p in victims}
                await eventually(lambda: len(role_procs(tree, role)) == COUNTS[role] and any(
                    p.pid not in before for p in role_procs(tree, role)), RECOVERY_S)
                tally.extra.setdefault("replaced_s", []).append(
                    round(time.monotonic() - killed_at, 1))
                # Every stream ends (or is cut with its web) within the recovery bound.
                with trio.move_on_at(trio.current_time() + RECOVERY_S
                                     - (time.monotonic() - killed_at)):
                    await eventually(lambda: len(results) + cut_early[0] == STREAMS, RECOVERY_S + 1)
                if len(results) + cut_early[0] < STREAMS:
                    tally.ends["(still open)"] += STREAMS - len(results) - cut_early[0]
                    problems.append(f"{STREAMS - len(results) - cut_early[0]} streams still open "
                                    f"{RECOVERY_S} s after the kill, without an `end`")
                    nursery.cancel_scope.cancel()

            # Streams: one `end` each; a cut one is resumed through the listener.
            for i, result in sorted(results.items()):
                tally.count_stream("cut" if not result.ends else "whole", result)
                whole = result
                if not result.ends and not result.clean:
                    rest = await resume(client, result)
                    tally.ends[f"resumed:{rest.ends[-1].data['reason']}" if rest.ends
                               else "resumed:(none)"] += 1
                    whole = StreamResult(rest.status, rest.headers,
                                         result.events + rest.events[1:], rest.clean)
                types = [e.type for e in whole.events]
                if types.count("end") != 1 or types[-1] != "end" or not whole.clean:
                    problems.append(f"stream {i}: {types.count('end')} ends, clean={whole.clean}, "
                                    f"last {types[-3:]}")
                    continue
                run = await run_final(client, result.run_id, RECOVERY_S)
                if run["output"] != whole.tokens:
                    problems.append(f"stream {i}: stored {len(run['output'] or '')} chars, "
                                    f"streamed {len(whole.tokens)}")
            # Accepted runs: none lost.
            runs = await settled(client, [*accepted, *(e[0].data["run_id"] for e in seen.values())])
            tally.runs.update(r["status"] for r in runs.values())
            lost = [rid for rid, r in runs.items() if r["status"] not in FINAL]
            if lost:
                problems.append(f"{len(lost)} runs not final {RECOVERY_S} s after the kill")
            for run_id in accepted:
                run = runs[run_id]
                if run["status"] == "completed" and run["output"] != token_text(20):
                    problems.append(f"run {run_id} completed with {run['output']!r}")
        tally.extra.setdefault("killed", []).append(f"{role}:{victim.pid}@{delay:.1f}s")


async def settled(client: httpx.AsyncClient, run_ids: list[str]) -> dict[str, dict]:
    """Each run as it stands once all are final, or when RECOVERY_S have passed."""
    runs: dict[str, dict] = {}

    async def check() -> bool:
        for run_id in run_ids:
            if runs.get(run_id, {}).get("status") not in FINAL:
                try:
                    reply = await client.get(f"/api/runs/{run_id}")
                except httpx.TransportError as e:
                    runs[run_id] = {"status": f"unanswered ({type(e).__name__})"}
                    continue
                # A dependency still coming back answers 503: not final yet, look again.
                runs[run_id] = (reply.json() if reply.status_code == 200
                                else {"status": f"unanswered (HTTP {reply.status_code})"})
        return all(r["status"] in FINAL for r in runs.values())

    with trio.move_on_after(RECOVERY_S):
        await eventually(check, RECOVERY_S + 1, interval=0.5)
    return runs


async def recovered(tree: AgentdTree, role: str) -> None:
    """The service answers again: /ready, a chat, and a search once the model is back."""
    async with httpx.AsyncClient(base_url=tree.base_url, timeout=30) as client:

        async def ready() -> bool:
            try:
                return (await client.get("/ready")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(ready, RECOVERY_S, interval=0.2)
        with trio.fail_after(30):
            chat = await client.post("/api/chat", json={"message": "[[script tokens=3]]"})
        assert chat.status_code == 200 and chat.json()["response"] == token_text(3), chat.text
        if role == "embedding":

            async def searchable() -> bool:
                return (await client.get("/api/search", params={"q": "x"})).status_code == 200

            await eventually(searchable, RECOVERY_S, interval=0.5)


@pytest.mark.parametrize("role", list(COUNTS))
async def test_sigkill_of_a_child_under_load_is_survived_and_loses_no_run(start_tree, role):
    rng = random.Random(f"{SEED}-{role}")
    with summary(f"sigkill_{role}") as tally:
        problems = tally.problems
        tally.extra["seed"] = SEED
        tree = start_tree(**ENV)
        for _ in range(ROUNDS):
            await one_round(tree, role, rng, tally, problems)
            if problems:
                break
            await recovered(tree, role)
        restarts = Counter(e["child"] for e in tree.events("child_restarting"))
        tally.extra["restarts"] = dict(restarts)
        assert tree.alive(), tree.text()[-3000:]
        assert not tree.events("restart_intensity_exceeded")
        assert not problems, problems
        assert all(r in FINAL for r in tally.runs), tally.runs
        assert tree.stop(timeout=20) == 0
