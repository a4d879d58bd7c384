"""Chats through the whole tree: streamed and not, history, tools, cancel, client disconnect,
and what a misbehaving upstream does to a run (API.md: HTTP, Chat outcomes, Run events)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from tests.e2e.conftest import (
    Ev,
    StreamResult,
    assistant_message,
    eventually,
    id_key,
    nonce,
    read_stream,
    requests_with,
    run_final,
    tokens_at_least,
)
from tests.support.scripted_llm import token_text

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.slow


@pytest.fixture
async def client(tree) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=tree.base_url, timeout=30) as c:
        yield c


def types_of(events: list[Ev]) -> list[str]:
    return [e.type for e in events]


def assert_one_end_last(result: StreamResult) -> dict[str, Any]:
    types = types_of(result.events)
    assert types[0] == "run", types
    assert types.count("end") == 1 and types[-1] == "end", types
    return result.events[-1].data


# One chat, streamed and not ------------------------------------------------------------------


async def test_streamed_chat_sends_run_thinking_tokens_then_one_end_and_stores_the_tokens(
    tree, llm, client
):
    marker = nonce()
    message = f"hello {marker} [[script tokens=25 rate=50]]"
    with trio.fail_after(20):
        result = await read_stream(client, "POST", "/api/chat/stream", json={"message": message},
                                   headers={"X-Request-ID": f"req-{marker}"})
    assert result.status == 200
    assert result.headers["content-type"].startswith("text/event-stream")
    assert result.headers["x-request-id"] == f"req-{marker}"
    assert float(result.headers["x-process-time"]) >= 0
    types = types_of(result.events)
    assert types[:2] == ["run", "thinking"], types
    assert set(types[2:-1]) == {"token"}, types
    end = assert_one_end_last(result)
    assert end["reason"] == "completed" and end["resumable"] is False and end["message_id"]
    assert result.events[0].data["session_id"]
    # Every event after `run` carries an id, and the ids increase.
    ids = [e.id for e in result.events[1:]]
    assert all(ids), ids
    assert [id_key(i) for i in ids] == sorted({id_key(i) for i in ids})
    assert result.tokens == token_text(25)
    assert result.clean, "the chunked body did not end with its terminator"

    stored = await assistant_message(client, result.session_id, result.run_id)
    assert stored["status"] == "complete"
    assert stored["content"] == result.tokens
    assert stored["message_id"] == end["message_id"]
    run = (await client.get(f"/api/runs/{result.run_id}")).json()
    assert run["status"] == "completed" and run["output"] == result.tokens
    # A run without tool calls makes one LLM request, the user's text last.
    requests = requests_with(llm, marker)
    assert len(requests) == 1
    assert requests[0].body["messages"][-1] == {"role": "user", "content": message}
    assert requests[0].body["messages"][0]["role"] == "system"


async def test_chat_answers_the_whole_result_and_a_second_message_sends_the_history(
    llm, client
):
    first, second = nonce(), nonce()
    first_text = f"first {first} [[script tokens=4]]"
    with trio.fail_after(20):
        response = await client.post("/api/chat", json={"message": first_text},
                                     headers={"X-Request-ID": first})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == first
    body = response.json()
    assert body["response"] == token_text(4)
    assert body["reason"] == "completed"
    assert body["cached"] is False
    assert body["iterations"] == 1
    assert isinstance(body["duration_ms"], int | float) and body["duration_ms"] >= 0
    assert body["usage"]["completion_tokens"] == 4 and body["usage"]["prompt_tokens"] > 0
    for key in ("session_id", "message_id", "run_id"):
        assert isinstance(body[key], str) and body[key]

    second_text = f"second {second} [[script tokens=2]]"
    with trio.fail_after(20):
        again = await client.post("/api/chat", json={"message": second_text,
                                                     "session_id": body["session_id"]})
    assert again.status_code == 200, again.text
    assert again.json()["session_id"] == body["session_id"]
    assert again.json()["response"] == token_text(2)

    [request] = requests_with(llm, second)
    sent = [(m["role"], m["content"]) for m in request.body["messages"]]
    assert sent[0][0] == "system"
    assert sent[1:] == [("user", first_text), ("assistant", token_text(4)),
                        ("user", second_text)]
    history = (await client.get(f"/api/sessions/{body['session_id']}/messages")).json()
    assert [(m["role"], m["content"], m["status"] if m["role"] == "assistant" else None)
            for m in history["messages"]] == [
        ("user", first_text, None), ("assistant", token_text(4), "complete"),
        ("user", second_text, None), ("assistant", token_text(2), "complete"),
    ]


async def test_tool_call_streams_call_and_result_then_the_answer_and_stores_both(llm, client):
    marker = nonce()
    message = f'What is 2+3? {marker} [[script tokens=3 tool=calculator:{{"expression":"2+3"}}]]'
    with trio.fail_after(20):
        result = await read_stream(client, "POST", "/api/chat/stream", json={"message": message})
    end = assert_one_end_last(result)
    assert end["reason"] == "completed"
    types = types_of(result.events)
    assert types.index("tool_call") < types.index("tool_result") < types.index("token")
    [call] = [e.data for e in result.events if e.type == "tool_call"]
    [outcome] = [e.data for e in result.events if e.type == "tool_result"]
    assert call["name"] == "calculator"
    assert json.loads(call["arguments"]) == {"expression": "2+3"}
    assert outcome["call_id"] == call["call_id"] and outcome["name"] == "calculator"
    assert "error" not in outcome and outcome["result"]["result"] == 5
    assert "The tool said:" in result.tokens and result.tokens.endswith(token_text(3))

    stored = await assistant_message(client, result.session_id, result.run_id)
    assert stored["status"] == "complete" and stored["content"] == result.tokens
    assert [c["call_id"] for c in stored["tool_calls"]] == [call["call_id"]]
    assert stored["tool_calls"][0]["name"] == "calculator"
    assert stored["tool_results"][0]["call_id"] == call["call_id"]
    assert stored["tool_results"][0]["result"]["result"] == 5
    run = (await client.get(f"/api/runs/{result.run_id}")).json()
    assert run["iterations"] == 2

    first, final = requests_with(llm, marker)
    assert "calculator" in {t["function"]["name"] for t in first.body["tools"]}
    tool_messages = [m for m in final.body["messages"] if m["role"] == "tool"]
    assert len(tool_messages) == 1 and "5" in tool_messages[0]["content"]


# Cancel and disconnect -----------------------------------------------------------------------


async def test_cancel_ends_the_run_cancelled_and_keeps_the_partial(client):
    created = await client.post("/api/runs",
                                json={"message": f"{nonce()} [[script tokens=400 rate=10]]"})
    assert created.status_code == 202, created.text
    assert created.json()["status"] == "queued"
    run_id = created.json()["run_id"]
    seen: list[Ev] = []
    results: list[StreamResult] = []

    async def follow() -> None:
        results.append(await read_stream(client, "GET", f"/api/runs/{run_id}/events",
                                         on_event=lambda events: seen.__setitem__(
                                             slice(None), events)))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            await eventually(lambda: tokens_at_least(3)(seen), 10)
            response = await client.post(f"/api/runs/{run_id}/cancel")
            assert response.status_code == 202, response.text
    [result] = results
    end = assert_one_end_last(result)
    assert end["reason"] == "cancelled"
    assert result.clean
    run = await run_final(client, run_id, 5)
    assert run["status"] == "cancelled" and run["reason"] == "cancelled"
    stored = await assistant_message(client, run["session_id"], run_id)
    assert stored["status"] == "cancelled"
    assert stored["content"] == result.tokens == run["output"]
    assert len(result.tokens) > 0 and token_text(400).startswith(result.tokens)


async def test_client_that_leaves_a_stream_cancels_its_run_and_the_upstream_call(llm, client):
    before = llm.streams_closed_by_client
    with trio.fail_after(20):
        result = await read_stream(
            client, "POST", "/api/chat/stream",
            json={"message": f"{nonce()} [[script tokens=400 rate=10]]"},
            until=tokens_at_least(3))
    left_at = time.monotonic()
    assert result.left
    await eventually(lambda: llm.streams_closed_by_client > before, 1.0, interval=0.01)
    upstream_closed_after = time.monotonic() - left_at
    run = await run_final(client, result.run_id, 3)
    assert run["status"] == "cancelled" and run["reason"] == "cancelled"
    stored = await assistant_message(client, result.session_id, result.run_id)
    assert stored["status"] == "cancelled"
    # What was stored is what the agent sent: the client's part, perhaps a token more.
    assert stored["content"].startswith(result.tokens)
    assert token_text(400).startswith(stored["content"])
    assert upstream_closed_after < 1.0


async def test_client_that_leaves_a_continue_stream_lets_its_run_complete(client):
    with trio.fail_after(20):
        result = await read_stream(
            client, "POST", "/api/chat/stream",
            json={"message": f"{nonce()} [[script tokens=30 rate=30]]",
                  "on_disconnect": "continue"},
            until=tokens_at_least(3))
    assert result.left
    run = await run_final(client, result.run_id, 10)
    assert run["status"] == "completed" and run["output"] == token_text(30)
    stored = await assistant_message(client, result.session_id, result.run_id)
    assert stored["status"] == "complete" and stored["content"] == token_text(30)


# A misbehaving upstream ----------------------------------------------------------------------
# Each directive here is used by this test only: failure counts are per directive text.


async def test_upstream_429_with_retry_after_is_retried_and_the_chat_completes(llm, client):
    marker = nonce()
    with trio.fail_after(20):
        response = await client.post("/api/chat", json={
            "message": f"{marker} [[script tokens=6 fail=1 status=429 retry_after=1]]"})
    assert response.status_code == 200, response.text
    assert response.json()["reason"] == "completed"
    assert response.json()["response"] == token_text(6)
    refused, answered = requests_with(llm, marker)
    assert answered.at - refused.at >= 0.9  # Retry-After: 1 was honoured


async def test_upstream_500_after_every_retry_ends_the_stream_error_with_a_detail(llm, client):
    marker = nonce()
    with trio.fail_after(20):
        result = await read_stream(client, "POST", "/api/chat/stream", json={
            "message": f"{marker} [[script tokens=7 fail=2 status=500]]"})
    end = assert_one_end_last(result)
    assert end["reason"] == "error"
    assert "500" in end["detail"] and "LLM" in end["detail"]
    assert len(requests_with(llm, marker)) == 2  # AGENTD_LLM_MAX_RETRIES=1: one retry
    run = await run_final(client, result.run_id, 5)
    assert run["status"] == "failed" and run["reason"] == "error"
    stored = await assistant_message(client, result.session_id, result.run_id)
    assert stored["status"] == "error" and stored["content"] == ""


async def test_upstream_500_on_a_plain_chat_answers_502_llm_error_with_what_was_saved(client):
    with trio.fail_after(20):
        response = await client.post("/api/chat", json={
            "message": f"{nonce()} [[script tokens=8 fail=2 status=500]]"})
    assert response.status_code == 502, response.text
    body = response.json()
    assert body["error"]["code"] == "llm_error" and body["error"]["message"]
    assert body["run_id"] and body["message_id"] and body["response"] == ""


async def test_hung_upstream_ends_the_run_timeout_and_keeps_the_partial(client):
    began = time.monotonic()
    with trio.fail_after(20):
        result = await read_stream(client, "POST", "/api/chat/stream", json={
            "message": f"{nonce()} [[script tokens=10 hang_after=3]]"})
    end = assert_one_end_last(result)
    assert end["reason"] == "timeout" and end["detail"]
    assert result.tokens == token_text(3)
    assert time.monotonic() - began < 10  # AGENTD_LLM_TIMEOUT=2, not the run's 120 s
    run = await run_final(client, result.run_id, 5)
    assert run["status"] == "interrupted" and run["reason"] == "timeout"
    stored = await assistant_message(client, result.session_id, result.run_id)
    assert stored["status"] == "interrupted" and stored["content"] == token_text(3)


async def test_chat_over_its_timeout_answers_504_with_the_partial_saved(client):
    with trio.fail_after(20):
        response = await client.post("/api/chat", json={
            "message": f"{nonce()} [[script tokens=100 rate=10]]", "timeout": 1})
    assert response.status_code == 504, response.text
    body = response.json()
    assert body["error"]["code"] == "timeout"
    assert body["response"] and token_text(100).startswith(body["response"])
    run = (await client.get(f"/api/runs/{body['run_id']}")).json()
    assert run["status"] == "interrupted" and run["reason"] == "timeout"
    stored = await assistant_message(client, run["session_id"], body["run_id"])
    assert stored["status"] == "interrupted" and stored["content"] == body["response"]
