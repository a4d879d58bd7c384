"""Scale-out: two `agentd serve` trees on one machine, as two hosts would run them, against one
external PostgreSQL and one external Redis (API.md, Configuration: `AGENTD_DATABASE_URL`,
`AGENTD_REDIS_URL`).

The external servers are started by this module the way `tests/conftest.py` starts its
session infra: `supervisor.infra.infra_specs` → `Tree` → `run_tree`, in a thread of its own,
on a private directory under /tmp. They listen on unix sockets only (that is how the embedded
specs are built), which every process on this machine can reach as well as TCP; two real
hosts would give TCP URLs instead. Tree A and tree B each get both URLs, so neither embeds
PostgreSQL or Redis; each has its own data dir and port, and both talk to the scripted LLM.

Not covered: a shared Qdrant. There is no Qdrant server binary on this machine, and
qdrant-client's local mode allows one process per path, so each tree keeps its own local
vector store in its own data dir (no `AGENTD_QDRANT_URL`). The knowledge base is therefore
per tree here; runs, events and streams (what this module checks) do not touch it.

Which agent ran a run is read from each tree's own log: the agent logs `run_started` with
the `run_id` when it claims a run, and each tree logs to its own file. To make the split
between the trees deterministic rather than a race, the trees' agents have small capacities
(`AGENTD_MAX_CONCURRENT_RUNS`: A 2, B 3): five runs that each outlast the claim latency,
queued at once, fill both agents, so A runs exactly two of them and B three.

The module's tests share the external servers and both trees (each start costs ~15-20 s);
the last one stops tree A.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from supervisor.infra import infra_specs
from supervisor.run import Tree
from tests.conftest import TreeThread
from tests.e2e.conftest import (
    SHARED_ENV,
    AgentdTree,
    Ev,
    StreamResult,
    assistant_message,
    eventually,
    id_key,
    nonce,
    read_stream,
    requests_with,
    run_final,
    tokens_at_least,
    tree_root,
)
from tests.support.scripted_llm import token_text
from tests.support.tree import tree_processes

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.support.scripted_llm import ScriptedLLM

CAPACITY = {"a": 2, "b": 3}
SHUTDOWN_S = float(SHARED_ENV["AGENTD_SHUTDOWN_TIMEOUT"])


@dataclass
class Cluster:
    database_url: str
    redis_url: str
    a: AgentdTree
    b: AgentdTree

    def trees(self) -> dict[str, AgentdTree]:
        return {"a": self.a, "b": self.b}

    def ran_by(self, run_id: str) -> list[str]:
        """The trees whose agent logged `run_started` for `run_id` (one entry per start)."""
        return [name for name, tree in self.trees().items()
                for e in tree.events("run_started") if e.get("run_id") == run_id]


def _start_both(trees: list[AgentdTree]) -> None:
    """Start the trees at the same time (and so also their migrations against one
    database, as hosts rolling out together would)."""
    errors: list[BaseException] = []

    def start(tree: AgentdTree) -> None:
        try:
            tree.start()
        except BaseException as e:  # re-raised below, in the fixture's thread
            errors.append(e)

    threads = [threading.Thread(target=start, args=(t,), daemon=True) for t in trees]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    if any(thread.is_alive() for thread in threads):
        raise AssertionError("a tree did not start within 120 s")


@pytest.fixture(scope="module")
def cluster(llm: ScriptedLLM) -> Iterator[Cluster]:
    with tree_root("scale-out") as root:
        data_dir, runtime_dir = root / "infra" / "data", root / "infra" / "run"
        specs, database_url, redis_url = infra_specs(
            data_dir, runtime_dir, database_url=None, redis_url=None)
        runner = TreeThread(
            Tree(specs, runtime_dir=runtime_dir, shutdown_timeout=10, shutdown_reserve=2))
        trees: list[AgentdTree] = []
        try:
            runner.start(timeout=90)
            for name in ("a", "b"):
                trees.append(AgentdTree(root / name, llm.base_url, {
                    **SHARED_ENV,
                    "AGENTD_DATABASE_URL": database_url,
                    "AGENTD_REDIS_URL": redis_url,
                    "AGENTD_MAX_CONCURRENT_RUNS": str(CAPACITY[name]),
                }))
            _start_both(trees)
            yield Cluster(database_url, redis_url, *trees)
            for tree in trees:
                if tree.alive():
                    status = tree.stop(timeout=20)
                    assert status == 0, f"exited {status}:\n{tree.text()[-3000:]}"
        finally:
            for tree in trees:
                tree.kill()
            exit_code = runner.stop(timeout=20)
        assert exit_code == 0, f"external infra tree exited {exit_code}"


def _ensure_running(tree: AgentdTree) -> None:
    """Tests here may run alone or in another order: a tree stopped by one comes back."""
    if not tree.alive():
        tree.start()


def one_end_last(result: StreamResult) -> dict[str, Any]:
    types = [e.type for e in result.events]
    assert types and types[0] == "run", types
    assert types.count("end") == 1 and types[-1] == "end", types
    return result.events[-1].data


def last_id(events: list[Ev]) -> str:
    ids = [e.id for e in events if e.id is not None]
    assert ids, events
    return ids[-1]


# ------------------------------------------------------------------------------------------


async def test_both_trees_use_the_external_servers_and_embed_none(cluster: Cluster):
    for name, tree in cluster.trees().items():
        _ensure_running(tree)
        procs = tree_processes(tree.pid)
        assert "postgres" not in procs.by_role, (name, procs.cmdlines)
        assert "redis" not in procs.by_role, (name, procs.cmdlines)
        for role in ("web", "agent", "embedding"):
            assert len(procs.by_role.get(role, [])) == 1, (name, role, procs.cmdlines)
        starting = tree.events("starting")
        assert starting and starting[-1].get("embedded") == [], (name, starting)
    async with (httpx.AsyncClient(base_url=cluster.a.base_url, timeout=10) as a,
                httpx.AsyncClient(base_url=cluster.b.base_url, timeout=10) as b):
        for client in (a, b):
            health = (await client.get("/health")).json()
            assert health["checks"]["database"] == "ok", health
            assert health["checks"]["redis"] == "ok", health


async def test_runs_submitted_through_one_tree_are_executed_by_both_and_read_through_the_other(
        cluster: Cluster, llm: ScriptedLLM):
    _ensure_running(cluster.a)
    _ensure_running(cluster.b)
    n = sum(CAPACITY.values())  # exactly enough to fill both agents
    markers = [nonce() for _ in range(n)]
    results: dict[int, StreamResult] = {}
    # 3 s each: far longer than an agent needs to claim a queued run (LISTEN/NOTIFY, ~ms;
    # at worst its 2 s poll), so each agent fills up to its capacity before any run ends.
    script = "[[script tokens=30 rate=10]]"
    async with (httpx.AsyncClient(base_url=cluster.a.base_url, timeout=30) as a,
                httpx.AsyncClient(base_url=cluster.b.base_url, timeout=30) as b):
        run_ids = []
        for marker in markers:
            response = await a.post("/api/runs", json={"message": f"{marker} {script}"})
            assert response.status_code == 202, response.text
            run_ids.append(response.json()["run_id"])

        async def follow(i: int) -> None:
            results[i] = await read_stream(b, "GET", f"/api/runs/{run_ids[i]}/events")

        with trio.fail_after(45):
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(follow, i)

        for i, run_id in enumerate(run_ids):
            result = results[i]
            assert result.status == 200 and result.clean, (i, result)
            end = one_end_last(result)
            assert end["reason"] == "completed", end
            assert result.run_id == run_id
            assert result.tokens == token_text(30)
            # The same outcome read through either tree.
            for client in (a, b):
                row = await run_final(client, run_id, 10)
                assert row["status"] == "completed" and row["output"] == token_text(30), row
            message = await assistant_message(b, result.session_id, run_id)
            assert message["status"] == "complete" and message["content"] == result.tokens

    # Each run was executed once, by one agent, with one LLM request; both agents had work.
    by = {run_id: await eventually(lambda r=run_id: cluster.ran_by(r), 5) for run_id in run_ids}
    assert all(len(trees) == 1 for trees in by.values()), by
    assert all(len(requests_with(llm, marker)) == 1 for marker in markers)
    counts = Counter(trees[0] for trees in by.values())
    assert counts["a"] >= 1 and counts["b"] >= 1, counts
    assert counts == Counter(CAPACITY), counts  # both agents were filled, none took more


async def test_a_stream_opened_on_one_tree_resumes_on_the_other(cluster: Cluster):
    _ensure_running(cluster.a)
    _ensure_running(cluster.b)
    async with (httpx.AsyncClient(base_url=cluster.a.base_url, timeout=30) as a,
                httpx.AsyncClient(base_url=cluster.b.base_url, timeout=30) as b):
        response = await a.post("/api/runs", json={
            "message": f"resume {nonce()} [[script tokens=200 rate=10]]",
            "on_disconnect": "continue"})
        assert response.status_code == 202, response.text
        run_id = response.json()["run_id"]
        with trio.fail_after(20):
            first = await read_stream(a, "GET", f"/api/runs/{run_id}/events",
                                      until=tokens_at_least(5))
        assert first.status == 200 and first.left, first
        assert not first.ends
        cut = last_id(first.events)
        # Away for a while: the run goes on, and the resume gets a replay, then live events.
        await trio.sleep(1.5)
        assert (await b.get(f"/api/runs/{run_id}")).json()["status"] == "running"
        with trio.fail_after(40):
            second = await read_stream(b, "GET", f"/api/runs/{run_id}/events",
                                       headers={"Last-Event-ID": cut})
        assert second.status == 200 and second.clean, second
        end = one_end_last(second)
        assert end["reason"] == "completed", end
        resumed_ids = [e.id for e in second.events if e.id is not None]
        assert resumed_ids and id_key(resumed_ids[0]) > id_key(cut), (cut, resumed_ids[:3])
        assert resumed_ids == sorted(resumed_ids, key=id_key)
        assert len(set(resumed_ids)) == len(resumed_ids)
        # Nothing lost, nothing twice: the two halves are the whole answer, as stored.
        assert first.tokens + second.tokens == token_text(200)
        assert len(first.tokens) > 0 and len(second.tokens) > 0
        row = await run_final(b, run_id, 10)
        assert row["status"] == "completed" and row["output"] == token_text(200), row
        message = await assistant_message(a, second.session_id, run_id)
        assert message["status"] == "complete" and message["content"] == token_text(200)


async def test_stopping_one_tree_does_not_disturb_the_others_streams(cluster: Cluster):
    """Five 20 s runs streamed through B fill both agents (A two, B three); SIGTERM to A
    then: B's own runs stream on through and after A's exit and complete; A's two runs are
    interrupted by A's drain, and B relays that end (once, resumable) instead of hanging."""
    a_tree, b_tree = cluster.a, cluster.b
    _ensure_running(a_tree)
    _ensure_running(b_tree)
    n = sum(CAPACITY.values())
    tokens = 200
    results: dict[int, StreamResult] = {}
    seen: dict[int, list[Ev]] = {}
    arrived: dict[int, list[float]] = {}
    async with httpx.AsyncClient(base_url=b_tree.base_url, timeout=30) as b:
        run_ids = []
        for i in range(n):
            response = await b.post("/api/runs", json={
                "message": f"stay {i} {nonce()} [[script tokens={tokens} rate=10]]"})
            assert response.status_code == 202, response.text
            run_ids.append(response.json()["run_id"])

        async def follow(i: int) -> None:
            arrived[i] = []

            def on_event(events: list[Ev]) -> None:
                seen[i] = events
                arrived[i].append(time.monotonic())

            results[i] = await read_stream(b, "GET", f"/api/runs/{run_ids[i]}/events",
                                           on_event=on_event)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(follow, i)
                await eventually(lambda: len(seen) == n and all(
                    tokens_at_least(3)(events) for events in seen.values()), 20)
                owner = {r: await eventually(lambda r=r: cluster.ran_by(r), 5) for r in run_ids}
                assert all(len(t) == 1 for t in owner.values()), owner
                on = {name: [i for i, r in enumerate(run_ids) if owner[r] == [name]]
                      for name in ("a", "b")}
                assert {k: len(v) for k, v in on.items()} == CAPACITY, on
                a_tree.sigterm()
                status, took = await a_tree.wait_exit(SHUTDOWN_S + 5)
                a_exited = time.monotonic()
                assert status == 0, a_tree.text()[-3000:]
                assert all(i not in results for i in on["b"]), "B's streams ended with A"
                # The nursery now waits for every stream to end.

        assert b_tree.alive()
        assert (await b.get("/ready")).status_code == 200
        for i in on["b"]:
            result = results[i]
            assert result.status == 200 and result.clean, (i, result.events[-3:])
            end = one_end_last(result)
            assert end["reason"] == "completed", (i, end)
            assert result.tokens == token_text(tokens), i
            # Still flowing after A was gone: a good part of the answer came after A's exit.
            after = [t for e, t in zip(result.events, arrived[i], strict=True)
                     if e.type == "token" and t > a_exited]
            assert len(after) >= 20, (i, len(after), took)
            message = await assistant_message(b, result.session_id, run_ids[i])
            assert message["status"] == "complete" and message["content"] == result.tokens
        for i in on["a"]:
            # A's own runs: interrupted by its drain. B's stream relays that end, once.
            result = results[i]
            assert result.status == 200 and result.clean, (i, result.events[-3:])
            end = one_end_last(result)
            assert end["reason"] == "server_shutdown" and end["resumable"] is True, (i, end)
            assert 0 < len(result.tokens) < len(token_text(tokens))
            message = await assistant_message(b, result.session_id, run_ids[i])
            assert message["status"] == "interrupted" and message["content"] == result.tokens
    summary = a_tree.events("shutdown_complete")[-1]
    assert summary["exit_status"] == 0 and summary["killed"] == [], summary

