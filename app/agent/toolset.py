"""The tools a run is offered, from the settings: the built-ins, plus the ones that need a
live service (`web_search` when AGENTD_WEB_SEARCH_URL is set). Web lists the same set."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.agent.tools import ToolRegistry, default_registry
from app.agent.tools.web_search import web_search_tool

if TYPE_CHECKING:
    import httpx

    from app.config import Settings


def tools_for(settings: Settings, http: httpx.AsyncClient) -> ToolRegistry:
    registry = default_registry()
    if settings.web_search_url:
        registry.register(web_search_tool(settings.web_search_url, http))
    return registry
