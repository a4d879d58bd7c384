from __future__ import annotations

import httpx
import pytest

from app.agent.tools import ToolRegistry
from app.agent.tools.web_search import MAX_FIELD, parse_results, web_search_tool


def registry(handler) -> ToolRegistry:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    r = ToolRegistry()
    r.register(web_search_tool("http://searx.example", client))
    return r


async def test_results_are_bounded_in_number_and_size():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        results = [{"title": "t" * 2000, "url": f"https://e/{i}", "content": "c"}
                   for i in range(20)]
        return httpx.Response(200, json={"results": results})

    outcome = await registry(handler).call("web_search", {"query": "trio nurseries"})
    assert outcome.success
    assert len(outcome.result) == 5 and len(outcome.result[0]["title"]) == MAX_FIELD
    assert seen[0].path == "/search" and seen[0].params["format"] == "json"
    assert seen[0].params["q"] == "trio nurseries"


@pytest.mark.parametrize("response", [
    httpx.Response(500), httpx.Response(200, text="<html>"), httpx.Response(200, json=[1])])
async def test_search_failures_become_tool_errors(response):
    outcome = await registry(lambda request: response).call("web_search", {"query": "x"})
    assert not outcome.success and outcome.error


async def test_an_unreachable_engine_is_a_tool_error():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    outcome = await registry(handler).call("web_search", {"query": "x"})
    assert not outcome.success and "unreachable" in outcome.error


def test_parse_results_refuses_a_reply_without_results():
    with pytest.raises(Exception, match="results"):
        parse_results({"nope": 1})
