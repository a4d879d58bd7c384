"""The /api routes. Validation errors, ownership and limits become `ApiError`s; errors.py
decides the status codes. The SSE routes are dispatched to streams.py as raw ASGI."""

from __future__ import annotations

import json
import os
import re
import time
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
import trio
from pydantic import BaseModel, ValidationError
from quart import Quart, Response, request

from app.agent.tools.knowledge import acting_for
from app.agent.toolset import tools_for
from app.db import runs as q
from app.db.pool import DatabaseUnavailable
from app.events import encode, read_after, stream_key
from app.web import streams
from app.web.errors import (
    ApiError,
    BadJson,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    ValidationFailed,
    error_json,
    outcome_error,
)
from app.web.models import BatchRequest, ChatRequest, RunRequest, StreamRequest, ToolArguments

if TYPE_CHECKING:
    from collections.abc import MutableMapping

    from app.web.app import Receive, Send, WebState

log = structlog.get_logger("web")
M = TypeVar("M", bound=BaseModel)

EVENTS_PATH = re.compile(r"^/api/runs/([^/]+)/events$")
CHAT_WAIT_MARGIN = 10.0


def parse_body(raw: bytes | str, model: type[M], limit: int) -> M:
    if len(raw) > limit:
        raise PayloadTooLarge(f"the request body is over {limit} bytes")
    try:
        data = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError):
        raise BadJson("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadJson("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ValidationFailed(f"{where}: {first['msg']}") from None


def owner_of(scope: Any) -> str:
    """The authenticated user, set on the ASGI scope by the entry (app.entry)."""
    return str(scope.get("agentd.user", "local"))


async def create(state: WebState, body: ChatRequest, owner: str, on_disconnect: str
                 ) -> q.NewRun:
    settings = state.settings
    if len(body.message) > settings.max_message_chars:
        raise ValidationFailed(f"message: at most {settings.max_message_chars} characters")
    cache = body.cache if body.cache is not None else settings.cache_default == "on"
    try:
        return await state.db.run(lambda c: q.create_run(
            c, owner=owner, message=body.message, session_id=body.session_id,
            on_disconnect=on_disconnect, timeout_s=body.timeout, cache=cache,
            max_queued=settings.max_queued_runs))
    except q.NotFoundError:
        raise NotFound("no such session") from None
    except q.QueueFull:
        raise Unavailable("too much work is queued; retry shortly", code="busy",
                          retry_after=5) from None
    except DatabaseUnavailable:
        raise Unavailable("the database is unavailable; retry shortly") from None


async def get_run(state: WebState, run_id: str, owner: str) -> dict[str, Any]:
    try:
        return await state.db.run(lambda c: q.get_run(c, run_id, owner))
    except q.NotFoundError:
        raise NotFound("no such run") from None


def run_view(row: dict[str, Any]) -> dict[str, Any]:
    started, finished = row.get("started_at"), row.get("finished_at")
    duration = (finished - started).total_seconds() * 1000 if started and finished else None
    return {
        "run_id": row["run_id"], "session_id": row["session_id"], "status": row["status"],
        "output": row["output"], "reason": row["reason"], "detail": row["detail"],
        "message_id": row["message_id"], "fallback": row["fallback"],
        "iterations": row["iterations"], "usage": row["usage"] or {},
        "cached": row["cached"], "priority": row["priority"], "attempts": row["attempts"],
        "duration_ms": round(duration, 1) if duration is not None else None,
        "created_at": row["created_at"].isoformat(),
    }


async def cancel_queued(state: WebState, run_id: str) -> bool:
    """A queued run has no agent to tell: end it here. False when it is not queued."""
    def end_if_queued(conn: Any) -> str | None:
        row = conn.execute("SELECT status FROM runs WHERE id = %s FOR UPDATE",
                           (run_id,)).fetchone()
        if row is None or row[0] != "queued":
            return None
        run = q.get_run(conn, run_id, None)
        return q.finish(conn, run=run, reason="cancelled", content="", tool_calls=[],
                        tool_results=[], detail="the run was cancelled before it started",
                        iterations=0, usage={}, fallback=None)

    message_id = await state.db.run(end_if_queued)
    if message_id is None:
        return False
    await state.redis.xadd(stream_key(run_id), {"t": "end", "d": encode(
        "end", run_id, reason="cancelled", message_id=message_id, resumable=False,
        detail="the run was cancelled before it started")})
    return True


async def wait_for_end(state: WebState, run_id: str, limit: float) -> None:
    sub = state.hub.subscribe(run_id, "0-0")
    try:
        if any(e.type == "end" for e in await read_after(state.redis, run_id, None)):
            return
        with trio.move_on_after(limit):
            while True:
                if any(e.type == "end" for e in await sub.get()):
                    return
    finally:
        sub.close()


def register(app: Quart, state: WebState) -> None:
    from app.web.app import json_response

    tools = tools_for(state.settings, state.http, state.embedding)
    limit = state.settings.max_body_bytes

    @app.post("/api/chat")
    async def chat() -> Response:
        body = parse_body(await request.get_data(), ChatRequest, limit)
        owner = owner_of(request.scope)
        new = await create(state, body, owner, "continue")
        run_limit = min(body.timeout or state.settings.run_timeout, state.settings.run_timeout)
        await wait_for_end(state, new.run_id, run_limit + CHAT_WAIT_MARGIN)
        row = await get_run(state, new.run_id, owner)
        view = run_view(row)
        result = {"response": view["output"], "session_id": new.session_id,
                  "message_id": view["message_id"], "run_id": new.run_id,
                  "reason": view["reason"], "iterations": view["iterations"],
                  "duration_ms": view["duration_ms"], "usage": view["usage"],
                  "cached": view["cached"]}
        if row["status"] == "completed":
            return json_response(result)
        reason = row["reason"] or "server_shutdown"
        message = row["detail"] or "the run did not complete; the partial answer is saved"
        raise outcome_error(reason, message, {k: result[k] for k in
                                              ("run_id", "message_id", "response")})

    @app.post("/api/runs")
    async def create_run() -> Response:
        body = parse_body(await request.get_data(), RunRequest, limit)
        new = await create(state, body, owner_of(request.scope), body.on_disconnect)
        return json_response({"run_id": new.run_id, "session_id": new.session_id,
                              "status": "queued"}, 202)

    @app.get("/api/runs/<run_id>")
    async def read_run(run_id: str) -> Response:
        return json_response(run_view(await get_run(state, run_id, owner_of(request.scope))))

    @app.post("/api/runs/<run_id>/cancel")
    async def cancel(run_id: str) -> Response:
        row = await get_run(state, run_id, owner_of(request.scope))
        if row["status"] in q.FINAL:
            return json_response({"run_id": run_id, "status": row["status"]}, 202)
        await streams.request_cancel(state, run_id)
        return json_response({"run_id": run_id, "status": "cancelling"}, 202)

    @app.get("/api/sessions/<session_id>/messages")
    async def messages(session_id: str) -> Response:
        try:
            rows = await state.db.run(lambda c: q.messages(c, session_id,
                                                           owner_of(request.scope)))
        except q.NotFoundError:
            raise NotFound("no such session") from None
        for row in rows:
            row["created_at"] = row["created_at"].isoformat()
        return json_response({"session_id": session_id, "messages": rows})

    @app.get("/api/tools")
    async def list_tools() -> Response:
        return json_response({"tools": [
            {"name": t.name, "description": t.description, "parameters": t.parameters}
            for t in tools.tools()]})

    @app.post("/api/tools/<name>")
    async def call_tool(name: str) -> Response:
        raw = await request.get_data(as_text=False)
        if name not in tools:
            raise NotFound(f"no tool named {name!r}")
        try:
            arguments = json.loads(raw) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError):
            raise BadJson("the arguments are not valid JSON") from None
        try:
            checked = ToolArguments.model_validate(arguments)
        except ValidationError:
            raise BadJson("the arguments must be a JSON object") from None
        with acting_for(owner_of(request.scope)):  # whose knowledge base (tools/knowledge.py)
            outcome = await tools.call(name, checked.root)
        return json_response({"success": outcome.success, "result": outcome.result,
                              "error": outcome.error})

    @app.post("/api/batches")
    async def create_batch() -> Response:
        body = parse_body(await request.get_data(), BatchRequest, limit)
        owner = owner_of(request.scope)
        cache = body.cache if body.cache is not None else state.settings.cache_default == "on"
        too_long = [i for i, m in enumerate(body.messages)
                    if len(m) > state.settings.max_message_chars]
        if too_long:
            raise ValidationFailed(f"messages.{too_long[0]}: at most "
                                   f"{state.settings.max_message_chars} characters")
        try:
            batch_id, run_ids = await state.db.run(partial(
                q.create_batch, owner=owner, messages=body.messages, priority=body.priority,
                session_id=body.session_id, cache=cache,
                max_queued=state.settings.max_queued_runs))
        except q.NotFoundError:
            raise NotFound("no such session") from None
        except q.QueueFull:
            raise Unavailable("the queue is full; nothing of this batch was accepted, retry "
                              "shortly", code="busy", retry_after=10) from None
        return json_response({"batch_id": batch_id, "run_ids": run_ids}, 202)

    @app.get("/api/batches/<batch_id>")
    async def read_batch(batch_id: str) -> Response:
        try:
            rows = await state.db.run(partial(q.get_batch, batch_id=batch_id,
                                              owner=owner_of(request.scope)))
        except q.NotFoundError:
            raise NotFound("no such batch") from None
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        done = sum(counts.get(s, 0) for s in q.FINAL)
        status = ("done" if done == len(rows) else
                  "queued" if counts.get("queued", 0) == len(rows) else "running")
        return json_response({"batch_id": batch_id, "status": status, "counts": counts,
                              "runs": rows})

    @app.get("/api/status")
    async def status() -> Response:
        return json_response(await status_view(state))

    document: list[bytes] = []  # made at the first request (~20 ms), all routes registered

    @app.get("/openapi.json")
    async def openapi() -> Response:
        if not document:
            from app.web.openapi import openapi_document  # it imports documents.py: us too

            document.append(json.dumps(openapi_document(app, state.settings, {
                "/api/tools/{name}": {"name": tools.names()}})).encode())
        return Response(document[0], content_type="application/json")

    @app.get("/docs")
    async def docs() -> Response:
        return Response(DOCS_HTML, content_type="text/html")


async def status_view(state: WebState) -> dict[str, Any]:
    """Counts for operators: this process's streams, runs by status, every process's state."""
    runs_by_status = await state.db.run(q.counts_by_status)
    tree: dict[str, Any] = {}
    path = os.environ.get("AGENTD_RUNTIME_DIR")
    if path:
        try:
            tree = json.loads(await trio.Path(path, "tree.json").read_text())
        except (OSError, ValueError):
            tree = {}
    started = tree.get("supervisor", {}).get("started_at")
    return {
        "version": "0.1.0",
        "uptime_s": round(time.time() - started, 1) if started else None,
        "open_streams": state.open_streams,
        "requests_in_flight": state.in_flight,
        "draining": state.life.draining.is_set(),
        "runs": runs_by_status,
        "processes": tree.get("children", []),
        "restarts_by_role": tree.get("restarts_by_role", {}),
    }


DOCS_HTML = """<!doctype html><title>agentd API</title>
<h1>agentd API</h1><p>The OpenAPI document is at <a href="/openapi.json">/openapi.json</a>.</p>"""


async def dispatch_stream(state: WebState, scope: MutableMapping[str, Any], receive: Receive,
                          send: Send) -> bool:
    """Serve the SSE routes; False when the request is for another route."""
    path, method = scope["path"], scope["method"]
    try:
        if path == "/api/chat/stream" and method == "POST":
            body = parse_body(await read_body(receive, state.settings.max_body_bytes),
                              StreamRequest, state.settings.max_body_bytes)
            check_stream_capacity(state)
            new = await create(state, body, owner_of(scope), body.on_disconnect)
            await streams.stream(state, scope, receive, send, run_id=new.run_id,
                                 session_id=new.session_id, status="queued", last_id=None,
                                 on_disconnect=body.on_disconnect)
            return True
        match = EVENTS_PATH.match(path)
        if match and method == "GET":
            check_stream_capacity(state)
            row = await get_run(state, match.group(1), owner_of(scope))
            last = _header(scope, b"last-event-id")
            await streams.stream(state, scope, receive, send, run_id=row["run_id"],
                                 session_id=row["session_id"], status=row["status"],
                                 last_id=last if last and _valid_id(last) else None,
                                 on_disconnect="continue")
            return True
    except ApiError as e:
        headers = [(b"content-type", b"application/json")]
        headers += [(k.lower().encode(), v.encode()) for k, v in e.headers.items()]
        await send({"type": "http.response.start", "status": e.status, "headers": headers})
        await send({"type": "http.response.body", "body": error_json(e)})
        return True
    return False


def check_stream_capacity(state: WebState) -> None:
    if state.open_streams >= state.settings.max_open_streams:
        raise Unavailable("this web process has too many open streams; retry shortly",
                          code="busy")


async def read_body(receive: Receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadJson("the client went away before sending its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _header(scope: MutableMapping[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _valid_id(event_id: str) -> bool:
    return re.fullmatch(r"\d{1,20}-\d{1,20}", event_id) is not None
