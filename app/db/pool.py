"""PostgreSQL for trio: psycopg 3 (sync) and its pool, in worker threads.

psycopg's async API is asyncio-only, so each call runs a plain function on a pooled
connection in a worker thread (notes/stack.md). Two things make that safe under trio:

- **Cancellation reaches the server.** A cancelled `Database.run` does not wait for its
  thread (``abandon_on_cancel``): it asks the server to cancel the statement the thread is
  running, so a query cut by a deadline stops using the database too, instead of running
  on, holding locks and a connection, until its `statement_timeout`.
- **No more threads than connections.** A `trio.CapacityLimiter` of the pool's size admits
  callers; an abandoned thread holds its token until it really ends.

psycopg's and the pool's exceptions become agentd's here, once: `DatabaseUnavailable` when
the server cannot be reached (or is shutting down), `DatabaseError` for everything else.
"""

from __future__ import annotations

import threading
import time
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import psycopg
import psycopg_pool
import structlog
import trio
from psycopg.rows import dict_row

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from psycopg.abc import Params
    from psycopg.abc import QueryNoTemplate as Query

T = TypeVar("T")
Connection = psycopg.Connection[Any]
Row = dict[str, Any]
PING_TIMEOUT = 2.0

log = structlog.get_logger("db")

#: SQLSTATEs that mean "the server is not there for us" rather than "this query failed":
#: class 08 (connection exception), admin/crash shutdown, cannot connect now, too many
#: connections.
_UNAVAILABLE = ("57P01", "57P02", "57P03", "53300")


class DatabaseError(Exception):
    """A database operation failed. `sqlstate` is PostgreSQL's code when the server sent one."""

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached, is starting or stopping, or has no connection free."""


@contextmanager
def mapped_errors() -> Iterator[None]:
    """The one place where psycopg's and psycopg_pool's exceptions become agentd's."""
    try:
        yield
    except (psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed) as e:
        raise DatabaseUnavailable(f"database unavailable: {e}") from e
    except psycopg.Error as e:
        sqlstate = e.sqlstate
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        unavailable = (sqlstate is None and isinstance(e, psycopg.OperationalError)) or (
            sqlstate is not None and (sqlstate.startswith("08") or sqlstate in _UNAVAILABLE)
        )
        if unavailable:
            raise DatabaseUnavailable(
                f"database unavailable: {first_line}", sqlstate=sqlstate
            ) from e
        raise DatabaseError(first_line, sqlstate=sqlstate) from e


class _Abandoned(Exception):
    """The caller left before its call got a connection: nothing to run, nobody to tell."""


class _Call(Generic[T]):
    """One `Database.run` as its worker thread sees it, and how to stop it from outside."""

    def __init__(
        self, pool: psycopg_pool.ConnectionPool[Connection], fn: Callable[[Connection], T]
    ) -> None:
        self._pool = pool
        self._fn = fn
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._abandoned = False

    def __call__(self) -> T:
        with mapped_errors(), self._pool.connection() as conn:
            with self._lock:
                if self._abandoned:
                    raise _Abandoned
                self._conn = conn
            try:
                return self._fn(conn)  # `with connection()` commits when this returns
            finally:
                with self._lock:
                    self._conn = None

    def abandon(self) -> None:
        """The caller was cancelled: make the server stop what this call is running."""
        with self._lock:
            self._abandoned = True
            conn = self._conn
        if conn is not None:
            trio.lowlevel.start_thread_soon(partial(self._cancel, conn), lambda _: None)

    def _cancel(self, conn: Connection, tries: int = 50) -> None:
        # A cancel request stops only the statement running when it arrives. `fn` may be
        # between two statements, so ask again until the worker lets go of the connection
        # (which it does once a statement fails with QueryCanceled and `fn` unwinds).
        for _ in range(tries):
            with self._lock:
                if self._conn is not conn:
                    return
            try:
                conn.cancel_safe(timeout=2)
            except psycopg.Error as e:
                log.debug("db_cancel_failed", error=str(e))
                return
            time.sleep(0.1)


class Database:
    """A pool of PostgreSQL connections used from trio; see `open_database`."""

    def __init__(
        self, pool: psycopg_pool.ConnectionPool[Connection], *, conninfo: str, max_size: int
    ) -> None:
        self._pool = pool
        #: For code that needs a connection of its own outside the pool (LISTEN).
        self.conninfo = conninfo
        self._limiter = trio.CapacityLimiter(max_size)

    async def run(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(conn)`` in a worker thread as one transaction, committed when it returns
        (rolled back when it raises). Cancelling the caller cancels the statement on the
        server too. psycopg errors raised by ``fn`` arrive as `DatabaseError`."""
        call = _Call(self._pool, fn)
        try:
            return await trio.to_thread.run_sync(
                call, abandon_on_cancel=True, limiter=self._limiter
            )
        except BaseException:
            call.abandon()  # a no-op unless trio gave up waiting (cancelled)
            raise

    async def execute(self, query: Query, params: Params | None = None) -> int:
        """Run one statement; the number of rows it affected."""
        return await self.run(lambda conn: conn.execute(query, params).rowcount)

    async def fetchone(self, query: Query, params: Params | None = None) -> Row | None:
        """The first row as a dict (column → value), or None."""
        return await self.run(
            lambda conn: conn.cursor(row_factory=dict_row).execute(query, params).fetchone()
        )

    async def fetchall(self, query: Query, params: Params | None = None) -> list[Row]:
        """Every row, as dicts."""
        return await self.run(
            lambda conn: conn.cursor(row_factory=dict_row).execute(query, params).fetchall()
        )

    async def ping(self) -> bool:
        """True when a trivial query answers within `PING_TIMEOUT` seconds (for /health)."""
        with trio.move_on_after(PING_TIMEOUT):
            try:
                await self.execute("SELECT 1")
            except DatabaseError:
                return False
            return True
        return False


@asynccontextmanager
async def open_database(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    role: str = "app",
    statement_timeout: float = 30.0,
    connect_timeout: float = 10.0,
    close_timeout: float = 5.0,
) -> AsyncIterator[Database]:
    """A connection pool for the life of the block; `DatabaseUnavailable` if it cannot fill
    ``min_size`` connections within ``connect_timeout`` seconds.

    Connections carry ``application_name=agentd-<role>`` (who is who in pg_stat_activity),
    a `statement_timeout` and an idle-in-transaction timeout, so no statement or forgotten
    transaction holds the database for ever. Closing is shielded, with its own deadline.
    """
    timeouts = {
        "statement_timeout": f"{int(statement_timeout * 1000)}ms",
        "idle_in_transaction_session_timeout": f"{int(max(statement_timeout, 60) * 1000)}ms",
    }

    def configure(conn: Connection) -> None:
        for name, value in timeouts.items():
            conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        conn.commit()

    pool: psycopg_pool.ConnectionPool[Connection] = psycopg_pool.ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        open=False,
        name=f"agentd-{role}",
        kwargs={"application_name": f"agentd-{role}", "connect_timeout": int(connect_timeout)},
        configure=configure,
        # A connection broken while idle (a server restart) is replaced, not handed out.
        check=psycopg_pool.ConnectionPool.check_connection,
        timeout=connect_timeout,
    )
    try:
        with mapped_errors():
            await trio.to_thread.run_sync(
                partial(pool.open, wait=True, timeout=connect_timeout), abandon_on_cancel=True
            )
        yield Database(pool, conninfo=url, max_size=max_size)
    finally:
        # Releasing connections must not be skipped by the cancellation that ends us, but
        # it is bounded: a stuck close is abandoned at its deadline.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + close_timeout):
            await trio.to_thread.run_sync(
                partial(pool.close, timeout=close_timeout), abandon_on_cancel=True
            )
