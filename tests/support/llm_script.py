"""The scripted LLM's pure half: directives in, OpenAI-shaped answers out. No I/O here.

A test picks the fake LLM's behaviour per request by putting a directive in the last user
message, so one server serves every test without restarts::

    [[script tokens=50 rate=20 ttft=0.1 hang_after=10 reset_after=5
             fail=2 status=429 retry_after=1 tool=calculator:{"expression":"2+3"};current_time]]

Keys left out take the server's defaults (see `Script`). `tool` takes `name:JSON` items
separated by `;` (the JSON may contain spaces; `name` alone means `{}` arguments) and may be
repeated. An unknown key or a bad value is answered 400, so a typo fails loudly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "Answer",
    "DirectiveError",
    "Renderer",
    "Script",
    "ToolScript",
    "error_body",
    "last_user_text",
    "parse_directive",
    "plan_answer",
    "token_text",
]

DIRECTIVE_OPEN = "[[script"
_KEY = re.compile(r"\s*(\w+)=")
_VALUE = re.compile(r"(?:(?!\]\])\S)+")
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]+")
_JSON = json.JSONDecoder()
_INT_KEYS = {"tokens", "hang_after", "reset_after", "fail", "status"}
_FLOAT_KEYS = {"rate", "ttft", "retry_after"}
ARGUMENT_PIECE = 12  # tool-call arguments are streamed in pieces this long, as OpenAI splits them


class DirectiveError(ValueError):
    """A directive the server cannot follow; answered 400 with this message."""


@dataclass(frozen=True, slots=True)
class ToolScript:
    name: str
    arguments: str  # JSON text, sent to the client exactly as written in the directive


@dataclass(frozen=True, slots=True)
class Script:
    """What one request should get. Field names are the directive's keys."""

    tokens: int = 20  # words of text: "tok0 tok1 ..."
    rate: float = 0.0  # chunks per second; 0 = as fast as possible
    ttft: float = 0.0  # seconds before the first chunk
    hang_after: int | None = None  # send this many chunks, then nothing, ever
    reset_after: int | None = None  # send this many chunks, then reset the TCP connection
    fail: int = 0  # the first `fail` requests with this directive get HTTP `status`
    status: int = 500
    retry_after: float | None = None  # seconds, sent as Retry-After with a failure
    tools: tuple[ToolScript, ...] = field(default=())


def token_text(count: int, start: int = 0) -> str:
    """The text of `count` scripted tokens: what a client should have after concatenation."""
    return "".join(f"tok{i} " for i in range(start, start + count))


def last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _content_text(content: Any) -> str:
    # Content is a string, or a list of parts of which the text ones count.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def parse_directive(text: str, defaults: Script) -> tuple[str, Script]:
    """(the directive exactly as written, or "" when there is none; the resulting script)."""
    start = text.find(DIRECTIVE_OPEN)
    if start < 0:
        return "", defaults
    values: dict[str, Any] = {}
    tools: list[ToolScript] = []
    pos = start + len(DIRECTIVE_OPEN)
    while True:
        pos = _skip_space(text, pos)
        if text.startswith("]]", pos):
            break
        match = _KEY.match(text, pos)
        if match is None:
            raise DirectiveError(f"cannot read the directive at {text[pos : pos + 20]!r}")
        key, pos = match[1], match.end()
        if key == "tool":
            pos = _parse_tools(text, pos, tools)
        else:
            value = _VALUE.match(text, pos)
            if value is None:
                raise DirectiveError(f"{key}= has no value")
            values[key] = _convert(key, value[0])
            pos = value.end()
    if tools:
        values["tools"] = tuple(tools)
    return text[start : pos + 2], replace(defaults, **values)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos >= len(text):
        raise DirectiveError("the directive has no closing ]]")
    return pos


def _convert(key: str, raw: str) -> int | float:
    if key not in _INT_KEYS and key not in _FLOAT_KEYS:
        raise DirectiveError(f"unknown directive key {key!r}")
    try:
        value = int(raw) if key in _INT_KEYS else float(raw)
    except ValueError as exc:
        raise DirectiveError(f"bad value for {key}: {raw!r}") from exc
    if value < 0 or (key == "status" and not 400 <= value <= 599):
        raise DirectiveError(f"value out of range for {key}: {raw!r}")
    return value


def _parse_tools(text: str, pos: int, tools: list[ToolScript]) -> int:
    while True:
        name = _TOOL_NAME.match(text, pos)
        if name is None:
            raise DirectiveError("tool= needs name:JSONARGS")
        pos = name.end()
        arguments = "{}"
        if text.startswith(":", pos):
            try:
                _, end = _JSON.raw_decode(text, pos + 1)
            except json.JSONDecodeError as exc:
                raise DirectiveError(f"tool {name[0]}: arguments are not JSON ({exc})") from exc
            arguments, pos = text[pos + 1 : end], end
        tools.append(ToolScript(name[0], arguments))
        if not text.startswith(";", pos):
            return pos
        pos += 1


@dataclass(frozen=True, slots=True)
class Answer:
    """What to say: text pieces, or tool calls; either way sent one piece per chunk."""

    content: list[str]
    tool_calls: tuple[ToolScript, ...]
    finish_reason: str
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.content) or sum(1 + len(c.arguments) // 4 for c in self.tool_calls)


def plan_answer(body: dict[str, Any], script: Script) -> Answer:
    """Tool calls when tools were offered and none has answered yet; text otherwise."""
    messages = body.get("messages") or []
    prompt_tokens = sum(len(_content_text(m.get("content")).split()) for m in messages)
    results = _tool_results(messages)
    if script.tools and body.get("tools") and not results:
        return Answer([], script.tools, "tool_calls", prompt_tokens)
    pieces = [f"The tool said: {content}. " for content in results]
    pieces += [f"tok{i} " for i in range(script.tokens)]
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and 0 < limit < len(pieces):
        return Answer(pieces[:limit], (), "length", prompt_tokens)
    return Answer(pieces, (), "stop", prompt_tokens)


def _tool_results(messages: list[Any]) -> list[str]:
    """Contents of the `tool` messages after the last user message."""
    found: list[str] = []
    for message in reversed(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "user":
            break
        if role == "tool":
            found.append(_content_text(message.get("content")))
    return found[::-1]


_ERROR_KINDS = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("not_found_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


def error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error shape for `status`."""
    kind, code = _ERROR_KINDS.get(status, ("server_error" if status >= 500 else "error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class Renderer:
    """Chunks and completions for one response, as bytes OpenAI would send.

    Text chunks are the hot path of the benchmarks (500 streams at 20 chunks/s), so they are
    formatted from a prefix computed once per response rather than with `json.dumps` of a
    whole dict per chunk.
    """

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        self._base = {"id": completion_id, "created": created, "model": model}
        self._prefix = (
            f'data: {{"id":"{completion_id}","object":"chat.completion.chunk",'
            f'"created":{created},"model":{json.dumps(model)},"choices":[{{"index":0,"delta":'
        )

    def chunks(self, answer: Answer) -> list[bytes]:
        if answer.tool_calls:
            return self._tool_chunks(answer.tool_calls)
        chunks = [self._delta(f'{{"content":{json.dumps(piece)}}}') for piece in answer.content]
        role = self._delta('{"role":"assistant","content":""}')
        return [role + chunks[0], *chunks[1:]] if chunks else [role]

    def _delta(self, delta_json: str, finish: str | None = None) -> bytes:
        reason = "null" if finish is None else f'"{finish}"'
        return f'{self._prefix}{delta_json},"finish_reason":{reason}}}]}}\n\n'.encode()

    def _tool_chunks(self, calls: tuple[ToolScript, ...]) -> list[bytes]:
        chunks: list[bytes] = []
        for index, call in enumerate(calls):
            head: dict[str, Any] = {
                "index": index,
                "id": f"call_{self._base['id']}_{index}",
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            delta: dict[str, Any] = {"tool_calls": [head]}
            if index == 0:
                delta = {"role": "assistant", "content": None, **delta}
            chunks.append(self._delta(json.dumps(delta)))
            for at in range(0, len(call.arguments), ARGUMENT_PIECE):
                piece = {
                    "index": index,
                    "function": {"arguments": call.arguments[at : at + ARGUMENT_PIECE]},
                }
                chunks.append(self._delta(json.dumps({"tool_calls": [piece]})))
        return chunks

    def tail(self, answer: Answer, include_usage: bool) -> bytes:
        """The finishing chunk, the usage chunk when asked for, then `[DONE]`."""
        tail = self._delta("{}", answer.finish_reason)
        if include_usage:
            usage = {**self._base, "object": "chat.completion.chunk", "choices": []}
            usage["usage"] = _usage(answer)
            tail += f"data: {json.dumps(usage)}\n\n".encode()
        return tail + b"data: [DONE]\n\n"

    def completion(self, answer: Answer) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(answer.content) or None}
        if answer.tool_calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{self._base['id']}_{index}",
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for index, call in enumerate(answer.tool_calls)
            ]
        choice = {"index": 0, "message": message, "finish_reason": answer.finish_reason}
        return {
            **self._base,
            "object": "chat.completion",
            "choices": [choice],
            "usage": _usage(answer),
        }


def _usage(answer: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }
