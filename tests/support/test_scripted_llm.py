"""The scripted LLM behaves like OpenAI to the real `openai` client, and does what it is told.

These run on the real clock: the server talks over real sockets, and an autojump clock would
leap over time spent waiting for them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx
import openai
import pytest
import trio

from app.web.sse import SSEParser
from tests.support.llm_script import (
    DirectiveError,
    Script,
    ToolScript,
    parse_directive,
    token_text,
)
from tests.support.procs import ROOT
from tests.support.scripted_llm import open_scripted_llm

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "arithmetic",
            "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "current_time",
            "description": "now",
            "parameters": {"type": "object"},
        },
    },
]


@pytest.fixture
async def llm():
    async with open_scripted_llm(tokens=5) as server:
        yield server


@pytest.fixture
async def client(llm):
    async with openai.AsyncOpenAI(base_url=llm.base_url, api_key="test-key", max_retries=0) as c:
        yield c


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def collect(stream) -> tuple[str, list]:
    chunks = []
    async with stream:
        async for chunk in stream:
            chunks.append(chunk)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# ---------------------------------------------------------------------------- directives


def test_directive_keys_override_defaults_and_the_rest_stay():
    text = "hi [[script tokens=50 rate=20 ttft=0.1 hang_after=10 fail=2 status=429 retry_after=1]]"
    directive, script = parse_directive(text, Script(tokens=7, reset_after=3))
    assert directive == text[3:]
    assert script == Script(
        tokens=50,
        rate=20.0,
        ttft=0.1,
        hang_after=10,
        fail=2,
        status=429,
        retry_after=1.0,
        reset_after=3,
    )


def test_no_directive_means_the_defaults():
    defaults = Script(tokens=3)
    assert parse_directive("just a question", defaults) == ("", defaults)


def test_tool_directive_takes_json_with_spaces_and_brackets():
    text = '[[script tool=calculator:{"expression": "[[1]] + 2"};current_time tool=x:[1, 2]]]'
    _, script = parse_directive(text, Script())
    assert script.tools == (
        ToolScript("calculator", '{"expression": "[[1]] + 2"}'),
        ToolScript("current_time", "{}"),
        ToolScript("x", "[1, 2]"),
    )


@pytest.mark.parametrize(
    "text",
    [
        "[[script tokns=5]]",
        "[[script tokens=five]]",
        "[[script tokens=-1]]",
        "[[script status=200]]",
        "[[script tokens=5",
        "[[script tool=calc:{bad json}]]",
        "[[script tokens]]",
    ],
)
def test_bad_directives_are_refused(text):
    with pytest.raises(DirectiveError):
        parse_directive(text, Script())


# ---------------------------------------------------------------------------- streaming


async def test_stream_tokens_concatenate_to_the_scripted_text(client):
    with trio.fail_after(10):
        stream = await client.chat.completions.create(
            model="m",
            messages=user("hello [[script tokens=7]]"),
            stream=True,
            stream_options={"include_usage": True},
        )
        text, chunks = await collect(stream)
    assert text == token_text(7) == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 "
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop"
    assert finish[:-1] == [None] * (len(finish) - 1)
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 7
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 7


async def test_stream_wire_format_is_openais(llm):
    body = {"model": "gpt-x", "messages": user("[[script tokens=2]]"), "stream": True}
    parser = SSEParser()
    url = f"{llm.base_url}/chat/completions"
    with trio.fail_after(10):
        async with httpx.AsyncClient() as http, http.stream("POST", url, json=body) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = [e async for raw in resp.aiter_raw() for e in parser.feed(raw)]
    assert events[-1].data == "[DONE]"
    chunks = [json.loads(e.data) for e in events[:-1]]
    first = chunks[1]
    assert set(first) == {"id", "object", "created", "model", "choices"}
    assert first["object"] == "chat.completion.chunk"
    assert first["model"] == "gpt-x"
    assert first["choices"] == [{"index": 0, "delta": {"content": "tok0 "}, "finish_reason": None}]
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert len({c["id"] for c in chunks}) == 1


async def test_rate_and_ttft_pace_the_stream(client):
    with trio.fail_after(10):
        start = trio.current_time()
        stream = await client.chat.completions.create(
            model="m", messages=user("[[script tokens=5 rate=20 ttft=0.2]]"), stream=True
        )
        arrivals = []
        async with stream:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    arrivals.append(trio.current_time() - start)
    assert len(arrivals) == 5
    assert arrivals[0] >= 0.2
    assert arrivals[-1] >= 0.2 + 4 / 20
    assert arrivals[-1] - arrivals[0] >= 4 / 20 * 0.9


async def test_max_tokens_cuts_the_answer_with_finish_reason_length(client):
    with trio.fail_after(10):
        stream = await client.chat.completions.create(
            model="m", messages=user("[[script tokens=10]]"), stream=True, max_tokens=3
        )
        text, chunks = await collect(stream)
    assert text == token_text(3)
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_non_streamed_completion_has_content_and_usage(client):
    with trio.fail_after(10):
        completion = await client.chat.completions.create(model="m", messages=user("hi"))
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == token_text(5)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 5
    assert completion.usage.prompt_tokens == 1


async def test_models_are_listed(client):
    with trio.fail_after(10):
        models = await client.models.list()
    assert [m.id for m in models.data] == ["scripted-model"]


# ---------------------------------------------------------------------------- failures


async def test_fail_answers_429_with_retry_after_then_succeeds(client, llm):
    messages = user("[[script fail=2 status=429 retry_after=1]]")
    with trio.fail_after(10):
        for attempt in (1, 2):
            with pytest.raises(openai.RateLimitError) as caught:
                await client.chat.completions.create(model="m", messages=messages, stream=True)
            assert caught.value.status_code == 429
            assert caught.value.response.headers["retry-after"] == "1"
            assert caught.value.code == "rate_limit_exceeded"
            assert f"scripted failure {attempt} of 2" in caught.value.message
        completion = await client.chat.completions.create(model="m", messages=messages)
    assert completion.choices[0].message.content == token_text(5)
    # Another directive text has its own count.
    with trio.fail_after(10), pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="m", messages=user("[[script fail=1 ]]"))
    assert len(llm.chat_requests) == 4


async def test_the_client_s_own_retries_honour_retry_after(llm):
    messages = user("[[script fail=1 status=503 retry_after=0.2]]")
    async with openai.AsyncOpenAI(base_url=llm.base_url, api_key="k", max_retries=2) as client:
        with trio.fail_after(10):
            start = trio.current_time()
            completion = await client.chat.completions.create(model="m", messages=messages)
    assert completion.choices[0].message.content == token_text(5)
    assert trio.current_time() - start >= 0.2
    assert len(llm.chat_requests) == 2


async def test_bad_directive_and_unknown_route_get_openai_errors(client, llm):
    with trio.fail_after(10):
        with pytest.raises(openai.BadRequestError, match="unknown directive key 'tokns'"):
            await client.chat.completions.create(model="m", messages=user("[[script tokns=1]]"))
        async with httpx.AsyncClient() as http:
            response = await http.get(f"{llm.base_url}/nope")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_hang_after_sends_some_tokens_then_nothing_until_the_client_leaves(client, llm):
    received = []
    with trio.fail_after(10):
        stream = await client.chat.completions.create(
            model="m", messages=user("[[script tokens=10 hang_after=3]]"), stream=True
        )
        async with stream:
            with trio.move_on_after(0.5) as waited:
                async for chunk in stream:
                    received.append(chunk.choices[0].delta.content)
        assert waited.cancelled_caught
        assert "".join(received) == token_text(3)
        await llm.wait_until(lambda: llm.streams_closed_by_client == 1)
    assert llm.streams_completed == 0
    assert llm.open_streams == 0


async def test_a_client_leaving_mid_stream_is_counted(client, llm):
    with trio.fail_after(10):
        stream = await client.chat.completions.create(
            model="m", messages=user("[[script tokens=100 rate=50]]"), stream=True
        )
        async with stream:
            async for _ in stream:
                break
        await llm.wait_until(lambda: llm.streams_closed_by_client == 1)


async def test_reset_after_cuts_the_connection_mid_stream(client, llm):
    received = []
    with trio.fail_after(10):
        stream = await client.chat.completions.create(
            model="m", messages=user("[[script tokens=10 reset_after=4 rate=100]]"), stream=True
        )
        with pytest.raises((httpx.TransportError, openai.APIError)):  # noqa: PT012
            async with stream:
                async for chunk in stream:
                    received.append(chunk.choices[0].delta.content)
    assert "".join(received) == token_text(4)
    assert llm.streams_reset == 1


async def test_reset_on_a_non_streamed_request_is_a_connection_error(client):
    with trio.fail_after(10), pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="m", messages=user("[[script reset_after=0]]"))


# ---------------------------------------------------------------------------- tools


async def test_tool_calls_stream_in_openai_format_and_results_come_back(client, llm):
    directive = '[[script tokens=2 tool=calculator:{"expression": "2+3"};current_time:{}]]'
    messages = [{"role": "system", "content": "be brief"}, *user(f"sum? {directive}")]
    with trio.fail_after(10):
        stream = await client.chat.completions.create(
            model="m", messages=messages, tools=TOOLS, stream=True
        )
        _, chunks = await collect(stream)
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["calculator", "current_time"]
    assert json.loads(calls[0]["arguments"]) == {"expression": "2+3"}
    assert json.loads(calls[1]["arguments"]) == {}
    assert len([c for c in chunks if c.choices[0].delta.tool_calls]) > 3  # arguments split

    messages.append(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in calls.values()
            ],
        }
    )
    messages.append({"role": "tool", "tool_call_id": calls[0]["id"], "content": "5"})
    messages.append({"role": "tool", "tool_call_id": calls[1]["id"], "content": "noon"})
    with trio.fail_after(10):
        stream = await client.chat.completions.create(
            model="m", messages=messages, tools=TOOLS, stream=True
        )
        text, chunks = await collect(stream)
    assert text == "The tool said: 5. The tool said: noon. " + token_text(2)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert llm.chat_requests[-1].body["messages"][-1]["content"] == "noon"


async def test_tool_directive_without_tools_in_the_request_answers_text(client):
    directive = "[[script tokens=2 tool=current_time]]"
    with trio.fail_after(10):
        completion = await client.chat.completions.create(model="m", messages=user(directive))
        with_tools = await client.chat.completions.create(
            model="m", messages=user(directive), tools=TOOLS
        )
    assert completion.choices[0].message.content == token_text(2)
    call = with_tools.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("current_time", "{}")
    assert with_tools.choices[0].finish_reason == "tool_calls"


# ---------------------------------------------------------------------------- recording


async def test_every_request_is_recorded_with_body_headers_and_time(client, llm):
    history = [
        {"role": "system", "content": "You are agentd."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "second"},
    ]
    with trio.fail_after(10):
        before = trio.current_time()
        await client.chat.completions.create(model="m", messages=history, temperature=0.5)
        await client.models.list()
    chat, models = llm.requests
    assert chat.body["messages"] == history
    assert chat.body["temperature"] == 0.5
    assert chat.headers["authorization"] == "Bearer test-key"
    assert (chat.method, chat.path, models.path, models.body) == (
        "POST",
        "/chat/completions",
        "/models",
        None,
    )
    assert before <= chat.at <= models.at <= trio.current_time()
    assert llm.chat_requests == [chat]


async def test_many_concurrent_streams_all_complete(llm):
    body = {"model": "m", "messages": user("[[script tokens=10 rate=50]]"), "stream": True}
    texts = []

    async def one(http):
        parser = SSEParser()
        async with http.stream("POST", f"{llm.base_url}/chat/completions", json=body) as resp:
            events = [e async for raw in resp.aiter_raw() for e in parser.feed(raw)]
        chunks = [json.loads(e.data) for e in events if e.data != "[DONE]"]
        texts.append("".join(c["choices"][0]["delta"].get("content", "") for c in chunks))

    limits = httpx.Limits(max_connections=200)
    with trio.fail_after(20):
        async with httpx.AsyncClient(limits=limits) as http, trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(one, http)
            await llm.wait_until(lambda: llm.open_streams >= 50)
    assert texts == [token_text(10)] * 100
    assert llm.streams_completed == 100


async def test_runs_as_a_process_and_says_where_it_listens():
    command = [sys.executable, "-m", "tests.support.scripted_llm", "--port", "0", "--tokens", "3"]
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    try:
        with trio.fail_after(30):
            line = b""
            while not line.endswith(b"\n"):
                line += await process.stdout.receive_some(1)
            word, base_url = line.decode().split()
            assert word == "LISTENING"
            async with openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0) as c:
                completion = await c.chat.completions.create(model="m", messages=user("hi"))
            assert completion.choices[0].message.content == token_text(3)
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
            stderr = await process.stderr.receive_some(65536)
        assert b'STATS {"requests": 1' in stderr
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5):
            await process.wait()
        await process.stdout.aclose()
        await process.stderr.aclose()
