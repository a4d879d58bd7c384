"""`web_search`: a SearXNG-compatible JSON search (``GET <url>/search?q=…&format=json``).

Bounded on every side: a timeout per query, at most `MAX_RESULTS` results, each title and
snippet cut to a size, so a search can't flood the LLM's context. Failures are `ToolError`s,
which the registry turns into `tool_result` errors.
"""

from __future__ import annotations

from typing import Any

import httpx

from app.agent.tools import Tool, ToolError

MAX_RESULTS = 5
MAX_FIELD = 500
TIMEOUT_S = 10.0


def _clip(value: Any) -> str:
    text = str(value or "").strip()
    return text if len(text) <= MAX_FIELD else text[: MAX_FIELD - 1] + "…"


def parse_results(data: Any, limit: int = MAX_RESULTS) -> list[dict[str, str]]:
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ToolError("the search engine answered without a results list")
    return [{"title": _clip(r.get("title")), "url": _clip(r.get("url")),
             "snippet": _clip(r.get("content"))}
            for r in data["results"][:limit] if isinstance(r, dict)]


def web_search_tool(base_url: str, client: httpx.AsyncClient) -> Tool:
    endpoint = base_url.rstrip("/")
    if not endpoint.endswith("/search"):
        endpoint += "/search"

    async def search(arguments: dict[str, Any]) -> list[dict[str, str]]:
        query = str(arguments["query"]).strip()
        if not query:
            raise ToolError("the query is empty")
        try:
            response = await client.get(endpoint, params={"q": query, "format": "json"},
                                        timeout=TIMEOUT_S)
        except httpx.HTTPError as e:
            raise ToolError(f"the search engine is unreachable: {type(e).__name__}") from None
        if response.status_code != 200:
            raise ToolError(f"the search engine answered HTTP {response.status_code}")
        try:
            data = response.json()
        except ValueError:
            raise ToolError("the search engine did not answer JSON") from None
        limit = int(arguments.get("max_results") or MAX_RESULTS)
        return parse_results(data, max(1, min(limit, MAX_RESULTS)))

    return Tool(
        name="web_search",
        description="Search the web. Returns up to 5 results with title, url and snippet.",
        parameters={"type": "object", "properties": {
            "query": {"type": "string", "description": "what to search for"},
            "max_results": {"type": "integer", "description": "1-5, default 5"}},
            "required": ["query"], "additionalProperties": False},
        call=search,
        timeout=TIMEOUT_S + 2,
    )
