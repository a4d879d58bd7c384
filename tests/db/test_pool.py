"""The pool in threads: transactions, errors mapped once, cancellation that reaches the server."""

from __future__ import annotations

import pytest
import trio

from app.db.pool import DatabaseError, DatabaseUnavailable, open_database


async def test_a_query_cancelled_by_trio_is_cancelled_on_the_server(infra):
    async with (
        open_database(infra.database_url, role="cancelled") as db,
        open_database(infra.database_url, role="observer") as observer,
    ):
        started = trio.current_time()
        with trio.move_on_after(0.5):
            await db.execute("SELECT pg_sleep(30)")
        assert trio.current_time() - started < 1.5

        with trio.fail_after(5):
            while True:
                backends = await observer.fetchall(
                    "SELECT state, query FROM pg_stat_activity"
                    " WHERE application_name = 'agentd-cancelled'"
                )
                if backends and all(b["state"] == "idle" for b in backends):
                    break
                await trio.sleep(0.05)
        # ...and the connection it used is fine for the next caller.
        assert await db.fetchone("SELECT 1 AS one") == {"one": 1}


async def test_run_commits_when_fn_returns_and_rolls_back_when_it_raises(infra):
    async with open_database(infra.database_url) as db:
        await db.execute("CREATE TABLE IF NOT EXISTS pool_notes (note text)")
        await db.run(lambda conn: conn.execute("INSERT INTO pool_notes VALUES ('kept')"))

        def insert_then_fail(conn):
            conn.execute("INSERT INTO pool_notes VALUES ('dropped')")
            raise KeyError("not a database error")

        with pytest.raises(KeyError):
            await db.run(insert_then_fail)
        rows = await db.fetchall("SELECT note FROM pool_notes")
    assert rows == [{"note": "kept"}]


async def test_errors_from_the_server_become_database_errors(infra):
    async with open_database(infra.database_url) as db:
        with pytest.raises(DatabaseError) as caught:
            await db.execute("SELEC 1")
    assert caught.type is DatabaseError
    assert caught.value.sqlstate == "42601"  # syntax_error


async def test_statement_timeout_bounds_every_statement(infra):
    async with open_database(infra.database_url, statement_timeout=0.2) as db:
        with trio.fail_after(5), pytest.raises(DatabaseError) as caught:
            await db.execute("SELECT pg_sleep(3)")
    assert caught.value.sqlstate == "57014"  # query_canceled


async def test_an_unreachable_database_is_unavailable(tmp_path):
    url = f"postgresql:///agentd?host={tmp_path}&user=agentd"
    with trio.fail_after(10), pytest.raises(DatabaseUnavailable):
        async with open_database(url, connect_timeout=1):
            pass


async def test_ping_answers_while_the_database_does(infra):
    async with open_database(infra.database_url) as db:
        assert await db.ping() is True
