"""Schema migrations: applied once, also when many processes start together; the schema's rules."""

from __future__ import annotations

import uuid

import psycopg
import pytest
import trio
from psycopg.conninfo import make_conninfo

from app.db.migrations import MIGRATIONS, RUNS_CHANNEL, migrate
from app.db.pool import DatabaseError, open_database


@pytest.fixture
def fresh_database(infra):
    """A database of its own on the session's server, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(infra.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_conninfo(infra.database_url, dbname=name)
    with psycopg.connect(infra.database_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


async def test_migrate_is_idempotent(infra):
    async with open_database(infra.database_url) as db:
        assert await migrate(db) == len(MIGRATIONS)
        assert await migrate(db) == len(MIGRATIONS)
        rows = await db.fetchall("SELECT version FROM schema_migrations ORDER BY version")
    assert [row["version"] for row in rows] == list(range(1, len(MIGRATIONS) + 1))


async def test_concurrent_migrations_apply_each_version_once(fresh_database):
    # One more migration that counts how often it ran (running twice would not fail).
    tally = "CREATE TABLE IF NOT EXISTS tally (n int); INSERT INTO tally VALUES (1)"
    migrations = (*MIGRATIONS, tally)
    go = trio.Event()
    versions: list[int] = []

    async def start_process() -> None:
        async with open_database(fresh_database, max_size=1, role="migrate") as db:
            await go.wait()
            versions.append(await migrate(db, migrations=migrations))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(start_process)
            await trio.sleep(0.5)  # let every pool connect, then start them all at once
            go.set()

    assert versions == [len(migrations)] * 8
    async with open_database(fresh_database) as db:
        assert await db.fetchone("SELECT count(*) AS n FROM tally") == {"n": 1}
        applied = await db.fetchall("SELECT version FROM schema_migrations ORDER BY version")
    assert [row["version"] for row in applied] == list(range(1, len(migrations) + 1))


async def test_a_schema_newer_than_this_code_is_refused(infra):
    async with open_database(infra.database_url) as db:
        with pytest.raises(DatabaseError, match="newer than this agentd knows"):
            await migrate(db, migrations=())


def _session(conn, owner="alice"):
    sid = uuid.uuid4()
    conn.execute("INSERT INTO sessions (id, owner) VALUES (%s, %s)", (sid, owner))
    return sid


async def test_a_message_and_its_run_may_be_inserted_in_either_order(infra):
    def accept(conn):
        sid, mid, rid = _session(conn), uuid.uuid4(), uuid.uuid4()
        conn.execute(
            "INSERT INTO messages (id, session_id, owner, role, content, run_id)"
            " VALUES (%s, %s, 'alice', 'user', 'hi', %s)",
            (mid, sid, rid),
        )
        conn.execute(
            "INSERT INTO runs (id, session_id, owner, user_message_id)"
            " VALUES (%s, %s, 'alice', %s)",
            (rid, sid, mid),
        )
        return rid

    async with open_database(infra.database_url) as db:
        rid = await db.run(accept)
        row = await db.fetchone("SELECT status, priority, attempts FROM runs WHERE id = %s", (rid,))
    assert row == {"status": "queued", "priority": 5, "attempts": 0}


async def test_a_running_run_must_hold_a_lease(infra):
    def claim_without_lease(conn):
        sid = _session(conn)
        conn.execute(
            "INSERT INTO runs (id, session_id, owner, status) VALUES (%s, %s, 'alice', 'running')",
            (uuid.uuid4(), sid),
        )

    async with open_database(infra.database_url) as db:
        with pytest.raises(DatabaseError) as caught:
            await db.run(claim_without_lease)
    assert caught.value.sqlstate == "23514"  # check_violation


async def test_queueing_a_run_notifies_the_runs_channel(infra):
    def listen_while_queueing() -> list[str]:
        with psycopg.connect(infra.database_url, autocommit=True) as listener:
            listener.execute(f"LISTEN {RUNS_CHANNEL}")
            with psycopg.connect(infra.database_url) as conn:
                sid = _session(conn)
                for _ in range(3):  # three runs in one transaction: one wake-up
                    conn.execute(
                        "INSERT INTO runs (id, session_id, owner) VALUES (%s, %s, 'alice')",
                        (uuid.uuid4(), sid),
                    )
            return [n.channel for n in listener.notifies(timeout=2)]

    with trio.fail_after(10):
        channels = await trio.to_thread.run_sync(listen_while_queueing)
    assert channels == [RUNS_CHANNEL]
