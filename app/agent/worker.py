"""The agent's claim loop and the life of each run it holds.

    serve_worker
    ├── events writer (outermost: it must outlive every run that appends to it)
    └── runs nursery
        ├── wake-ups: LISTEN agentd_runs (thread) + a slow poll as a safety net
        ├── control: cancel requests from any web process (Redis stream)
        ├── leases: renew ours; reclaim runs whose agent died
        ├── claim loop (until the drain starts)
        └── one task per run, each in its own cancel scope

Drain: stop claiming; running runs may finish until the drain deadline; then every run's
scope is cancelled with reason `server_shutdown`, each hands its state over, and they are
concluded together in a shielded scope with its own short deadline (I3, I9): one append
carrying every buffered token and every `end`, then one transaction storing every partial.

How a run ends, always in this order: its `end` is appended (after all its tokens), then
the run and its message are committed. A run whose `end` could not be appended stays
`running`; when its lease runs out, a reclaimer ends it from what its stream holds. So a
final run always has its `end` in Redis, and what is stored never exceeds what was sent.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any

import httpx as plain_httpx
import httpx2 as httpx
import psycopg
import structlog
import trio

from app import metrics
from app.agent import cache
from app.agent.cache import cache_key
from app.agent.llm import LocalProvider, OpenAIProvider
from app.agent.run import (
    RunDeps,
    RunState,
    Stalled,
    build_messages,
    end_event,
    execute,
    rebuilt,
    record,
)
from app.agent.tools.knowledge import acting_for
from app.agent.toolset import tools_for
from app.agent.transport import llm_transport
from app.db import runs as q
from app.db.migrations import RUNS_CHANNEL
from app.db.pool import DatabaseError
from app.embedding.client import EmbeddingClient, default_socket_path
from app.events import CONTROL_STREAM, EventWriter, encode, read_after
from app.redis import RedisUnavailable

if TYPE_CHECKING:
    from app.config import Settings
    from app.db.pool import Database
    from app.events import Event
    from app.lifecycle import Lifecycle
    from app.redis import RedisClient

log = structlog.get_logger("agent")

LEASE_S = 15.0
RENEW_EVERY = 5.0
POLL_EVERY = 2.0
PERSIST_S = 3.0
#: At the drain deadline: how long the interrupted runs get to stop and hand over their
#: state, to be concluded together (one that stops later concludes on its own).
HANDOFF_S = 0.5
#: How long after a Redis outage the reclaimer waits before reading other agents' streams:
#: their writers retry at most a second apart (events.RETRY_MAX), so what they kept while
#: Redis was away is written by then, and a stream is read as it will stay.
RECLAIM_AFTER_OUTAGE_S = 3.0


class Worker:
    def __init__(self, settings: Settings, life: Lifecycle, db: Database, redis: RedisClient,
                 deps: RunDeps) -> None:
        self.settings, self.life, self.db, self.redis, self.deps = settings, life, db, redis, deps
        self.id = f"{socket.gethostname()}:{os.getpid()}"
        self.active: dict[str, tuple[trio.CancelScope, RunState]] = {}
        self.wake = trio.Event()
        self.idle = trio.Event()
        #: Runs that ended after the drain began, by reason (for the shutdown summary).
        self.ended_during_drain: dict[str, int] = {}
        #: The runs interrupted at the drain deadline, being collected (see `interrupt_all`).
        self.interrupted: Interrupted | None = None

    # The loops -----------------------------------------------------------------------------

    async def claim_loop(self, runs: trio.Nursery) -> None:
        while not self.life.draining.is_set():
            capacity = self.settings.max_concurrent_runs - len(self.active)
            if capacity > 0:
                want = min(capacity, 20)
                claimed = await self.db.run(
                    partial(q.claim, worker=self.id, lease_s=LEASE_S, limit=want))
                for run in claimed:
                    scope = trio.CancelScope()
                    self.active[run["run_id"]] = (scope, RunState(run))
                    runs.start_soon(self.run_one, run["run_id"])
                if len(claimed) == want:
                    continue  # there may be more waiting
            self.wake = trio.Event()
            with trio.move_on_after(POLL_EVERY):
                await self.wake.wait()
        log.info("claiming_stopped", running=len(self.active))

    def listen(self) -> None:
        """In a thread: LISTEN for new runs and wake the claim loop (woken ~1 ms later)."""
        assert self.settings.database_url is not None
        with psycopg.connect(self.settings.database_url, autocommit=True) as conn:
            conn.execute(f"LISTEN {RUNS_CHANNEL}")
            while True:
                for _ in conn.notifies(timeout=0.25, stop_after=1):
                    trio.from_thread.run_sync(self.wake.set)
                trio.from_thread.check_cancelled()

    async def serve_listen(self) -> None:
        while True:
            try:
                await trio.to_thread.run_sync(self.listen, abandon_on_cancel=True)
            except psycopg.Error as e:
                log.warning("listen_failed", error=str(e))
            await trio.sleep(1)

    async def control_loop(self) -> None:
        """Cancel requests: web appends a run id to the control stream; whoever runs it stops."""
        last = "$"
        while True:
            try:
                reply = await self.redis.xread({CONTROL_STREAM: last}, count=100, block=5000)
            except Exception as e:  # noqa: BLE001 - Redis down: keep running runs, retry
                log.warning("control_read_failed", error=str(e))
                await trio.sleep(1)
                continue
            for entries in (reply or {}).values():
                for entry in entries:
                    last = str(entry.identifier)
                    fields = entry.field_values
                    self.cancel(str(fields.get("run_id")), "cancelled")

    async def lease_loop(self) -> None:
        while True:
            await trio.sleep(RENEW_EVERY)
            held = list(self.active)
            kept = await self.db.run(
                partial(q.renew, worker=self.id, run_ids=held, lease_s=LEASE_S))
            for lost in set(held) - set(kept):
                if lost in self.active:  # not one that ended meanwhile
                    log.warning("lease_lost", run_id=lost)
            await self.reclaim()

    async def reclaim(self) -> None:
        """Runs whose agent died (or could not append their `end`): each is leased to us,
        then restarted if no token went out, else ended from what its stream holds."""
        writer = self.deps.writer
        if (writer.down_since is not None
                or trio.current_time() - writer.up_since < RECLAIM_AFTER_OUTAGE_S
                or not await writer.flush()):  # our own kept events go out first
            return
        for run in await self.db.run(partial(q.take_expired, worker=self.id, lease_s=LEASE_S)):
            try:
                events = await read_after(self.redis, run["run_id"], None, count=100_000)
                await self._recover(run, events)
            except RedisUnavailable as e:  # its lease (ours now) runs out: tried again then
                log.warning("run_reclaim_failed", run_id=run["run_id"], error=str(e))

    async def _recover(self, run: dict[str, Any], events: list[Event]) -> None:
        state = rebuilt(run, events)
        end = next((e for e in events if e.type == "end"), None)
        if end is not None:
            # Its agent appended the `end` but could not commit: store what the stream says.
            data = end.payload()
            outcome = q.Outcome(run, data["reason"], "".join(state.content), state.tool_calls,
                                state.tool_results, data.get("detail"), state.iterations,
                                state.usage, data.get("fallback"),
                                message_id=data.get("message_id") or str(uuid.uuid4()))
            await self.db.run(partial(q.finish_many, outcomes=[outcome]))
            record(self.deps.provider.model, state, outcome.reason)
            log.info("run_reclaimed", run_id=run["run_id"], action="stored",
                     reason=outcome.reason)
        elif not state.content and not state.tool_calls:
            await self.db.run(partial(q.requeue, run_id=run["run_id"]))
            log.info("run_reclaimed", run_id=run["run_id"], action="requeued")
        else:
            state.detail = ("the agent process running this answer stopped unexpectedly; "
                            "the partial answer is saved: ask again to continue")
            await self.conclude(state, "server_shutdown")
            log.info("run_reclaimed", run_id=run["run_id"], action="interrupted")

    def shed_load(self) -> None:
        """The event writer keeps no more (Redis has been away too long): end every run with
        `error`; what each streamed so far is kept, and goes out once Redis is back."""
        shed = 0
        for run_id, (_, state) in list(self.active.items()):
            if state.cancel_reason is None:
                state.detail = ("agentd could not store this answer's events (Redis is "
                                "unreachable); the answer so far is kept. Please retry.")
                self.cancel(run_id, "error")
                shed += 1
        if shed:
            log.error("runs_shed", runs=shed, buffered=self.deps.writer.buffered)

    def cancel(self, run_id: str, reason: str) -> None:
        found = self.active.get(run_id)
        if found is not None:
            scope, state = found
            state.cancel_reason = state.cancel_reason or reason
            scope.cancel()

    # One run -------------------------------------------------------------------------------

    async def run_one(self, run_id: str) -> None:
        scope, state = self.active[run_id]
        run = state.run
        limit = min(float(run["timeout_s"] or self.settings.run_timeout), self.settings.run_timeout)
        scope.deadline = trio.current_time() + limit
        log.info("run_started", run_id=run_id, attempt=run["attempts"])
        reason = "error"
        try:
            with scope:
                history = await self.db.run(lambda c: q.history(
                    c, run["session_id"], run["user_message_id"]))
                user = await self._user_text(run)
                key = None
                if run["cache"]:
                    messages = build_messages(self.deps, history, user)
                    key = cache_key(run["owner"], self.deps.provider.model, messages,
                                    self.deps.tools.openai_tools())
                    reason = await self._from_cache(state, key)
                if not state.cached:
                    # Tool calls in this run are made for its owner (tools/knowledge.py).
                    with acting_for(str(run["owner"])):
                        reason = await execute(state, self.deps, history, user, limit)
                    if key is not None and reason == "completed" and state.fallback is None:
                        await cache.store(self.redis, key, "".join(state.content),
                                          self.settings.cache_ttl)
            if scope.cancelled_caught:
                reason = state.cancel_reason or "timeout"
                if reason == "cancelled":
                    state.detail = ("the run was cancelled (POST /cancel, or its client left "
                                    "with on_disconnect: cancel); the answer so far is saved. "
                                    "Ask again to continue.")
                if reason == "timeout":
                    state.detail = (f"the run reached its time limit of {limit:g} s; the partial "
                                    "answer is saved. Ask for less, or raise the timeout.")
        except Stalled:
            reason = "timeout"
        except Exception as e:  # noqa: BLE001 - a bug in one run must not take the agent down
            log.exception("run_crashed", run_id=run_id)
            state.detail = f"agentd failed while answering ({type(e).__name__}); please retry"
            reason = "error"
        finally:
            try:
                interrupted = self.interrupted
                if interrupted is None or not interrupted.hand_over(state, reason):
                    await self.conclude(state, reason)
            finally:
                self.active.pop(run_id, None)
                if not self.active:
                    self.idle.set()

    async def _from_cache(self, state: RunState, key: str) -> str:
        """A cached answer is streamed as one token and stored like any other (cached: true)."""
        answer = await cache.lookup(self.redis, key)
        if answer is None:
            return "error"
        state.cached = True
        state.content.append(answer)
        self.deps.writer.append(state.run_id, "token",
                                encode("token", state.run_id, content=answer))
        metrics.cache_hits.inc()
        return "completed"

    async def _user_text(self, run: dict[str, Any]) -> str:
        row = await self.db.fetchone("SELECT content FROM messages WHERE id = %s",
                                     (run["user_message_id"],))
        return str(row["content"] if isinstance(row, dict) else row[0]) if row else ""

    async def conclude(self, state: RunState, reason: str) -> None:
        """Append the run's `end`, then store exactly what was streamed (module docstring)."""
        outcome = self._outcome(state, reason)
        stored = await self._persist([outcome])
        self._ended(state, outcome, stored)

    async def conclude_interrupted(self, states: list[RunState]) -> None:
        """`conclude` for many runs at once: one append, one transaction."""
        if not states:
            return
        began = trio.current_time()
        outcomes = [self._outcome(state, "server_shutdown") for state in states]
        stored = await self._persist(outcomes)
        for state, outcome in zip(states, outcomes, strict=True):
            self._ended(state, outcome, stored)
        log.info("runs_interrupted", runs=len(states), stored=stored,
                 duration_s=round(trio.current_time() - began, 3))

    def _outcome(self, state: RunState, reason: str) -> q.Outcome:
        if reason == "server_shutdown" and state.detail is None:
            state.detail = ("agentd is shutting down; the answer so far is saved. Read it with "
                            f"GET /api/runs/{state.run_id}, or ask again to continue.")
        return q.Outcome(state.run, reason, "".join(state.content), state.tool_calls,
                         state.tool_results, state.detail, state.iterations, state.usage,
                         state.fallback, state.cached)

    async def _persist(self, outcomes: list[q.Outcome]) -> bool:
        """Shielded, bounded (I3, I9): one transaction locks and writes the runs, the `end`s
        are appended (with every event buffered before them, in one call), then it commits.
        Appending inside the transaction keeps the rows locked from before the `end` until
        the commit, so whoever saw an `end` reads the stored outcome (`q.get_run`). False
        when they were not stored: each run stays `running` for the reclaimer."""
        now = trio.current_time()
        deadline = now + PERSIST_S
        if self.life.draining.is_set():
            deadline = min(deadline, self.life.deadline)  # our layer's kill time, less a margin
        # `store` runs in a worker thread and `append` back in trio, as a system task
        # (Database.run abandons its thread on cancel): bounded by its own deadline, a
        # little earlier than ours, so that the transaction is rolled back, not abandoned.
        append_by = deadline - min(0.1, 0.2 * max(0.0, deadline - now))
        stage = ["store"]  # where it stopped, if it does: the rows, the `end`s, the commit

        async def append(ends: list[tuple[str, str, str]]) -> bool:
            if trio.current_time() >= append_by:  # our caller has given up already
                return False
            with trio.move_on_at(append_by):
                await self.deps.writer.append_now_many(ends, expire=True)
                return True
            return False

        def store(conn: psycopg.Connection[Any]) -> dict[str, str]:
            stored = q.finish_many(conn, outcomes)
            stage[0] = "end"
            # A run another agent has ended since (its lease was lost) has its `end` already.
            ends = [(o.run["run_id"], "end", end_event(o)) for o in outcomes
                    if stored[o.run["run_id"]] == o.message_id]
            if ends and not trio.from_thread.run(append, ends):
                raise EndNotAppended  # rolled back
            stage[0] = "commit"
            return stored

        with trio.CancelScope(shield=True, deadline=deadline):
            try:
                await self.db.run(store)
            except EndNotAppended:
                pass
            except DatabaseError as e:
                log.error("run_store_failed", runs=len(outcomes), error=str(e))
            else:
                return True
        for o in outcomes:
            log.error("run_persist_timeout", run_id=o.run["run_id"], reason=o.reason,
                      stage=stage[0])
        return False

    def _ended(self, state: RunState, outcome: q.Outcome, stored: bool) -> None:
        if self.life.draining.is_set():
            reason = outcome.reason
            self.ended_during_drain[reason] = self.ended_during_drain.get(reason, 0) + 1
        if stored:  # else whoever stores it later counts it
            record(self.deps.provider.model, state, outcome.reason)
        elapsed = time.monotonic() - state.started
        log.log(30 if elapsed > 10 else 20, "slow_run" if elapsed > 10 else "run_finished",
                run_id=state.run_id, reason=outcome.reason, iterations=state.iterations,
                tokens_out=state.usage["completion_tokens"], tokens_in=state.usage["prompt_tokens"],
                chars=len(outcome.content), duration_s=round(elapsed, 3), fallback=state.fallback,
                stored=stored)

    # Drain ---------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Let running runs finish until the drain deadline, then interrupt the rest."""
        await self.life.draining.wait()
        with trio.move_on_at(self.life.drain_deadline):
            while self.active:
                self.idle = trio.Event()
                await self.idle.wait()
        await self.interrupt_all()

    async def interrupt_all(self) -> None:
        """Cancel every run still going, and conclude them together.

        Hundreds of runs end here at the same moment; concluded one by one (a transaction
        and a Redis call each, one after another) most would miss the deadline. So each run
        only stops and hands its state over (`Interrupted`), then all are concluded at once.
        """
        if not self.active:
            return
        interrupted = self.interrupted = Interrupted(set(self.active))
        for run_id in list(self.active):
            self.cancel(run_id, "server_shutdown")
        now = trio.current_time()
        with trio.move_on_at(min(now + HANDOFF_S, now + 0.2 * (self.life.deadline - now))):
            await interrupted.all_in.wait()
        await self.conclude_interrupted(interrupted.close())


class EndNotAppended(Exception):
    """A run's `end` could not be appended in time: its transaction is rolled back."""


class Interrupted:
    """The runs cancelled at the drain deadline, handing their state over as they stop."""

    def __init__(self, run_ids: set[str]) -> None:
        self.pending = run_ids
        self.states: list[RunState] = []
        self.all_in = trio.Event()
        self.open = True

    def hand_over(self, state: RunState, reason: str) -> bool:
        """A run has stopped. True when it is to be concluded with the others: it was one of
        them, it stopped for the shutdown, and the others have not been concluded yet."""
        ours = state.run_id in self.pending
        self.pending.discard(state.run_id)
        if not self.pending:
            self.all_in.set()
        if ours and self.open and reason == "server_shutdown":
            self.states.append(state)
            return True
        return False

    def close(self) -> list[RunState]:
        """No more hand-overs: a run that stops from now on concludes on its own."""
        self.open = False
        return self.states


async def serve_worker(settings: Settings, life: Lifecycle, db: Database,
                       redis: RedisClient) -> None:
    writer = EventWriter(redis, settings.event_ttl)
    limits = httpx.Limits(max_connections=settings.llm_max_connections,
                          max_keepalive_connections=settings.llm_max_connections)
    async with (
        httpx.AsyncClient(limits=limits, transport=llm_transport(limits)) as http,
        plain_httpx.AsyncClient() as tool_http,
        EmbeddingClient(default_socket_path(settings)) as embedding,
        trio.open_nursery() as outer,
    ):
        await outer.start(writer.serve)
        # The local provider searches the knowledge base through the tool, like an LLM would.
        provider = OpenAIProvider(settings, http) if settings.llm_configured else LocalProvider()
        deps = RunDeps(provider, tools_for(settings, tool_http, embedding), writer,
                       settings.system_prompt, settings.agent_max_iterations)
        worker = Worker(settings, life, db, redis, deps)
        writer.on_backlog = worker.shed_load
        async with trio.open_nursery() as runs:
            runs.start_soon(worker.serve_listen)
            runs.start_soon(worker.control_loop)
            runs.start_soon(worker.lease_loop)

            async def stop_claiming() -> None:
                await life.draining.wait()
                worker.wake.set()

            runs.start_soon(stop_claiming)
            life.ready(f"agent {worker.id}: {provider.model}")
            await worker.claim_loop(runs)
            await worker.drain()
            # Runs have ended (or are persisting under their own shields): stop the loops.
            with trio.move_on_at(life.deadline):
                while worker.active:
                    worker.idle = trio.Event()
                    await worker.idle.wait()
            runs.cancel_scope.cancel()
        ended = " ".join(f"{k}={v}" for k, v in sorted(worker.ended_during_drain.items()))
        life.status(f"runs ended: {ended or 'none'}")
        log.info("drained", runs_ended=worker.ended_during_drain)
        outer.cancel_scope.cancel()
