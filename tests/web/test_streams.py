"""A stream whose run is final in PostgreSQL but whose `end` never reached Redis is ended by
the web from what is stored (app/web/streams.py `_ending_of_final_run`), exactly once."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import trio

from app.db import runs as q
from app.db.pool import open_database
from app.events import encode, read_after, stream_key
from app.redis import open_redis
from app.web.sse import SSEParser
from app.web.streams import RUN_EVENTS, _ending_of_final_run

if TYPE_CHECKING:
    from app.db.pool import Database


async def a_run(db: Database, *, final: str | None) -> str:
    def make(conn: Any) -> str:
        new = q.create_run(conn, owner="test-streams", message="m", session_id=None,
                           on_disconnect="continue", timeout_s=None, cache=False,
                           max_queued=None)
        conn.execute("UPDATE runs SET status = 'running', lease_owner = 'w',"
                     " lease_expires_at = now() + interval '1 minute' WHERE id = %s",
                     (uuid.UUID(new.run_id),))
        if final is not None:
            run = q.get_run(conn, new.run_id, None)
            q.finish(conn, run=run, reason=final, content="so far", tool_calls=[],
                     tool_results=[], detail="why it ended", iterations=1, usage={},
                     fallback=None)
        return new.run_id

    return await db.run(make)


def parsed(body: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    return [(e.id, json.loads(e.data)) for e in SSEParser().feed(body)]


async def test_a_final_run_without_its_end_in_redis_gets_one_made_from_what_is_stored(infra):
    with trio.fail_after(30):
        async with (open_database(infra.database_url) as db,
                    open_redis(infra.redis_url) as redis):
            ends: list[str] = []
            state = SimpleNamespace(db=db, redis=redis, count_end=ends.append)
            running = await a_run(db, final=None)
            assert await _ending_of_final_run(state, RUN_EVENTS, running, "0-0") is None  # type: ignore[arg-type]

            lost = await a_run(db, final="server_shutdown")
            sent = await redis.xadd(stream_key(lost), {"t": "token", "d": encode(
                "token", lost, content="so far")})
            body = await _ending_of_final_run(state, RUN_EVENTS, lost, sent)  # type: ignore[arg-type]
            assert body is not None
            [(event_id, end)] = parsed(body)
            stored = await db.run(lambda c: q.get_run(c, lost, None))
            assert event_id is None and end["type"] == "end"
            assert (end["reason"], end["message_id"], end["resumable"], end["detail"]) == (
                "server_shutdown", stored["message_id"], True, "why it ended")

            # Its `end` did reach Redis after all: that one, and what came before it.
            late = await a_run(db, final="completed")
            token = await redis.xadd(stream_key(late), {"t": "token", "d": encode(
                "token", late, content="so far")})
            await redis.xadd(stream_key(late), {"t": "end", "d": encode(
                "end", late, reason="completed", message_id="m", resumable=False)})
            body = await _ending_of_final_run(state, RUN_EVENTS, late, "0-0")  # type: ignore[arg-type]
            assert body is not None
            events = parsed(body)
            assert [(i, e["type"]) for i, e in events] == [
                (token, "token"), (events[1][0], "end")]
            assert [e.id for e in await read_after(redis, late, None)][-1] == events[1][0]
            assert ends == ["server_shutdown", "completed"]
