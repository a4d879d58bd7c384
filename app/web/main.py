"""The web process: hypercorn's protocol + quart-trio on the listener the supervisor bound.

    lifecycle ─ database ─ redis ─ http client ─ nursery
                                                 ├── event hub (one reader for all streams)
                                                 └── serve_http (server.py): accept until
                                                     the drain, serve until it is over

On SIGTERM the listener is closed at once (the supervisor closes its own copy too), /ready
says 503 draining, new /api work gets 503 also on connections opened before, open streams
are carried to their end, then the process exits; idle keep-alive connections do not hold
it open.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import httpx
import structlog
import trio
from hypercorn.config import Config as HyperConfig

from app.db.migrations import migrate
from app.db.pool import open_database
from app.lifecycle import open_lifecycle
from app.redis import open_redis
from app.web.app import WebState, create_app
from app.web.server import serve_http

if TYPE_CHECKING:
    from app.config import Settings

log = structlog.get_logger("web")


def hypercorn_config(settings: Settings) -> HyperConfig:
    config = HyperConfig()
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_timeout = 75
    # The drain is bounded by our own deadline (stop_when_done and the lifecycle), not
    # hypercorn's: give it the whole budget so it never cuts a stream we still carry.
    config.graceful_timeout = settings.shutdown_timeout
    config.h11_max_incomplete_size = 64 * 1024
    config.max_app_queue_size = 64
    return config


async def run(settings: Settings) -> int:
    fd = int(os.environ["AGENTD_LISTEN_FD"])
    assert settings.database_url is not None and settings.redis_url is not None
    async with (
        open_lifecycle("web", budget=settings.shutdown_timeout, reserve=settings.reserve) as life,
        open_database(settings.database_url, min_size=1, max_size=10, role="web") as db,
        open_redis(settings.redis_url) as redis,
        httpx.AsyncClient() as http,
        trio.open_nursery() as nursery,
    ):
        await migrate(db)
        state = WebState(settings=settings, life=life, db=db, redis=redis, http=http)
        app = create_app(state)
        await nursery.start(state.serve_background)
        async with trio.open_nursery() as serving:
            await serving.start(serve_http, app, hypercorn_config(settings), fd, state)
            life.ready(f"web listening on fd {fd}")
        # serve_http returned: the drain is over. Stop the event hub with it.
        nursery.cancel_scope.cancel()
        ends = " ".join(f"{k}={v}" for k, v in sorted(state.ends_during_drain.items()))
        life.status(f"streams ended: {ends or 'none'}")
    log.info("stopped", streams_ended=state.ends_during_drain)
    return 0
