from __future__ import annotations

import uuid

import trio

from app.redis import open_redis
from app.web.ratelimit import RateLimiter


async def test_the_limit_is_shared_and_answers_when_to_retry(infra):
    who = uuid.uuid4().hex
    with trio.fail_after(10):
        async with open_redis(infra.redis_url) as a, open_redis(infra.redis_url) as b:
            first, second = RateLimiter(a, "3/minute"), RateLimiter(b, "3/minute")
            # Two clients (as two web processes would be) draw on one budget.
            assert [await first.hit(who), await second.hit(who), await first.hit(who)] == [None] * 3
            wait = await second.hit(who)
            assert wait is not None and 1 <= wait <= 60
            assert await first.hit(uuid.uuid4().hex) is None  # someone else is not limited
