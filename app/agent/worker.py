"""The agent's claim loop and the life of each run it holds.

    serve_worker
    ├── events writer (outermost: it must outlive every run that appends to it)
    └── runs nursery
        ├── wake-ups: LISTEN agentd_runs (thread) + a slow poll as a safety net
        ├── control: cancel requests from any web process (Redis stream)
        ├── leases: renew ours; reclaim runs whose agent died
        ├── claim loop (until the drain starts)
        └── one task per run, each in its own cancel scope

Drain: stop claiming; running runs may finish until the drain deadline; then each run's
scope is cancelled with reason `server_shutdown`, and each run persists its partial and
appends its `end` in a shielded scope with its own short deadline (I3, I9).
"""

from __future__ import annotations

import os
import socket
import time
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
from app.agent.run import RunDeps, RunState, Stalled, build_messages, execute
from app.agent.tools.knowledge import acting_for
from app.agent.toolset import tools_for
from app.db import runs as q
from app.db.migrations import RUNS_CHANNEL
from app.embedding.client import EmbeddingClient, default_socket_path
from app.events import CONTROL_STREAM, EventWriter, encode, read_after

if TYPE_CHECKING:
    from app.config import Settings
    from app.db.pool import Database
    from app.lifecycle import Lifecycle
    from app.redis import RedisClient

log = structlog.get_logger("agent")

LEASE_S = 15.0
RENEW_EVERY = 5.0
POLL_EVERY = 2.0
PERSIST_S = 3.0


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
                log.warning("lease_lost", run_id=lost)
            await self.reclaim()

    async def reclaim(self) -> None:
        """Runs whose agent died: restart them if no token went out, else interrupt them."""
        def take(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
            return q.expired(conn)

        for run in await self.db.run(take):
            events = await read_after(self.redis, run["run_id"], None, count=100_000)
            if any(e.type == "end" for e in events):
                continue
            if not any(e.type in ("token", "tool_call") for e in events):
                await self.db.run(partial(q.requeue, run_id=run["run_id"]))
                log.info("run_reclaimed", run_id=run["run_id"], action="requeued")
                continue
            state = RunState(run)
            for e in events:
                data = e.payload()
                if e.type == "token":
                    state.content.append(data["content"])
                elif e.type == "tool_call":
                    state.tool_calls.append({k: data[k] for k in ("call_id", "name", "arguments")})
                elif e.type == "tool_result":
                    state.tool_results.append({k: v for k, v in data.items()
                                               if k not in ("type", "run_id")})
            state.detail = ("the agent process running this answer stopped unexpectedly; "
                            "the partial answer is saved: ask again to continue")
            await self.conclude(state, "server_shutdown")
            log.info("run_reclaimed", run_id=run["run_id"], action="interrupted")

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
        """Persist exactly what was streamed, then append `end`: shielded, bounded (I3, I9)."""
        run_id = state.run_id
        if reason == "server_shutdown" and state.detail is None:
            state.detail = ("agentd is shutting down; the answer so far is saved. Read it with "
                            f"GET /api/runs/{run_id}, or ask again to continue.")
        deadline = trio.current_time() + PERSIST_S
        if self.life.draining.is_set():
            deadline = min(deadline, self.life.deadline)  # our layer's kill time, less a margin
        content = "".join(state.content)
        with trio.CancelScope(shield=True, deadline=deadline) as persist:
            message_id = await self.db.run(lambda c: q.finish(
                c, run=state.run, reason=reason, content=content, tool_calls=state.tool_calls,
                tool_results=state.tool_results, detail=state.detail,
                iterations=state.iterations, usage=state.usage, fallback=state.fallback,
                cached=state.cached))
            end: dict[str, Any] = {"reason": reason, "message_id": message_id,
                                   "resumable": reason == "server_shutdown"}
            if state.detail:
                end["detail"] = state.detail
            if state.fallback:
                end["fallback"] = state.fallback
            await self.deps.writer.append_now(run_id, "end", encode("end", run_id, **end),
                                              expire=True)
        if self.life.draining.is_set():
            self.ended_during_drain[reason] = self.ended_during_drain.get(reason, 0) + 1
        if persist.cancelled_caught:
            log.error("run_persist_timeout", run_id=run_id, reason=reason)
        elapsed = time.monotonic() - state.started
        from app.db.runs import STORED

        metrics.runs.labels(STORED[reason][0]).inc()
        metrics.run_ends.labels(reason).inc()
        metrics.run_duration.observe(elapsed)
        metrics.run_iterations.observe(state.iterations)
        model = self.deps.provider.model
        metrics.llm_tokens.labels(model, "in").inc(state.usage["prompt_tokens"])
        metrics.llm_tokens.labels(model, "out").inc(state.usage["completion_tokens"])
        log.log(30 if elapsed > 10 else 20, "slow_run" if elapsed > 10 else "run_finished",
                run_id=run_id, reason=reason, iterations=state.iterations,
                tokens_out=state.usage["completion_tokens"], tokens_in=state.usage["prompt_tokens"],
                chars=len(content), duration_s=round(elapsed, 3), fallback=state.fallback)

    # Drain ---------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Let running runs finish until the drain deadline, then interrupt the rest."""
        await self.life.draining.wait()
        with trio.move_on_at(self.life.drain_deadline):
            while self.active:
                self.idle = trio.Event()
                await self.idle.wait()
        for run_id in list(self.active):
            self.cancel(run_id, "server_shutdown")


async def serve_worker(settings: Settings, life: Lifecycle, db: Database,
                       redis: RedisClient) -> None:
    writer = EventWriter(redis, settings.event_ttl)
    limits = httpx.Limits(max_connections=settings.llm_max_connections,
                          max_keepalive_connections=settings.llm_max_connections)
    async with (
        httpx.AsyncClient(limits=limits) as http,
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
