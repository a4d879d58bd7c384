"""The tools a run is offered, from the settings: the built-ins, plus the ones that need a
live service (`search_knowledge_base` when an `EmbeddingClient` is given: web and agent
always open one; `web_search` when AGENTD_WEB_SEARCH_URL is set). Web lists the
same set."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.agent.tools import ToolRegistry, default_registry
from app.agent.tools.knowledge import knowledge_tool
from app.agent.tools.web_search import web_search_tool

if TYPE_CHECKING:
    import httpx

    from app.config import Settings
    from app.embedding.client import EmbeddingClient


def tools_for(settings: Settings, http: httpx.AsyncClient,
              embedding: EmbeddingClient | None = None) -> ToolRegistry:
    registry = default_registry()
    if embedding is not None:
        registry.register(knowledge_tool(embedding))
    if settings.web_search_url:
        registry.register(web_search_tool(settings.web_search_url, http))
    return registry
