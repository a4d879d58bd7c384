"""What a child is: a declaration the supervisor turns into a supervised OS process.

The supervisor knows processes, not what they do: a child is an argv, an environment and a
few policies. Layers order start-up and shutdown; see `supervisor.run`.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field


class Layer(enum.IntEnum):
    """Outer layers start first and stop last. An inner layer depends on the outer ones."""

    INFRA = 0
    MODEL = 1
    WORK = 2
    EDGE = 3


class Restart(enum.Enum):
    PERMANENT = "permanent"  # always restarted when it exits outside a shutdown
    TRANSIENT = "transient"  # restarted only when it exits abnormally (non-zero or by signal)


#: A readiness probe for children that do not speak the notify protocol (PostgreSQL, Redis).
#: Called repeatedly until it returns True or the start timeout passes.
ReadyProbe = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class ChildSpec:
    name: str
    layer: Layer
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    restart: Restart = Restart.PERMANENT
    #: None: the child reports READY=1 over NOTIFY_SOCKET. Otherwise: polled until True.
    ready_probe: ReadyProbe | None = None
    #: Seconds between required WATCHDOG=1 pings; None disables the watchdog.
    watchdog: float | None = None
    start_timeout: float = 30.0
    #: Signal that asks the child to stop (PostgreSQL: SIGINT = fast shutdown).
    stop_signal: int = signal.SIGTERM
    #: Drain children get their stop signal the moment shutdown starts (they stop taking
    #: work at once); the others get it when their layer unwinds.
    drain: bool = False
    user: str | None = None
    group: str | None = None
    cwd: str | None = None
    pass_fds: Sequence[int] = ()
    #: Where the child's stdout/stderr go instead of the supervisor's stderr.
    log_file: str | None = None
    #: Called (in the supervisor) before each spawn, e.g. to prepare a data directory.
    prepare: Callable[[], None] | None = None
