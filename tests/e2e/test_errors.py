"""Bad input gets the right 4xx with the error shape, never a 500; every response carries
X-Request-ID and X-Process-Time (API.md: HTTP, Precise points → Limits)."""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
UNKNOWN = str(uuid.uuid4())


@pytest.fixture
async def client(tree) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=tree.base_url, timeout=30) as c:
        yield c


def raw(value: object) -> bytes:
    return json.dumps(value).encode()


BIG = raw({"message": "x" * (MIB + 10)})

CHAT_BODIES = [
    pytest.param(b'{"message":', 400, "bad_json", id="malformed-json"),
    pytest.param(b"[1, 2]", 400, "bad_json", id="json-array"),
    pytest.param(b'"hello"', 400, "bad_json", id="json-string"),
    pytest.param(b"", 400, "bad_json", id="empty-body"),
    pytest.param(raw({}), 422, "validation_error", id="missing-message"),
    pytest.param(raw({"message": ""}), 422, "validation_error", id="empty-message"),
    pytest.param(raw({"message": "x" * 32001}), 422, "validation_error", id="message-32001"),
    pytest.param(raw({"message": 5}), 422, "validation_error", id="message-int"),
    pytest.param(raw({"message": ["hi"]}), 422, "validation_error", id="message-list"),
    pytest.param(raw({"message": "hi", "session_id": 5}), 422, "validation_error",
                 id="session-int"),
    pytest.param(raw({"message": "hi", "timeout": "soon"}), 422, "validation_error",
                 id="timeout-str"),
    pytest.param(raw({"message": "hi", "cache": "maybe"}), 422, "validation_error",
                 id="cache-str"),
    pytest.param(raw({"message": "hi", "timeout": 0}), 422, "validation_error", id="timeout-0"),
    pytest.param(raw({"message": "hi", "timeout": 601}), 422, "validation_error",
                 id="timeout-601"),
    pytest.param(BIG, 413, "payload_too_large", id="body-over-1mib"),
    pytest.param(raw({"message": "hi", "session_id": UNKNOWN}), 404, "not_found",
                 id="unknown-session"),
    pytest.param(raw({"message": "hi", "session_id": "not-a-uuid"}), 404, "not_found",
                 id="malformed-session"),
]


def assert_error(response: httpx.Response, status: int, code: str | None) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), response.text[:300]
    error = response.json()["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str), error
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error


def assert_headers(response: httpx.Response, request_id: str) -> None:
    assert response.headers["x-request-id"] == request_id
    assert float(response.headers["x-process-time"]) >= 0


async def post(client: httpx.AsyncClient, path: str, content: bytes) -> httpx.Response:
    request_id = uuid.uuid4().hex
    with trio.fail_after(20):
        response = await client.post(path, content=content, headers={
            "content-type": "application/json", "x-request-id": request_id})
    assert_headers(response, request_id)
    return response


@pytest.mark.parametrize("path", ["/api/chat", "/api/runs", "/api/chat/stream"])
@pytest.mark.parametrize(("content", "status", "code"), CHAT_BODIES)
async def test_bad_chat_body_gets_the_right_4xx(client, path, content, status, code):
    assert_error(await post(client, path, content), status, code)


@pytest.mark.parametrize("path", ["/api/runs", "/api/chat/stream"])
async def test_bad_on_disconnect_gets_422(client, path):
    body = raw({"message": "hi", "on_disconnect": "later"})
    assert_error(await post(client, path, body), 422, "validation_error")


@pytest.mark.parametrize(("method", "path"), [
    ("GET", f"/api/runs/{UNKNOWN}"),
    ("GET", "/api/runs/not-a-uuid"),
    ("GET", f"/api/runs/{UNKNOWN}/events"),
    ("GET", "/api/runs/not-a-uuid/events"),
    ("POST", f"/api/runs/{UNKNOWN}/cancel"),
    ("POST", "/api/runs/not-a-uuid/cancel"),
    ("GET", f"/api/sessions/{UNKNOWN}/messages"),
    ("GET", "/api/sessions/not-a-uuid/messages"),
    ("POST", "/api/tools/no_such_tool"),
    ("GET", "/api/no-such-route"),
])
async def test_unknown_object_or_route_gets_404(client, method, path):
    request_id = uuid.uuid4().hex
    with trio.fail_after(20):
        response = await client.request(method, path, headers={"x-request-id": request_id},
                                        content=b"{}" if method == "POST" else None)
    assert_headers(response, request_id)
    assert_error(response, 404, None)


async def test_wrong_method_gets_a_json_405(client):
    with trio.fail_after(20):
        response = await client.delete("/api/tools")
    assert_error(response, 405, None)


async def test_tools_are_listed_and_called_with_json_arguments(client):
    with trio.fail_after(20):
        listed = await client.get("/api/tools", headers={"x-request-id": "list-tools"})
        called = await client.post("/api/tools/calculator", json={"expression": "2+3"})
    assert listed.status_code == 200
    assert_headers(listed, "list-tools")
    assert {"calculator", "current_time"} <= {t["name"] for t in listed.json()["tools"]}
    assert called.status_code == 200
    assert called.json()["success"] is True and called.json()["result"]["result"] == 5


@pytest.mark.parametrize("arguments", [
    {"expression": "2+"}, {}, {"expression": 5}, {"expression": "__import__('os')"},
])
async def test_bad_tool_arguments_answer_200_with_success_false(client, arguments):
    response = await post(client, "/api/tools/calculator", raw(arguments))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is False and body["result"] is None and body["error"]


@pytest.mark.parametrize(("content", "status"), [
    pytest.param(b"{bad", 400, id="malformed-json"),
    pytest.param(b"[1]", 400, id="json-array"),
    pytest.param(b"x" * (MIB + 10), 413, id="body-over-1mib"),
])
async def test_bad_tool_body_gets_the_right_4xx(client, content, status):
    assert_error(await post(client, "/api/tools/calculator", content), status, None)


async def test_requests_without_an_id_get_a_fresh_one(client):
    with trio.fail_after(20):
        first, second = await client.get("/live"), await client.get("/live")
    ids = {first.headers["x-request-id"], second.headers["x-request-id"]}
    assert len(ids) == 2 and all(ids)
    assert first.json() == {"status": "alive"}
