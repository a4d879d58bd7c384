"""GET /openapi.json: an OpenAPI 3.1 document of every route, from the models that validate.

Which routes there are is found, not listed: every rule of Quart's url map, plus the routes
`app.entry` serves as raw ASGI before Quart sees them (the two SSE routes and
/v1/chat/completions), which no url map knows and which are therefore the entries below
marked `asgi=True`. What a route takes and answers is its one entry in `OPERATIONS`: the
pydantic model of its body or query string (the same model the route validates with), its
replies, and the errors it can answer with beyond the ones every route of its kind has
(`_Builder.errors`: draining, auth and rate limit under /api and /v1; 400 and 413 with a
body).
A new route without an entry still appears, summarised by its view's docstring, with a
`default` reply that says it is not documented yet; tests/web/test_openapi.py fails on it.

The document is written for the process that serves it: limits that are settings
(AGENTD_MAX_BODY_BYTES, AGENTD_MAX_MESSAGE_CHARS), the tools that exist, and whether 401 and
429 can happen at all come from its settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.web import responses as r
from app.web.documents import DocumentListQuery, DocumentRequest, SearchQuery
from app.web.models import (
    MESSAGE_LIMIT,
    BatchRequest,
    ChatCompletionRequest,
    ChatRequest,
    RunRequest,
    StreamRequest,
    ToolArguments,
)
from app.web.responses import ERROR_SCHEMAS, REF, RUN_EVENT

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from quart import Quart

    from app.config import Settings

Schema = type[BaseModel] | dict[str, Any]
VERSION = "0.1.0"


@dataclass(frozen=True)
class Reply:
    description: str
    content: Mapping[str, Schema | None] = field(default_factory=dict)  # media type → schema
    headers: tuple[str, ...] = ()  # names in components.headers


def json_reply(schema: Schema, description: str, *headers: str) -> Reply:
    return Reply(description, {"application/json": schema}, headers)


SSE = {"type": "string", "description": "`id:`, `event:` and `data:` lines; `data` is a "
       "RunEvent (components.schemas) as JSON; `: keep-alive` comments while idle"}


def sse_reply(description: str) -> Reply:
    return Reply(description, {"text/event-stream": SSE})


@dataclass(frozen=True)
class Operation:
    summary: str
    description: str = ""
    body: type[BaseModel] | None = None
    body_required: bool = True
    query: type[BaseModel] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # request header → meaning
    path: Mapping[str, str] = field(default_factory=dict)  # path parameter → meaning
    replies: Mapping[int, Reply] = field(default_factory=dict)
    errors: Mapping[int, str] = field(default_factory=dict)  # status → when
    outcomes: Mapping[int, str] = field(default_factory=dict)  # errors that carry a run's save
    asgi: bool = False  # served by app.entry, not by Quart
    operation_id: str = ""  # default: the Quart endpoint


RUN = {"run_id": "a run's id; another user's run is 404"}
BUSY = ("`busy`: too many runs are queued (AGENTD_MAX_QUEUED_RUNS); `unavailable`: the "
        "database is unavailable")
STREAM_BUSY = "`busy`: this web process has AGENTD_MAX_OPEN_STREAMS streams open"
SESSION_404 = "no such session (`session_id` unknown, or another user's)"
SHUTDOWN_503 = ("; `server_shutdown`: the run was interrupted by a shutdown; the body also "
                "carries what was saved, as for 409")
KB_503 = ("`embedding_unavailable` (the embedding process is restarting), `busy` (its queue "
          "is full) or `unavailable` (the database)")
CHAT_OUTCOMES = {409: "`cancelled`: the run was cancelled; what was saved comes with it",
                 502: "`llm_error`: the LLM failed after its retries and the fallback",
                 504: "`timeout`: the run reached its time limit; the partial answer is kept"}

OPERATIONS: dict[str, Operation] = {
    "GET /live": Operation("Liveness", "200 while the process runs; checks nothing else.",
                           replies={200: json_reply(r.Live, "the process runs")}),
    "GET /ready": Operation(
        "Readiness", "Whether this instance should get traffic.", replies={
            200: json_reply(r.Ready, "ready"),
            503: json_reply(r.NotReady, "`starting`, `draining`, or `degraded` (PostgreSQL "
                            "or Redis does not answer)", "Retry-After")}),
    "GET /health": Operation("The dependencies' health", replies={
        200: json_reply(r.Health, "PostgreSQL and Redis answer"),
        503: json_reply(r.Health, "PostgreSQL or Redis does not")}),
    "GET /metrics": Operation("Prometheus metrics of the whole tree", replies={
        200: Reply("Prometheus text format", {"text/plain": {"type": "string"}})}),
    "GET /openapi.json": Operation("This document", replies={
        200: json_reply({"type": "object"}, "OpenAPI 3.1")}),
    "GET /docs": Operation("Where the API is described", replies={
        200: Reply("an HTML page that links to /openapi.json", {"text/html": {
            "type": "string"}})}),
    "POST /api/chat": Operation(
        "Chat: a run, answered when it ends",
        "Creates a run and waits for its end. A run that did not complete answers with an "
        "error that carries what was saved (its partial answer).",
        body=ChatRequest, replies={200: json_reply(r.ChatAnswer, "the run completed")},
        errors={404: SESSION_404, 422: "", 503: BUSY + SHUTDOWN_503},
        outcomes=CHAT_OUTCOMES),
    "POST /api/chat/stream": Operation(
        "Chat, streamed as server-sent events",
        "The run's events as they happen: `run` first, exactly one `end` last.",
        body=StreamRequest, asgi=True, operation_id="chat_stream",
        replies={200: sse_reply("the run's events")},
        errors={404: SESSION_404, 422: "", 503: f"{STREAM_BUSY}; {BUSY}"}),
    "POST /api/runs": Operation(
        "Queue a run", "Follow it with GET /api/runs/{run_id} or its events.",
        body=RunRequest, replies={202: json_reply(r.RunCreated, "queued")},
        errors={404: SESSION_404, 422: "", 503: BUSY}),
    "GET /api/runs/{run_id}": Operation(
        "A run", path=RUN, replies={200: json_reply(r.Run, "the run as committed")},
        errors={404: "no such run"}),
    "GET /api/runs/{run_id}/events": Operation(
        "A run's events as server-sent events",
        "Replays the run's events from the start, or after `Last-Event-ID`, then follows "
        "them live until its `end`.",
        path=RUN, asgi=True, operation_id="run_events",
        headers={"Last-Event-ID": "replay after this event id (`<ms>-<seq>`, as sent in "
                                  "`id:`); another value replays from the start"},
        replies={200: sse_reply("the run's events")},
        errors={404: "no such run", 503: STREAM_BUSY}),
    "POST /api/runs/{run_id}/cancel": Operation(
        "Cancel a run", "The run ends with reason `cancelled` (a finished one is left as is).",
        path=RUN, replies={202: json_reply(r.Cancelling, "asked")},
        errors={404: "no such run"}),
    "GET /api/sessions/{session_id}/messages": Operation(
        "A session's messages", path={"session_id": "from an answer or a run"},
        replies={200: json_reply(r.Messages, "the messages")}, errors={404: SESSION_404}),
    "GET /api/tools": Operation("The tools", replies={
        200: json_reply(r.Tools, "the tools a run is offered")}),
    "POST /api/tools/{name}": Operation(
        "Call a tool", "Arguments that do not fit the tool's `parameters` are a 200 with "
        "`success: false` and the reason in `error`.",
        path={"name": "a tool from GET /api/tools"}, body=ToolArguments, body_required=False,
        replies={200: json_reply(r.ToolOutcome, "the tool's outcome")},
        errors={400: "the arguments are not valid JSON, or not a JSON object",
                404: "no tool of that name"}),
    "POST /api/batches": Operation(
        "Queue a batch of runs", "Each message is its own run, queued by priority.",
        body=BatchRequest, replies={202: json_reply(r.BatchCreated, "all queued")},
        errors={404: SESSION_404, 422: "", 503: "`busy`: the queue has no room for the "
                "whole batch; none of it was accepted"}),
    "GET /api/batches/{batch_id}": Operation(
        "A batch", path={"batch_id": "from POST /api/batches"},
        replies={200: json_reply(r.Batch, "its runs")}, errors={404: "no such batch"}),
    "GET /api/status": Operation("Counts for operators", replies={
        200: json_reply(r.Status, "streams, runs by status, every process")}),
    "POST /api/documents": Operation(
        "Add a document to the knowledge base",
        "The same `source` again (or, without one, the same text) replaces the earlier "
        "document and keeps its `document_id`.",
        body=DocumentRequest, replies={201: json_reply(r.DocumentAdded, "indexed")},
        errors={422: "", 503: KB_503 + ", or `conflict`: deleted while being added"}),
    "GET /api/documents": Operation(
        "The caller's documents", query=DocumentListQuery,
        replies={200: json_reply(r.Documents, "a page of them")},
        errors={422: "`limit` or `offset` out of range", 503: "`unavailable`: the database"}),
    "DELETE /api/documents/{document_id}": Operation(
        "Delete a document", "Its chunks are gone from search.",
        path={"document_id": "from POST /api/documents"},
        replies={204: Reply("deleted")}, errors={404: "no such document", 503: KB_503}),
    "GET /api/search": Operation(
        "Search the knowledge base", "The caller's chunks closest to `q`.", query=SearchQuery,
        replies={200: json_reply(r.SearchResults, "the closest chunks")},
        errors={422: "`q` or `k` out of range", 503: KB_503}),
    "POST /v1/chat/completions": Operation(
        "OpenAI-compatible chat completion",
        "An agentd run behind OpenAI's API. Streamed, an interrupted answer ends with a chunk "
        "whose `finish_reason` is `length` and whose `agentd` object has the reason; then "
        "`data: [DONE]`.",
        body=ChatCompletionRequest, asgi=True, operation_id="chat_completions",
        replies={200: Reply("a `chat.completion`, or with `stream: true` server-sent "
                            "`chat.completion.chunk`s then `data: [DONE]`", {
                                "application/json": r.ChatCompletion,
                                "text/event-stream": {"type": "string"}})},
        errors={400: "bad JSON, or a field OpenAI would refuse (`param` names it)",
                404: SESSION_404, 503: BUSY + SHUTDOWN_503},
        outcomes=CHAT_OUTCOMES),
    "GET /v1/models": Operation("OpenAI-compatible model list", replies={
        200: json_reply(r.ModelList, "the one model agentd answers with")}),
    "GET /v1/models/{model}": Operation(
        "An OpenAI-compatible model", path={"model": "a model id (may contain `/`)"},
        replies={200: json_reply(r.Model, "the model")},
        errors={404: "`model_not_found`: not the model agentd answers with"}),
}


def openapi_document(app: Quart, settings: Settings,
                     path_values: Mapping[str, Mapping[str, list[str]]]) -> dict[str, Any]:
    """The document. `path_values`: the values a path parameter can take, known only at run
    time (the tool names), by path."""
    operations = list(_discover(app))
    models = _models(o for _, _, o, _ in operations)
    refs, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    schemas = {**_limited(defs.get("$defs", {}), settings), **ERROR_SCHEMAS, "RunEvent": RUN_EVENT}
    paths: dict[str, Any] = {}
    for method, path, op, operation_id in operations:
        build = _Builder(settings, refs, path_values.get(path, {}))
        paths.setdefault(path, {})[method.lower()] = build.operation(path, op, operation_id)
    components: dict[str, Any] = {"schemas": dict(sorted(schemas.items())),
                                  "headers": HEADERS, "parameters": PARAMETERS}
    if settings.auth_enabled:
        components["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "a key from AGENTD_API_KEYS, or an HS256 JWT whose `sub` is the "
                           "user (with an `exp`)"}}
    return {"openapi": "3.1.0", "info": INFO, "paths": paths, "components": components}


def _discover(app: Quart) -> Iterator[tuple[str, str, Operation, str]]:
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            op = OPERATIONS.get(f"{method} {path}") or _undocumented(
                app.view_functions.get(rule.endpoint), rule.endpoint)
            yield method, path, op, op.operation_id or rule.endpoint
    for key, op in OPERATIONS.items():
        if op.asgi:
            method, path = key.split(" ", 1)
            yield method, path, op, op.operation_id


def _undocumented(view: Callable[..., Any] | None, endpoint: str) -> Operation:
    doc = (getattr(view, "__doc__", None) or "").strip().split("\n")[0]
    return Operation(doc or endpoint.replace("_", " "), replies={})


def _models(operations: Iterator[Operation]) -> list[type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}
    for op in operations:
        schemas: list[Any] = [op.body, *(c for reply in op.replies.values()
                                         for c in reply.content.values())]
        for schema in schemas:
            if isinstance(schema, type) and issubclass(schema, BaseModel):
                found[schema.__name__] = schema
    return list(found.values())


def _limited(schemas: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """AGENTD_MAX_MESSAGE_CHARS, where it is lower than a model's own maximum."""
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.pop(MESSAGE_LIMIT, None):
                node["maxLength"] = min(node["maxLength"], settings.max_message_chars)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schemas)
    return schemas


@dataclass
class _Builder:
    settings: Settings
    refs: Mapping[Any, dict[str, Any]]  # (model, mode) → its $ref
    path_values: Mapping[str, list[str]]

    def schema(self, schema: Schema | None) -> dict[str, Any] | None:
        if isinstance(schema, type):
            return dict(self.refs[(schema, "validation")])
        return schema

    def operation(self, path: str, op: Operation, operation_id: str) -> dict[str, Any]:
        out: dict[str, Any] = {"summary": op.summary, "operationId": operation_id}
        if op.description:
            out["description"] = op.description
        out["parameters"] = [*self.path_parameters(path, op), *self.query(op),
                             *({"name": name, "in": "header", "required": False,
                                "description": meaning, "schema": {"type": "string"}}
                               for name, meaning in op.headers.items()),
                             {"$ref": "#/components/parameters/RequestId"}]
        if op.body is not None:
            out["requestBody"] = {"required": op.body_required, "content": {
                "application/json": {"schema": self.schema(op.body)}}}
        out["responses"] = self.responses(path, op)
        if _guarded(path) and self.settings.auth_enabled:
            out["security"] = [{"bearer": []}]
        return out

    def path_parameters(self, path: str, op: Operation) -> Iterator[dict[str, Any]]:
        for name in re.findall(r"\{(\w+)\}", path):
            schema: dict[str, Any] = {"type": "string"}
            if name in self.path_values:
                schema["enum"] = list(self.path_values[name])
            param = {"name": name, "in": "path", "required": True, "schema": schema}
            yield param | ({"description": op.path[name]} if name in op.path else {})

    def query(self, op: Operation) -> Iterator[dict[str, Any]]:
        if op.query is None:
            return
        schema = op.query.model_json_schema()
        for name, prop in schema["properties"].items():
            yield {"name": name, "in": "query", "required": name in schema.get("required", ()),
                   "description": prop.get("description", ""),
                   "schema": {k: v for k, v in prop.items() if k not in ("title",
                                                                          "description")}}

    def responses(self, path: str, op: Operation) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for status, reply in op.replies.items():
            out[str(status)] = self.response(reply)
        for status, (description, shape) in sorted(self.errors(path, op).items()):
            headers = {429: ("Retry-After",), 503: ("Retry-After",),
                       401: ("WWW-Authenticate",)}.get(status, ())
            out[str(status)] = self.response(json_reply(
                {"$ref": REF.format(model=shape)}, description, *headers))
        if not op.replies:
            out["default"] = {"description": "not documented yet: see the route's code"}
        return dict(sorted(out.items()))

    def response(self, reply: Reply) -> dict[str, Any]:
        out: dict[str, Any] = {"description": reply.description, "headers": {
            name: {"$ref": f"#/components/headers/{name}"}
            for name in ("X-Request-ID", "X-Process-Time", *reply.headers)}}
        if reply.content:
            out["content"] = {media: {"schema": self.schema(schema)} if schema else {}
                              for media, schema in reply.content.items()}
        return out

    def errors(self, path: str, op: Operation) -> dict[int, tuple[str, str]]:
        """Every error the route can answer with: (when, its schema's name)."""
        openai = path.startswith("/v1/")
        plain, outcome = ("OpenAIError", "CompletionOutcome") if openai else (
            "Error", "ChatOutcome")
        when: dict[int, str] = {}
        if op.body is not None:
            when[400] = "the body is not valid JSON, or not a JSON object"
            when[413] = f"the body is over {self.settings.max_body_bytes} bytes"
        if _guarded(path):
            if self.settings.auth_enabled:
                when[401] = "no valid bearer token (`unauthorized`)"
            if self.settings.rate_limit:
                when[429] = f"over the rate limit of {self.settings.rate_limit} (`rate_limited`)"
            when[503] = "`draining`: agentd is shutting down"
        for status, text in op.errors.items():
            text = text or DEFAULT_WHEN[status]
            # A route's own 503s come on top of the drain's; its 400 replaces the default.
            when[status] = f"{text}; {when[503]}" if status == 503 and 503 in when else text
        found = {status: (text, plain) for status, text in when.items()}
        found.update({status: (text, outcome) for status, text in op.outcomes.items()})
        return found


def _guarded(path: str) -> bool:
    return path.startswith(("/api/", "/v1/"))


DEFAULT_WHEN = {422: "a well-formed body or query that fails validation (`validation_error`; "
                     "`message` names the field)"}

INFO = {
    "title": "agentd", "version": VERSION,
    "description": (
        "A backend for AI agents: chat, runs and their events, tools, a knowledge base, "
        "batches, and an OpenAI-compatible /v1.\n\n"
        "JSON in and out; unknown fields in a body are ignored, and a body's `user_id` is "
        "never read (the user is who authenticated). Errors are `{\"error\": {\"code\", "
        "\"message\"}}` (components.schemas.Error); under /v1 they are OpenAI's shape. A "
        "503 or 429 says when to retry in `Retry-After`. Another user's object is a 404."),
}

HEADERS = {
    "X-Request-ID": {"description": "the client's X-Request-ID (its first 200 characters), "
                                    "or one made for the request",
                     "schema": {"type": "string"}},
    "X-Process-Time": {"description": "seconds the request took to answer",
                       "schema": {"type": "string"}},
    "Retry-After": {"description": "seconds to wait before retrying",
                    "schema": {"type": "string"}},
    "WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}},
}

PARAMETERS = {"RequestId": {
    "name": "X-Request-ID", "in": "header", "required": False,
    "description": "echoed in the answer's X-Request-ID and in the logs",
    "schema": {"type": "string"}}}
