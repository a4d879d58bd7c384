"""OpenAI-compatible /v1 (API.md, HTTP): the official `openai` client works against agentd.

`POST /v1/chat/completions` (with `stream` true or false) and `GET /v1/models` are a second
face of the same runs as /api: each completion is an agentd run, created durably with its
session and user message before anything is answered, executed by an agent with agentd's
tools, persisted, cancellable and interrupted cleanly by a shutdown.

How a request maps onto agentd
------------------------------

- **The run's message is the last `user` message** in `messages` (its text; a list of
  content parts counts its `text` parts). Messages after it are ignored.
- **History is agentd's own, not the request's.** Without the `session_id` extension field
  every request is a new agentd session, so earlier messages in `messages` (system prompts,
  previous turns) do *not* reach the LLM: agentd sends its own system prompt
  (`AGENTD_SYSTEM_PROMPT`), its stored session history and the user's message (API.md, Agent
  behaviour). To hold a conversation, send back the `session_id` that every answer carries in
  its `agentd` object (`extra_body={"session_id": ...}` with the openai client); the session's
  stored messages are then the history, and only the new last user message is needed.
  `user` is not used for this: it names an end user, and the user is who authenticated.
- **`model`** is required (as OpenAI requires it) but does not pick a model: agentd answers with
  its configured one (`AGENTD_LLM_MODEL`, or `agentd-local` when no LLM is configured), and
  says so in the answer's `model` and in `GET /v1/models`.
- Other extensions, as on /api: `timeout` (1–600 s), `cache` (bool). Unknown fields
  (`temperature`, `tools`, `max_tokens`, ...) are ignored; `n` other than 1 is refused.
- Validation errors are 400 in OpenAI's error shape, with `param` naming the field.

Answers
-------

Non-streamed: a `chat.completion` (`id` `chatcmpl-<run_id>`) plus an `agentd` object
`{run_id, session_id, message_id, reason}`. A run that did not complete answers in OpenAI's
error shape, with the same `agentd` object (and the saved partial `content`): 503 +
`Retry-After` (`server_shutdown`), 504 (`timeout`), 502 (`llm_error`), 409 (`cancelled`).

Streamed: `data: {chat.completion.chunk}` lines as OpenAI sends them: a first chunk with delta
`{"role": "assistant", "content": ""}` (and `agentd: {run_id, session_id}`), one chunk per
`token` event, a last chunk with an empty delta, then `data: [DONE]`. **An interrupted answer
is told apart from a complete one by that last chunk**: `finish_reason` is `"stop"` only when
the run completed; otherwise it is `"length"`, and the chunk's `agentd` object carries the
`reason` (`server_shutdown`, `timeout`, `error`, `cancelled`), `message_id`, `resumable` and
`detail`. The concatenated deltas are exactly the stored assistant message. Tool calls are
agentd's own business (the agent runs them), so they are not surfaced as `tool_calls`
deltas; `usage` is not streamed. A client that disconnects cancels its run, streamed or not.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog
import trio
from pydantic import ValidationError

from app.config import DEFAULT_LLM_MODEL
from app.db import runs as q
from app.web import streams
from app.web.api import (
    CHAT_WAIT_MARGIN,
    check_stream_capacity,
    create,
    get_run,
    owner_of,
    read_body,
    wait_for_end,
)
from app.web.errors import ApiError, BadJson, NotFound, openai_error_json, outcome_error
from app.web.models import MISSING, ChatCompletionRequest, ChatRequest

if TYPE_CHECKING:
    from collections.abc import MutableMapping

    from quart import Quart, Response

    from app.config import Settings
    from app.web.app import Receive, Send, WebState

COMPLETIONS_PATH = "/v1/chat/completions"
DONE = b"data: [DONE]\n\n"

log = structlog.get_logger("web")


# The request ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionRequest:
    message: str  # the last user message's text: the run's message
    stream: bool = False
    session_id: str | None = None
    timeout: float | None = None
    cache: bool | None = None

    def chat_request(self) -> ChatRequest:
        return ChatRequest(message=self.message, session_id=self.session_id,
                           timeout=self.timeout, cache=self.cache)


def invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    """A request OpenAI would refuse: 400, naming the field (API.md, `/v1` errors)."""
    return ApiError(message, status=400, code=code, extra={"param": param})


def parse_request(data: Any, max_chars: int) -> CompletionRequest:
    """Validate an OpenAI chat request and map it onto a run (see the module's docstring).
    The checks are `ChatCompletionRequest`'s (app/web/models.py), which the OpenAPI
    document describes; the first one failed is the 400."""
    if not isinstance(data, dict):
        raise BadJson("the request body must be a JSON object")
    try:
        body = ChatCompletionRequest.model_validate(data, context={"max_chars": max_chars})
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "missing":  # absent: as OpenAI says it of a null one
            name = str(first["loc"][0])
            raise invalid(name, MISSING[name], "missing_required_parameter") from None
        param = (first.get("ctx") or {}).get("param") or ".".join(map(str, first["loc"]))
        raise invalid(param, first["msg"], first["type"]) from None
    return CompletionRequest(message=body.message(), stream=body.stream or False,
                             session_id=body.session_id, timeout=body.timeout,
                             cache=body.cache)


# The answers ---------------------------------------------------------------------------------


def served_model(settings: Settings) -> str:
    """The model agentd answers with, whatever a request names."""
    from app.agent.llm import LOCAL_MODEL

    if not settings.llm_configured:
        return LOCAL_MODEL
    return settings.llm_model or DEFAULT_LLM_MODEL


def usage_of(stored: dict[str, Any] | None) -> dict[str, int]:
    prompt = int((stored or {}).get("prompt_tokens") or 0)
    completion = int((stored or {}).get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def agentd_of(row: dict[str, Any]) -> dict[str, Any]:
    return {"run_id": row["run_id"], "session_id": row["session_id"],
            "message_id": row["message_id"], "reason": row["reason"]}


def completion_body(row: dict[str, Any], model: str) -> dict[str, Any]:
    """A completed run as a `chat.completion`."""
    return {
        "id": f"chatcmpl-{row['run_id']}", "object": "chat.completion",
        "created": int(row["created_at"].timestamp()), "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "logprobs": None, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": row["output"] or "",
                                 "refusal": None}}],
        "usage": usage_of(row["usage"]),
        "agentd": agentd_of(row),
    }


def outcome(row: dict[str, Any], *, draining: bool) -> ApiError:
    """A run that did not complete (or not in time), as the error it answers with."""
    extra = {"agentd": {**agentd_of(row), "content": row["output"] or ""}}
    if row["status"] in q.FINAL:
        reason = row["reason"] or "error"
        message = row["detail"] or "the run did not complete; the partial answer is saved"
        return outcome_error(reason, message, extra)
    follow = f"Follow it with GET /api/runs/{row['run_id']}."
    if draining:
        return outcome_error("server_shutdown", "agentd is shutting down; the run is kept and "
                             f"continues after the restart. {follow}", extra)
    return outcome_error("timeout", f"the run did not end in time; it may still. {follow}", extra)


def frame(data_json: str) -> bytes:
    """OpenAI's SSE framing: one `data:` line. `json.dumps` never writes a raw line break."""
    return b"data: " + data_json.encode() + b"\n\n"


class Chunks:
    """A run's events as `chat.completion.chunk`s: the framing `streams.stream` writes."""

    def __init__(self, model: str, created: int) -> None:
        self.model = model
        self.created = created
        self.run_id = ""

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None,
              **extra: Any) -> bytes:
        return frame(json.dumps({
            "id": f"chatcmpl-{self.run_id}", "object": "chat.completion.chunk",
            "created": self.created, "model": self.model, "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}],
            **extra}, separators=(",", ":")))

    def start(self, run_id: str, session_id: str, status: str) -> bytes:
        self.run_id = run_id
        return self.chunk({"role": "assistant", "content": ""},
                          agentd={"run_id": run_id, "session_id": session_id})

    def event(self, event_id: str | None, event_type: str, data_json: str) -> bytes:
        if event_type == "token":
            return self.chunk({"content": json.loads(data_json)["content"]})
        if event_type == "end":
            end = json.loads(data_json)
            reason = end.get("reason")
            return self.chunk({}, "stop" if reason == "completed" else "length", agentd={
                "run_id": self.run_id, "reason": reason, "message_id": end.get("message_id"),
                "resumable": end.get("resumable"), "detail": end.get("detail")})
        return b""  # run, thinking, tool calls and results: not part of OpenAI's answer

    def close(self) -> bytes:
        return DONE


# The routes ----------------------------------------------------------------------------------


async def dispatch(state: WebState, scope: MutableMapping[str, Any], receive: Receive,
                   send: Send) -> None:
    """`/v1/chat/completions` as raw ASGI (a stream must not go through Quart's buffering)."""
    try:
        if scope["method"] != "POST":
            raise ApiError("use POST for /v1/chat/completions", status=405,
                           code="method_not_allowed", headers={"Allow": "POST"})
        limit = state.settings.max_body_bytes
        raw = await read_body(receive, limit)
        try:
            data = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError):
            raise BadJson("the request body is not valid JSON") from None
        request = parse_request(data, state.settings.max_message_chars)
        if request.stream:
            await _stream(state, scope, receive, send, request)
        else:
            await _complete(state, scope, receive, send, request)
    except ApiError as error:
        await _send_json(send, error.status, openai_error_json(error), error.headers)


async def _stream(state: WebState, scope: MutableMapping[str, Any], receive: Receive,
                  send: Send, request: CompletionRequest) -> None:
    check_stream_capacity(state)
    new = await create(state, request.chat_request(), owner_of(scope), "cancel")
    await streams.stream(state, scope, receive, send, run_id=new.run_id,
                         session_id=new.session_id, status="queued", last_id=None,
                         on_disconnect="cancel",
                         framing=Chunks(served_model(state.settings), int(time.time())))


async def _complete(state: WebState, scope: MutableMapping[str, Any], receive: Receive,
                    send: Send, request: CompletionRequest) -> None:
    owner = owner_of(scope)
    new = await create(state, request.chat_request(), owner, "cancel")
    settings = state.settings
    limit = min(request.timeout or settings.run_timeout, settings.run_timeout)
    left, _ = await streams.unless_client_leaves(
        receive, partial(_wait_or_cutoff, state, new.run_id, limit + CHAT_WAIT_MARGIN))
    if left:  # nobody to answer: like a stream's client that left, cancel the run
        log.info("completion_client_left", run_id=new.run_id)
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 2):
            await streams.request_cancel(state, new.run_id)
        return
    row = await get_run(state, new.run_id, owner)
    if row["status"] != "completed":
        raise outcome(row, draining=state.life.draining.is_set())
    body = completion_body(row, served_model(settings))
    await _send_json(send, 200, json.dumps(body).encode(), {})


async def _wait_or_cutoff(state: WebState, run_id: str, limit: float) -> None:
    """Wait for the run's end, but no longer than a draining stream would (its cutoff)."""
    async with trio.open_nursery() as nursery:

        async def cutoff() -> None:
            await state.life.draining.wait()
            await trio.sleep_until(state.stream_cutoff())
            nursery.cancel_scope.cancel()

        nursery.start_soon(cutoff)
        await wait_for_end(state, run_id, limit)
        nursery.cancel_scope.cancel()


async def _send_json(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    raw = [(b"content-type", b"application/json")]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def register(app: Quart, state: WebState) -> None:
    """`GET /v1/models` and `GET /v1/models/{model}`: the one model agentd answers with."""
    from quart import Response

    from app.web.app import json_response

    def model_object() -> dict[str, Any]:
        return {"id": served_model(state.settings), "object": "model",
                "created": int(state.started_at), "owned_by": "agentd"}

    @app.get("/v1/models")
    async def list_models() -> Response:
        return json_response({"object": "list", "data": [model_object()]})

    @app.get("/v1/models/<path:model>")
    async def read_model(model: str) -> Response:
        if model != served_model(state.settings):
            error = NotFound(f"the model {model!r} does not exist", code="model_not_found",
                             extra={"param": "model"})
            return Response(openai_error_json(error), status=404,
                            content_type="application/json")
        return json_response(model_object())
