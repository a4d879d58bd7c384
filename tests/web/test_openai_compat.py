"""The pure half of /v1 (web/openai_compat.py): request mapping, chunks, answers, errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from app.web.errors import ApiError, BadJson, openai_error_json
from app.web.openai_compat import (
    DONE,
    Chunks,
    CompletionRequest,
    completion_body,
    outcome,
    parse_request,
    served_model,
    usage_of,
)
from app.web.sse import SSEParser

LIMIT = 32000


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def error_of(data: Any) -> dict[str, Any]:
    with pytest.raises(ApiError) as info:
        parse_request(data, LIMIT)
    assert info.value.status == 400
    return dict(json.loads(openai_error_json(info.value))["error"])


# Request mapping -----------------------------------------------------------------------------


def test_the_last_user_message_is_the_runs_message_and_the_rest_is_not_sent():
    request = parse_request(body(messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": None, "tool_calls": []},
    ]), LIMIT)
    assert request == CompletionRequest(message="second")


def test_text_parts_of_a_list_content_are_joined_and_other_parts_skipped():
    content = [{"type": "text", "text": "look "}, {"type": "image_url", "image_url": {}},
               {"type": "text", "text": "here"}]
    assert parse_request(body(messages=[{"role": "user", "content": content}]),
                         LIMIT).message == "look here"


def test_extensions_map_onto_the_run_and_unknown_fields_are_ignored():
    request = parse_request(body(stream=True, session_id="s1", timeout=5, cache=True,
                                 temperature=0.2, tools=[{"type": "function"}], user="u",
                                 stream_options={"include_usage": True}, n=1), LIMIT)
    assert request == CompletionRequest(message="hi", stream=True, session_id="s1",
                                        timeout=5.0, cache=True)
    chat = request.chat_request()
    assert (chat.message, chat.session_id, chat.timeout, chat.cache) == ("hi", "s1", 5.0, True)


@pytest.mark.parametrize(("data", "param", "code"), [
    ({"messages": [{"role": "user", "content": "x"}]}, "model", "missing_required_parameter"),
    (body(model=3), "model", "invalid_type"),
    ({"model": "m"}, "messages", "missing_required_parameter"),
    (body(messages=[]), "messages", "invalid_type"),
    (body(messages="hi"), "messages", "invalid_type"),
    (body(messages=["hi"]), "messages[0]", "invalid_type"),
    (body(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role", "invalid_value"),
    (body(messages=[{"role": "system", "content": "x"}]), "messages", "invalid_value"),
    (body(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "  "}]),
     "messages[1].content", "invalid_value"),
    (body(messages=[{"role": "user", "content": 5}]), "messages[0].content", "invalid_type"),
    (body(messages=[{"role": "user", "content": "x" * (LIMIT + 1)}]), "messages[0].content",
     "string_above_max_length"),
    (body(stream="yes"), "stream", "invalid_type"),
    (body(n=2), "n", "invalid_value"),
    (body(timeout=0.5), "timeout", "invalid_value"),
    (body(timeout=True), "timeout", "invalid_value"),
    (body(session_id=""), "session_id", "invalid_type"),
    (body(cache="on"), "cache", "invalid_type"),
])
def test_invalid_requests_are_400_in_openais_shape_naming_the_param(data, param, code):
    error = error_of(data)
    assert error["param"] == param
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str) and error["message"]


def test_a_body_that_is_not_an_object_is_bad_json():
    with pytest.raises(BadJson):
        parse_request([body()], LIMIT)


# Answers -------------------------------------------------------------------------------------


def row(**fields: Any) -> dict[str, Any]:
    return {"run_id": "r1", "session_id": "s1", "message_id": "m1", "status": "completed",
            "reason": "completed", "detail": None, "output": "tok0 tok1 ",
            "usage": {"prompt_tokens": 7, "completion_tokens": 2},
            "created_at": datetime(2026, 1, 2, tzinfo=UTC), **fields}


def test_a_completed_run_is_a_chat_completion_the_openai_types_accept():
    completion = ChatCompletion.model_validate(completion_body(row(), "scripted"))
    assert completion.id == "chatcmpl-r1"
    assert completion.model == "scripted"
    assert completion.choices[0].message.content == "tok0 tok1 "
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens,
            completion.usage.total_tokens) == (7, 2, 9)
    assert completion.model_extra == {"agentd": {"run_id": "r1", "session_id": "s1",
                                                 "message_id": "m1", "reason": "completed"}}


def test_missing_usage_counts_zero():
    assert usage_of(None) == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


@pytest.mark.parametrize(("reason", "status", "code"), [
    ("server_shutdown", 503, "server_shutdown"), ("timeout", 504, "timeout"),
    ("error", 502, "llm_error"), ("cancelled", 409, "cancelled"),
])
def test_a_run_that_did_not_complete_answers_its_outcome_with_what_was_saved(
        reason, status, code):
    error = outcome(row(status="interrupted", reason=reason, detail="why", output="tok0 "),
                    draining=False)
    assert (error.status, error.code, error.message) == (status, code, "why")
    assert ("Retry-After" in error.headers) == (reason == "server_shutdown")
    shaped = json.loads(openai_error_json(error))
    assert shaped["error"]["code"] == code and "param" in shaped["error"]
    assert shaped["agentd"] == {"run_id": "r1", "session_id": "s1", "message_id": "m1",
                                "reason": reason, "content": "tok0 "}


def test_a_run_still_going_is_a_shutdown_when_draining_and_a_timeout_otherwise():
    going = row(status="queued", reason=None, message_id=None, output=None)
    assert outcome(going, draining=True).status == 503
    assert outcome(going, draining=False).status == 504
    assert "/api/runs/r1" in outcome(going, draining=False).message


def test_the_served_model_is_the_configured_one_or_the_local_provider():
    assert served_model(SimpleNamespace(llm_configured=False, llm_model="x")) == "agentd-local"
    assert served_model(SimpleNamespace(llm_configured=True, llm_model="x")) == "x"
    assert served_model(SimpleNamespace(llm_configured=True, llm_model=None)) == "gpt-4o-mini"


# Streamed chunks -----------------------------------------------------------------------------


def event(event_type: str, **data: Any) -> str:
    return json.dumps({"type": event_type, "run_id": "r1", **data})


def stream_of(*events: tuple[str, str]) -> bytes:
    chunks = Chunks("scripted", 1700000000)
    out = chunks.start("r1", "s1", "queued")
    for i, (event_type, data) in enumerate(events):
        out += chunks.event(f"1-{i}", event_type, data)
    return out + chunks.close()


def parsed(raw: bytes) -> tuple[list[ChatCompletionChunk], list[str]]:
    """The chunks as the openai client types them, and every `data:` payload in order."""
    messages = SSEParser().feed(raw)
    assert all(m.event == "message" for m in messages)  # no `event:` lines, as OpenAI
    datas = [m.data for m in messages]
    chunks = [ChatCompletionChunk.model_validate(json.loads(d)) for d in datas if d != "[DONE]"]
    return chunks, datas


def test_a_completed_stream_is_openais_chunks_then_done():
    raw = stream_of(("thinking", event("thinking")), ("token", event("token", content="Hel")),
                    ("tool_call", event("tool_call", call_id="c", name="clock", arguments="{}")),
                    ("tool_result", event("tool_result", call_id="c", name="clock", result=1)),
                    ("token", event("token", content="lo\n")),
                    ("end", event("end", reason="completed", message_id="m1", resumable=False)))
    assert raw.endswith(DONE)
    chunks, datas = parsed(raw)
    assert datas[-1] == "[DONE]" and len(datas) == len(chunks) + 1
    assert {c.id for c in chunks} == {"chatcmpl-r1"}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    first, *middle, last = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert first.model_extra == {"agentd": {"run_id": "r1", "session_id": "s1"}}
    assert "".join(c.choices[0].delta.content or "" for c in middle) == "Hello\n"
    assert all(c.choices[0].finish_reason is None for c in [first, *middle])
    assert last.choices[0].finish_reason == "stop"
    assert last.choices[0].delta.content is None
    assert last.model_extra is not None and last.model_extra["agentd"]["reason"] == "completed"


@pytest.mark.parametrize("reason", ["server_shutdown", "timeout", "error", "cancelled"])
def test_an_interrupted_stream_ends_with_length_and_the_agentd_reason(reason):
    raw = stream_of(("token", event("token", content="tok0 ")),
                    ("end", event("end", reason=reason, message_id="m9", resumable=True,
                                  detail="the answer so far is saved")))
    chunks, datas = parsed(raw)
    assert datas[-1] == "[DONE]"
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length"
    assert last.model_extra is not None
    assert last.model_extra["agentd"] == {"run_id": "r1", "reason": reason, "message_id": "m9",
                                          "resumable": True,
                                          "detail": "the answer so far is saved"}


def test_the_webs_own_shutdown_end_has_no_message_id_yet():
    chunks = Chunks("m", 0)
    chunks.start("r1", "s1", "queued")
    own = chunks.event(None, "end", event("end", reason="server_shutdown", message_id=None,
                                          resumable=True, detail="kept"))
    (chunk,), _ = parsed(own)
    assert chunk.choices[0].finish_reason == "length"
    assert chunk.model_extra is not None and chunk.model_extra["agentd"]["message_id"] is None


def test_a_token_with_line_breaks_and_unicode_stays_one_data_line():
    chunks = Chunks("m", 0)
    chunks.start("r1", "s1", "queued")
    raw = chunks.event("1-0", "token", event("token", content="a\r\nb\u2028c"))
    assert raw.count(b"\n") == 2 and raw.startswith(b"data: {")
    (chunk,), _ = parsed(raw)
    assert chunk.choices[0].delta.content == "a\r\nb\u2028c"


def test_the_openai_client_reads_the_stream_to_its_end():
    # The client's own SSE decoder and chunk types, not ours: what `stream=True` users get.
    raw = stream_of(("token", event("token", content="tok0 ")),
                    ("end", event("end", reason="completed", message_id="m1",
                                  resumable=False)))
    decoder = openai.OpenAI(api_key="x", base_url="http://unused/v1")._make_sse_decoder()
    payloads = [sse.data for sse in decoder.iter_bytes(iter([raw[:7], raw[7:]]))]
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[1])["choices"][0]["delta"] == {"content": "tok0 "}
