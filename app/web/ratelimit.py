"""Requests per user (or client address) per window, counted in Redis so that every web
process of every host shares one budget. A fixed window in one Lua script: atomic, one
round trip, and the key expires by itself."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from app.config import parse_rate

if TYPE_CHECKING:
    from app.redis import RedisClient

SCRIPT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('PTTL', KEYS[1])}
"""


class RateLimiter:
    def __init__(self, redis: RedisClient, rate: str) -> None:
        self._redis = redis
        self.limit, self.period = parse_rate(rate)

    async def hit(self, who: str) -> float | None:
        """Count one request; None when allowed, else seconds until the window resets."""
        window = int(time.time() // self.period)
        key = f"agentd:rl:{who}:{window}"
        reply: Any = await self._redis.eval(SCRIPT, keys=[key],
                                            args=[str(int(self.period * 1000))])
        count, ttl_ms = int(reply[0]), int(reply[1])
        if count <= self.limit:
            return None
        return max(1.0, math.ceil(max(ttl_ms, 0) / 1000))
