"""End-to-end fixtures: the real `agentd serve` tree, as a subprocess, against the scripted LLM.

- `llm` (session): the scripted OpenAI-compatible server. It runs in a thread with its own
  `trio.run`, so trees that live longer than one test can use it; agentd reaches it over TCP.
  Tests read its counters and recorded requests as plain attributes (the GIL makes that
  safe) and wait on them by polling, bounded (`eventually`). Its failure counters are per
  directive text (`fail=N` fails N times per distinct directive, session-wide), so every test
  that scripts failures uses a directive no other test uses.
- `tree` (session): one shared tree that tests must not stop, signal or break.
- `start_tree` (function): a factory of private trees for tests that stop or crash them.

Starting a tree is sync (trio-free): spawn `agentd serve`, poll `/ready` with a sync httpx
client, bounded. Each start costs ~5 s on a 2-core machine, so trees are few.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psutil
import pytest
import trio

from app.web.sse import SSEParser
from tests.support.procs import descendants, kill_tree
from tests.support.scripted_llm import ScriptedLLM

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

AGENTD = str(Path(sys.executable).with_name("agentd"))
READY_TIMEOUT = 90.0
FINAL = ("completed", "cancelled", "failed", "interrupted")


# The scripted LLM, in a thread of its own ------------------------------------------------------


class LLMThread:
    """A `ScriptedLLM` served by its own trio loop in a daemon thread."""

    def __init__(self, **defaults: Any) -> None:
        self.llm = ScriptedLLM(**defaults)
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="scripted-llm", daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.llm.serve)
                    self._ready.set()

        try:
            trio.run(main)
        except BaseException as e:  # reported by start()
            self._error = e
        finally:
            self._ready.set()

    def start(self) -> ScriptedLLM:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None or not self.llm.base_url:
            raise RuntimeError("the scripted LLM did not start") from self._error
        return self.llm

    def stop(self) -> None:
        if self._token is not None and self._scope is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(10)


@pytest.fixture(scope="session")
def llm() -> Iterator[ScriptedLLM]:
    runner = LLMThread()
    try:
        yield runner.start()
    finally:
        runner.stop()


def requests_with(llm: ScriptedLLM, marker: str) -> list[Any]:
    """The chat requests whose last message contains `marker` (a test's nonce)."""
    found = []
    for r in list(llm.chat_requests):
        messages = (r.body or {}).get("messages") or []
        users = [m for m in messages if m.get("role") == "user"]
        if users and marker in str(users[-1].get("content")):
            found.append(r)
    return found


def nonce() -> str:
    """A marker to put in a message, outside the directive, to find the LLM's requests."""
    return f"n{uuid.uuid4().hex[:12]}"


# The agentd tree --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentdTree:
    """`agentd serve` with its own data dir and port; its log (JSON lines) in `log_path`."""

    def __init__(self, root: Path, llm_url: str, env: dict[str, str] | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.log_path = root / "serve.log"
        self.port = free_port()
        self.llm_url = llm_url
        self.extra_env = env or {}
        self.popen: subprocess.Popen[bytes] | None = None
        self.sigterm_at: float | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def _env(self) -> dict[str, str]:
        # Hermetic: nothing AGENTD_*/OPENAI_* from the caller's environment leaks in.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTD_", "OPENAI_"))}
        env.update({
            "PYTHONUNBUFFERED": "1",
            "AGENTD_DATA_DIR": str(self.root / "var"),
            "AGENTD_BIND": f"127.0.0.1:{self.port}",
            "AGENTD_LLM_BASE_URL": self.llm_url,
            "AGENTD_LLM_API_KEY": "test-key",
            "AGENTD_LLM_MODEL": "scripted",
            "AGENTD_LOG_FORMAT": "json",
            "AGENTD_LOG_LEVEL": "info",
            **self.extra_env,
        })
        return env

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Spawn the tree (again, on the same data dir and port) and wait until /ready."""
        for _attempt in range(3):
            with self.log_path.open("ab") as log:
                log.write(f"--- start {self.starts} ---\n".encode())
                log.flush()
                # cwd is the test's own directory: no stray `.env` is read.
                self.popen = subprocess.Popen([AGENTD, "serve"], stdout=log, stderr=log,
                                              env=self._env(), cwd=self.root)
            self.starts += 1
            self.sigterm_at = None
            if self._wait_ready(timeout):
                return
            if "cannot listen" not in self.text()[-2000:] or self.starts > 1:
                break
            self.port = free_port()  # someone took the port between our probe and the bind
        raise AssertionError(f"agentd did not become ready:\n{self.text()[-6000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2) as client:
            while time.monotonic() < deadline:
                assert self.popen is not None
                if self.popen.poll() is not None:
                    return False
                try:
                    if client.get(f"{self.base_url}/ready").status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        self.kill()
        return False

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if name is None or event.get("event") == name:
                    out.append(event)
        return out

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def sigterm(self) -> None:
        self.sigterm_at = time.monotonic()
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)

    async def wait_exit(self, timeout: float) -> tuple[int, float]:
        """(exit status, seconds since SIGTERM), bounded by `timeout`."""
        assert self.popen is not None and self.sigterm_at is not None
        with trio.fail_after(timeout):
            while self.popen.poll() is None:
                await trio.sleep(0.02)
        return self.popen.returncode, time.monotonic() - self.sigterm_at

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait (sync): the exit status."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.sigterm()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"agentd still running {timeout} s after SIGTERM") from None
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            kill_tree(self.popen.pid)
            self.popen.wait(10)

    def role_pids(self, role: str) -> list[int]:
        """Children showing `agentd: <role>` in their command line (API.md, Processes)."""
        pids = []
        for p in descendants(self.pid):
            try:
                if f"agentd: {role}" in " ".join(p.cmdline()) and p.status() != "zombie":
                    pids.append(p.pid)
            except psutil.Error:
                continue
        return pids


SHARED_ENV = {
    # A hung upstream ends a run `timeout` after 2 s; a failing one gives up after 1 retry.
    "AGENTD_LLM_TIMEOUT": "2",
    "AGENTD_LLM_MAX_RETRIES": "1",
    "AGENTD_SHUTDOWN_TIMEOUT": "10",
}


@contextmanager
def tree_root(name: str) -> Iterator[Path]:
    """A data dir outside pytest's basetemp: as root, a concurrent pytest session resets
    /tmp/pytest-of-root to mode 0700, and the embedded PostgreSQL's own user loses its way
    in. Removed afterwards unless AGENTD_E2E_KEEP is set (to read the logs)."""
    root = Path(tempfile.mkdtemp(prefix=f"agentd-e2e-{name}-", dir="/tmp"))
    try:
        yield root
    finally:
        if not os.environ.get("AGENTD_E2E_KEEP"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tree(llm: ScriptedLLM) -> Iterator[AgentdTree]:
    """A tree shared by every test that leaves it running (no stop; test_crash kills its
    agent and checks that it comes back)."""
    with tree_root("shared") as root:
        agentd = AgentdTree(root, llm.base_url, SHARED_ENV)
        try:
            agentd.start()
            yield agentd
            assert agentd.alive(), "a test stopped the shared tree"
            status = agentd.stop(timeout=15)
            assert status == 0, f"shared tree exited {status}:\n{agentd.text()[-3000:]}"
        finally:
            agentd.kill()


@pytest.fixture
def start_tree(llm: ScriptedLLM, request: pytest.FixtureRequest
               ) -> Iterator[Callable[..., AgentdTree]]:
    """Private trees: `start_tree(AGENTD_X="…")` → a running tree, killed after the test."""
    made: list[AgentdTree] = []
    with tree_root(re.sub(r"[^\w-]", "_", request.node.name)[:40]) as root:

        def start(**env: str) -> AgentdTree:
            agentd = AgentdTree(root / f"tree{len(made)}", llm.base_url, env)
            made.append(agentd)
            agentd.start()
            return agentd

        yield start
        for agentd in made:
            agentd.kill()


# Clients ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ev:
    """One SSE event: `id` is its own id field (None when it had none)."""

    id: str | None
    type: str
    data: dict[str, Any]


@dataclass
class StreamResult:
    status: int
    headers: httpx.Headers
    events: list[Ev]
    clean: bool  # the body ended with its terminator (not cut, not left by us)
    left: bool = False  # we closed it ourselves

    @property
    def tokens(self) -> str:
        return "".join(e.data["content"] for e in self.events if e.type == "token")

    @property
    def ends(self) -> list[Ev]:
        return [e for e in self.events if e.type == "end"]

    @property
    def run_id(self) -> str:
        return str(self.events[0].data["run_id"])

    @property
    def session_id(self) -> str:
        return str(self.events[0].data["session_id"])


async def read_stream(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    until: Callable[[list[Ev]], bool] | None = None,
    on_event: Callable[[list[Ev]], None] | None = None,
    **kwargs: Any,
) -> StreamResult:
    """Read an SSE response to its end, or until `until(events)` holds (then leave)."""
    parser = SSEParser()
    events: list[Ev] = []
    last_id: str | None = None
    async with client.stream(method, url, **kwargs) as response:
        result = StreamResult(response.status_code, response.headers, events, clean=False)
        if response.status_code != 200:
            await response.aread()
            result.clean = True
            return result
        try:
            async for chunk in response.aiter_bytes():
                for message in parser.feed(chunk):
                    own = message.id if message.id != last_id else None
                    last_id = message.id
                    events.append(Ev(own, message.event, json.loads(message.data)))
                    if on_event is not None:
                        on_event(events)
                if until is not None and until(events):
                    result.left = True
                    return result
            result.clean = True
        except (httpx.RemoteProtocolError, httpx.ReadError):
            result.clean = False
    return result


class LiveChat:
    """A chat streamed in the background: start `read` in a nursery; `seen` holds its events
    so far, `result` its StreamResult once the stream is over."""

    def __init__(self, client: httpx.AsyncClient, script: str, *,
                 path: str = "/api/chat/stream", **body: Any) -> None:
        self.client = client
        self.path = path
        self.body = {"message": f"{nonce()} [[script {script}]]", **body}
        self.seen: list[Ev] = []
        self.result: StreamResult | None = None

    async def read(self) -> None:
        self.result = await read_stream(self.client, "POST", self.path, json=self.body,
                                        on_event=self._update)

    def _update(self, events: list[Ev]) -> None:
        self.seen = events  # read_stream appends to this same list

    def tokens(self) -> int:
        return sum(e.type == "token" for e in self.seen)


def id_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def tokens_at_least(n: int) -> Callable[[list[Ev]], bool]:
    return lambda events: sum(e.type == "token" for e in events) >= n


async def eventually(check: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll `check` (sync or async) until it returns something truthy; bounded."""
    with trio.fail_after(timeout):
        while True:
            value = check()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return value
            await trio.sleep(interval)


async def run_final(client: httpx.AsyncClient, run_id: str, timeout: float) -> dict[str, Any]:
    """GET /api/runs/{id} until the run reaches a final status."""

    async def check() -> dict[str, Any] | None:
        reply = await client.get(f"/api/runs/{run_id}")
        if reply.status_code == 503:  # a dependency coming back (a chaos test killed it)
            return None
        body: dict[str, Any] = reply.json()
        return body if body["status"] in FINAL else None

    result: dict[str, Any] = await eventually(check, timeout, interval=0.1)
    return result


async def assistant_message(client: httpx.AsyncClient, session_id: str, run_id: str
                            ) -> dict[str, Any]:
    response = await client.get(f"/api/sessions/{session_id}/messages")
    assert response.status_code == 200, response.text
    found = [m for m in response.json()["messages"]
             if m["role"] == "assistant" and m.get("run_id") == run_id]
    assert len(found) == 1, response.json()
    return dict(found[0])
