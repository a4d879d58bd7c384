"""/openapi.json (app/web/openapi.py) against the app that serves it: a valid OpenAPI 3.1
document with every route in it, whose bodies, query strings, limits, replies and errors are
what the routes do.

The app runs in-process (`create_app` behind its ASGI entry, no tree) over fakes that fail
the way an outage does: a request that gets past validation reaches PostgreSQL or the
embedding process and is answered 503, so "accepted" is "not 400, 413 or 422".
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlencode

import pytest
import trio
from quart_trio import QuartTrio

import app.web.app as web_app
from app.config import Settings
from app.db import documents as document_rows
from app.db import runs as q
from app.db.pool import DatabaseUnavailable
from app.embedding.client import EmbeddingUnavailable
from app.lifecycle import Lifecycle
from app.web import responses
from app.web.api import run_view, status_view
from app.web.documents import DocumentListQuery, DocumentRequest, SearchQuery
from app.web.models import (
    NO_NUL,
    NOT_BLANK,
    BatchRequest,
    ChatCompletionRequest,
    ChatRequest,
    RunRequest,
    StreamRequest,
    ToolArguments,
)
from app.web.openai_compat import completion_body
from app.web.openapi import OPERATIONS, openapi_document

jsonschema = pytest.importorskip("jsonschema")

BODIES = {"POST /api/chat": ChatRequest, "POST /api/chat/stream": StreamRequest,
          "POST /api/runs": RunRequest, "POST /api/batches": BatchRequest,
          "POST /api/tools/{name}": ToolArguments, "POST /api/documents": DocumentRequest,
          "POST /v1/chat/completions": ChatCompletionRequest}
QUERIES = {"GET /api/search": SearchQuery, "GET /api/documents": DocumentListQuery}
REFUSED = (400, 413, 422)


# The app, in-process -------------------------------------------------------------------------


class FakeDatabase:
    """Down: every statement fails as an outage does (QueueFull for a batch, whose route
    maps only that). `error` may be set to another exception for one test."""

    def __init__(self) -> None:
        self.error: Exception = DatabaseUnavailable("down")
        self.rows: list[dict[str, Any]] = []

    async def run(self, fn: Any) -> Any:
        func = getattr(fn, "func", fn)
        if func is q.counts_by_status:
            return {"queued": 1}
        if func is document_rows.list_documents:
            return self.rows
        if func is q.create_batch:
            raise q.QueueFull
        if func is document_rows.mark_unindexed and isinstance(self.error, q.NotFoundError):
            return False  # how the documents' queries say "no such document"
        raise self.error

    async def fetchone(self, *args: Any) -> None:
        return None

    async def ping(self) -> bool:
        return False


class FakeRedis:
    async def ping(self) -> None:
        raise ConnectionRefusedError


class FakeEmbedding:
    def __init__(self) -> None:
        self.hits: list[dict[str, Any]] | None = None

    async def search(self, query: str, k: int, owner: str) -> list[dict[str, Any]]:
        if self.hits is None:
            raise EmbeddingUnavailable("down")
        return self.hits

    async def health(self) -> dict[str, Any]:
        raise EmbeddingUnavailable("down")

    async def aclose(self) -> None:
        pass


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Served:
    asgi: Any
    quart: QuartTrio
    state: web_app.WebState
    db: FakeDatabase

    async def call(self, method: str, path: str, body: Any = None, query: str = "",
                   headers: dict[str, str] | None = None) -> Answer:
        raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(
            body).encode()
        pending = [raw]
        sent: list[dict[str, Any]] = []
        done = trio.Event()

        async def receive() -> dict[str, Any]:
            if pending:
                return {"type": "http.request", "body": pending.pop(), "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        head = [(b"content-length", str(len(raw)).encode()),
                (b"content-type", b"application/json")]
        head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
                 "query_string": query.encode(), "headers": head, "http_version": "1.1",
                 "scheme": "http", "client": ("127.0.0.1", 5000),
                 "server": ("127.0.0.1", 8000), "root_path": ""}
        with trio.fail_after(10):
            await self.asgi(scope, receive, send)
        start = sent[0]
        return Answer(start["status"],
                      {k.decode(): v.decode() for k, v in start.get("headers", [])},
                      b"".join(m.get("body", b"") for m in sent[1:]))

    async def document(self) -> dict[str, Any]:
        answer = await self.call("GET", "/openapi.json")
        assert answer.status == 200
        return answer.json()  # type: ignore[no-any-return]


@pytest.fixture
def serve(monkeypatch, tmp_path):
    def make(**settings: Any) -> Served:
        quart: list[QuartTrio] = []
        entry = web_app.entry

        def capture(app: QuartTrio, state: web_app.WebState) -> Any:
            quart.append(app)
            return entry(app, state)

        monkeypatch.setattr(web_app, "entry", capture)
        db = FakeDatabase()
        state = web_app.WebState(
            settings=Settings(data_dir=tmp_path, **settings),
            life=Lifecycle(role="web", timeout=30, reserve=5), db=db,  # type: ignore[arg-type]
            redis=FakeRedis(), http=SimpleNamespace())  # type: ignore[arg-type]
        state.embedding = FakeEmbedding()  # type: ignore[assignment]
        asgi = web_app.create_app(state)
        return Served(asgi, quart[0], state, db)

    return make


def operations(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{method.upper()} {path}": op for path, item in doc["paths"].items()
            for method, op in item.items()}


def validator(doc: dict[str, Any], schema: dict[str, Any]) -> Any:
    root = {**schema, "components": doc["components"]}
    return jsonschema.Draft202012Validator(root)


def resolved(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def body_schema(doc: dict[str, Any], op: dict[str, Any]) -> dict[str, Any]:
    return op["requestBody"]["content"]["application/json"]["schema"]  # type: ignore[no-any-return]


def templated(rule: str) -> str:
    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule)


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: "calculator" if m[1] == "name" else "x", path)


def check_reply(doc: dict[str, Any], op: dict[str, Any], answer: Answer) -> None:
    """The answer's status is one the operation documents, with its schema and headers."""
    documented = op["responses"].get(str(answer.status))
    assert documented is not None, (answer.status, answer.body[:300], list(op["responses"]))
    for header in documented.get("headers", {}):
        assert header.lower() in answer.headers, (header, answer.status)
    media = answer.headers.get("content-type", "").split(";")[0]
    if "content" in documented:
        assert media in documented["content"], (media, answer.status)
        schema = documented["content"][media].get("schema", {})
        if media == "application/json":
            validator(doc, schema).validate(answer.json())


# The document --------------------------------------------------------------------------------


async def test_the_document_is_valid_openapi_3_1(serve):
    spec = pytest.importorskip("openapi_spec_validator")
    for settings in ({}, {"api_keys": ["k1"], "rate_limit": "10/minute"}):
        spec.validate(await serve(**settings).document())


async def test_every_route_the_app_serves_is_in_the_document_and_nothing_else(serve):
    served = serve()
    doc = operations(await served.document())
    quart_routes = {
        f"{method} {templated(rule.rule)}" for rule in served.quart.url_map.iter_rules()
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}}
    raw = {key for key, op in OPERATIONS.items() if op.asgi}
    assert quart_routes | raw == set(doc)
    assert quart_routes.isdisjoint(raw)
    # The raw ASGI routes are served by the entry (Quart would 404 them: no rule matches).
    assert (await served.call("POST", "/api/chat/stream", b"{")).json()["error"][
        "code"] == "bad_json"
    assert (await served.call("POST", "/v1/chat/completions", b"{")).json()["error"][
        "type"] == "invalid_request_error"
    served.db.error = q.NotFoundError("x")
    answer = await served.call("GET", "/api/runs/x/events")
    assert answer.json()["error"]["message"] == "no such run"


async def test_every_operation_is_declared_with_a_summary_and_its_replies(serve):
    doc = await serve().document()
    ids = [op["operationId"] for op in operations(doc).values()]
    assert len(ids) == len(set(ids))
    for key, op in operations(doc).items():
        assert key in OPERATIONS, f"{key}: add it to app/web/openapi.py OPERATIONS"
        assert op["summary"]
        assert "default" not in op["responses"]
        assert any(status.startswith("2") for status in op["responses"]), key
        named = set(re.findall(r"\{(\w+)\}", key))
        assert named == {p["name"] for p in op["parameters"] if p.get("in") == "path"}


async def test_a_route_without_an_entry_appears_with_its_docstring_and_no_made_up_replies():
    app = QuartTrio("new")

    @app.get("/api/new/<thing_id>")
    async def new_thing(thing_id: str) -> str:
        """Something new.

        More about it."""
        return thing_id

    doc = openapi_document(app, Settings(), {})
    op = doc["paths"]["/api/new/{thing_id}"]["get"]
    assert op["summary"] == "Something new."
    assert set(op["responses"]) == {"default", "503"}  # 503: every /api route when draining
    assert op["parameters"][0]["name"] == "thing_id"


async def test_every_route_with_a_body_documents_the_model_that_validates_it(serve):
    doc = await serve().document()
    ops = operations(doc)
    with_body = {key for key, op in ops.items() if "requestBody" in op}
    assert with_body == set(BODIES)
    assert {key for key in ops if key.startswith("POST ")} - with_body == {
        "POST /api/runs/{run_id}/cancel"}
    for key, model in BODIES.items():
        assert body_schema(doc, ops[key]) == {"$ref": f"#/components/schemas/{model.__name__}"}
    assert ops["POST /api/tools/{name}"]["requestBody"]["required"] is False


async def test_query_parameters_and_headers_are_documented(serve):
    ops = operations(await serve().document())
    for key, model in QUERIES.items():
        params = {p["name"]: p for p in ops[key]["parameters"] if p.get("in") == "query"}
        assert set(params) == set(model.model_fields)
    search = {p["name"]: p["schema"] for p in ops["GET /api/search"]["parameters"]
              if "name" in p}
    assert search["q"]["minLength"] == 1 and search["q"]["maxLength"] == 2000
    assert (search["k"]["minimum"], search["k"]["maximum"], search["k"]["default"]) == (1, 100, 5)
    events = ops["GET /api/runs/{run_id}/events"]
    assert "Last-Event-ID" in {p.get("name") for p in events["parameters"]}
    for key in ("GET /api/runs/{run_id}/events", "POST /api/chat/stream"):
        assert "text/event-stream" in ops[key]["responses"]["200"]["content"]
    assert set(ops["POST /v1/chat/completions"]["responses"]["200"]["content"]) == {
        "application/json", "text/event-stream"}


async def test_the_tool_names_are_the_tools_listed(serve):
    served = serve()
    ops = operations(await served.document())
    [name] = [p for p in ops["POST /api/tools/{name}"]["parameters"] if p.get("name") == "name"]
    listed = (await served.call("GET", "/api/tools")).json()["tools"]
    assert name["schema"]["enum"] == [tool["name"] for tool in listed]


# What the document says the routes take is what they take ------------------------------------


def example(doc: dict[str, Any], op: dict[str, Any]) -> dict[str, Any]:
    [first, *_] = resolved(doc, body_schema(doc, op))["examples"]
    return first  # type: ignore[no-any-return]


async def post(served: Served, key: str, body: Any) -> Answer:
    method, path = key.split(" ", 1)
    return await served.call(method, concrete(path), body)


async def test_each_bodys_example_fits_its_schema_and_is_accepted(serve):
    served = serve()
    doc = await served.document()
    for key in BODIES:
        op = operations(doc)[key]
        body = example(doc, op)
        validator(doc, body_schema(doc, op)).validate(body)
        answer = await post(served, key, body)
        assert answer.status not in REFUSED, (key, answer.body)
        check_reply(doc, op, answer)


def edges(schema: dict[str, Any]) -> list[tuple[Any, bool]]:
    """Values at and just past each bound of a schema: (value, allowed)."""
    branch = next((s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"), {})
    found: list[tuple[Any, bool]] = []
    kind = branch.get("type")
    if kind == "string":
        if "minLength" in branch and branch["minLength"] > 0:
            found += [("x" * (branch["minLength"] - 1), False), ("x" * branch["minLength"], True)]
        if "maxLength" in branch:
            found += [("x" * branch["maxLength"], True), ("x" * (branch["maxLength"] + 1), False)]
    if kind in ("integer", "number"):
        step = 1 if kind == "integer" else 0.5
        if "minimum" in branch:
            found += [(branch["minimum"], True), (branch["minimum"] - step, False)]
        if "maximum" in branch:
            found += [(branch["maximum"], True), (branch["maximum"] + step, False)]
    if kind == "array":
        item = "x" if branch.get("items", {}).get("type") == "string" else None
        if item is not None and "minItems" in branch:
            found += [([item] * branch["minItems"], True), ([item] * (branch["minItems"] - 1),
                                                            False)]
        if item is not None and "maxItems" in branch:
            found += [([item] * branch["maxItems"], True), ([item] * (branch["maxItems"] + 1),
                                                            False)]
        if "minItems" in branch and item is None:
            found += [([], False)]
        found += [([value], allowed) for value, allowed in edges(branch.get("items", {}))
                  if isinstance(value, str)]
    return found


async def check_body_limits(served: Served, doc: dict[str, Any]) -> int:
    checked = 0
    for key in BODIES:
        op = operations(doc)[key]
        properties = resolved(doc, body_schema(doc, op)).get("properties", {})
        for name, schema in properties.items():
            for value, allowed in edges(schema):
                answer = await post(served, key, {**example(doc, op), name: value})
                refused = answer.status in REFUSED
                assert refused != allowed, (key, name, str(value)[:40], answer.body[:200])
                check_reply(doc, op, answer)
                checked += 1
    return checked


async def test_the_documented_body_limits_are_the_enforced_ones(serve):
    served = serve()
    doc = await served.document()
    assert await check_body_limits(served, doc) > 40


async def test_a_lower_message_limit_setting_is_the_documented_one(serve):
    served = serve(max_message_chars=100)
    doc = await served.document()
    schemas = doc["components"]["schemas"]
    assert schemas["ChatRequest"]["properties"]["message"]["maxLength"] == 100
    assert schemas["BatchRequest"]["properties"]["messages"]["items"]["maxLength"] == 100
    assert "x-agentd-max-message-chars" not in json.dumps(doc)
    assert await check_body_limits(served, doc) > 40


async def test_the_documented_query_limits_are_the_enforced_ones(serve):
    served = serve()
    doc = await served.document()
    for key in QUERIES:
        op = operations(doc)[key]
        params = {p["name"]: p for p in op["parameters"] if p.get("in") == "query"}
        base = {name: "cats" for name, p in params.items() if p["required"]}
        for name, param in params.items():
            for value, allowed in edges(param["schema"]):
                answer = await served.call("GET", key.split(" ", 1)[1],
                                           query=urlencode({**base, name: value}))
                assert (answer.status == 422) != allowed, (key, name, str(value)[:40])
                check_reply(doc, op, answer)


def test_not_blank_is_exactly_what_str_strip_leaves_something_of():
    pattern = re.compile(NOT_BLANK)
    for code in range(sys.maxunicode + 1):
        if 0xD800 <= code <= 0xDFFF:
            continue
        char = chr(code)
        assert bool(pattern.search(char)) == (not char.isspace()), hex(code)
    assert re.search(NO_NUL, "a\x00b") is None and re.search(NO_NUL, "ab")


@pytest.mark.parametrize(("key", "field", "value"), [
    ("POST /api/documents", "text", " \u2028\x1c"),
    ("POST /api/documents", "source", "a\x00b"),
    ("POST /api/chat", "message", "a\x00b"),
    ("POST /api/batches", "messages", ["a\x00b"]),
])
async def test_what_a_pattern_refuses_is_refused(serve, key, field, value):
    served = serve()
    doc = await served.document()
    op = operations(doc)[key]
    body = {**example(doc, op), field: value}
    with pytest.raises(jsonschema.ValidationError):
        validator(doc, body_schema(doc, op)).validate(body)
    assert (await post(served, key, body)).status == 422


async def test_a_blank_query_is_refused_as_documented(serve):
    served = serve()
    doc = await served.document()
    [q_param] = [p for p in operations(doc)["GET /api/search"]["parameters"]
                 if p.get("name") == "q"]
    assert re.search(q_param["schema"]["pattern"], "\u3000 ") is None
    assert (await served.call("GET", "/api/search", query="q=%E3%80%80+")).status == 422


async def test_the_last_user_messages_limit_on_v1_is_the_setting(serve):
    served = serve(max_message_chars=50)
    for text, status in (("x" * 50, 503), ("x" * 51, 400)):
        answer = await served.call("POST", "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": text}]})
        assert answer.status == status, answer.body


# Errors --------------------------------------------------------------------------------------


async def test_bad_json_and_too_large_bodies_are_answered_as_documented(serve):
    served = serve(max_body_bytes=1024)
    doc = await served.document()
    for key in BODIES:
        op = operations(doc)[key]
        assert "1024 bytes" in op["responses"]["413"]["description"]
        for body, status in ((b"{", 400), (b"[1]", 400), (b'{"a": "' + b"x" * 1100 + b'"}',
                                                           413)):
            answer = await post(served, key, body)
            assert answer.status == status, (key, body[:10], answer.body)
            check_reply(doc, op, answer)


async def test_not_found_is_documented_where_it_happens(serve):
    served = serve()
    served.db.error = q.NotFoundError("x")
    doc = await served.document()
    for key, op in operations(doc).items():
        method, path = key.split(" ", 1)
        if "{" not in path or key == "POST /api/tools/{name}":
            continue
        answer = await served.call(method, concrete(path))
        assert answer.status == 404, (key, answer.body)
        check_reply(doc, op, answer)
    answer = await served.call("POST", "/api/tools/nope", b"{}")
    check_reply(doc, operations(doc)["POST /api/tools/{name}"], answer)


async def test_every_guarded_route_documents_the_drain_503_with_retry_after(serve):
    served = serve()
    doc = await served.document()
    served.state.life.draining.set()
    for key, op in operations(doc).items():
        method, path = key.split(" ", 1)
        answer = await served.call(method, concrete(path), b"{}")
        if path.startswith(("/api/", "/v1/")):
            assert answer.status == 503, key
            assert "Retry-After" in op["responses"]["503"]["headers"]
            check_reply(doc, op, answer)


async def test_401_and_429_are_documented_only_when_configured(serve):
    plain = operations(await serve().document())
    assert not any({"401", "429"} & set(op["responses"]) for op in plain.values())
    assert not any("security" in op for op in plain.values())
    served = serve(api_keys=["k1"], rate_limit="10/minute")
    doc = await served.document()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for key, op in operations(doc).items():
        method, path = key.split(" ", 1)
        guarded = path.startswith(("/api/", "/v1/"))
        assert ({"401", "429"} <= set(op["responses"])) == guarded, key
        assert ("security" in op) == guarded
        if guarded:
            answer = await served.call(method, concrete(path), b"{}")
            assert answer.status == 401
            check_reply(doc, op, answer)


# Replies -------------------------------------------------------------------------------------


def fields(model: type[Any]) -> set[str]:
    return set(model.model_fields)


def reply_schema(doc: dict[str, Any], key: str, status: int = 200) -> Any:
    return validator(doc, operations(doc)[key]["responses"][str(status)]["content"][
        "application/json"]["schema"])


async def test_the_open_routes_answer_what_they_document(serve):
    served = serve()
    doc = await served.document()
    for key in ("GET /live", "GET /ready", "GET /health", "GET /api/tools", "GET /v1/models",
                "GET /v1/models/agentd-local", "GET /api/status", "GET /metrics", "GET /docs",
                "GET /openapi.json"):
        path = key.split(" ", 1)[1]
        op = operations(doc)[key.replace("agentd-local", "{model}")]
        check_reply(doc, op, await served.call("GET", path))


def a_run_row(**fields: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {"run_id": "r", "session_id": "s", "owner": "o", "user_message_id": "u",
            "message_id": "m", "status": "completed", "reason": "completed", "detail": None,
            "fallback": None, "on_disconnect": "continue", "priority": 5, "attempts": 1,
            "timeout_s": None, "cache": False, "batch_id": None, "output": "42",
            "iterations": 1, "usage": {"prompt_tokens": 3}, "cached": False,
            "created_at": now, "started_at": now, "finished_at": now, **fields}


async def test_a_run_and_a_completion_are_what_their_models_say(serve):
    doc = await serve().document()
    view = run_view(a_run_row())
    assert set(view) == fields(responses.Run)
    reply_schema(doc, "GET /api/runs/{run_id}").validate(view)
    reply_schema(doc, "GET /api/runs/{run_id}").validate(run_view(a_run_row(
        status="running", reason=None, message_id=None, usage=None, finished_at=None)))
    completion = completion_body(a_run_row(), "agentd-local")
    assert set(completion) == fields(responses.ChatCompletion)
    reply_schema(doc, "POST /v1/chat/completions").validate(completion)


async def test_status_is_what_its_model_says(serve):
    doc = await serve().document()
    state = SimpleNamespace(db=FakeDatabase(), open_streams=0, in_flight=0,
                            life=SimpleNamespace(draining=trio.Event()))
    view = await status_view(state)  # type: ignore[arg-type]
    assert set(view) == fields(responses.Status)
    reply_schema(doc, "GET /api/status").validate(view)


async def test_documents_and_search_results_are_what_their_models_say(serve):
    served = serve()
    doc = await served.document()
    columns = [c.split()[-1] for c in document_rows.COLUMNS.split(",")]
    assert set(columns) == fields(responses.DocumentInfo)
    now = datetime.now(UTC)
    served.db.rows = [{"document_id": "d", "source": None, "title": "t", "chunks": 2,
                       "content_hash": "h", "metadata": {}, "created_at": now,
                       "updated_at": now}]
    answer = await served.call("GET", "/api/documents")
    check_reply(doc, operations(doc)["GET /api/documents"], answer)
    served.state.embedding.hits = [  # type: ignore[attr-defined]
        {"document_id": "d", "text": "t", "score": 0.5, "source": "", "title": "", "chunk": 0}]
    answer = await served.call("GET", "/api/search", query="q=cats")
    check_reply(doc, operations(doc)["GET /api/search"], answer)
    [hit] = answer.json()["results"]
    assert set(hit) == fields(responses.SearchResult)


async def test_what_the_document_allows_is_accepted(serve):
    """schemathesis draws requests the document says are valid; none may be refused. Not
    /v1/chat/completions: its rules are about the last user message (text, not blank, its
    length), which a JSON Schema cannot single out; test_openai_compat.py and the limit
    tests above check them."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.core import NOT_SET
    from schemathesis.generation import GenerationMode

    served = serve()
    doc = await served.document()
    schema = schemathesis.openapi.from_dict(doc)
    schema.config.generation.update(allow_x00=False)
    keys = (set(BODIES) | set(QUERIES)) - {"POST /v1/chat/completions"}
    chosen = [op for op in (result.ok() for result in schema.get_all_operations())
              if f"{op.method.upper()} {op.path}" in keys]
    assert len(chosen) == len(keys)

    def explore(operation: Any) -> None:
        key = f"{operation.method.upper()} {operation.path}"

        @given(case=operation.as_strategy(GenerationMode.POSITIVE))
        @settings(max_examples=10, deadline=None, database=None, derandomize=True,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        def accepted(case: Any) -> None:
            body = None if case.body is NOT_SET else case.body
            query = urlencode(case.query or {}, doseq=True)
            answer = trio.from_thread.run(served.call, case.method, case.formatted_path,
                                          body, query)
            assert answer.status not in REFUSED, (key, body, query, answer.body[:300])
            check_reply(doc, operations(doc)[key], answer)

        accepted()

    for operation in chosen:
        await trio.to_thread.run_sync(explore, operation)
