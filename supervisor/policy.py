"""Supervision policy: pure functions and small classes, tested without processes or a loop.

- `Backoff`: how long to wait before the n-th consecutive restart of a child.
- `RestartIntensity`: more than N restarts within T seconds means the fault is not transient;
  the supervisor escalates (stops the whole tree, exits non-zero) and lets systemd decide.
- `ShutdownPlan`: the one deadline, cut into each layer's share.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from supervisor.spec import Layer


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 30.0
    #: A child that stayed up this long is considered healthy again: its backoff resets.
    reset_after: float = 60.0

    def delay(self, consecutive_failures: int) -> float:
        """Delay before restart number ``consecutive_failures`` (1-based); 0 for the first start."""
        if consecutive_failures <= 0:
            return 0.0
        return min(self.maximum, self.initial * self.factor ** (consecutive_failures - 1))


@dataclass
class RestartIntensity:
    """Allows at most ``max_restarts`` restarts in any window of ``period`` seconds."""

    max_restarts: int = 5
    period: float = 60.0
    _times: deque[float] = field(default_factory=deque)

    def record(self, now: float) -> bool:
        """Record a restart at ``now``; True when the intensity is exceeded (escalate)."""
        self._times.append(now)
        while self._times and self._times[0] <= now - self.period:
            self._times.popleft()
        return len(self._times) > self.max_restarts


@dataclass(frozen=True)
class ShutdownPlan:
    """Offsets, in seconds from SIGTERM, at which each phase of a shutdown must be over.

    One deadline (``timeout``) is computed at SIGTERM. Until ``drain_end`` running work may
    finish; in the reserve after it, unfinished work is interrupted, persisted and ended.
    Layers then stop innermost first; each has a kill offset after which whatever is still
    alive in it is SIGKILLed. Infra gets the last share, so it stops after every app process.
    """

    timeout: float
    reserve: float

    @property
    def drain_end(self) -> float:
        return self.timeout - self.reserve

    def kill_at(self, layer: Layer) -> float:
        shares = {
            Layer.EDGE: 0.6,
            Layer.WORK: 0.6,
            Layer.MODEL: 0.8,
            Layer.INFRA: 1.0,
        }
        return self.drain_end + self.reserve * shares[layer]


def exit_status(*, killed: int, escalated: bool, failed_to_start: bool) -> int:
    """API.md: 0 after a shutdown within budget (even with interrupted work), else non-zero."""
    return 1 if killed or escalated or failed_to_start else 0
