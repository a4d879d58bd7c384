"""The answer cache (opt-in, Agent behaviour): completed answers in Redis, keyed on what
determines them: model, system prompt, the messages sent and the tools offered."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from app.redis import RedisClient

log = structlog.get_logger("cache")
PREFIX = "agentd:cache:"


def cache_key(owner: str, model: str, messages: list[dict[str, Any]],
              tools: list[dict[str, Any]]) -> str:
    """`messages` start with the system prompt, so it is part of the key. So is the owner:
    an answer may quote the owner's own documents (search_knowledge_base), which another
    user must never be served from the cache."""
    material = json.dumps({"owner": owner, "model": model, "messages": messages,
                           "tools": tools},
                          sort_keys=True, separators=(",", ":"))
    return PREFIX + hashlib.sha256(material.encode()).hexdigest()


async def lookup(redis: RedisClient, key: str) -> str | None:
    try:
        value = await redis.get(key)
    except Exception as e:  # noqa: BLE001 - a cache that is down is a miss, not a failure
        log.warning("cache_unavailable", error=str(e))
        return None
    return None if value is None else str(value)


async def store(redis: RedisClient, key: str, answer: str, ttl: float) -> None:
    try:
        await redis.set(key, answer, ex=max(1, int(ttl)))
    except Exception as e:  # noqa: BLE001 - not caching is always allowed
        log.warning("cache_unavailable", error=str(e))
