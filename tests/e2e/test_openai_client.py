"""The official `openai` client against agentd's /v1, unchanged, and `agentd chat`, through the
whole tree (API.md: HTTP `/v1`, Precise points `/v1` errors, Command line).

Trees here use data dirs from `tempfile.mkdtemp` under /tmp rather than pytest's tmp_path:
as root, concurrent pytest sessions reset /tmp/pytest-of-root's permissions, which breaks the
embedded PostgreSQL's user. Every tree needs a key (`KEY`), so auth is on for /v1 too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
import trio

from tests.e2e.conftest import (
    AGENTD,
    AgentdTree,
    assistant_message,
    eventually,
    nonce,
    requests_with,
    run_final,
)
from tests.support.scripted_llm import token_text

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from tests.support.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.slow

KEY = "k-openai-e2e"
AUTH = {"Authorization": f"Bearer {KEY}"}
ENV = {"AGENTD_API_KEYS": KEY, "AGENTD_LLM_TIMEOUT": "2", "AGENTD_LLM_MAX_RETRIES": "1",
       "AGENTD_SHUTDOWN_TIMEOUT": "6"}
TIMEOUT = 6  # AGENTD_SHUTDOWN_TIMEOUT: a 4 s drain, then the 2 s reserve


def temp_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="agentd-openai-", dir="/tmp"))


@pytest.fixture(scope="module")
def tree(llm: ScriptedLLM) -> Iterator[AgentdTree]:
    """A tree for the tests that leave it running."""
    root = temp_root()
    agentd = AgentdTree(root, llm.base_url, ENV)
    try:
        agentd.start()
        yield agentd
        assert agentd.stop(timeout=15) == 0, agentd.text()[-3000:]
    finally:
        agentd.kill()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def private_tree(llm: ScriptedLLM) -> Iterator[Callable[[], AgentdTree]]:
    """Trees a test may stop or break: `private_tree()` → a running tree, killed after."""
    made: list[AgentdTree] = []

    def start() -> AgentdTree:
        agentd = AgentdTree(temp_root(), llm.base_url, ENV)
        made.append(agentd)
        agentd.start()
        return agentd

    yield start
    for agentd in made:
        agentd.kill()
        shutil.rmtree(agentd.root, ignore_errors=True)


@pytest.fixture
async def oai(tree) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{tree.base_url}/v1", api_key=KEY, max_retries=0,
                                timeout=30)
    async with client:
        yield client


@pytest.fixture
async def api(tree) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=tree.base_url, headers=AUTH, timeout=30) as client:
        yield client


def agentd_of(obj: Any) -> dict[str, Any]:
    """The `agentd` extension object of a completion or chunk (pydantic keeps extras)."""
    extra = obj.model_extra or {}
    assert "agentd" in extra, obj
    return dict(extra["agentd"])


# Completions, non-streamed and streamed ------------------------------------------------------


async def test_a_completion_is_the_runs_stored_answer_and_only_the_last_user_message_is_sent(
        llm, oai, api):
    marker, earlier = nonce(), nonce()
    with trio.fail_after(30):
        completion = await oai.chat.completions.create(model="any-name", messages=[
            {"role": "system", "content": f"talk like a pirate {earlier}"},
            {"role": "user", "content": f"an earlier turn {earlier}"},
            {"role": "assistant", "content": "arr"},
            {"role": "user", "content": f"hello {marker} [[script tokens=5]]"},
        ])
        info = agentd_of(completion)
        stored = await assistant_message(api, info["session_id"], info["run_id"])
    assert completion.id == f"chatcmpl-{info['run_id']}"
    assert completion.object == "chat.completion"
    assert completion.model == "scripted"  # agentd's configured model, whatever was asked
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert choice.message.content == token_text(5) == stored["content"]
    assert stored["message_id"] == info["message_id"] and info["reason"] == "completed"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == (completion.usage.prompt_tokens
                                             + completion.usage.completion_tokens)
    (sent,) = requests_with(llm, marker)
    contents = json.dumps(sent.body["messages"])
    assert earlier not in contents  # agentd keeps its own history, not the request's


async def test_the_sync_client_streams_deltas_that_concatenate_to_the_stored_message(tree, api):
    marker = nonce()

    def stream() -> list[Any]:
        client = openai.OpenAI(base_url=f"{tree.base_url}/v1", api_key=KEY, max_retries=0,
                               timeout=30)
        with client:
            return list(client.chat.completions.create(
                model="scripted", stream=True,
                messages=[{"role": "user",
                           "content": f"hi {marker} [[script tokens=30 rate=60]]"}]))

    with trio.fail_after(30):
        chunks = await trio.to_thread.run_sync(stream, abandon_on_cancel=True)
        first, *_, last = chunks
        opening = agentd_of(first)
        stored = await assistant_message(api, opening["session_id"], opening["run_id"])
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert {c.id for c in chunks} == {f"chatcmpl-{opening['run_id']}"}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == token_text(30) == stored["content"]
    assert [c.choices[0].finish_reason for c in chunks].count("stop") == 1
    assert last.choices[0].finish_reason == "stop"
    ending = agentd_of(last)
    assert ending["reason"] == "completed" and ending["message_id"] == stored["message_id"]


async def test_a_session_id_from_an_answer_continues_that_session_with_agentds_history(
        llm, oai):
    first_marker, second_marker = nonce(), nonce()
    with trio.fail_after(30):
        first = await oai.chat.completions.create(model="m", messages=[
            {"role": "user", "content": f"remember {first_marker} [[script tokens=3]]"}])
        session = agentd_of(first)["session_id"]
        second = await oai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"again {second_marker}"}],
            extra_body={"session_id": session})
    assert agentd_of(second)["session_id"] == session
    (sent,) = requests_with(llm, second_marker)
    history = [m for m in sent.body["messages"] if m["role"] in ("user", "assistant")]
    assert first_marker in history[0]["content"] and history[1]["content"] == token_text(3)


async def test_models_lists_and_retrieves_the_configured_model(oai):
    with trio.fail_after(10):
        models = await oai.models.list()
        one = await oai.models.retrieve("scripted")
        with pytest.raises(openai.NotFoundError) as missing:
            await oai.models.retrieve("gpt-nope")
    assert [m.id for m in models.data] == ["scripted"]
    assert one.id == "scripted" and one.object == "model" and one.owned_by == "agentd"
    assert missing.value.code == "model_not_found"


# Errors in OpenAI's shape --------------------------------------------------------------------


async def test_invalid_requests_are_openai_bad_request_errors_naming_the_param(oai, api):
    with trio.fail_after(10):
        with pytest.raises(openai.BadRequestError) as empty:
            await oai.chat.completions.create(model="m", messages=[])
        with pytest.raises(openai.BadRequestError) as several:
            await oai.chat.completions.create(
                model="m", n=2, messages=[{"role": "user", "content": "x"}])
        missing = await api.post("/v1/chat/completions", json={"model": "m"})
        bad_json = await api.post("/v1/chat/completions", content=b"{nope",
                                  headers={"content-type": "application/json"})
        wrong_method = await api.get("/v1/chat/completions")
        with pytest.raises(openai.NotFoundError) as no_session:
            await oai.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}],
                extra_body={"session_id": "00000000-0000-0000-0000-000000000000"})
    assert (empty.value.status_code, empty.value.param) == (400, "messages")
    assert several.value.param == "n"
    assert missing.status_code == 400
    assert missing.json() == {"error": {
        "message": "missing required parameter: 'messages'", "type": "invalid_request_error",
        "code": "missing_required_parameter", "param": "messages"}}
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "bad_json"
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert set(wrong_method.json()["error"]) == {"message", "type", "code", "param"}
    assert no_session.value.status_code == 404


async def test_a_wrong_key_is_an_openai_authentication_error(tree):
    async with openai.AsyncOpenAI(base_url=f"{tree.base_url}/v1", api_key="wrong",
                                  max_retries=0, timeout=10) as client:
        with trio.fail_after(10), pytest.raises(openai.AuthenticationError) as refused:
            await client.models.list()
    assert refused.value.status_code == 401 and refused.value.code == "unauthorized"


# Clients that leave, servers that stop ---------------------------------------------------------


async def test_a_client_that_leaves_cancels_its_run_streamed_or_not(oai, api):
    with trio.fail_after(40):
        stream = await oai.chat.completions.create(
            model="m", stream=True,
            messages=[{"role": "user", "content": f"{nonce()} [[script tokens=400 rate=20]]"}])
        seen = []
        async for chunk in stream:
            seen.append(chunk)
            if len(seen) == 4:
                break
        await stream.close()
        streamed = await run_final(api, agentd_of(seen[0])["run_id"], 10)
        stored = await assistant_message(api, streamed["session_id"], streamed["run_id"])

        # Not streamed: the run is found through its session, made beforehand.
        session = (await api.post("/api/chat", json={"message": "[[script tokens=1]]"})
                   ).json()["session_id"]
        with pytest.raises(httpx.ReadTimeout):
            await api.post("/v1/chat/completions", timeout=1.5, json={
                "model": "m", "session_id": session,
                "messages": [{"role": "user", "content": "[[script tokens=400 rate=20]]"}]})

        async def left_one() -> list[dict[str, Any]]:
            messages = (await api.get(f"/api/sessions/{session}/messages")).json()["messages"]
            return [m for m in messages if m["role"] == "assistant"][1:]

        (plain,) = await eventually(left_one, 10, interval=0.1)
    assert streamed["status"] == "cancelled" and stored["status"] == "cancelled"
    got = "".join(c.choices[0].delta.content or "" for c in seen)
    assert got and stored["content"].startswith(got)  # what was sent before it noticed
    assert plain["status"] == "cancelled"


async def test_sigterm_ends_a_streamed_answer_with_length_and_agentd_then_done_and_503s_the_rest(
        private_tree, llm):
    tree = private_tree()
    markers = {"client": nonce(), "raw": nonce(), "plain": nonce()}
    chunks: list[Any] = []
    raw_lines: list[str] = []
    plain: list[httpx.Response] = []

    def ask(name: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{markers[name]} [[script tokens=400 rate=10]]"}]

    async with openai.AsyncOpenAI(base_url=f"{tree.base_url}/v1", api_key=KEY, max_retries=0,
                                  timeout=30) as client, \
            httpx.AsyncClient(base_url=tree.base_url, headers=AUTH, timeout=30) as http:

        async def with_client() -> None:
            async for chunk in await client.chat.completions.create(
                    model="m", messages=ask("client"), stream=True):
                chunks.append(chunk)

        async def raw() -> None:
            body = {"model": "m", "messages": ask("raw"), "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line:
                        raw_lines.append(line)

        async def not_streamed() -> None:
            plain.append(await http.post("/v1/chat/completions",
                                         json={"model": "m", "messages": ask("plain")}))

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                for task in (with_client, raw, not_streamed):
                    nursery.start_soon(task)
                await eventually(lambda: len(chunks) >= 3 and len(raw_lines) >= 3 and all(
                    requests_with(llm, m) for m in markers.values()), 20)
                tree.sigterm()
                await tree.wait_exit(TIMEOUT + 5)  # its exit status: test_shutdown.py

    last = chunks[-1]
    assert last.choices[0].finish_reason == "length"
    ending = agentd_of(last)
    assert ending["reason"] == "server_shutdown" and ending["message_id"]
    assert ending["resumable"] is True and ending["detail"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text and token_text(400).startswith(text)

    assert raw_lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in raw_lines)
    final = json.loads(raw_lines[-2].removeprefix("data: "))
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["agentd"]["reason"] == "server_shutdown"
    raw_text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                       for line in raw_lines[:-1])

    (answer,) = plain
    assert answer.status_code == 503 and answer.headers["retry-after"]
    error = answer.json()
    assert error["error"]["code"] == "server_shutdown" and "param" in error["error"]
    saved = error["agentd"]

    await trio.to_thread.run_sync(tree.start)
    async with httpx.AsyncClient(base_url=tree.base_url, headers=AUTH, timeout=30) as http:
        with trio.fail_after(30):
            opening = agentd_of(chunks[0])
            stored = await assistant_message(http, opening["session_id"], opening["run_id"])
            assert stored["content"] == text and stored["status"] == "interrupted"
            assert stored["message_id"] == ending["message_id"]
            raw_open = json.loads(raw_lines[0][6:])["agentd"]
            stored = await assistant_message(http, raw_open["session_id"], raw_open["run_id"])
            assert stored["content"] == raw_text
            stored = await assistant_message(http, saved["session_id"], saved["run_id"])
            assert stored["content"] == saved["content"] and stored["status"] == "interrupted"
    assert tree.stop() == 0


# agentd chat ---------------------------------------------------------------------------------


def chat_command(tree: AgentdTree) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTD_", "OPENAI_"))}
    env["AGENTD_LOG_LEVEL"] = "warning"
    return [AGENTD, "chat", "--url", tree.base_url, "--api-key", KEY], env


async def test_agentd_chat_streams_answers_and_tool_calls_in_one_session(tree, api):
    command, env = chat_command(tree)
    first = f"{nonce()} [[script tokens=4]]"
    second = f"{nonce()} [[script tokens=2 tool=calculator:{{\"expression\":\"2+3\"}}]]"
    with trio.fail_after(60):
        done = await trio.run_process(command, stdin=f"{first}\n\n{second}\n".encode(),
                                      capture_stdout=True, capture_stderr=True, check=False,
                                      env=env, cwd=tempfile.gettempdir())
    out = done.stdout.decode()
    assert done.returncode == 0, (out, done.stderr.decode())
    assert "you>" not in out  # not a terminal: no prompt
    assert f"{token_text(4)}\n" in out
    tool = '[tool calculator {"expression": "2+3"} → 5]\n'
    assert tool in out and out.index(tool) > out.index(token_text(4))
    assert out.rstrip("\n").endswith(token_text(2))  # the answer after the tool's
    assert "[ended" not in out


async def test_agentd_chat_resumes_an_answer_when_the_web_process_dies_mid_stream(
        private_tree):
    tree = private_tree()
    command, env = chat_command(tree)
    with trio.fail_after(60):
        proc = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, cwd=tempfile.gettempdir())
        assert proc.stdin is not None and proc.stdout is not None
        out = bytearray()

        async def read_until(text: bytes) -> None:
            assert proc.stdout is not None
            while text not in out:
                chunk = await proc.stdout.receive_some()
                assert chunk, out.decode()
                out.extend(chunk)

        await proc.stdin.send_all(f"{nonce()} [[script tokens=60 rate=20]]\n".encode())
        await read_until(b"tok5 ")
        webs = tree.role_pids("web")
        assert webs
        for pid in webs:
            os.kill(pid, signal.SIGKILL)
        await read_until(token_text(60).encode() + b"\n")
        await proc.stdin.aclose()
        while chunk := await proc.stdout.receive_some():
            out.extend(chunk)
        assert await proc.wait() == 0
    text = out.decode()
    assert token_text(60) in text and text.count("tok0 ") == 1 and text.count("tok59 ") == 1
    assert "[ended" not in text and "gave up" not in text
    assert tree.stop() == 0
