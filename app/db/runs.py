"""Queries for sessions, messages and runs: the durable half of a chat (I3, I4).

Each function is one transaction. The web side creates work (`create_run`): the session,
the user's message and the queued run are committed together before anything is
acknowledged. The agent side claims (`claim`), keeps its lease (`renew`), recovers the runs
of agents that died (`take_expired`) and ends runs with their assistant messages in one
commit (`finish`, `finish_many`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, LiteralString

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

if TYPE_CHECKING:
    import psycopg

FINAL = ("completed", "cancelled", "failed", "interrupted")
#: How an `end` reason is stored (API.md, Why it ended → what is stored).
STORED = {
    "completed": ("completed", "complete"),
    "server_shutdown": ("interrupted", "interrupted"),
    "timeout": ("interrupted", "interrupted"),
    "cancelled": ("cancelled", "cancelled"),
    "error": ("failed", "error"),
}


class NotFoundError(Exception):
    """No such object, or it belongs to someone else (the same thing to a caller)."""


class QueueFull(Exception):
    """The system-wide bound on queued runs is reached."""


@dataclass(frozen=True)
class NewRun:
    run_id: str
    session_id: str
    message_id: str


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFoundError(value) from None


def _check_queue_room(conn: psycopg.Connection[Any], adding: int, max_queued: int) -> None:
    """The system-wide bound on queued runs (API.md: beyond it, 503 busy)."""
    queued = conn.execute("SELECT count(*) FROM runs WHERE status = 'queued'").fetchone()
    if queued is not None and queued[0] + adding > max_queued:
        raise QueueFull()


_OWNER_OF: dict[str, LiteralString] = {
    "sessions": "SELECT owner FROM sessions WHERE id = %s",
    "batches": "SELECT owner FROM batches WHERE id = %s",
}


def _owned(conn: psycopg.Connection[Any], table: Literal["sessions", "batches"], object_id: str,
           owner: str | None) -> uuid.UUID:
    """The id of an object of ``owner``'s (None: anyone's), or `NotFoundError`."""
    oid = _uuid(object_id)
    query = _OWNER_OF[table]
    found = conn.execute(query, (oid,)).fetchone()
    if found is None or (owner is not None and found[0] != owner):
        raise NotFoundError(object_id)
    return oid


def create_run(
    conn: psycopg.Connection[Any], *, owner: str, message: str, session_id: str | None,
    on_disconnect: str, timeout_s: float | None, cache: bool, priority: int = 5,
    batch_id: str | None = None, max_queued: int | None,
) -> NewRun:
    """Session (new or the owner's), user message and queued run (a trigger wakes agents).

    ``max_queued=None``: the caller has already checked the queue bound for this run.
    """
    cur = conn.cursor()
    if max_queued is not None:
        _check_queue_room(conn, 1, max_queued)
    if session_id is None:
        sid = uuid.uuid4()
        cur.execute("INSERT INTO sessions (id, owner) VALUES (%s, %s)", (sid, owner))
    else:
        sid = _uuid(session_id)
        row = cur.execute("UPDATE sessions SET updated_at = now() WHERE id = %s AND owner = %s"
                          " RETURNING id", (sid, owner)).fetchone()
        if row is None:
            raise NotFoundError(session_id)
    mid, rid = uuid.uuid4(), uuid.uuid4()
    cur.execute(
        "INSERT INTO messages (id, session_id, owner, role, content, run_id)"
        " VALUES (%s, %s, %s, 'user', %s, %s)", (mid, sid, owner, message, rid))
    cur.execute(
        "INSERT INTO runs (id, session_id, owner, user_message_id, status, on_disconnect,"
        " priority, timeout_s, cache, batch_id, attempts)"
        " VALUES (%s, %s, %s, %s, 'queued', %s, %s, %s, %s, %s, 0)",
        (rid, sid, owner, mid, on_disconnect, priority, timeout_s, cache,
         uuid.UUID(batch_id) if batch_id else None))
    return NewRun(str(rid), str(sid), str(mid))


RUN_COLUMNS = (
    "id::text AS run_id, session_id::text, owner, user_message_id::text,"
    " assistant_message_id::text AS message_id, status, reason, detail, fallback, on_disconnect,"
    " priority, attempts, timeout_s, cache, batch_id::text, output, iterations, usage, cached,"
    " created_at, started_at, finished_at"
)


def get_run(conn: psycopg.Connection[Any], run_id: str, owner: str | None) -> dict[str, Any]:
    """The run as committed. A running run is read again under a share lock, which waits
    for an agent that is ending it right now (`finish_many` holds the row from before the
    run's `end` is appended until its commit): whoever saw the `end` reads the outcome."""
    cur = conn.cursor(row_factory=dict_row)
    query = f"SELECT {RUN_COLUMNS} FROM runs WHERE id = %s"
    row = cur.execute(query, (_uuid(run_id),)).fetchone()
    if row is not None and row["status"] == "running":
        row = cur.execute(query + " FOR KEY SHARE", (_uuid(run_id),)).fetchone()
    if row is None or (owner is not None and row["owner"] != owner):
        raise NotFoundError(run_id)
    return row


def claim(conn: psycopg.Connection[Any], *, worker: str, lease_s: float, limit: int
          ) -> list[dict[str, Any]]:
    """Take up to ``limit`` queued runs, highest priority then oldest, for this worker."""
    cur = conn.cursor(row_factory=dict_row)
    return cur.execute(
        "UPDATE runs SET status = 'running', lease_owner = %s, attempts = attempts + 1,"
        " lease_expires_at = now() + make_interval(secs => %s),"
        " started_at = coalesce(started_at, now()), updated_at = now()"
        " WHERE id IN (SELECT id FROM runs WHERE status = 'queued'"
        "   ORDER BY priority DESC, created_at LIMIT %s FOR UPDATE SKIP LOCKED)"
        f" RETURNING {RUN_COLUMNS}", (worker, lease_s, limit)).fetchall()


def renew(conn: psycopg.Connection[Any], *, worker: str, run_ids: list[str], lease_s: float
          ) -> list[str]:
    """Extend our leases; returns the runs we still hold (one lost is not ours any more)."""
    if not run_ids:
        return []
    rows = conn.execute(
        "UPDATE runs SET lease_expires_at = now() + make_interval(secs => %s)"
        " WHERE id = ANY(%s) AND lease_owner = %s AND status = 'running' RETURNING id::text",
        (lease_s, [uuid.UUID(r) for r in run_ids], worker)).fetchall()
    return [r[0] for r in rows]


def take_expired(conn: psycopg.Connection[Any], *, worker: str, lease_s: float,
                 limit: int = 100) -> list[dict[str, Any]]:
    """Running runs whose lease has run out (their agent died), leased to ``worker`` now:
    two agents looking at once never both recover one, and a recovery that fails half-way
    (Redis away) is tried again when this lease runs out in turn."""
    cur = conn.cursor(row_factory=dict_row)
    return cur.execute(
        "UPDATE runs SET lease_owner = %s, lease_expires_at = now() + make_interval(secs => %s)"
        " WHERE id IN (SELECT id FROM runs WHERE status = 'running' AND lease_expires_at < now()"
        "   ORDER BY lease_expires_at LIMIT %s FOR UPDATE SKIP LOCKED)"
        f" RETURNING {RUN_COLUMNS}", (worker, lease_s, limit)).fetchall()


def requeue(conn: psycopg.Connection[Any], run_id: str) -> None:
    conn.execute(
        "UPDATE runs SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL,"
        " updated_at = now() WHERE id = %s", (uuid.UUID(run_id),))


def run_status(conn: psycopg.Connection[Any], run_id: str) -> dict[str, Any] | None:
    """What an `end` says about a run: status, reason, detail, fallback, message_id."""
    cur = conn.cursor(row_factory=dict_row)
    return cur.execute(
        "SELECT status, reason, detail, fallback, assistant_message_id::text AS message_id"
        " FROM runs WHERE id = %s", (_uuid(run_id),)).fetchone()


@dataclass(frozen=True)
class Outcome:
    """How one run ended, as `finish_many` stores it. ``message_id`` is chosen before the
    run's `end` is appended (the `end` names it), so before anything is committed."""

    run: dict[str, Any]
    reason: str
    content: str
    tool_calls: list[dict[str, Any]]
    tool_results: list[dict[str, Any]]
    detail: str | None
    iterations: int
    usage: dict[str, int]
    fallback: str | None = None
    cached: bool = False
    error: str | None = None
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))


def finish(
    conn: psycopg.Connection[Any], *, run: dict[str, Any], reason: str, content: str,
    tool_calls: list[dict[str, Any]], tool_results: list[dict[str, Any]], detail: str | None,
    iterations: int, usage: dict[str, int], fallback: str | None, cached: bool = False,
    error: str | None = None, message_id: str | None = None,
) -> str:
    """Store the assistant message (exactly what was streamed) and end the run, together;
    see `finish_many`. Returns the assistant message id."""
    outcome = Outcome(run, reason, content, tool_calls, tool_results, detail, iterations, usage,
                      fallback, cached, error, message_id or str(uuid.uuid4()))
    return finish_many(conn, [outcome])[outcome.run["run_id"]]


_INSERT_MESSAGES: LiteralString = (
    "INSERT INTO messages (id, session_id, owner, role, content, status, tool_calls,"
    " tool_results, run_id)"
    " SELECT m.id, m.session_id, m.owner, 'assistant', m.content, m.status, m.tool_calls,"
    "   m.tool_results, m.run_id"
    " FROM unnest(%s::uuid[], %s::uuid[], %s::text[], %s::text[], %s::text[], %s::jsonb[],"
    "   %s::jsonb[], %s::uuid[]) WITH ORDINALITY"
    "   AS m(id, session_id, owner, content, status, tool_calls, tool_results, run_id, n)"
    " ORDER BY m.n"
)
_END_RUNS: LiteralString = (
    "UPDATE runs SET status = d.status, reason = d.reason, detail = d.detail,"
    " output = d.content, iterations = d.iterations, usage = d.usage, fallback = d.fallback,"
    " cached = d.cached, error = d.error, assistant_message_id = d.mid, lease_owner = NULL,"
    " lease_expires_at = NULL, finished_at = now(), updated_at = now()"
    " FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[], %s::int[],"
    "   %s::jsonb[], %s::text[], %s::bool[], %s::text[], %s::uuid[])"
    "   AS d(id, status, reason, detail, content, iterations, usage, fallback, cached, error,"
    "   mid)"
    " WHERE runs.id = d.id"
)


def finish_many(conn: psycopg.Connection[Any], outcomes: list[Outcome]) -> dict[str, str]:
    """Store each run's assistant message and end each run: one transaction, three
    statements whatever the number of runs (the drain ends hundreds at once). The runs'
    rows stay locked until the caller's transaction ends: an agent appends the `end`s
    before it commits (`get_run` waits for that).

    Idempotent: a run that already reached a final status keeps it (a reclaimer racing
    with a slow agent cannot end a run twice). Returns run id → the assistant message id
    stored for it (for such a run, the one stored first).
    """
    ids = [uuid.UUID(o.run["run_id"]) for o in outcomes]
    rows = conn.execute(
        "SELECT id::text, status, assistant_message_id::text FROM runs WHERE id = ANY(%s)"
        " ORDER BY id FOR UPDATE", (ids,)).fetchall()
    found = {row[0]: row for row in rows}
    missing = [o.run["run_id"] for o in outcomes if o.run["run_id"] not in found]
    if missing:
        raise NotFoundError(missing[0])
    stored = {rid: str(mid) for rid, status, mid in rows if status in FINAL and mid is not None}
    todo = [o for o in outcomes if o.run["run_id"] not in stored]
    if todo:
        rids = [uuid.UUID(o.run["run_id"]) for o in todo]
        mids = [uuid.UUID(o.message_id) for o in todo]
        conn.execute(_INSERT_MESSAGES, (
            mids, [uuid.UUID(o.run["session_id"]) for o in todo], [o.run["owner"] for o in todo],
            [o.content for o in todo], [STORED[o.reason][1] for o in todo],
            [Jsonb(o.tool_calls) for o in todo], [Jsonb(o.tool_results) for o in todo], rids))
        conn.execute(_END_RUNS, (
            rids, [STORED[o.reason][0] for o in todo], [o.reason for o in todo],
            [o.detail for o in todo], [o.content for o in todo], [o.iterations for o in todo],
            [Jsonb(o.usage) for o in todo], [o.fallback for o in todo],
            [o.cached for o in todo], [o.error for o in todo], mids))
    return {**stored, **{o.run["run_id"]: o.message_id for o in todo}}


def history(conn: psycopg.Connection[Any], session_id: str, before_message: str,
            limit: int = 50) -> list[dict[str, Any]]:
    """The session's earlier messages, oldest first, for the LLM's context."""
    cur = conn.cursor(row_factory=dict_row)
    rows = cur.execute(
        "SELECT role, content, status FROM messages WHERE session_id = %s"
        " AND seq < (SELECT seq FROM messages WHERE id = %s)"
        " ORDER BY seq DESC LIMIT %s",
        (uuid.UUID(session_id), uuid.UUID(before_message), limit)).fetchall()
    return list(reversed(rows))


def messages(conn: psycopg.Connection[Any], session_id: str, owner: str | None
             ) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    sid = _owned(conn, "sessions", session_id, owner)
    # As in `get_run`: wait for the session's runs being ended right now.
    conn.execute("SELECT 1 FROM runs WHERE session_id = %s AND status = 'running'"
                 " FOR KEY SHARE", (sid,))
    return cur.execute(
        "SELECT id::text AS message_id, role, content, status, tool_calls, tool_results,"
        " run_id::text, created_at FROM messages WHERE session_id = %s ORDER BY seq",
        (sid,)).fetchall()


def create_batch(conn: psycopg.Connection[Any], *, owner: str, messages: list[str],
                 priority: int, session_id: str | None, cache: bool, max_queued: int
                 ) -> tuple[str, list[str]]:
    """A batch and one queued run per message, all in one transaction: all or nothing."""
    _check_queue_room(conn, len(messages), max_queued)
    bid = uuid.uuid4()
    conn.execute("INSERT INTO batches (id, owner) VALUES (%s, %s)", (bid, owner))
    run_ids = [
        create_run(conn, owner=owner, message=message, session_id=session_id,
                   on_disconnect="continue", timeout_s=None, cache=cache, priority=priority,
                   batch_id=str(bid), max_queued=None).run_id
        for message in messages
    ]
    return str(bid), run_ids


def get_batch(conn: psycopg.Connection[Any], batch_id: str, owner: str | None
              ) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    bid = _owned(conn, "batches", batch_id, owner)
    return cur.execute(
        "SELECT id::text AS run_id, status, reason FROM runs WHERE batch_id = %s"
        " ORDER BY created_at", (bid,)).fetchall()


def counts_by_status(conn: psycopg.Connection[Any]) -> dict[str, int]:
    rows = conn.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall()
    return {status: n for status, n in rows}
