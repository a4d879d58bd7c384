"""Shared fixtures.

`infra`: embedded PostgreSQL and Redis for the whole session, started the way `agentd
serve` starts them: `infra_specs` → `Tree` → `run_tree`. pytest-trio has no session-scoped
trio fixtures, so the tree runs in its own `trio.run` in a thread that lives all session
(it must: `PR_SET_PDEATHSIG` kills a child when the *thread* that forked it ends).

`infra_dir`: a directory for data of embedded servers. Not pytest's tmp_path: when we are
root, PostgreSQL runs as another user that must be able to reach its data directory, and
every pytest session that starts (another one on the same machine, say) resets
/tmp/pytest-of-root to 0700, which would lock a running cluster's user out.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from app.db.migrations import migrate
from app.db.pool import open_database
from supervisor.infra import infra_specs
from supervisor.run import Tree, run_tree

if TYPE_CHECKING:
    from collections.abc import Iterator


@dataclass(frozen=True)
class Infra:
    database_url: str
    redis_url: str
    data_dir: Path


class TreeThread:
    """A supervisor tree run by `run_tree` in a thread of its own, driven from outside trio."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = threading.Event()  # set once ready, or once run_tree has returned
        self._thread = threading.Thread(target=self._main, name="infra-tree", daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:

                async def report_ready() -> None:
                    await self.tree.ready.wait()
                    self._started.set()

                nursery.start_soon(report_ready)
                self.exit_code = await run_tree(self.tree)
                nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        except BaseException as e:  # reported by start() / stop()
            self.error = e
        finally:
            self._started.set()

    def start(self, timeout: float) -> None:
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"infra tree not ready within {timeout} s")
        if self.error is not None or not self.tree.ready.is_set():
            raise RuntimeError(f"infra tree failed to start: {self.tree.reason}") from self.error

    def stop(self, timeout: float) -> int | None:
        if self._thread.is_alive() and self._token is not None:
            trio.from_thread.run_sync(
                self.tree.begin_shutdown, "tests done", trio_token=self._token
            )
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"infra tree still running {timeout} s after shutdown began")
        if self.error is not None:
            raise self.error
        return self.exit_code


async def _migrate(url: str) -> None:
    with trio.fail_after(30):
        async with open_database(url, role="tests-migrate") as db:
            await migrate(db)


@contextmanager
def _private_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="agentd-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def infra_dir() -> Iterator[Path]:
    with _private_dir() as path:
        yield path


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    with _private_dir() as base:
        yield from _run_infra(base)


def _run_infra(base: Path) -> Iterator[Infra]:
    data_dir, runtime_dir = base / "data", base / "run"
    specs, database_url, redis_url = infra_specs(
        data_dir, runtime_dir, database_url=None, redis_url=None
    )
    runner = TreeThread(
        Tree(specs, runtime_dir=runtime_dir, shutdown_timeout=10, shutdown_reserve=2)
    )
    try:
        runner.start(timeout=90)
        trio.run(_migrate, database_url)
        yield Infra(database_url, redis_url, data_dir)
    finally:
        exit_code = runner.stop(timeout=20)
    assert exit_code == 0, f"infra tree exited {exit_code}"
