"""How runs end (app/agent/worker.py): the drain concludes its interrupted runs in bulk, an
`end` always reaches the stream before the run is committed final, and a run whose `end`
could not be appended is left to the reclaimer, which ends it from its stream.

Real PostgreSQL and Redis (the session's `infra`; a private Redis where it is killed); the
LLM, which lives outside the machine, is a stub provider that streams tokens until cancelled.
"""

from __future__ import annotations

import time
import uuid
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
import structlog
import trio
from psycopg.rows import dict_row

from app.agent import worker as worker_module
from app.agent.llm import Turn
from app.agent.run import RunDeps, RunState
from app.agent.tools import ToolRegistry
from app.agent.worker import Worker
from app.config import Settings
from app.db import runs as q
from app.db.pool import open_database
from app.events import EventWriter, encode, read_after
from app.lifecycle import Lifecycle
from app.redis import open_redis
from tests.support.redis_server import RedisServer, private_redis

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from app.db.pool import Database
    from app.redis import RedisClient

OWNER = "test-conclude"


class Streaming:
    """A provider that sends one token every `interval` seconds until it is cancelled."""

    model = "stub"

    def __init__(self, interval: float) -> None:
        self.interval = interval

    async def stream_turn(self, messages: list[dict[str, Any]],
                          tools: list[dict[str, Any]] | None,
                          on_token: Callable[[str], None]) -> Turn:
        turn = Turn()
        i = 0
        while True:
            await trio.sleep(self.interval)
            turn.content.append(f"w{i} ")
            on_token(f"w{i} ")
            i += 1


@pytest.fixture
def private() -> Iterator[RedisServer]:
    yield from private_redis()


@asynccontextmanager
async def agent(infra: Any, redis_url: str, *, interval: float = 0.2, serve: bool = True
                ) -> AsyncIterator[tuple[Worker, Database, RedisClient]]:
    """A `Worker` and its event writer (serving, unless told not to), on real PostgreSQL
    and Redis."""
    settings = Settings(database_url=infra.database_url, redis_url=redis_url)
    async with (open_database(infra.database_url, max_size=10) as db,
                open_redis(redis_url, connect_timeout=2) as redis,
                trio.open_nursery() as nursery):
        writer = EventWriter(redis, ttl=600)
        if serve:
            await nursery.start(writer.serve)
        deps = RunDeps(Streaming(interval), ToolRegistry(), writer, "system", 10)
        worker = Worker(settings, Lifecycle("agent", 30, 5), db, redis, deps)
        writer.on_backlog = worker.shed_load
        yield worker, db, redis
        nursery.cancel_scope.cancel()


async def running_runs(db: Database, n: int, worker_id: str) -> list[dict[str, Any]]:
    """``n`` runs of our own, each in its own session, running and leased to ``worker_id``."""
    def make(conn: Any) -> list[dict[str, Any]]:
        ids = [q.create_run(conn, owner=OWNER, message=f"m{i}", session_id=None,
                            on_disconnect="continue", timeout_s=None, cache=False,
                            max_queued=None).run_id for i in range(n)]
        cur = conn.cursor(row_factory=dict_row)
        return cur.execute(
            "UPDATE runs SET status = 'running', lease_owner = %s, attempts = 1,"
            " lease_expires_at = now() + interval '60 seconds', started_at = now()"
            f" WHERE id = ANY(%s) RETURNING {q.RUN_COLUMNS}",
            (worker_id, [uuid.UUID(i) for i in ids])).fetchall()

    return await db.run(make)


async def stored(db: Database, run_ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = await db.fetchall(
        "SELECT r.id::text AS run_id, r.status, r.reason, r.output,"
        " r.assistant_message_id::text AS message_id, m.content, m.status AS message_status,"
        " m.tool_calls FROM runs r LEFT JOIN messages m ON m.id = r.assistant_message_id"
        " WHERE r.id = ANY(%s)", ([uuid.UUID(i) for i in run_ids],))
    return {row["run_id"]: row for row in rows}


def check_stream(events: list[Any], reason: str) -> tuple[str, str]:
    """(the tokens, the `end`'s message id) of a stream that ends once, last."""
    types = [e.type for e in events]
    assert types.count("end") == 1 and types[-1] == "end", types[-3:]
    end = events[-1].payload()
    assert end["reason"] == reason and end["resumable"] is (reason == "server_shutdown")
    return "".join(e.payload()["content"] for e in events if e.type == "token"), end["message_id"]


async def test_runs_interrupted_together_take_one_append_and_one_transaction(infra):
    # Without the background flush: what is buffered stays so until the conclusion.
    async with agent(infra, infra.redis_url, serve=False) as (worker, db, redis):
        runs = await running_runs(db, 500, worker.id)
        writer = worker.deps.writer
        states = []
        for i, run in enumerate(runs):
            state = RunState(run)
            for j in range(3):  # the last one is still buffered when the drain ends
                state.content.append(f"{i}.{j} ")
                writer.append(state.run_id, "token",
                              encode("token", state.run_id, content=f"{i}.{j} "))
                if j == 1:
                    await writer.flush()
            if i % 50 == 0:
                state.tool_calls.append({"call_id": "c1", "name": "calculator",
                                         "arguments": "{}"})
            states.append(state)

        writes = transactions = 0
        write, run_in_db = writer._write, db.run

        async def counted_write(*args: Any) -> list[str]:
            nonlocal writes
            writes += 1
            return await write(*args)

        async def counted_run(fn: Any) -> Any:
            nonlocal transactions
            transactions += 1
            return await run_in_db(fn)

        writer._write = counted_write  # type: ignore[method-assign]
        db.run = counted_run  # type: ignore[method-assign]
        with structlog.testing.capture_logs() as logs, trio.fail_after(30):
            began = time.perf_counter()
            await worker.conclude_interrupted(states)
            took = time.perf_counter() - began
        db.run = run_in_db  # type: ignore[method-assign]
        print(f"\n500 runs concluded in {took * 1000:.0f} ms")
        assert (writes, transactions) == (1, 1)
        assert not [e for e in logs if e["event"] == "run_persist_timeout"]

        rows = await stored(db, [s.run_id for s in states])
        for i, state in enumerate(states):
            row = rows[state.run_id]
            tokens, message_id = check_stream(await read_after(redis, state.run_id, None),
                                              "server_shutdown")
            assert tokens == row["output"] == row["content"] == "".join(state.content)
            assert (row["status"], row["reason"], row["message_status"]) == (
                "interrupted", "server_shutdown", "interrupted")
            assert row["message_id"] == message_id
            assert bool(row["tool_calls"]) is (i % 50 == 0)


async def test_the_drain_ends_hundreds_of_runs_before_the_web_would_end_their_streams(infra):
    async with agent(infra, infra.redis_url, interval=0.5) as (worker, db, redis):
        runs = await running_runs(db, 500, worker.id)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for run in runs:
                    worker.active[run["run_id"]] = (trio.CancelScope(), RunState(run))
                    nursery.start_soon(worker.run_one, run["run_id"])
                while not all(state.content for _, state in worker.active.values()):
                    await trio.sleep(0.05)
                # A 1 s drain, then 1 s to stop in: 500 runs interrupted at once.
                worker.life.timeout, worker.life.reserve = 2.0, 1.0
                with structlog.testing.capture_logs() as logs:
                    worker.life.begin_drain("test")
                    await worker.drain()
                    while worker.active:
                        await trio.sleep(0.01)
                ended_at = trio.current_time()
        # A web process waits for the agent's `end` until halfway through the stop span
        # (WebState.stream_cutoff), then sends its own: every run must have ended by then.
        drain_end = worker.life.drain_deadline
        assert ended_at - drain_end < 0.5 * (worker.life.deadline - drain_end)
        assert not [e for e in logs if e["event"] == "run_persist_timeout"]
        [summary] = [e for e in logs if e["event"] == "runs_interrupted"]
        assert summary["runs"] == 500 and summary["stored"] is True
        print(f"\n500 runs interrupted: concluded in {summary['duration_s']} s, all ended "
              f"{ended_at - drain_end:.3f} s after the drain deadline")
        rows = await stored(db, [r["run_id"] for r in runs])
        for run in runs:
            row = rows[run["run_id"]]
            tokens, message_id = check_stream(await read_after(redis, run["run_id"], None),
                                              "server_shutdown")
            assert (row["status"], row["output"], row["message_id"]) == (
                "interrupted", tokens, message_id)


async def test_an_end_that_cannot_be_appended_leaves_the_run_to_the_reclaimer(
        infra, private, monkeypatch):
    monkeypatch.setattr(worker_module, "PERSIST_S", 0.5)
    monkeypatch.setattr(worker_module, "RECLAIM_AFTER_OUTAGE_S", 0.0)
    await private.start()
    async with agent(infra, private.url) as (worker, db, redis):
        [run] = await running_runs(db, 1, worker.id)
        state = RunState(run)
        writer = worker.deps.writer
        for word in ("kept ", "while ", "away"):
            state.content.append(word)
            writer.append(state.run_id, "token", encode("token", state.run_id, content=word))
        private.kill()
        with structlog.testing.capture_logs() as logs, trio.fail_after(10):
            await worker.conclude(state, "completed")
        [timeout] = [e for e in logs if e["event"] == "run_persist_timeout"]
        assert timeout["stage"] == "end"
        row = (await stored(db, [state.run_id]))[state.run_id]
        assert (row["status"], row["message_id"]) == ("running", None)

        # Redis is back: what the writer kept goes out, the `end` last; once the lease runs
        # out, the reclaimer stores what the stream says.
        await private.start()
        with trio.fail_after(10):
            while not any(e.type == "end" for e in await read_after(redis, state.run_id, None)):
                await trio.sleep(0.05)
        await db.execute("UPDATE runs SET lease_expires_at = now() - interval '1 second'"
                         " WHERE id = %s", (uuid.UUID(state.run_id),))
        with trio.fail_after(10):
            await worker.reclaim()
        tokens, message_id = check_stream(await read_after(redis, state.run_id, None),
                                          "completed")
        row = (await stored(db, [state.run_id]))[state.run_id]
        assert (row["status"], row["output"], row["message_status"], row["message_id"]) == (
            "completed", tokens, "complete", message_id)
        assert tokens == "kept while away"


async def test_a_run_whose_agent_died_mid_stream_is_interrupted_once(infra):
    async with agent(infra, infra.redis_url) as (worker, db, redis):
        [run] = await running_runs(db, 1, "a-dead-agent")
        writer = worker.deps.writer
        writer.append(run["run_id"], "token", encode("token", run["run_id"], content="half"))
        await writer.flush()
        await db.execute("UPDATE runs SET lease_expires_at = now() - interval '1 second'"
                         " WHERE id = %s", (uuid.UUID(run["run_id"]),))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:  # two reclaimers at once
                nursery.start_soon(worker.reclaim)
                nursery.start_soon(worker.reclaim)
        tokens, message_id = check_stream(await read_after(redis, run["run_id"], None),
                                          "server_shutdown")
        row = (await stored(db, [run["run_id"]]))[run["run_id"]]
        assert (row["status"], row["output"], row["message_id"]) == (
            "interrupted", "half", message_id)


async def test_a_full_event_buffer_ends_the_runs_with_error(infra, private, monkeypatch):
    monkeypatch.setattr(worker_module, "PERSIST_S", 0.5)
    await private.start()
    async with agent(infra, private.url, interval=0.02) as (worker, db, _redis):
        worker.deps.writer.max_buffered = 50
        [run] = await running_runs(db, 1, worker.id)
        worker.active[run["run_id"]] = (trio.CancelScope(), RunState(run))
        private.kill()
        with trio.fail_after(10):
            await worker.run_one(run["run_id"])
        # The bound, plus what one run streams (50 tokens/s) between two attempts to write.
        assert worker.deps.writer.buffered < 150
        row = await db.run(partial(q.run_status, run_id=run["run_id"]))
        assert row is not None and row["status"] == "running"  # no `end` yet: reclaimer's


async def test_whoever_saw_the_end_reads_the_stored_outcome(infra):
    """The `end` is appended before the commit: a reader that saw it (/api/chat reads the
    run once its `end` arrives) must wait for the commit rather than read `running`."""
    async with agent(infra, infra.redis_url) as (worker, db, redis):
        [run] = await running_runs(db, 1, worker.id)
        state = RunState(run)
        state.content.append("all of it")
        writer = worker.deps.writer
        append_now_many = writer.append_now_many
        seen: list[dict[str, Any]] = []
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:

                async def read() -> None:
                    seen.append(await db.run(lambda c: q.get_run(c, state.run_id, None)))

                async def append_then_read(*args: Any, **kw: Any) -> list[str]:
                    ids = await append_now_many(*args, **kw)
                    assert (await read_after(redis, state.run_id, None))[-1].type == "end"
                    nursery.start_soon(read)
                    await trio.sleep(0.3)  # the reader's query runs before our commit
                    return ids

                writer.append_now_many = append_then_read  # type: ignore[method-assign]
                await worker.conclude(state, "completed")
        [row] = seen
        assert (row["status"], row["output"]) == ("completed", "all of it")
