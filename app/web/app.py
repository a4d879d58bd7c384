"""The web app: shared state, the ASGI entry (request ids, timing, in-flight accounting,
drain refusals) and the Quart app with the health routes. /api routes live in api.py."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from app import metrics
from app.db.pool import DatabaseUnavailable
from app.embedding.client import EmbeddingClient, EmbeddingError, default_socket_path
from app.events import EventHub
from app.redis import RedisClient, RedisUnavailable
from app.redis import ping as redis_ping
from app.web.auth import Authenticator, ClientAddress
from app.web.errors import ApiError, RateLimited, Unavailable, error_json, openai_error_json
from app.web.ratelimit import RateLimiter

if TYPE_CHECKING:
    import httpx

    from app.config import Settings
    from app.db.pool import Database
    from app.lifecycle import Lifecycle

log = structlog.get_logger("web")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEALTH_CACHE_S = 1.0
DISCARD_BODY_S = 1.0  # how long a refused request's body may take to arrive
#: How long /health waits for the embedding process (over its unix socket: it answers in ms).
EMBEDDING_CHECK_S = 1.0
STREAM_PATHS = ("/api/chat/stream",)
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
OPEN_PATHS = ("/live", "/ready", "/health", "/metrics", "/openapi.json", "/docs")


@dataclass
class WebState:
    settings: Settings
    life: Lifecycle
    db: Database
    redis: RedisClient
    http: httpx.AsyncClient
    started_at: float = field(default_factory=time.time)
    in_flight: int = 0
    open_streams: int = 0
    _quiet: trio.Event = field(default_factory=trio.Event)
    _health: tuple[float, dict[str, Any]] | None = None
    #: `end` events sent to clients since the drain began, by reason (for the summary).
    ends_during_drain: dict[str, int] = field(default_factory=dict)
    hub: EventHub = field(init=False)
    #: The embedding process (knowledge base, /health), one client for the process's life:
    #: made here (it connects lazily), closed when `serve_background` ends.
    embedding: EmbeddingClient = field(init=False)

    def __post_init__(self) -> None:
        self.hub = EventHub(self.redis)
        self.embedding = EmbeddingClient(default_socket_path(self.settings))

    async def serve_background(self, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.hub.serve)
                nursery.start_soon(self._wake_streams_at_drain)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
                await self.embedding.aclose()

    async def _wake_streams_at_drain(self) -> None:
        # A stream with nothing to relay (its run still queued, or its agent gone) would
        # otherwise learn of the drain only at its next keep-alive, after its cutoff.
        await self.life.draining.wait()
        self.hub.wake_all()

    def count_end(self, reason: str) -> None:
        if self.life.draining.is_set():
            self.ends_during_drain[reason] = self.ends_during_drain.get(reason, 0) + 1
            metrics.shutdown_streams.labels(reason).inc()

    def stream_cutoff(self) -> float:
        """When a draining stream stops waiting for its agent's `end` and sends its own:
        halfway between the drain deadline and this process's own deadline."""
        return self.life.drain_deadline + 0.5 * self._stop_span()

    def _stop_span(self) -> float:
        return max(0.0, self.life.deadline - self.life.drain_deadline)

    def close_connections_at(self) -> float:
        """When connections still open are told to close (hypercorn `terminated`), then cut.

        Soon after the stream cutoff: what is still in flight then is a write to a client
        that stopped reading. The rest of the span is the process's own teardown (a thousand
        connections to unwind, the lifespan, the pools), under load too."""
        return self.life.drain_deadline + 0.65 * self._stop_span()

    def request_started(self) -> None:
        self.in_flight += 1

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._quiet.set()

    async def idle_or_deadline(self) -> None:
        """Return once draining with nothing in flight (the caller bounds it by the deadline)."""
        while self.in_flight > 0:
            self._quiet = trio.Event()
            await self._quiet.wait()

    async def health(self) -> dict[str, Any]:
        """Real checks of the dependencies, cached for a second (probes can be frequent)."""
        now = trio.current_time()
        if self._health is not None and now - self._health[0] < HEALTH_CACHE_S:
            return self._health[1]
        checks: dict[str, Any] = {}
        with trio.move_on_after(2):
            checks["database"] = "ok" if await self.db.ping() else "unavailable"
        checks.setdefault("database", "timeout")
        with trio.move_on_after(2):
            checks["redis"] = "ok" if await redis_ping(self.redis) else "unavailable"
        checks.setdefault("redis", "timeout")
        with trio.move_on_after(EMBEDDING_CHECK_S):
            checks["embedding"] = await self._embedding_check()
        checks.setdefault("embedding", "unavailable")
        checks["llm"] = (
            "configured" if self.settings.llm_configured else "local provider (no LLM configured)"
        )
        # The embedding process is not part of `healthy`: without it chat and runs still
        # work (only the knowledge base answers 503), so /ready keeps this instance serving.
        healthy = checks["database"] == "ok" and checks["redis"] == "ok"
        result = {"status": "healthy" if healthy else "unhealthy", "checks": checks,
                  "timestamp": time.time()}
        self._health = (now, result)
        return result

    async def _embedding_check(self) -> str:
        try:
            answer = await self.embedding.health()
        except EmbeddingError:
            return "unavailable"
        return "ok" if answer.get("status") == "ok" else "unavailable"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status=status, headers=headers,
                    content_type="application/json")


def error_response(error: ApiError) -> Response:
    return Response(error_json(error), status=error.status, headers=error.headers,
                    content_type="application/json")


def create_app(state: WebState) -> ASGIApp:
    app = QuartTrio("agentd", static_folder=None)  # no files served from the working directory
    app.config["MAX_CONTENT_LENGTH"] = state.settings.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True

    @app.get("/live")
    async def live() -> Response:
        return json_response({"status": "alive"})

    @app.get("/ready")
    async def ready() -> Response:
        if state.life.draining.is_set():
            return json_response({"status": "draining"}, 503, {"Retry-After": "5"})
        if state.life.ready_at is None:
            return json_response({"status": "starting"}, 503, {"Retry-After": "1"})
        if (await state.health())["status"] != "healthy":
            return json_response({"status": "degraded"}, 503, {"Retry-After": "5"})
        return json_response({"status": "ready"})

    @app.get("/health")
    async def health() -> Response:
        result = await state.health()
        return json_response(result, 200 if result["status"] == "healthy" else 503)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        extra = metrics.tree_lines(os.environ.get("AGENTD_RUNTIME_DIR"))
        with trio.move_on_after(2):
            active = await state.db.fetchone(
                "SELECT count(DISTINCT session_id) AS n FROM runs"
                " WHERE created_at > now() - interval '15 minutes'")
            extra += metrics.gauge_line("agentd_active_sessions",
                                        "sessions with a run in the last 15 minutes",
                                        float(active["n"]) if active else 0.0)
        body, content_type = metrics.render(extra)
        return Response(body, content_type=content_type)

    @app.errorhandler(ApiError)
    async def api_error(error: ApiError) -> Response:
        return error_response(error)

    @app.errorhandler(DatabaseUnavailable)
    @app.errorhandler(RedisUnavailable)
    async def dependency_down(error: Exception) -> Response:
        api_error = dependency_error(error)
        if request.path.startswith("/v1/"):
            return Response(openai_error_json(api_error), status=api_error.status,
                            headers=api_error.headers, content_type="application/json")
        return error_response(api_error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        # Quart's own refusals (no such route, wrong method, a body over MAX_CONTENT_LENGTH)
        # in our error shape, with the status Quart chose.
        status = error.code or 500
        allow = {k: v for k, v in error.get_headers() if k.lower() == "allow"}
        api_error = ApiError(error.description or error.name, status=status,
                             code=HTTP_ERROR_CODES.get(status, "http_error"), headers=allow)
        if request.path.startswith("/v1/"):
            return Response(openai_error_json(api_error), status=status, headers=allow,
                            content_type="application/json")
        return error_response(api_error)

    from app.web import api, documents, openai_compat

    api.register(app, state)
    documents.register(app, state)
    openai_compat.register(app, state)
    return entry(app, state)  # type: ignore[arg-type]


def dependency_error(error: Exception) -> ApiError:
    """PostgreSQL or Redis down, wherever a route met it: 503, retry shortly (never a 500)."""
    what = "the database" if isinstance(error, DatabaseUnavailable) else "Redis"
    log.warning("dependency_unavailable", what=what, error=str(error))
    return Unavailable(f"{what} is unavailable; retry shortly")


def entry(app: ASGIApp, state: WebState) -> ASGIApp:
    """ASGI wrapper around everything: request id, timing, CORS, drain refusal, who is
    asking (auth), rate limits, in-flight count; then the SSE routes or the Quart app."""
    settings = state.settings
    auth = Authenticator(settings)
    addresses = ClientAddress(settings.trusted_proxies)
    limiter = RateLimiter(state.redis, settings.rate_limit) if settings.rate_limit else None
    cors = set(settings.cors_origins)

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        began = time.perf_counter()
        request_id = (_header(scope, b"x-request-id") or uuid.uuid4().hex)[:200]
        extra = [(b"x-request-id", request_id.encode("latin-1", "replace"))]
        origin = _header(scope, b"origin")
        if cors and origin and ("*" in cors or origin in cors):
            extra += _cors_headers(origin if "*" not in cors else "*")
        path: str = scope["path"]
        guarded = path.startswith(("/api/", "/v1/"))
        status_seen: list[int] = []

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
                elapsed = f"{time.perf_counter() - began:.6f}".encode()
                message["headers"] = [*message.get("headers", []), *extra,
                                      (b"x-process-time", elapsed)]
            await send(message)

        client = addresses.of((scope.get("client") or (None,))[0],
                              _header(scope, b"x-forwarded-for"), _header(scope, b"x-real-ip"))
        scope["agentd.client"] = client
        try:
            if scope["method"] == "OPTIONS" and cors and origin:
                await _send_empty(send_with_headers, 204)
                return
            if guarded and state.life.draining.is_set():
                raise Unavailable("agentd is shutting down; retry on another instance or "
                                  "shortly", code="draining")
            if guarded:
                user = auth.user(_header(scope, b"authorization"))
                scope["agentd.user"] = user
                if limiter is not None:
                    wait = await limiter.hit(user if auth.enabled else client)
                    if wait is not None:
                        metrics.rate_limited.inc()
                        raise RateLimited(f"over the rate limit of {settings.rate_limit}; "
                                          f"retry in {wait:g} s",
                                          headers={"Retry-After": f"{wait:g}"})
        except ApiError as error:
            await _discard_body(receive, settings.max_body_bytes)
            await _send_error(send_with_headers, error, openai=path.startswith("/v1/"))
            _log_request(scope, client, status_seen, began, request_id)
            return
        state.request_started()
        try:
            if path == "/v1/chat/completions":  # raw ASGI, streamed or not (openai_compat.py)
                from app.web.openai_compat import dispatch

                await dispatch(state, scope, receive, send_with_headers)
                return
            if path in STREAM_PATHS or path.endswith("/events"):
                from app.web.api import dispatch_stream

                if await dispatch_stream(state, scope, receive, send_with_headers):
                    return
            await app(scope, receive, send_with_headers)
        except (DatabaseUnavailable, RedisUnavailable) as error:  # the raw routes' own
            if status_seen:
                raise  # a stream already under way: nothing to answer with now
            await _send_error(send_with_headers, dependency_error(error),
                              openai=path.startswith("/v1/"))
        finally:
            state.request_finished()
            _log_request(scope, client, status_seen, began, request_id)

    return asgi


def _log_request(scope: Scope, client: str, status: list[int], began: float,
                 request_id: str) -> None:
    elapsed = time.perf_counter() - began
    route = _route(scope["path"], status[0] if status else 0)
    metrics.http_requests.labels(route, scope["method"], str(status[0] if status else 0)).inc()
    metrics.http_duration.labels(route).observe(elapsed)
    log.info("request", method=scope["method"], path=scope["path"], client=client,
             status=status[0] if status else None, request_id=request_id,
             duration_ms=round((time.perf_counter() - began) * 1000, 2))


_ID_SEGMENT = re.compile(r"/(?:[0-9a-fA-F-]{16,}|\d+)(?=/|$)")


def _route(path: str, status: int) -> str:
    """A low-cardinality route label: ids become {id}; unknown paths are one label."""
    if status == 404 and not path.startswith(("/api/", "/v1/")):
        return "unmatched"
    return _ID_SEGMENT.sub("/{id}", path)[:100]


def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin.encode()),
            (b"access-control-allow-headers",
             b"authorization, content-type, last-event-id, x-request-id"),
            (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
            (b"access-control-expose-headers", b"x-request-id, x-process-time, retry-after"),
            (b"vary", b"origin")]


async def _send_empty(send: Send, status: int) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _discard_body(receive: Receive, limit: int) -> None:
    """Read (and drop) a request body we refuse before looking at it (401, 429, draining):
    left unread, h11 cannot start the next request on the connection and hypercorn closes
    it, which a client reusing the connection meets as "disconnected without a response".
    Bounded in size and time: a body too large or too slow just has its connection closed."""
    seen = 0
    with trio.move_on_after(DISCARD_BODY_S):
        while seen <= limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


async def _send_error(send: Send, error: ApiError, *, openai: bool = False) -> None:
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    body = openai_error_json(error) if openai else error_json(error)
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
