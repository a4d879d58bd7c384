"""`agentd serve`'s supervisor: the layers as nested nurseries, and the one shutdown deadline.

    infra ─┐ nursery: postgres, redis
           └ model ─┐ nursery: embedding
                    └ work ─┐ nursery: agent ×N
                            └ edge ─┐ nursery: web ×N
                                    └ wait for the shutdown

Each layer's nursery starts its children (in parallel, returning once each is ready), then
runs the next layer inside itself. A shutdown is: tell the drain children at once (SIGTERM),
set `stopping`, and let the innermost body return. Each nursery then cancels its own children
as the stack unwinds, so layers stop innermost first without any "stage" code: the nesting
is the order. Every stop is bounded by its layer's share of the one deadline (`ShutdownPlan`),
and the whole tree by the deadline itself.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import TYPE_CHECKING

import structlog
import trio

from supervisor.child import ChildStatus, State, supervise
from supervisor.notify import Notifier
from supervisor.policy import RestartIntensity, ShutdownPlan, exit_status
from supervisor.spec import ChildSpec, Layer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence
    from pathlib import Path

log = structlog.get_logger("supervisor")

SNAPSHOT_FILE = "tree.json"
SHUTDOWN_FILE = "shutdown.json"
LAST_SHUTDOWN_FILE = "last_shutdown.json"


class Tree:
    """The supervisor's shared state: children, the shutdown deadline, and what to report."""

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        *,
        runtime_dir: Path,
        shutdown_timeout: float,
        shutdown_reserve: float,
        intensity: RestartIntensity | None = None,
        on_drain: Callable[[], None] | None = None,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique: {names}")
        self.specs = list(specs)
        self.runtime_dir = runtime_dir
        self.plan = ShutdownPlan(shutdown_timeout, shutdown_reserve)
        self.intensity = intensity or RestartIntensity()
        self.children = {spec.name: ChildStatus(spec) for spec in specs}
        self.child_env = {"AGENTD_SHUTDOWN_FILE": str(runtime_dir / SHUTDOWN_FILE)}
        self.stopping = trio.Event()
        self.ready = trio.Event()
        self.killed: list[str] = []
        self.reason = ""
        self.escalated = False
        self.failed_to_start = False
        self._on_drain = on_drain
        #: Called with the pid of every child process that has exited (e.g. metrics cleanup).
        self.on_exit = on_exit
        self._stop_started: float | None = None
        self._started_wall = time.time()
        self.upstream = Notifier()
        self.restart_counts: dict[str, int] = {}

    # The shutdown --------------------------------------------------------------------------

    def begin_shutdown(self, reason: str) -> None:
        """Compute the one deadline, hand it down, and start the drain. Idempotent."""
        if self.stopping.is_set():
            return
        self._stop_started = trio.current_time()
        self.reason = reason
        now = time.time()
        deadline = {
            "signal_at": now,
            "deadline": now + self.plan.timeout,
            "drain_end": now + self.plan.drain_end,
            "reason": reason,
            # When each layer's processes are SIGKILLed: a child's own deadline.
            "kill_at": {layer.name.lower(): now + self.plan.kill_at(layer) for layer in Layer},
        }
        _write_atomic(self.runtime_dir / SHUTDOWN_FILE, json.dumps(deadline))
        self.upstream.notify(
            STOPPING=1,
            STATUS=f"stopping: {reason}",
            EXTEND_TIMEOUT_USEC=int((self.plan.timeout + 5) * 1e6),
        )
        log.info(
            "shutdown_started",
            reason=reason,
            timeout_s=self.plan.timeout,
            drain_s=round(self.plan.drain_end, 3),
        )
        if self._on_drain is not None:
            self._on_drain()
        self.stopping.set()

    def kill_deadline(self, layer: Layer) -> float:
        if self._stop_started is None:  # not a planned shutdown: a generous bound
            return trio.current_time() + self.plan.timeout
        return self._stop_started + self.plan.kill_at(layer)

    @property
    def hard_deadline(self) -> float:
        assert self._stop_started is not None
        return self._stop_started + self.plan.timeout + 0.5

    def fail(self, reason: str) -> None:
        log.error("tree_start_failed", reason=reason)
        self.failed_to_start = True
        self.begin_shutdown(reason)

    def escalate(self, reason: str) -> None:
        log.error(
            "restart_intensity_exceeded",
            reason=reason,
            max_restarts=self.intensity.max_restarts,
            period_s=self.intensity.period,
        )
        self.escalated = True
        self.begin_shutdown(reason)

    def restarted(self, spec: ChildSpec) -> None:
        role = spec.env.get("AGENTD_ROLE", spec.name)
        self.restart_counts[role] = self.restart_counts.get(role, 0) + 1
        self.changed()

    # Reporting -----------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return not self.stopping.is_set() and all(
            c.state is State.READY for c in self.children.values()
        )

    def summary_line(self) -> str:
        ready = sum(c.state is State.READY for c in self.children.values())
        parts = [f"{ready}/{len(self.children)} children ready"]
        parts += [f"{name}: {c.status}" for name, c in self.children.items() if c.status]
        return "; ".join(parts)

    def snapshot(self) -> dict[str, object]:
        return {
            "supervisor": {
                "pid": os.getpid(),
                "started_at": self._started_wall,
                "stopping": self.stopping.is_set(),
            },
            "children": [
                {
                    "name": name,
                    "role": c.spec.env.get("AGENTD_ROLE", name),
                    "layer": c.spec.layer.name.lower(),
                    "state": c.state.value,
                    "pid": c.pid,
                    "restarts": c.restarts,
                    "status": c.status,
                    "since": c.since,
                }
                for name, c in self.children.items()
            ],
            "restarts_by_role": self.restart_counts,
        }

    def changed(self) -> None:
        """Publish the tree's state: to systemd (STATUS=) and to a file /api/status reads."""
        _write_atomic(self.runtime_dir / SNAPSHOT_FILE, json.dumps(self.snapshot()))
        self.upstream.notify(STATUS=self.summary_line())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def layered(specs: Sequence[ChildSpec]) -> list[list[ChildSpec]]:
    """Group specs by layer, outermost first, skipping empty layers."""
    return [group for layer in Layer if (group := [s for s in specs if s.layer is layer])]


async def _start_layer(nursery: trio.Nursery, tree: Tree, specs: Sequence[ChildSpec]) -> None:
    """Start every child of a layer at once; return when each reported ready (or failed)."""
    async with trio.open_nursery() as starters:
        for spec in specs:
            starters.start_soon(nursery.start, supervise, spec, tree)


async def _run_layers(tree: Tree, layers: Sequence[Sequence[ChildSpec]]) -> None:
    if not layers:
        tree.ready.set()
        tree.upstream.notify(READY=1, STATUS=tree.summary_line())
        log.info("tree_ready", children=len(tree.children))
        await tree.stopping.wait()
        return
    async with trio.open_nursery() as nursery:
        await _start_layer(nursery, tree, layers[0])
        if not tree.stopping.is_set():
            await _run_layers(tree, layers[1:])
        # The layers inside this one have stopped: now stop this one's children.
        nursery.cancel_scope.cancel()


async def _watch_signals(tree: Tree, signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            log.info("sighup_ignored", detail="reload is not supported yet; the tree keeps running")
        elif tree.stopping.is_set():
            log.info("signal_during_shutdown", signal=name, detail="the deadline stands")
        else:
            tree.begin_shutdown(name)


async def _ping_systemd(tree: Tree) -> None:
    """WATCHDOG=1 to systemd at half its interval, only while every child is healthy."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not tree.upstream.enabled:
        return
    interval = int(usec) / 1e6 / 2
    while True:
        if tree.healthy or tree.stopping.is_set():
            tree.upstream.notify(WATCHDOG=1)
        await trio.sleep(interval)


async def _extend_timeout(tree: Tree) -> None:
    """During a long drain, keep telling systemd how much longer the stop may take."""
    await tree.stopping.wait()
    while True:
        remaining = tree.hard_deadline - trio.current_time()
        tree.upstream.notify(EXTEND_TIMEOUT_USEC=int((max(remaining, 0) + 5) * 1e6))
        await trio.sleep(5)


async def run_tree(tree: Tree) -> int:
    """Run the tree's layers until `Tree.begin_shutdown`; return the exit status.

    No signal handling here: `serve_tree` adds it for `agentd serve`; tests and `agentd
    ingest` drive a tree (e.g. just the infra layer) by calling `begin_shutdown` themselves.
    """
    tree.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (tree.runtime_dir / SHUTDOWN_FILE).unlink(missing_ok=True)
    began = trio.current_time()
    async with trio.open_nursery() as watchers:
        watchers.start_soon(_ping_systemd, tree)
        watchers.start_soon(_extend_timeout, tree)
        with trio.CancelScope() as guard:
            watchers.start_soon(_arm_guard, tree, guard)
            await _run_layers(tree, layered(tree.specs))
        watchers.cancel_scope.cancel()
    return _finish(tree, trio.current_time() - began)


async def serve_tree(tree: Tree) -> int:
    """`run_tree` under signals: SIGTERM/SIGINT start the shutdown, SIGHUP is ignored."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, tree, signals)
            code = await run_tree(tree)
            nursery.cancel_scope.cancel()
    return code


async def _arm_guard(tree: Tree, guard: trio.CancelScope) -> None:
    """Once the shutdown starts, nothing in the tree may outlive the deadline (+0.5 s)."""
    await tree.stopping.wait()
    guard.deadline = tree.hard_deadline


def _finish(tree: Tree, uptime: float) -> int:
    code = exit_status(
        killed=len(tree.killed), escalated=tree.escalated, failed_to_start=tree.failed_to_start
    )
    stop_started = tree._stop_started
    duration = trio.current_time() - stop_started if stop_started is not None else 0.0
    tree.changed()
    summary = {"reason": tree.reason, "duration_s": round(duration, 3),
               "killed": tree.killed, "exit_status": code, "finished_at": time.time(),
               "reports": {name: c.status for name, c in tree.children.items() if c.status}}
    _write_atomic(tree.runtime_dir / LAST_SHUTDOWN_FILE, json.dumps(summary))
    log.info(
        "shutdown_complete",
        reason=tree.reason,
        duration_s=round(duration, 3),
        uptime_s=round(uptime, 3),
        children={name: c.outcome or c.state.value for name, c in tree.children.items()},
        # What the children said last (web: streams ended by reason; agent: runs ended).
        reports={name: c.status for name, c in tree.children.items() if c.status},
        killed=tree.killed,
        exit_status=code,
    )
    return code
