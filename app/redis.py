"""Redis for trio: a coredis client for the life of a block, and coredis's errors mapped once.

Replies are decoded to `str` (``decode_responses=True``): every user of Redis here (run event
streams, the answer cache, rate limits) works with text, and coredis decodes in its parser,
which costs no more than decoding in our code would. Commands accept str or bytes.

coredis runs its connection pool in a nursery inside ``async with client``, so an exception
leaving the block would come out wrapped in an ExceptionGroup; `open_redis` gives back the
one exception the body raised, as a plain block would.
"""

from __future__ import annotations

from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, TypeAlias

import coredis
import coredis.exceptions
import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

RedisClient: TypeAlias = coredis.Redis[str]
PING_TIMEOUT = 2.0


class RedisUnavailable(Exception):
    """Redis cannot be reached (refused, timed out, connection lost, still loading)."""


@contextmanager
def mapped_errors() -> Iterator[None]:
    """The one place where coredis's connection failures become `RedisUnavailable`.

    Other coredis errors (a wrong type, a bad command) are bugs of ours and pass unchanged.
    """
    try:
        yield
    except (
        coredis.exceptions.ConnectionError,
        OSError,  # TimeoutError too: coredis raises the builtin one
        trio.TooSlowError,
    ) as e:
        raise RedisUnavailable(f"redis unavailable: {e}") from e


@contextmanager
def _unwrapped() -> Iterator[None]:
    """Re-raise a lone exception that coredis's internal nursery wrapped in a group."""
    lone: BaseException | None = None
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1 or isinstance(group.exceptions[0], BaseExceptionGroup):
            raise
        lone = group.exceptions[0]
    if lone is not None:
        raise lone


@asynccontextmanager
async def open_redis(
    url: str,
    *,
    connect_timeout: float = 5.0,
    max_connections: int = 64,
) -> AsyncIterator[RedisClient]:
    """A connected client (checked with PING) for the life of the block.

    ``url``: ``redis://host:port/db``, ``rediss://…`` or ``unix:///path/to/redis.sock``.
    Raises `RedisUnavailable` when Redis does not answer within ``connect_timeout``.
    """
    client: RedisClient = coredis.Redis.from_url(
        url,
        decode_responses=True,
        connect_timeout=connect_timeout,
        max_connections=max_connections,
    )
    with _unwrapped():
        async with client:
            with mapped_errors(), trio.fail_after(connect_timeout):
                await client.ping()
            yield client


async def ping(client: RedisClient) -> bool:
    """True when Redis answers PING within `PING_TIMEOUT` seconds (for /health)."""
    with trio.move_on_after(PING_TIMEOUT):
        try:
            with mapped_errors():
                await client.ping()
        except RedisUnavailable:
            return False
        return True
    return False
