"""structlog set-up: JSON lines on stderr (journald keeps them), console text on a terminal.

Every line carries the process role and pid, so the interleaved stderr of the whole tree
(children inherit the supervisor's stderr) can be told apart and filtered.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from collections.abc import MutableMapping

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def setup(role: str, *, level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog for this process. Safe to call again (e.g. in tests)."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    pid = os.getpid()

    def add_process(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("role", role)
        event.setdefault("pid", pid)
        return event

    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=True)
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            add_process,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        # One write per line (PrintLogger writes the newline apart): lines of the processes
        # sharing stderr never run into each other.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library (hypercorn, httpx, psycopg) go
    # through structlog too, at warning and above: one format on stderr, JSON stays JSON.
    root = logging.getLogger()
    root.handlers[:] = [_ToStructlog()]
    root.setLevel(logging.WARNING)


class _ToStructlog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        structlog.get_logger(record.name).log(record.levelno, message, logger=record.name)
