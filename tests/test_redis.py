"""The Redis client: str replies, errors mapped once, and exceptions that leave the block plain."""

from __future__ import annotations

import pytest
import trio

from app.redis import RedisUnavailable, open_redis, ping


async def test_open_redis_answers_in_str(infra):
    async with open_redis(infra.redis_url) as redis:
        await redis.set("agentd:test:redis", "value")
        assert await redis.get("agentd:test:redis") == "value"
        assert await ping(redis) is True


async def test_an_unreachable_redis_is_unavailable(tmp_path):
    with trio.fail_after(10), pytest.raises(RedisUnavailable):
        async with open_redis(f"unix://{tmp_path / 'nothing.sock'}", connect_timeout=1):
            pass


async def test_an_exception_from_the_block_leaves_it_unwrapped(infra):
    with pytest.raises(KeyError):
        async with open_redis(infra.redis_url):
            raise KeyError("mine")
