"""Embedded PostgreSQL and Redis, started, restarted and stopped by the supervisor's tree."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil
import psycopg
import trio

from app.redis import open_redis
from supervisor.child import State
from supervisor.infra import PG_USER, infra_specs
from supervisor.run import Tree, run_tree

if TYPE_CHECKING:
    from pathlib import Path


@dataclass
class Running:
    tree: Tree
    database_url: str
    redis_url: str
    data_dir: Path
    exit_code: int | None = None

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "postgres" / "postmaster.pid"


async def _first(*events: trio.Event) -> None:
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)


@asynccontextmanager
async def running_infra(base: Path):
    """A tree of just the infra layer on `base`, as `agentd serve` would build it."""
    data_dir, runtime_dir = base / "data", base / "run"
    specs, database_url, redis_url = infra_specs(
        data_dir, runtime_dir, database_url=None, redis_url=None
    )
    tree = Tree(specs, runtime_dir=runtime_dir, shutdown_timeout=10, shutdown_reserve=2)
    running = Running(tree, database_url, redis_url, data_dir)
    done = trio.Event()

    async def run() -> None:
        running.exit_code = await run_tree(tree)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        try:
            with trio.fail_after(60):
                await _first(tree.ready, done)
            assert tree.ready.is_set(), f"infra did not start: {tree.reason}"
            yield running
        finally:
            tree.begin_shutdown("test done")
            with trio.fail_after(20):
                await done.wait()


async def sql(url: str, statement: str, params: tuple[object, ...] = ()) -> list[tuple]:
    def work() -> list[tuple]:
        with psycopg.connect(url, connect_timeout=5) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description is not None else []

    with trio.fail_after(10):
        return await trio.to_thread.run_sync(work)


def server_user() -> str:
    return PG_USER if os.geteuid() == 0 else psutil.Process().username()


def infra_processes(running: Running) -> list[psutil.Process]:
    postmaster = psutil.Process(int(running.pidfile.read_text().split()[0]))
    redis = psutil.Process(running.tree.children["redis"].pid)
    return [postmaster, *postmaster.children(recursive=True), redis]


async def test_session_infra_answers_on_private_unix_sockets(infra):
    rows = await sql(infra.database_url, "SELECT current_database(), current_user")
    assert rows == [("agentd", "agentd")]
    async with open_redis(infra.redis_url) as redis:
        await redis.set("agentd:test:hello", "world")
        assert await redis.get("agentd:test:hello") == "world"
    postmaster = int((infra.data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
    assert psutil.Process(postmaster).username() == server_user()  # never root
    sockets = [infra.data_dir / "pg-run", infra.data_dir / "pg-run" / ".s.PGSQL.5432"]
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o700 for path in sockets)
    assert "-c" in psutil.Process(postmaster).cmdline()
    assert "listen_addresses=" in psutil.Process(postmaster).cmdline()  # no TCP


async def test_data_survives_a_restart(infra_dir):
    async with running_infra(infra_dir) as first:
        await sql(first.database_url, "CREATE TABLE kept (note text)")
        await sql(first.database_url, "INSERT INTO kept VALUES ('still here')")
        async with open_redis(first.redis_url) as redis:
            await redis.set("kept", "also here")
    assert first.exit_code == 0

    async with running_infra(infra_dir) as second:
        assert await sql(second.database_url, "SELECT note FROM kept") == [("still here",)]
        async with open_redis(second.redis_url) as redis:
            assert await redis.get("kept") == "also here"
    assert second.exit_code == 0


async def test_no_postgres_or_redis_process_remains_after_shutdown(infra_dir):
    async with running_infra(infra_dir) as running:
        await sql(running.database_url, "SELECT 1")
        processes = infra_processes(running)
        assert len(processes) >= 4  # postmaster, its helpers, redis
    assert running.exit_code == 0
    still_there = [p for p in processes if p.is_running()]  # is_running checks pid reuse
    assert still_there == []
    assert not running.pidfile.exists()


async def test_postgres_killed_with_sigkill_comes_back_despite_its_stale_pid_file(infra_dir):
    async with running_infra(infra_dir) as running:
        await sql(running.database_url, "CREATE TABLE kept (note text)")
        await sql(running.database_url, "INSERT INTO kept VALUES ('committed')")
        postgres = running.tree.children["postgres"]
        killed = postgres.pid
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        with trio.fail_after(60):
            while not (postgres.state is State.READY and postgres.pid != killed):
                await trio.sleep(0.05)
        assert postgres.restarts >= 1
        assert await sql(running.database_url, "SELECT note FROM kept") == [("committed",)]
    assert running.exit_code == 0


async def test_stale_pid_file_naming_a_live_process_does_not_block_start(infra_dir):
    async with running_infra(infra_dir) as first:
        stale = first.pidfile.read_text().splitlines()
    # The next boot: the pid in the leftover file now belongs to some other process of the
    # same user (postgres would refuse to start, thinking a server still runs).
    user = server_user()
    squatter = subprocess.Popen(
        ["sleep", "60"], user=user if os.geteuid() == 0 else None, start_new_session=True
    )
    try:
        first.pidfile.write_text("\n".join([str(squatter.pid), *stale[1:]]) + "\n")
        if os.geteuid() == 0:
            os.chown(first.pidfile, psutil.Process(squatter.pid).uids().real, -1)
        async with running_infra(infra_dir) as second:
            assert await sql(second.database_url, "SELECT 1") == [(1,)]
            assert second.tree.children["postgres"].restarts == 0
        assert squatter.poll() is None  # not ours to touch
    finally:
        squatter.kill()
        squatter.wait()


def test_only_what_has_no_url_is_embedded(tmp_path):
    specs, db, redis = infra_specs(
        tmp_path, tmp_path / "run", database_url="postgresql://db.example/agentd", redis_url=None
    )
    assert [spec.name for spec in specs] == ["redis"]
    assert db == "postgresql://db.example/agentd"
    assert redis == f"unix://{tmp_path / 'run' / 'redis.sock'}"

    specs, db, redis = infra_specs(
        tmp_path, tmp_path / "run", database_url="postgresql:///x", redis_url="redis://r:6379/0"
    )
    assert (specs, db, redis) == ([], "postgresql:///x", "redis://r:6379/0")
