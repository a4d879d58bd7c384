"""Operating agentd: who may ask (API keys, JWTs) and what each user sees, the rate limit
shared by every web process, the answer cache, batches by priority, a full queue, /metrics for
the whole tree, the command-line clients, X-Forwarded-For believed from trusted proxies only,
and a property-based fuzz of every route in /openapi.json (API.md: Configuration, HTTP,
Metrics, Precise points → No auth needed).

Two trees, one per class, so each is stopped when its tests are done:

- `TestWithAuth`: API keys `k1,k2` and a JWT secret, two web processes, no rate limit.
- `TestBehindATrustedProxy`: no auth, two web processes, 127.0.0.1 a trusted proxy, a rate
  limit per client address, one run at a time and at most 3 queued. Its tests other than the
  rate-limit one send a fresh `X-Forwarded-For` with every request, so each request is its own
  client to the limiter and only the rate-limit test spends a budget.
"""

from __future__ import annotations

import json
import os
import pty
import random
import time
import uuid
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from app.web.auth import key_user
from tests.e2e.conftest import (
    AGENTD,
    SHARED_ENV,
    AgentdTree,
    assistant_message,
    eventually,
    nonce,
    read_stream,
    requests_with,
    run_final,
    tree_root,
)
from tests.support.scripted_llm import token_text

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from tests.support.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.slow

SECRET = "operating-tests-jwt-secret-" + "0123456789abcdef" * 3  # 75 bytes: enough for HS512
KEYS = ("k1", "k2")
RATE = 20  # requests per hour per client address on the proxy tree
OPEN_PATHS = ("/live", "/ready", "/health", "/metrics", "/openapi.json", "/docs")
API_METRICS = (
    "agentd_http_requests_total", "agentd_http_request_duration_seconds", "agentd_open_streams",
    "agentd_runs_total", "agentd_run_duration_seconds", "agentd_llm_requests_total",
    "agentd_llm_tokens_total", "agentd_tool_calls_total", "agentd_embedding_batch_size",
    "agentd_cache_hits_total", "agentd_rate_limited_total", "agentd_process_restarts_total",
    "agentd_active_sessions", "agentd_run_iterations", "agentd_llm_retries_total",
    "agentd_shutdown_streams_ended_total",
)


@contextmanager
def running_tree(name: str, llm: ScriptedLLM, env: dict[str, str]) -> Iterator[AgentdTree]:
    with tree_root(name) as root:
        agentd = AgentdTree(root, llm.base_url, {**SHARED_ENV, **env})
        try:
            agentd.start()
            yield agentd
        finally:
            agentd.kill()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def token(sub: Any = "alice", *, exp_in: float | None = 300, secret: str | None = SECRET,
          algorithm: str = "HS256", **claims: Any) -> str:
    payload = dict(claims)
    if sub is not None:
        payload["sub"] = sub
    if exp_in is not None:
        payload["exp"] = int(time.time() + exp_in)
    return jwt.encode(payload, secret, algorithm=algorithm)


def assert_unauthorized(response: httpx.Response, *, openai: bool = False) -> None:
    assert response.status_code == 401, (response.request.url, response.text[:300])
    assert response.headers["www-authenticate"].lower().startswith("bearer")
    error = response.json()["error"]
    assert error["code"] == "unauthorized" and error["message"], error
    if openai:  # OpenAI's shape: message, type, code (a string), param
        assert set(error) >= {"message", "type", "code", "param"}, error
        assert error["type"] == "authentication_error", error


def metric_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name → [(labels, value)], through prometheus-client's own parser."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        found.setdefault(family.name, [])
        if family.type == "counter":  # the parser names a counter's family without _total
            found.setdefault(f"{family.name}_total", [])
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    return sum(value for have, value in samples.get(name, [])
               if all(have.get(k) == v for k, v in labels.items()))


async def scrape(client: httpx.AsyncClient) -> dict[str, list[tuple[dict[str, str], float]]]:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text[:300]
    return metric_samples(response.text)


async def fresh_connections(base_url: str, method: str, path: str, count: int,
                            headers: dict[str, str]) -> list[httpx.Response]:
    """`count` requests at once, each on a connection of its own (so the kernel hands them
    to whichever web process accepts first), each with its own X-Request-ID."""
    answers: list[httpx.Response] = []
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:

        async def one(i: int) -> None:
            answers.append(await client.request(
                method, path, headers={**headers, "x-request-id": f"{headers['x-tag']}-{i}"}))

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
    return answers


def log_events(tree: AgentdTree, name: str) -> list[dict[str, Any]]:
    """The tree's log events called `name`, also those run together on one line: each process
    writes a line's JSON and its newline in two writes (structlog's PrintLogger under
    PYTHONUNBUFFERED), so two processes logging at once can leave `{…}{…}` on one line."""
    decoder = json.JSONDecoder()
    found = []
    for line in tree.text().splitlines():
        at = 0
        while (start := line.find("{", at)) >= 0:
            try:
                event, at = decoder.raw_decode(line, start)
            except ValueError:
                break
            if isinstance(event, dict) and event.get("event") == name:
                found.append(event)
    return found


def all_logged(tree: AgentdTree, tag: str, count: int) -> dict[int, int] | None:
    """`served_by` once all `count` requests are in the log, else None."""
    pids = served_by(tree, tag)
    return pids if sum(pids.values()) == count else None


def served_by(tree: AgentdTree, tag: str) -> dict[int, int]:
    """Web pid → requests it logged whose X-Request-ID starts with `tag`."""
    pids: dict[int, int] = {}
    for event in log_events(tree, "request"):
        if str(event.get("request_id", "")).startswith(f"{tag}-"):
            pids[event["pid"]] = pids.get(event["pid"], 0) + 1
    return pids


# With auth: keys, JWTs, ownership, cache, metrics, CLI, fuzz ----------------------------------


@pytest.fixture(scope="class")
def auth_tree(llm) -> Iterator[AgentdTree]:
    with running_tree("operating-auth", llm, {
        "AGENTD_API_KEYS": ",".join(KEYS),
        "AGENTD_JWT_SECRET": SECRET,
        "AGENTD_WEB_WORKERS": "2",
        "AGENTD_CACHE_DEFAULT": "off",
    }) as agentd:
        yield agentd


@pytest.fixture
async def anon(auth_tree) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=auth_tree.base_url, timeout=30) as c:
        yield c


@pytest.fixture
async def k1(auth_tree) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=auth_tree.base_url, timeout=30,
                                 headers=bearer("k1")) as c:
        yield c


class TestWithAuth:
    async def test_a_refused_request_whose_body_comes_late_leaves_its_connection_usable(
        self, auth_tree
    ):
        # The 401 is decided on the headers; the body, sent after a pause, is read and
        # dropped, so the kept-alive connection serves the next request.
        body = json.dumps({"message": "hi"}).encode()
        head = (f"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        with trio.fail_after(20):
            stream = await trio.open_tcp_stream("127.0.0.1", auth_tree.port)
            async with stream:
                await stream.send_all(head)
                await trio.sleep(0.3)
                await stream.send_all(body)
                await stream.send_all(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
                received = b""
                while received.count(b"HTTP/1.1 ") < 2 or not received.endswith(b"}"):
                    chunk = await stream.receive_some(65536)
                    assert chunk, f"the connection was closed: {received!r}"
                    received += chunk
        first, second = received.split(b"HTTP/1.1 ")[1:]
        assert first.startswith(b"401") and second.startswith(b"200"), received

    async def test_without_valid_credentials_api_and_v1_answer_401_and_open_paths_answer(
        self, anon
    ):
        some_run = f"/api/runs/{uuid.uuid4()}"
        with trio.fail_after(60):
            for method, path in [("GET", "/api/tools"), ("GET", "/api/status"),
                                 ("POST", "/api/chat"), ("POST", "/api/chat/stream"),
                                 ("POST", "/api/runs"), ("GET", some_run),
                                 ("GET", f"{some_run}/events"), ("POST", "/api/batches")]:
                response = await anon.request(method, path, json={"message": "hi"})
                assert_unauthorized(response)
            for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]:
                body = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
                response = await anon.request(method, path, json=body)
                assert_unauthorized(response, openai=True)
            for headers in [bearer("k3"), bearer("k1x"), {"Authorization": "Basic k1"},
                            {"Authorization": "Bearer"}, {"Authorization": "k1"},
                            bearer("K1"), bearer("not.a.jwt")]:
                assert_unauthorized(await anon.get("/api/tools", headers=headers))
                assert_unauthorized(await anon.get("/v1/models", headers=headers),
                                    openai=True)
            for key in KEYS:
                assert (await anon.get("/api/tools", headers=bearer(key))).status_code == 200
                assert (await anon.get("/v1/models", headers=bearer(key))).status_code == 200
            for path in OPEN_PATHS:
                response = await anon.get(path)
                assert response.status_code == 200, (path, response.text[:300])
        assert response.headers["content-type"].startswith("text/html")  # /docs

    async def test_a_jwt_needs_an_hs256_signature_a_sub_and_an_exp_in_the_future(self, anon):
        refused = {
            "expired": token(exp_in=-60),
            "bad signature": token(secret=SECRET + "-other"),
            "no sub": token(sub=None),
            "no exp": token(exp_in=None),
            "empty sub": token(sub=""),
            "sub not a string": token(sub=42),
            "HS512": token(algorithm="HS512"),
            "alg none": token(algorithm="none", secret=None),
            "truncated": token()[:-4],
        }
        with trio.fail_after(60):
            for name, bad in refused.items():
                response = await anon.get("/api/tools", headers=bearer(bad))
                assert response.status_code == 401, (name, response.text)
                assert_unauthorized(response)
                assert_unauthorized(await anon.get("/v1/models", headers=bearer(bad)),
                                    openai=True)
            for good in (token(), token(sub="bob", exp_in=5), token(sub="carol", scope="read")):
                assert (await anon.get("/api/tools", headers=bearer(good))).status_code == 200
                assert (await anon.get("/v1/models", headers=bearer(good))).status_code == 200

    async def test_each_key_and_each_jwt_subject_sees_only_its_own_objects(self, anon):
        alice, bob = bearer(token("alice")), bearer(token("bob"))
        with trio.fail_after(60):
            # A body's user_id is never trusted: k1 names k2 as the user, and k1 owns the run.
            chat = await anon.post("/api/chat", headers=bearer("k1"), json={
                "message": f"{nonce()} [[script tokens=2]]", "user_id": key_user("k2")})
            assert chat.status_code == 200, chat.text
            mine = chat.json()
            batch = await anon.post("/api/batches", headers=bearer("k1"), json={
                "messages": ["[[script tokens=1]]"], "user_id": key_user("k2")})
            assert batch.status_code == 202, batch.text
            batch_id = batch.json()["batch_id"]
            own_paths = [("GET", f"/api/runs/{mine['run_id']}"),
                         ("GET", f"/api/sessions/{mine['session_id']}/messages"),
                         ("GET", f"/api/batches/{batch_id}"),
                         ("POST", f"/api/runs/{mine['run_id']}/cancel")]
            for stranger in (bearer("k2"), alice):
                for method, path in [*own_paths, ("GET", f"/api/runs/{mine['run_id']}/events")]:
                    response = await anon.request(method, path, headers=stranger)
                    assert response.status_code == 404, (method, path, response.text)
                    assert response.json()["error"]["code"] == "not_found"
                response = await anon.post("/api/chat", headers=stranger, json={
                    "message": "hi", "session_id": mine["session_id"]})
                assert response.status_code == 404, response.text
            for method, path in own_paths:
                response = await anon.request(method, path, headers=bearer("k1"))
                assert response.status_code in (200, 202), (method, path, response.text)
            replay = await read_stream(anon, "GET", f"/api/runs/{mine['run_id']}/events",
                                       headers=bearer("k1"))
            assert replay.status == 200 and replay.tokens == token_text(2)

            # A JWT's user is its sub: another token for alice sees alice's run, bob does not.
            theirs = (await anon.post("/api/runs", headers=alice, json={
                "message": "[[script tokens=1]]", "user_id": "bob"})).json()
            again = bearer(token("alice", exp_in=120))
            assert (await anon.get(f"/api/runs/{theirs['run_id']}", headers=again)
                    ).status_code == 200
            for stranger in (bob, bearer("k1")):
                response = await anon.get(f"/api/runs/{theirs['run_id']}", headers=stranger)
                assert response.status_code == 404, response.text

    async def test_cache_true_answers_the_same_message_in_a_new_session_from_the_cache(
        self, llm, k1
    ):
        marker = nonce()
        message = f"{marker} cached? [[script tokens=4]]"
        with trio.fail_after(60):
            before = await scrape(k1)
            first = (await k1.post("/api/chat", json={"message": message, "cache": True})).json()
            second = (await k1.post("/api/chat", json={"message": message, "cache": True})
                      ).json()
            after = await scrape(k1)
            assert first["cached"] is False and second["cached"] is True, (first, second)
            assert first["response"] == second["response"] == token_text(4)
            assert first["session_id"] != second["session_id"]
            assert len(requests_with(llm, marker)) == 1
            assert (total(after, "agentd_cache_hits_total")
                    - total(before, "agentd_cache_hits_total")) == 1
            # A hit still stores the messages: both sessions hold the question and the answer.
            for answer in (first, second):
                stored = await assistant_message(k1, answer["session_id"], answer["run_id"])
                assert stored["status"] == "complete" and stored["content"] == token_text(4)
                messages = (await k1.get(f"/api/sessions/{answer['session_id']}/messages")
                            ).json()["messages"]
                assert [m["role"] for m in messages] == ["user", "assistant"]
                assert messages[0]["content"] == message
            # Not asked for (AGENTD_CACHE_DEFAULT=off) or refused: the LLM answers again.
            for body in ({"message": message, "cache": False}, {"message": message}):
                answer = (await k1.post("/api/chat", json=body)).json()
                assert answer["cached"] is False and answer["response"] == token_text(4)
            assert len(requests_with(llm, marker)) == 3

    async def test_metrics_parse_and_count_what_every_process_of_the_tree_did(
        self, auth_tree, k1
    ):
        tag = uuid.uuid4().hex[:10]
        count = 40
        with trio.fail_after(90):
            before = await scrape(k1)
            # Something for each counter to count: a tool call, a retried LLM call, a search
            # (embedding), and requests spread over both web processes.
            directive = '[[script tokens=1 tool=calculator:{"expression":"2+3"}]]'
            tool = await k1.post("/api/chat", json={"message": f"{nonce()} {directive}"})
            assert tool.status_code == 200, tool.text
            retried = await k1.post("/api/chat", json={
                "message": f"{nonce()} [[script tokens=2 fail=1 status=503]]"})
            assert retried.status_code == 200, retried.text
            assert (await k1.get("/api/search", params={"q": "metrics"})).status_code == 200
            answers = await fresh_connections(auth_tree.base_url, "GET", "/live", count,
                                              {"x-tag": tag})
            assert [a.status_code for a in answers] == [200] * count
            pids = await eventually(lambda: (lambda p: p if sum(p.values()) == count else None)(
                served_by(auth_tree, tag)), 10)
            assert len(pids) == 2, pids  # both web processes served some
            after = await scrape(k1)

        assert set(API_METRICS) - {"agentd_shutdown_streams_ended_total"} <= set(after), (
            sorted(set(API_METRICS) - set(after)))
        live = {"route": "/live", "method": "GET", "status": "200"}
        assert (total(after, "agentd_http_requests_total", **live)
                - total(before, "agentd_http_requests_total", **live)) == count
        assert (total(after, "agentd_http_request_duration_seconds_count", route="/live")
                - total(before, "agentd_http_request_duration_seconds_count", route="/live")
                ) == count

        def grew(name: str, by: float = 1, **labels: str) -> None:
            delta = total(after, name, **labels) - total(before, name, **labels)
            assert delta >= by, (name, labels, delta)

        grew("agentd_runs_total", 2, status="completed")
        grew("agentd_run_duration_seconds_count", 2)
        grew("agentd_run_iterations_count", 2)
        grew("agentd_run_iterations_sum", 3)  # the tool run took two turns
        grew("agentd_llm_requests_total", 2, model="scripted", outcome="success")
        grew("agentd_llm_tokens_total", 3, model="scripted", direction="out")
        grew("agentd_llm_tokens_total", 1, model="scripted", direction="in")
        grew("agentd_tool_calls_total", 1, tool="calculator", outcome="success")
        grew("agentd_llm_retries_total", 1, model="scripted")
        grew("agentd_embedding_batch_size_count", 1)
        assert total(after, "agentd_active_sessions") >= 2
        assert total(after, "agentd_open_streams") == 0
        assert "agentd_process_restarts_total" in after  # HELP/TYPE, no restarts yet

    async def test_agentd_status_prints_readiness_checks_runs_and_processes(
        self, auth_tree, tmp_path
    ):
        with trio.fail_after(60):
            done = await trio.run_process(
                [AGENTD, "status", "--url", auth_tree.base_url, "--api-key", "k1"],
                capture_stdout=True, capture_stderr=True, check=False, cwd=tmp_path,
                env=cli_env())
        out = done.stdout.decode()
        assert done.returncode == 0, (out, done.stderr.decode()[-2000:])
        assert f"agentd at {auth_tree.base_url}: ready, healthy" in out, out
        for line in ("database     ok", "redis        ok", "embedding    ok", "runs         "):
            assert line in out, out
        assert "completed" in out, out  # earlier tests' runs, by status
        for name in ("web-0", "web-1", "agent-0", "embedding", "postgres", "redis"):
            assert any(row.split()[:2] == [name, "ready"] for row in out.splitlines()), out

    async def test_agentd_status_without_a_key_says_it_was_refused_and_exits_1(
        self, auth_tree, tmp_path
    ):
        with trio.fail_after(60):
            done = await trio.run_process(
                [AGENTD, "status", "--url", auth_tree.base_url], capture_stdout=True,
                capture_stderr=True, check=False, cwd=tmp_path, env=cli_env())
        said = (done.stdout + done.stderr).decode()
        assert done.returncode == 1, said
        assert "401" in said or "key" in said.lower(), said

    async def test_agentd_chat_on_a_terminal_streams_the_answer_and_exits_0_at_ctrl_d(
        self, llm, auth_tree, tmp_path
    ):
        marker = nonce()
        master, slave = pty.openpty()
        process = await trio.lowlevel.open_process(
            [AGENTD, "chat", "--url", auth_tree.base_url, "--api-key", "k1"],
            stdin=slave, stdout=slave, stderr=slave, cwd=tmp_path, env=cli_env())
        os.close(slave)
        seen = b""
        terminal = trio.lowlevel.FdStream(master)

        async def read_until(wanted: bytes) -> None:
            nonlocal seen
            while wanted not in seen:
                chunk = await terminal.receive_some(4096)
                if not chunk:
                    raise AssertionError(f"the terminal closed before {wanted!r}: {seen!r}")
                seen += chunk

        try:
            with trio.fail_after(60):
                await read_until(b"you> ")
                await terminal.send_all(f"hello {marker} [[script tokens=6 rate=20]]\n".encode())
                await read_until(token_text(6).strip().encode())
                await read_until(b"you> ")
                await terminal.send_all(b"\x04")  # Ctrl-D: end of input
                status = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
            await terminal.aclose()
        assert status == 0, seen
        assert len(requests_with(llm, marker)) == 1

    async def test_x_forwarded_for_from_an_untrusted_peer_is_not_the_client(
        self, auth_tree, k1
    ):
        request_id = uuid.uuid4().hex
        with trio.fail_after(30):
            response = await k1.get("/api/tools", headers={
                "x-request-id": request_id, "x-forwarded-for": "203.0.113.9",
                "x-real-ip": "203.0.113.10"})
            assert response.status_code == 200
            logged = await eventually(lambda: [e for e in log_events(auth_tree, "request")
                                               if e.get("request_id") == request_id], 10)
        assert logged[0]["client"] == "127.0.0.1", logged

    async def test_text_postgresql_cannot_store_is_refused_with_a_4xx_not_a_500(self, k1):
        nul, lone = "a\x00b", "a\ud800b"
        bodies = [
            ("/api/chat", {"message": nul}), ("/api/runs", {"message": nul}),
            ("/api/chat/stream", {"message": nul}), ("/api/batches", {"messages": [nul]}),
            ("/v1/chat/completions", {"model": "scripted",
                                      "messages": [{"role": "user", "content": nul}]}),
            ("/v1/chat/completions", {"model": "scripted",
                                      "messages": [{"role": "user", "content": lone}]}),
        ]
        answers = []
        with trio.fail_after(60):
            for path, body in bodies:
                response = await k1.post(path, content=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
                answers.append((path, response.status_code, response.text[:120]))
        assert all(status in (400, 422) for _, status, _ in answers), answers

    async def test_v1_a_role_that_is_not_a_string_is_a_400(self, k1):
        with trio.fail_after(30):
            for role in ({"x": 1}, ["user"]):
                response = await k1.post("/v1/chat/completions", json={
                    "model": "scripted", "messages": [{"role": role, "content": "hi"}]})
                assert response.status_code == 400, (role, response.status_code, response.text)
                error = response.json()["error"]
                assert error["param"] == "messages[0].role", error

    def test_every_route_in_the_openapi_document_survives_a_property_based_fuzz(
        self, auth_tree
    ):
        # Sync: schemathesis and hypothesis drive their own (blocking) loop of requests.
        failures = fuzz_openapi(auth_tree.base_url, bearer("k1"))
        failures += fuzz_bodies(auth_tree.base_url, bearer("k1"))
        assert not failures, "\n".join(failures[:20])


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AGENTD_", "OPENAI_"))}


# Behind a trusted proxy: X-Forwarded-For, the rate limit, batches, a full queue ---------------


@pytest.fixture(scope="class")
def proxy_tree(llm) -> Iterator[AgentdTree]:
    with running_tree("operating-proxy", llm, {
        "AGENTD_WEB_WORKERS": "2",
        "AGENTD_TRUSTED_PROXIES": "127.0.0.1",
        "AGENTD_RATE_LIMIT": f"{RATE}/hour",
        "AGENTD_MAX_CONCURRENT_RUNS": "1",
        "AGENTD_MAX_QUEUED_RUNS": "3",
    }) as agentd:
        yield agentd


def documentation_address() -> str:
    return f"198.51.100.{random.randrange(1, 255)}"


async def _from_anywhere(request: httpx.Request) -> None:
    request.headers.setdefault("x-forwarded-for", f"10.{random.randrange(256)}."
                                                  f"{random.randrange(256)}.{random.randrange(256)}")


@pytest.fixture
async def proxied(proxy_tree) -> AsyncIterator[httpx.AsyncClient]:
    """Each request from an address of its own (see the module's docstring)."""
    async with httpx.AsyncClient(base_url=proxy_tree.base_url, timeout=30,
                                 event_hooks={"request": [_from_anywhere]}) as c:
        yield c


class TestBehindATrustedProxy:
    async def test_x_forwarded_for_from_a_trusted_proxy_is_the_client_in_the_request_log(
        self, proxy_tree, proxied
    ):
        cases = {
            "198.51.100.7": {"x-forwarded-for": "198.51.100.7"},
            # The nearest untrusted hop is the client; trusted proxies before it are skipped.
            "198.51.100.8": {"x-forwarded-for": "192.0.2.1, 198.51.100.8, 127.0.0.1"},
            "198.51.100.9": {"x-real-ip": "198.51.100.9", "x-forwarded-for": ""},
        }
        ids = {}
        with trio.fail_after(30):
            for client, headers in cases.items():
                ids[client] = uuid.uuid4().hex
                response = await proxied.get("/api/tools",
                                             headers={**headers, "x-request-id": ids[client]})
                assert response.status_code == 200, response.text

            def logged() -> dict[str, str] | None:
                found = {e["request_id"]: e["client"] for e in log_events(proxy_tree, "request")}
                return found if all(i in found for i in ids.values()) else None

            found = await eventually(logged, 10)
        assert {client: found[ids[client]] for client in cases} == {c: c for c in cases}

    async def test_the_rate_limit_is_one_budget_across_both_web_processes(self, proxy_tree,
                                                                          proxied):
        # A fixed window of an hour: don't start a burst in its last seconds.
        if time.time() % 3600 > 3600 - 30:
            await trio.sleep(3600 - time.time() % 3600 + 1)
        extra = 7
        with trio.fail_after(150):
            # Which web process accepts a connection is the kernel's choice, and a fast one
            # can take a whole burst: a burst both served is needed (each from its own
            # client address, so each has a fresh budget).
            for _ in range(5):
                client, tag = documentation_address(), uuid.uuid4().hex[:10]
                before = await scrape(proxied)
                answers = await fresh_connections(proxy_tree.base_url, "GET", "/api/tools",
                                                  RATE + extra,
                                                  {"x-forwarded-for": client, "x-tag": tag})
                after = await scrape(proxied)
                pids = await eventually(partial(all_logged, proxy_tree, tag, RATE + extra), 10)
                if len(pids) == 2:
                    break
            other = await proxied.get("/api/tools")  # another client has its own budget
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [200] * RATE + [429] * extra, statuses
        assert len(pids) == 2, pids  # both web processes took part, and shared one count
        for refused in (a for a in answers if a.status_code == 429):
            assert 1 <= int(refused.headers["retry-after"]) <= 3600, refused.headers
            error = refused.json()["error"]
            assert error["code"] == "rate_limited" and f"{RATE}/hour" in error["message"]
        assert other.status_code == 200, other.text
        assert (total(after, "agentd_rate_limited_total")
                - total(before, "agentd_rate_limited_total")) == extra
        counted = {status: total(after, "agentd_http_requests_total", route="/api/tools",
                                 status=status)
                   - total(before, "agentd_http_requests_total", route="/api/tools",
                           status=status) for status in ("200", "429")}
        assert counted == {"200": RATE, "429": extra}, counted
        # The open paths are never limited.
        assert (await proxied.get("/live", headers={"x-forwarded-for": client})
                ).status_code == 200

    async def test_a_high_priority_batch_runs_before_queued_low_ones_and_a_full_queue_is_503(
        self, llm, proxied
    ):
        marker = nonce()

        async def batch(priority: int, *texts: str) -> dict[str, Any]:
            response = await proxied.post("/api/batches", json={
                "priority": priority,
                "messages": [f"{marker} {t}" for t in texts]})
            assert response.status_code == 202, response.text
            return dict(response.json())

        async def view(batch_id: str) -> dict[str, Any]:
            response = await proxied.get(f"/api/batches/{batch_id}")
            assert response.status_code == 200, response.text
            return dict(response.json())

        with trio.fail_after(120):
            for body in ({"messages": ["x"] * 101}, {"messages": ["x"], "priority": 10},
                         {"messages": ["x"], "priority": -1}, {"messages": []},
                         {"messages": [""]}, {"messages": "x"}):
                response = await proxied.post("/api/batches", json=body)
                assert response.status_code == 422, (body, response.text)
                assert response.json()["error"]["code"] == "validation_error"
            runs_before = sum((await proxied.get("/api/status")).json()["runs"].values())
            # One run at a time (AGENTD_MAX_CONCURRENT_RUNS=1), each low one ~3 s.
            low = await batch(1, "low [[script tokens=6 rate=2]]", "low [[script tokens=6 rate=2]]")
            await eventually(lambda: _running(proxied, low["batch_id"]), 20, interval=0.1)
            high = await batch(9, "high [[script tokens=2]]", "high [[script tokens=2]]")
            # 1 low running, 1 low + 2 high queued: AGENTD_MAX_QUEUED_RUNS=3 is reached.
            low_view, high_view = await view(low["batch_id"]), await view(high["batch_id"])
            assert low_view["status"] == "running", low_view
            assert low_view["counts"] == {"running": 1, "queued": 1}, low_view
            assert high_view["status"] == "queued" and high_view["counts"] == {"queued": 2}
            assert {r["run_id"] for r in high_view["runs"]} == set(high["run_ids"])
            full = await proxied.post("/api/runs", json={"message": f"{marker} refused"})
            full_batch = await proxied.post("/api/batches", json={"messages": ["refused"]})
            for refused in (full, full_batch):
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "busy"
                assert int(refused.headers["retry-after"]) >= 1
            for run_id in [*low["run_ids"], *high["run_ids"]]:
                run = await run_final(proxied, run_id, 60)
                assert run["status"] == "completed", run
            done = await view(low["batch_id"])
            assert done["status"] == "done" and done["counts"] == {"completed": 2}, done
            assert all(r["reason"] == "completed" for r in done["runs"])
            later = await proxied.post("/api/runs", json={"message": f"{marker} later "
                                                                     "[[script tokens=1]]"})
            assert later.status_code == 202, later.text
            assert (await run_final(proxied, later.json()["run_id"], 30))["status"] == "completed"
            runs_after = sum((await proxied.get("/api/status")).json()["runs"].values())
        # Nothing lost, nothing extra: the five accepted runs, none of the refused ones.
        assert runs_after - runs_before == 5
        order = [str(r.body["messages"][-1]["content"]).split()[1]
                 for r in sorted(requests_with(llm, marker), key=lambda r: r.at)]
        assert order == ["low", "high", "high", "low", "later"], order


async def _running(client: httpx.AsyncClient, batch_id: str) -> bool:
    body = (await client.get(f"/api/batches/{batch_id}")).json()
    return bool(body["counts"].get("running"))


# The fuzz -------------------------------------------------------------------------------------
# Generated text has no NUL characters and no lone surrogates: agentd answers 500 to those in
# a chat message today (test_text_postgresql_cannot_store_is_refused_with_a_4xx_not_a_500,
# xfail), and they would drown whatever else the fuzz finds.


def _check(failures: list[str], where: str, status: int, content_type: str, text: str) -> None:
    if status >= 500:
        failures.append(f"{where} → {status} {text[:200]}")
        return
    if status < 400:
        return
    if not content_type.startswith("application/json"):
        failures.append(f"{where} → {status} not JSON: {content_type} {text[:200]}")
        return
    try:
        error = json.loads(text)["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["code"], str) and error["code"]
    except (ValueError, KeyError, TypeError, AssertionError):
        failures.append(f"{where} → {status} without the error shape: {text[:200]}")


def unhashable_role(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False
    messages = data.get("messages") if isinstance(data, dict) else None
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("role"), list | dict) for m in messages)


def explore(strategy: Any, each: Callable[[Any], None], examples: int) -> None:
    """Run `each` on `examples` values drawn from `strategy` (hypothesis, no shrinking: a
    failure is recorded by `each`, not raised, so one bad input does not hide the others)."""
    from hypothesis import HealthCheck, Phase, given, settings

    @given(value=strategy)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    def run(value: Any) -> None:
        each(value)

    run()


def fuzz_openapi(base_url: str, headers: dict[str, str], examples: int = 25) -> list[str]:
    """schemathesis: every operation of /openapi.json, valid and invalid inputs."""
    import schemathesis
    from hypothesis import strategies as st
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", timeout=30)
    schema.config.generation.update(allow_x00=False)
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, [op.path for op in operations]

    def call(value: Any) -> None:
        response = value.call(base_url=base_url, headers=headers, timeout=60)
        sent = response.request
        where = f"{sent.method} {sent.url} {sent.body!r:.200}"
        content_type = (response.headers.get("content-type") or [""])[0]
        _check(failures, where, response.status_code, content_type, response.text)

    for operation in operations:
        strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
        try:
            strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
        except Exception:  # noqa: BLE001 - nothing to make invalid in this operation
            pass
        explore(st.one_of(strategies), call, examples)
    return failures


def fuzz_bodies(base_url: str, headers: dict[str, str], examples: int = 25) -> list[str]:
    """hypothesis: what the OpenAPI document does not describe (bodies of most POST routes,
    query strings): any JSON, JSON objects with the fields agentd knows, and raw bytes."""
    from hypothesis import strategies as st

    text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
                   max_size=40)
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | text
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(text, inner, max_size=4), max_leaves=8)
    known = st.sampled_from(["message", "messages", "session_id", "timeout", "cache",
                             "priority", "on_disconnect", "text", "source", "title", "metadata",
                             "model", "stream", "expression", "query", "k", "max_results",
                             "user_id", "stream_options", "max_tokens", "temperature"])
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant",
                                                              "tool", "x"]) | values,
                                     "content": text | values})
    objects = st.dictionaries(known, values | text, max_size=6) | st.fixed_dictionaries(
        {"model": text, "messages": st.lists(message, max_size=3) | values},
        optional={"stream": st.booleans() | values, "message": text,
                  "session_id": text | values, "timeout": values})
    bodies = (values.map(json.dumps) | objects.map(json.dumps)).map(str.encode) | st.binary(
        max_size=200)
    posts = ["/api/chat", "/api/chat/stream", "/api/runs", "/api/batches", "/api/documents",
             "/api/tools/calculator", "/api/tools/current_time",
             "/api/tools/search_knowledge_base", "/v1/chat/completions"]
    long_text = st.text(alphabet=st.characters(codec="utf-8"), min_size=1900, max_size=2100)
    failures: list[str] = []
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        for path in posts:

            def post(body: bytes, path: str = path) -> None:
                if path.startswith("/v1/") and unhashable_role(body):
                    return  # a known 500 (xfail test_v1_a_role_that_is_not_a_string_is_a_400)
                response = client.post(path, content=body,
                                       headers={"content-type": "application/json"})
                _check(failures, f"POST {path} {body!r:.200}", response.status_code,
                       response.headers.get("content-type", ""), response.text)

            explore(bodies, post, examples)

        def search(params: dict[str, Any]) -> None:
            response = client.get("/api/search", params=params)
            _check(failures, f"GET /api/search {params!r:.200}", response.status_code,
                   response.headers.get("content-type", ""), response.text)

        query = st.fixed_dictionaries({}, optional={"q": text | long_text,
                                                    "k": st.integers() | text})
        explore(query, search, examples * 2)
    return failures
