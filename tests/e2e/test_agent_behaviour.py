"""How a run behaves, through the whole tree: the tool loop's last tool-free call at
AGENTD_AGENT_MAX_ITERATIONS or after half the run's time, the fallback LLM endpoint, what
`POST /api/chat` answers for each way a run can fail to complete, and `web_search` against a
local SearXNG stand-in (API.md: Agent behaviour, Chat outcomes, Configuration).

One tree for the module, on an LLM of its own (`ToolLoopLLM`), with a fallback endpoint (the
same server under another model name) and `AGENTD_WEB_SEARCH_URL` pointing at `FakeSearx`.
The last test stops it with SIGTERM and starts it again on the same data dir.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import (
    SHARED_ENV,
    AgentdTree,
    LLMThread,
    assistant_message,
    eventually,
    nonce,
    read_stream,
    requests_with,
    run_final,
    tree_root,
)
from tests.e2e.test_operating import log_events
from tests.support.scripted_llm import ScriptedLLM, token_text

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

pytestmark = pytest.mark.slow

MAX_ITERATIONS = 3
FALLBACK_MODEL = "scripted-fallback"
CALCULATE = '[[script tokens=2 tool=calculator:{"expression":"6*7"}]]'


class ToolLoopLLM(ScriptedLLM):
    """The scripted LLM, except that a `tool=` directive answers with its tool calls on every
    turn that offers tools, not only until the first tool result: an LLM that never stops
    calling tools, which only AGENTD_AGENT_MAX_ITERATIONS ends. A turn without tools (the
    agent's last one) sees the tool results and answers with them as usual."""

    async def _chat(self, ex: Any, body: Any) -> None:
        if isinstance(body, dict) and body.get("tools") and isinstance(body.get("messages"), list):
            body = {**body, "messages": [m for m in body["messages"]
                                         if not (isinstance(m, dict) and m.get("role") == "tool")]}
        await super()._chat(ex, body)


class FakeSearx:
    """A SearXNG-compatible `GET /search?q=…&format=json` in a thread. The query picks the
    answer: `slow` waits 15 s, `badjson` answers HTML, `broken` answers 500, anything else
    gets 12 results whose snippets are longer than agentd keeps."""

    RESULTS = 12

    def __init__(self) -> None:
        self.queries: list[tuple[str, dict[str, list[str]]]] = []
        self.stopping = threading.Event()
        searx = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                params = parse_qs(url.query)
                searx.queries.append((url.path, params))
                q = params.get("q", [""])[0]
                if "slow" in q:
                    searx.stopping.wait(15)
                if "badjson" in q:
                    self._send(200, b"<html>not json</html>", "text/html")
                elif "broken" in q:
                    self._send(500, b'{"error": "broken"}', "application/json")
                else:
                    results = [{"title": f"{q} result {i}", "url": f"https://example.org/{i}",
                                "content": f"snippet {i} " + "x" * 800}
                               for i in range(searx.RESULTS)]
                    body = json.dumps({"query": q, "results": results}).encode()
                    self._send(200, body, "application/json")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                try:
                    self.send_response(status)
                    self.send_header("content-type", content_type)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # agentd gave up on us (the slow case): nobody to answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-searx",
                                       daemon=True)

    def __enter__(self) -> FakeSearx:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def loop_llm() -> Iterator[ScriptedLLM]:
    runner = LLMThread()
    runner.llm = ToolLoopLLM()
    try:
        yield runner.start()
    finally:
        runner.stop()


@pytest.fixture(scope="module")
def searx() -> Iterator[FakeSearx]:
    with FakeSearx() as server:
        yield server


@pytest.fixture(scope="module")
def agent_tree(loop_llm, searx) -> Iterator[AgentdTree]:
    with tree_root("agent-behaviour") as root:
        agentd = AgentdTree(root, loop_llm.base_url, {
            **SHARED_ENV,
            "AGENTD_AGENT_MAX_ITERATIONS": str(MAX_ITERATIONS),
            "AGENTD_LLM_FALLBACK_BASE_URL": loop_llm.base_url,
            "AGENTD_LLM_FALLBACK_MODEL": FALLBACK_MODEL,
            "AGENTD_LLM_MAX_RETRIES": "1",
            "AGENTD_LLM_TIMEOUT": "5",
            "AGENTD_SHUTDOWN_TIMEOUT": "10",
            "AGENTD_WEB_SEARCH_URL": searx.url,
        })
        try:
            agentd.start()
            yield agentd
        finally:
            agentd.kill()


@pytest.fixture
async def client(agent_tree) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=agent_tree.base_url, timeout=60) as c:
        yield c


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    text = (await client.get("/metrics")).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v
                                              for k, v in labels.items()))


def warnings_for(tree: AgentdTree, event: str, run_id: str) -> list[dict[str, Any]]:
    return [e for e in log_events(tree, event) if e.get("run_id") == run_id
            and e.get("level") == "warning"]


def offered(request: Any) -> list[str]:
    return sorted(t["function"]["name"] for t in request.body.get("tools") or [])


# The tool loop's last call --------------------------------------------------------------------


async def test_a_tool_loop_ends_at_max_iterations_with_one_last_call_without_tools(
    loop_llm, agent_tree, client
):
    marker = nonce()
    with trio.fail_after(60):
        result = await read_stream(client, "POST", "/api/chat/stream",
                                   json={"message": f"{marker} {CALCULATE}"})
        run = await run_final(client, result.run_id, 10)
        warned = await eventually(
            lambda: warnings_for(agent_tree, "max_iterations_reached", result.run_id), 10)
    end = result.ends[-1].data
    assert end["reason"] == "completed" and end["fallback"] == "max_iterations", end
    assert run["fallback"] == "max_iterations" and run["iterations"] == MAX_ITERATIONS, run
    turns = requests_with(loop_llm, marker)
    assert [bool(r.body.get("tools")) for r in turns] == [True] * (MAX_ITERATIONS - 1) + [False]
    assert offered(turns[0]) == ["calculator", "current_time", "search_knowledge_base",
                                 "web_search"]
    calls = [e for e in result.events if e.type == "tool_call"]
    assert len(calls) == MAX_ITERATIONS - 1 and {e.data["name"] for e in calls} == {"calculator"}
    # The last answer is made from what the loop gathered: both results reach the LLM.
    assert [m["role"] for m in turns[-1].body["messages"]].count("tool") == MAX_ITERATIONS - 1
    assert result.tokens.count("42") == MAX_ITERATIONS - 1 and result.tokens.endswith(
        token_text(2))
    assert run["output"] == result.tokens
    assert warned[0]["iterations"] == MAX_ITERATIONS - 1


async def test_a_turn_that_would_start_after_half_the_run_time_is_the_last_one_without_tools(
    loop_llm, agent_tree, client
):
    # The tool call streams in 11 chunks at 2 a second: its turn ends ~5 s in, past half of
    # the 8 s the request allows, so the next turn is the last and offers no tools.
    expression = "+".join(["111111111", "222222222", "333333333", "444444444", "555555555",
                           "666666666", "777777777", "888888888", "999999999", "123456789"])
    arguments = json.dumps({"expression": expression}, separators=(",", ":"))
    marker = nonce()
    began = time.monotonic()
    with trio.fail_after(30):
        result = await read_stream(client, "POST", "/api/chat/stream", json={
            "message": f"{marker} [[script tokens=1 rate=2 tool=calculator:{arguments}]]",
            "timeout": 8})
        took = time.monotonic() - began
        run = await run_final(client, result.run_id, 10)
        warned = await eventually(
            lambda: warnings_for(agent_tree, "time_budget_reached", result.run_id), 10)
    end = result.ends[-1].data
    assert end["reason"] == "completed" and end["fallback"] == "time_budget", (end, took)
    assert run["fallback"] == "time_budget" and run["iterations"] == 2, run
    turns = requests_with(loop_llm, marker)
    assert [bool(r.body.get("tools")) for r in turns] == [True, False]
    assert turns[1].at - turns[0].at > 4  # the second turn did start after half the time
    assert warned[0]["elapsed_s"] > 4
    assert "5123456784" in result.tokens and run["output"] == result.tokens
    assert took < 8


# The fallback endpoint ------------------------------------------------------------------------
# Failure counts are per directive text on this module's own server: each directive is used once.


async def test_a_primary_llm_failing_after_its_retries_hands_the_call_to_the_fallback(
    loop_llm, agent_tree, client
):
    marker = nonce()
    retries = await metric(client, "agentd_llm_retries_total", model="scripted")
    with trio.fail_after(30):
        # AGENTD_LLM_MAX_RETRIES=1: the primary fails twice (a try and a retry), then the
        # fallback's first try is the third request with this directive, which succeeds.
        response = await client.post("/api/chat", json={
            "message": f"{marker} [[script tokens=3 fail=2 status=500]]"})
        assert response.status_code == 200, response.text
        after = {
            "retries": await metric(client, "agentd_llm_retries_total", model="scripted"),
            "primary_failed": await metric(client, "agentd_llm_requests_total",
                                           model="scripted", outcome="failure"),
            "fallback_ok": await metric(client, "agentd_llm_requests_total",
                                        model=FALLBACK_MODEL, outcome="success"),
        }
        warned = await eventually(lambda: [e for e in log_events(agent_tree, "llm_endpoint_failed")
                                           if e.get("model") == "scripted"], 10)
    body = response.json()
    assert body["reason"] == "completed" and body["response"] == token_text(3), body
    assert [r.body["model"] for r in requests_with(loop_llm, marker)] == [
        "scripted", "scripted", FALLBACK_MODEL]
    assert after["retries"] - retries == 1, after
    assert after["primary_failed"] >= 1 and after["fallback_ok"] >= 1, after
    assert warned[-1]["level"] == "warning" and "500" in warned[-1]["detail"]
    stored = await assistant_message(client, body["session_id"], body["run_id"])
    assert stored["status"] == "complete" and stored["content"] == token_text(3)


# What /api/chat answers when the run did not complete -----------------------------------------


def assert_outcome(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["error"]["code"] == code, body
    message = body["error"]["message"]
    assert isinstance(message, str) and len(message.split()) >= 5, body  # a sentence
    assert body["run_id"] and body["message_id"] and isinstance(body["response"], str), body
    return body


async def assert_stored(client: httpx.AsyncClient, body: dict[str, Any], run_status: str,
                        message_status: str) -> None:
    run = await run_final(client, body["run_id"], 10)
    assert run["status"] == run_status and run["output"] == body["response"], run
    stored = await assistant_message(client, run["session_id"], body["run_id"])
    assert stored["message_id"] == body["message_id"], stored
    assert stored["status"] == message_status and stored["content"] == body["response"]


async def test_chat_answers_502_llm_error_when_the_primary_and_the_fallback_fail(
    loop_llm, client
):
    marker = nonce()
    with trio.fail_after(30):
        response = await client.post("/api/chat", json={
            "message": f"{marker} [[script tokens=4 fail=4 status=500]]"})
        body = assert_outcome(response, 502, "llm_error")
        await assert_stored(client, body, "failed", "error")
    assert "500" in body["error"]["message"] and "LLM" in body["error"]["message"], body
    assert body["response"] == ""
    assert [r.body["model"] for r in requests_with(loop_llm, marker)] == [
        "scripted", "scripted", FALLBACK_MODEL, FALLBACK_MODEL]


async def test_chat_answers_504_at_its_timeout_with_the_partial_saved(client):
    with trio.fail_after(30):
        response = await client.post("/api/chat", json={
            "message": f"{nonce()} [[script tokens=100 rate=10]]", "timeout": 1})
        body = assert_outcome(response, 504, "timeout")
        await assert_stored(client, body, "interrupted", "interrupted")
    assert body["response"] and token_text(100).startswith(body["response"]), body
    assert "time limit" in body["error"]["message"] and "saved" in body["error"]["message"]


async def test_chat_answers_409_when_another_client_cancels_its_run(loop_llm, agent_tree,
                                                                    client):
    marker = nonce()
    answers: list[httpx.Response] = []
    with trio.fail_after(60):
        # The run's id, for the other client: the user message in a session we know holds it.
        session_id = (await client.post("/api/chat", json={"message": "[[script tokens=1]]"})
                      ).json()["session_id"]

        async def chat() -> None:
            answers.append(await client.post("/api/chat", json={
                "message": f"{marker} [[script tokens=200 rate=10]]",
                "session_id": session_id}))

        async with trio.open_nursery() as nursery, httpx.AsyncClient(
                base_url=agent_tree.base_url, timeout=30) as other:
            nursery.start_soon(chat)
            await eventually(lambda: requests_with(loop_llm, marker), 10)
            await trio.sleep(1)  # some tokens out: the partial is not empty
            messages = (await other.get(f"/api/sessions/{session_id}/messages")
                        ).json()["messages"]
            run_id = [m for m in messages if m["role"] == "user"][-1]["run_id"]
            cancel = await other.post(f"/api/runs/{run_id}/cancel")
            assert cancel.status_code == 202, cancel.text
        body = assert_outcome(answers[0], 409, "cancelled")
        await assert_stored(client, body, "cancelled", "cancelled")
    assert body["run_id"] == run_id and body["response"], body
    assert token_text(200).startswith(body["response"])


async def test_a_cancelled_run_ends_with_a_detail_that_says_it_was_cancelled(loop_llm, client):
    marker = nonce()
    with trio.fail_after(30):
        run_id = (await client.post("/api/runs", json={
            "message": f"{marker} [[script tokens=100 rate=10]]"})).json()["run_id"]
        await eventually(lambda: requests_with(loop_llm, marker), 10)
        assert (await client.post(f"/api/runs/{run_id}/cancel")).status_code == 202
        result = await read_stream(client, "GET", f"/api/runs/{run_id}/events")
    end = result.ends[-1].data
    assert end["reason"] == "cancelled", end
    assert "cancel" in (end.get("detail") or ""), end


# web_search -----------------------------------------------------------------------------------


async def test_web_search_answers_5_clipped_results_and_a_bad_or_slow_engine_is_a_tool_error(
    searx, client
):
    async def search(**arguments: Any) -> dict[str, Any]:
        response = await client.post("/api/tools/web_search", json=arguments)
        assert response.status_code == 200, response.text
        return dict(response.json())

    with trio.fail_after(60):
        tools = (await client.get("/api/tools")).json()["tools"]
        found = await search(query="trio structured concurrency")
        two = await search(query="nurseries", max_results=2)
        bad_json = await search(query="badjson please")
        broken = await search(query="broken engine")
        began = time.monotonic()
        slow = await search(query="slow engine")
        slow_took = time.monotonic() - began
    assert "web_search" in [t["name"] for t in tools]
    assert found["success"] is True and found["error"] is None, found
    assert len(found["result"]) == 5 < FakeSearx.RESULTS
    first = found["result"][0]
    assert first["title"] == "trio structured concurrency result 0"
    assert first["url"] == "https://example.org/0"
    assert first["snippet"].startswith("snippet 0 ") and len(first["snippet"]) <= 500
    assert [r["url"] for r in two["result"]] == ["https://example.org/0", "https://example.org/1"]
    path, params = searx.queries[0]
    assert path == "/search" and params["q"] == ["trio structured concurrency"]
    assert params["format"] == ["json"]
    for failed, says in ((bad_json, "JSON"), (broken, "500"), (slow, "Timeout")):
        assert failed["success"] is False and failed["result"] is None, failed
        assert says in failed["error"], failed
    assert 9 < slow_took < 20  # the tool's own 10 s bound, not the engine's 15 s


# During a shutdown (last: it stops the tree, then starts it again) ----------------------------


async def test_chat_during_a_shutdown_answers_503_with_retry_after_and_the_partial_saved(
    loop_llm, agent_tree
):
    marker = nonce()
    answers: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=agent_tree.base_url, timeout=60) as client:

        async def chat() -> None:
            answers.append(await client.post("/api/chat", json={
                "message": f"{marker} [[script tokens=300 rate=10]]"}))

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(chat)
                await eventually(lambda: requests_with(loop_llm, marker), 10)
                await trio.sleep(1)
                agent_tree.sigterm()
            status, _ = await agent_tree.wait_exit(20)
    assert status == 0, agent_tree.text()[-3000:]
    response = answers[0]
    body = assert_outcome(response, 503, "server_shutdown")
    assert int(response.headers["retry-after"]) >= 1
    assert body["response"] and token_text(300).startswith(body["response"]), body
    assert "saved" in body["error"]["message"], body
    # What it said was saved is what the restarted tree has.
    await trio.to_thread.run_sync(agent_tree.start)
    async with httpx.AsyncClient(base_url=agent_tree.base_url, timeout=30) as client:
        with trio.fail_after(30):
            await assert_stored(client, body, "interrupted", "interrupted")
