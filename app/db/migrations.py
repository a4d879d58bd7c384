"""The schema, as numbered migrations applied at start.

Every app process calls `migrate` as it starts, and several start together (web ×N,
agent ×N). The first to take a transaction-scoped advisory lock applies what is missing, in
that one transaction (PostgreSQL's DDL is transactional: a failed migration leaves nothing
behind); the others wait on the lock, then find nothing left to do. `schema_migrations`
records each applied version. Migrations are append-only: never edit one that has shipped,
add the next.

Version 1, the tables the product needs:

- ``sessions``: a conversation, owned by one user (a key or a JWT ``sub``).
- ``messages``: ordered by ``seq`` within a session. ``status`` is NULL for user messages
  and, for an assistant's, how its run ended (API.md, Why it ended → what is stored).
- ``runs``: the queue and each run's outcome. Queued runs are claimed highest ``priority``
  first, then oldest (``runs_claim_idx``, ``FOR UPDATE SKIP LOCKED``); a running run holds a
  lease (``lease_owner``, ``lease_expires_at``) that a crashed agent lets expire
  (``runs_lease_idx``), and a CHECK makes sure no run can be running without one.
  Inserting or re-queueing a run notifies `RUNS_CHANNEL` (one wake-up per transaction).
- ``batches``, ``documents`` (one per owner and source; without a source, one per owner and
  content hash).

Runs and messages point at each other (a run's user and assistant messages, a message's
run). Those foreign keys are DEFERRABLE INITIALLY DEFERRED, so the transaction that accepts
a request may insert the message and the run in either order: they are checked at commit.
``created_at`` of runs and messages is ``clock_timestamp()``, so rows inserted in one
transaction (a batch) still keep their order. ``updated_at`` is kept by a trigger.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Final, LiteralString

import structlog

from app.db.pool import DatabaseError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from app.db.pool import Connection, Database

log = structlog.get_logger("db")

#: LISTEN on this channel to be woken when a run is queued.
RUNS_CHANNEL: Final = "agentd_runs"
#: pg_advisory_xact_lock key serialising migrations ("agentd" in ASCII).
MIGRATION_LOCK: Final = 0x6167656E7464

_V1: Final = """
CREATE FUNCTION agentd_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;

CREATE FUNCTION agentd_notify_runs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- An empty payload: identical notifications in one transaction are sent once.
    PERFORM pg_notify('agentd_runs', '');
    RETURN NULL;
END $$;

CREATE TABLE sessions (
    id          uuid PRIMARY KEY,
    owner       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sessions_owner_idx ON sessions (owner, updated_at DESC);

CREATE TABLE batches (
    id          uuid PRIMARY KEY,
    owner       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX batches_owner_idx ON batches (owner, created_at DESC);

CREATE TABLE messages (
    id            uuid PRIMARY KEY,
    session_id    uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    owner         text NOT NULL,
    role          text NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content       text NOT NULL DEFAULT '',
    status        text CHECK (status IN ('complete', 'interrupted', 'cancelled', 'error')),
    tool_calls    jsonb,
    tool_results  jsonb,
    run_id        uuid,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    seq           bigserial NOT NULL
);
CREATE INDEX messages_session_idx ON messages (session_id, seq);
CREATE INDEX messages_run_idx ON messages (run_id) WHERE run_id IS NOT NULL;

CREATE TABLE runs (
    id                    uuid PRIMARY KEY,
    session_id            uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    owner                 text NOT NULL,
    user_message_id       uuid REFERENCES messages (id) DEFERRABLE INITIALLY DEFERRED,
    assistant_message_id  uuid REFERENCES messages (id) DEFERRABLE INITIALLY DEFERRED,
    status                text NOT NULL DEFAULT 'queued' CHECK (status IN
                              ('queued', 'running', 'completed', 'cancelled', 'failed',
                               'interrupted')),
    reason                text CHECK (reason IN
                              ('completed', 'cancelled', 'server_shutdown', 'timeout', 'error')),
    detail                text,
    fallback              text,
    on_disconnect         text NOT NULL DEFAULT 'continue'
                              CHECK (on_disconnect IN ('cancel', 'continue')),
    priority              integer NOT NULL DEFAULT 5 CHECK (priority BETWEEN 0 AND 9),
    attempts              integer NOT NULL DEFAULT 0,
    lease_owner           text,
    lease_expires_at      timestamptz,
    timeout_s             double precision CHECK (timeout_s > 0),
    cache                 boolean NOT NULL DEFAULT false,
    batch_id              uuid REFERENCES batches (id) ON DELETE SET NULL,
    output                text NOT NULL DEFAULT '',
    iterations            integer NOT NULL DEFAULT 0,
    usage                 jsonb,
    cached                boolean NOT NULL DEFAULT false,
    error                 text,
    created_at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at            timestamptz,
    finished_at           timestamptz,
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT runs_running_has_lease CHECK (status <> 'running' OR lease_expires_at IS NOT NULL)
);
CREATE INDEX runs_claim_idx ON runs (priority DESC, created_at) WHERE status = 'queued';
CREATE INDEX runs_lease_idx ON runs (lease_expires_at) WHERE status = 'running';
CREATE INDEX runs_session_idx ON runs (session_id, created_at);
CREATE INDEX runs_batch_idx ON runs (batch_id) WHERE batch_id IS NOT NULL;

ALTER TABLE messages ADD CONSTRAINT messages_run_fk
    FOREIGN KEY (run_id) REFERENCES runs (id) ON DELETE SET NULL DEFERRABLE INITIALLY DEFERRED;

CREATE TABLE documents (
    id            uuid PRIMARY KEY,
    owner         text NOT NULL,
    source        text,
    title         text,
    content_hash  text NOT NULL,
    chunks        integer NOT NULL DEFAULT 0,
    metadata      jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (owner, source)
);
CREATE UNIQUE INDEX documents_hash_idx ON documents (owner, content_hash) WHERE source IS NULL;

CREATE TRIGGER sessions_touch BEFORE UPDATE ON sessions
    FOR EACH ROW EXECUTE FUNCTION agentd_touch();
CREATE TRIGGER messages_touch BEFORE UPDATE ON messages
    FOR EACH ROW EXECUTE FUNCTION agentd_touch();
CREATE TRIGGER runs_touch BEFORE UPDATE ON runs
    FOR EACH ROW EXECUTE FUNCTION agentd_touch();
CREATE TRIGGER documents_touch BEFORE UPDATE ON documents
    FOR EACH ROW EXECUTE FUNCTION agentd_touch();
CREATE TRIGGER runs_notify AFTER INSERT OR UPDATE OF status ON runs
    FOR EACH ROW WHEN (NEW.status = 'queued') EXECUTE FUNCTION agentd_notify_runs();
"""

#: Index i holds version i + 1.
MIGRATIONS: Final[tuple[LiteralString, ...]] = (_V1,)


async def migrate(db: Database, *, migrations: Sequence[LiteralString] = MIGRATIONS) -> int:
    """Bring the schema up to date; return its version. Safe to call from many processes."""
    version, applied = await db.run(partial(_apply, migrations))
    if applied:
        log.info("migrations_applied", versions=applied, version=version)
    return version


def _apply(migrations: Sequence[LiteralString], conn: Connection) -> tuple[int, list[int]]:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version integer PRIMARY KEY,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    current = int(row[0]) if row is not None else 0
    if current > len(migrations):
        raise DatabaseError(
            f"the database schema is at version {current}, newer than this agentd knows "
            f"({len(migrations)}): run a newer agentd against it"
        )
    applied = []
    for version in range(current + 1, len(migrations) + 1):
        conn.execute(migrations[version - 1])
        conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
        applied.append(version)
    return len(migrations), applied
