"""search_knowledge_base (whose documents, what it returns, its failures as tool errors) and
the local provider's use of it (app/agent/tools/knowledge.py, LocalProvider in llm.py)."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from app.agent.llm import KB_TOOL, NO_LLM, LocalProvider, local_answer, local_tool_call
from app.agent.tools import INVALID_ARGUMENTS, TOOL_ERROR, ToolRegistry
from app.agent.tools.knowledge import acting_for, current_owner, knowledge_tool
from app.embedding.client import EmbeddingClient

HITS = [{"document_id": "d1", "text": "Cats sleep sixteen hours a day.", "score": 0.71234,
         "source": "/kb/cats.md", "title": "Cats", "chunk": 0},
        {"document_id": "d2", "text": "untitled", "score": 0.5, "source": "", "title": "",
         "chunk": 3}]


def registry(handler) -> tuple[ToolRegistry, EmbeddingClient]:
    client = EmbeddingClient("/nonexistent.sock", transport=httpx.MockTransport(handler))
    tools = ToolRegistry()
    tools.register(knowledge_tool(client))
    return tools, client


def answering(seen: list[dict], status: int = 200, body: dict | None = None):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(status, json=body if body is not None else {"results": HITS})

    return handler


async def test_the_search_is_made_for_the_bound_owner_and_returns_passages():
    seen: list[dict] = []
    tools, client = registry(answering(seen))
    async with client:
        with acting_for("alice"):
            outcome = await tools.call(KB_TOOL, {"query": "  how long do cats sleep ", "k": 2})
    assert outcome.success, outcome.error
    assert seen == [{"query": "how long do cats sleep", "k": 2, "owner": "alice"}]
    first, second = outcome.result["passages"]
    assert first == {"text": "Cats sleep sixteen hours a day.", "source": "/kb/cats.md",
                     "title": "Cats", "score": 0.7123, "document_id": "d1"}
    assert second["source"] is None and second["title"] is None


async def test_without_a_bound_owner_the_tool_refuses_instead_of_searching():
    seen: list[dict] = []
    tools, client = registry(answering(seen))
    async with client:
        outcome = await tools.call(KB_TOOL, {"query": "cats"})
    assert outcome.error_code == TOOL_ERROR and "no user" in (outcome.error or "")
    assert seen == []


async def test_each_task_sees_the_owner_of_the_run_that_spawned_it():
    seen_by: dict[str, str | None] = {}

    async def run(owner: str) -> None:
        with acting_for(owner):
            async with trio.open_nursery() as nursery:  # like run.py's tool-call tasks
                nursery.start_soon(look, owner)
            await trio.sleep(0.01)
            assert current_owner() == owner

    async def look(owner: str) -> None:
        await trio.sleep(0.005)
        seen_by[owner] = current_owner()

    async with trio.open_nursery() as nursery:
        for owner in ("alice", "bob"):
            nursery.start_soon(run, owner)
    assert seen_by == {"alice": "alice", "bob": "bob"}
    assert current_owner() is None


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [({"query": "   "}, TOOL_ERROR, "'query'"),
     ({"query": "x" * 2001}, TOOL_ERROR, "'query'"),
     ({"query": "cats", "k": 0}, TOOL_ERROR, "'k'"),
     ({"query": "cats", "k": 11}, TOOL_ERROR, "'k'"),
     ({"query": "cats", "k": "3"}, INVALID_ARGUMENTS, "'k'"),
     ({}, INVALID_ARGUMENTS, "'query'")])
async def test_bad_arguments_are_tool_errors(args, code, message):
    seen: list[dict] = []
    tools, client = registry(answering(seen))
    async with client:
        with acting_for("alice"):
            outcome = await tools.call(KB_TOOL, args)
    assert outcome.error_code == code and message in (outcome.error or ""), outcome
    assert seen == []


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [(503, "overloaded", "busy"), (503, "shutting_down", "unavailable"),
     (422, "text_too_long", "refused")])
async def test_embedding_failures_are_tool_errors_the_model_can_read(status, code, message):
    tools, client = registry(answering([], status, {"error": {"code": code, "message": "m"}}))
    async with client:
        with acting_for("alice"):
            outcome = await tools.call(KB_TOOL, {"query": "cats"})
    assert outcome.error_code == TOOL_ERROR and message in (outcome.error or ""), outcome


# The local provider ----------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": n}} for n in ("calculator", KB_TOOL)]


def user(text: str) -> list[dict]:
    return [{"role": "system", "content": "s"}, {"role": "user", "content": text}]


def with_result(text: str, content: str, name: str = KB_TOOL) -> list[dict]:
    return [*user(text), {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "tool", "tool_call_id": "c", "name": name, "content": content}]


def test_local_provider_searches_the_knowledge_base_for_a_question_and_calculates_sums():
    call = local_tool_call(user("How long do  cats\nsleep?"), TOOLS)
    assert call is not None and call.name == KB_TOOL
    assert json.loads(call.arguments) == {"query": "How long do cats sleep?", "k": 3}
    sums = local_tool_call(user("what is 2+3*4?"), TOOLS)
    assert sums is not None and sums.name == "calculator"
    assert local_tool_call(user("cats?"), [TOOLS[0]]) is None  # no knowledge base offered
    assert local_tool_call(with_result("cats?", "{}"), TOOLS) is None  # answered already


def test_local_answer_quotes_close_passages_with_their_sources_trimmed():
    passages = [{"text": "Cats sleep " + "long " * 100, "source": "/kb/cats.md", "score": 0.8},
                {"text": "Kittens too.", "source": None, "title": "Kittens", "score": 0.5},
                {"text": "Unrelated.", "source": "/kb/far.md", "score": 0.1}]
    text = local_answer(with_result("cats?", json.dumps({"passages": passages})))
    assert text.startswith(NO_LLM)
    assert "From /kb/cats.md: “Cats sleep long" in text and "…”" in text
    assert "From Kittens: “Kittens too.”" in text
    assert "far.md" not in text  # a fifth of the best one's score: noise
    quote = text.split("“", 1)[1].split("”", 1)[0]
    assert len(quote) <= 301


def test_local_answer_says_briefly_when_the_knowledge_base_is_empty_or_unavailable():
    empty = local_answer(with_result("cats?", json.dumps({"passages": []})))
    assert "nothing to quote" in empty and "agentd ingest" in empty
    down = local_answer(with_result(
        "cats?", f"error: {KB_TOOL}: the knowledge base is unavailable right now"))
    assert "could not be searched (the knowledge base is unavailable right now)" in down


async def test_local_provider_streams_its_answer_after_the_tool_result():
    tokens: list[str] = []
    content = json.dumps({"passages": [{"text": "Purr.", "source": "/kb/c.md", "score": 1}]})
    turn = await LocalProvider().stream_turn(with_result("cats?", content), TOOLS,
                                             tokens.append)
    assert turn.finish_reason == "stop" and not turn.tool_calls
    assert "".join(tokens) == turn.text and "From /kb/c.md: “Purr.”" in turn.text
