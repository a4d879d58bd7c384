"""A child's side of supervision: READY / STATUS / WATCHDOG / STOPPING, and SIGTERM → drain.

The supervisor writes the one shutdown deadline to a file before it signals; a child reads
it on SIGTERM, so every process works to the same deadline instead of inventing its own.
When that file is absent (a child run by hand), the budget from the settings starts now.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import signal
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
import trio

from supervisor.notify import Notifier

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

log = structlog.get_logger("lifecycle")


@dataclass
class Lifecycle:
    role: str
    timeout: float
    reserve: float
    notifier: Notifier = field(default_factory=Notifier)
    #: Set when the drain starts: stop taking new work.
    draining: trio.Event = field(default_factory=trio.Event)
    #: trio clock times, known once draining: the end of the drain and the final deadline.
    drain_deadline: float = float("inf")
    deadline: float = float("inf")
    ready_at: float | None = None

    def ready(self, status: str = "") -> None:
        # Everything imported and built so far lives as long as the process: move it out of
        # the collector's reach. Full collections walking it paused every stream for
        # 50–300 ms at a time under load (bench/stream.py); afterwards 10–30 ms.
        gc.collect()
        gc.freeze()
        self.ready_at = trio.current_time()
        self.notifier.notify(READY=1, STATUS=status or f"{self.role} ready")
        log.info("ready", status=status)

    def status(self, text: str) -> None:
        self.notifier.notify(STATUS=text)

    def begin_drain(self, reason: str = "SIGTERM") -> None:
        """Set the deadlines from the supervisor's shutdown file (or from now) and drain."""
        if self.draining.is_set():
            return
        wall_now, trio_now = time.time(), trio.current_time()
        deadline, drain_end = wall_now + self.timeout, wall_now + self.timeout - self.reserve
        path = os.environ.get("AGENTD_SHUTDOWN_FILE")
        if path:
            try:
                with open(path) as f:
                    handed = json.load(f)
                deadline, drain_end = float(handed["deadline"]), float(handed["drain_end"])
                # Our own deadline is when our layer gets SIGKILLed, a little before it.
                kill_at = handed.get("kill_at", {}).get(os.environ.get("AGENTD_LAYER", ""))
                if kill_at is not None:
                    margin = min(0.25, 0.1 * (float(kill_at) - drain_end))
                    deadline = min(deadline, float(kill_at) - margin)
            except (OSError, ValueError, KeyError, TypeError):
                pass
        self.deadline = trio_now + (deadline - wall_now)
        self.drain_deadline = trio_now + (drain_end - wall_now)
        self.notifier.notify(STOPPING=1)
        log.info(
            "draining",
            reason=reason,
            drain_s=round(self.drain_deadline - trio_now, 3),
            deadline_s=round(self.deadline - trio_now, 3),
        )
        self.draining.set()


async def _watch_signals(life: Lifecycle) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            life.begin_drain(signal.Signals(signum).name)


async def _ping_watchdog(life: Lifecycle) -> None:
    """Ping from the event loop itself: a blocked loop stops pinging, which is the point."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return
    interval = int(usec) / 1e6 / 3
    while True:
        life.notifier.notify(WATCHDOG=1)
        await trio.sleep(interval)


@asynccontextmanager
async def open_lifecycle(role: str, *, budget: float, reserve: float) -> AsyncIterator[Lifecycle]:
    """Run the signal watcher and the watchdog pinger around a child's whole life."""
    faulthandler.enable(file=sys.stderr, all_threads=True)
    # SIGHUP is the supervisor's business; a child must not die of a terminal hang-up.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    life = Lifecycle(role, budget, reserve)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, life)
        nursery.start_soon(_ping_watchdog, life)
        try:
            yield life
        finally:
            nursery.cancel_scope.cancel()
            life.notifier.close()
