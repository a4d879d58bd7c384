"""`search_knowledge_base`: passages from the caller's own documents, closest first.

Whose documents. A tool is called with its arguments only, and one registry serves every run
of an agent process (and every request of a web process), so the owner cannot be part of the
tool. It is task-local instead: whoever calls tools on behalf of a user wraps the calls in
``with acting_for(owner):`` (worker.run_one around a run, /api/tools/{name} around a call).
That sets a ContextVar, and trio gives every task a copy of the context of the task that
spawned it, so the tool-call tasks a run spawns see their run's owner, and a run's setting
never reaches another run (its sibling tasks were spawned with their own copies). A call
with no owner bound is refused: it never searches as somebody.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from app.agent.tools import Tool, ToolError
from app.embedding.client import (
    EmbeddingOverloaded,
    EmbeddingRequestError,
    EmbeddingUnavailable,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from app.embedding.client import EmbeddingClient

NAME = "search_knowledge_base"
MAX_QUERY = 2_000
MAX_K = 10
DEFAULT_K = 5
TIMEOUT_S = 15.0

_owner: ContextVar[str | None] = ContextVar("agentd_tool_owner", default=None)


@contextmanager
def acting_for(owner: str) -> Iterator[None]:
    """Tool calls in this block (and in tasks it spawns) are made for `owner`."""
    token = _owner.set(owner)
    try:
        yield
    finally:
        _owner.reset(token)


def current_owner() -> str | None:
    return _owner.get()


def passage(hit: dict[str, Any]) -> dict[str, Any]:
    """A search hit as the tool returns it ("" from the store means none)."""
    return {"text": hit.get("text") or "", "source": hit.get("source") or None,
            "title": hit.get("title") or None, "score": round(float(hit.get("score") or 0), 4),
            "document_id": hit.get("document_id")}


def knowledge_tool(embedding: EmbeddingClient) -> Tool:
    async def call(args: dict[str, Any]) -> dict[str, Any]:
        owner = _owner.get()
        if owner is None:
            raise ToolError("no user is bound to this call, so there is no knowledge base "
                            "to search")
        query = str(args["query"]).strip()
        if not query or len(query) > MAX_QUERY:
            raise ToolError(f"'query' must be 1 to {MAX_QUERY} characters of text")
        k = args.get("k", DEFAULT_K)
        if not isinstance(k, int | float) or k != int(k) or not 1 <= k <= MAX_K:
            raise ToolError(f"'k' must be an integer from 1 to {MAX_K}")
        try:
            hits = await embedding.search(query, int(k), owner)
        except EmbeddingOverloaded:
            raise ToolError("the knowledge base is busy; try again in a moment") from None
        except EmbeddingUnavailable:
            raise ToolError("the knowledge base is unavailable right now") from None
        except EmbeddingRequestError as e:
            raise ToolError(f"the knowledge base refused the query: {e}") from None
        return {"query": query, "passages": [passage(hit) for hit in hits]}

    return Tool(
        name=NAME,
        description=("Search the user's knowledge base (documents they added) by meaning. "
                     "Returns the closest passages, best first, with their source and title; "
                     "quote or cite them in the answer."),
        parameters={
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "what to look for, in words"},
                "k": {"type": "integer", "minimum": 1, "maximum": MAX_K,
                      "description": f"how many passages (default {DEFAULT_K})"},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
        call=call,
        timeout=TIMEOUT_S,
    )
