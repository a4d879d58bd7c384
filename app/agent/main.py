"""The agent process: claims runs from the queue and executes them (see worker.py).

    lifecycle ─ database ─ redis ─ worker (claim loop + one task per run)

On SIGTERM it stops claiming at once; running runs may finish until the drain deadline,
then they are interrupted, their partials persisted (shielded, bounded) and ended.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from app.agent.worker import serve_worker
from app.db.migrations import migrate
from app.db.pool import open_database
from app.lifecycle import open_lifecycle
from app.redis import open_redis

if TYPE_CHECKING:
    from app.config import Settings

log = structlog.get_logger("agent")


async def run(settings: Settings) -> int:
    assert settings.database_url is not None and settings.redis_url is not None
    async with (
        open_lifecycle("agent", budget=settings.shutdown_timeout, reserve=settings.reserve) as life,
        open_database(settings.database_url, min_size=2,
                      max_size=min(settings.max_concurrent_runs + 4, 60), role="agent") as db,
        open_redis(settings.redis_url) as redis,
    ):
        await migrate(db)
        await serve_worker(settings, life, db, redis)
    log.info("stopped")
    return 0
