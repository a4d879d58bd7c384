"""The embedding process: the only one that imports torch (see service.py).

    lifecycle ─ model + vector store ─ internal API on a unix socket

It is in the model layer: the supervisor stops it only after every agent and web process
has exited (I6), so on SIGTERM it has nothing to drain; it releases the model and the store,
each under its own short shielded deadline, and exits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from app.lifecycle import open_lifecycle

if TYPE_CHECKING:
    from app.config import Settings

log = structlog.get_logger("embedding")


async def run(settings: Settings) -> int:
    async with open_lifecycle("embedding", budget=settings.shutdown_timeout,
                              reserve=settings.reserve) as life:
        life.ready("embedding ready")
        await life.draining.wait()
    log.info("stopped")
    return 0
