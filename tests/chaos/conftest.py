"""Chaos scenarios on the real tree: `agentd serve` with embedded PostgreSQL and Redis, the
real embedding model, and the scripted LLM (tests/e2e/conftest.py has the tree and clients).

What is shared here:

- `llm`: a scripted LLM of the chaos suite's own (its failure counters are per directive
  text and session-wide, so sharing the e2e one would let the two suites' directives
  collide). `start_tree` (from the e2e conftest) picks it up by name.
- `Tally` and `summary`: each scenario prints one line, `CHAOS <name>: …`, with counts of
  streams, ends by reason, runs by status and seconds, so a failure says what was lost.
- `open_stalled`: a client that sends a streaming request and then stops reading, with a
  tiny receive buffer, so the server's send buffer fills and its writes block.
- `dead_endpoint`: a TCP port that accepts connections (the kernel does, into the backlog)
  and never answers: a hung tool upstream.
- Process helpers: the tree's processes by role, and a bounded wait for pids to be gone.

Every wait is bounded (`trio.fail_after`, or `eventually` from the e2e conftest).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import select
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil
import pytest
import trio

from tests.e2e.conftest import FINAL, LLMThread, StreamResult, start_tree
from tests.support.procs import ROOT
from tests.support.tree import tree_processes

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    import httpx

    from tests.e2e.conftest import AgentdTree
    from tests.support.scripted_llm import ScriptedLLM

__all__ = ["start_tree"]  # a fixture: pytest finds it by name in this module


@pytest.fixture(scope="session")
def llm() -> Iterator[ScriptedLLM]:
    runner = LLMThread()
    try:
        yield runner.start()
    finally:
        runner.stop()


@pytest.fixture(scope="session")
def llm_process() -> Iterator[str]:
    """The scripted LLM as a process of its own (its base URL): a thousand streams from the
    thread-hosted one would share this process's interpreter lock with the clients."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.scripted_llm", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline().decode() if readable else "(nothing within 20 s)"
        assert line.startswith("LISTENING "), line
        yield line.split()[-1]
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="session", autouse=True)
def _many_files() -> None:
    """A thousand streams, their LLM connections (the scripted LLM runs in this process)
    and the idle ones need more descriptors than a default soft limit of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 16384 if hard == resource.RLIM_INFINITY else min(hard, 16384)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# The one-line summary ---------------------------------------------------------------------


@dataclass
class Tally:
    """What a scenario saw, for its summary line."""

    name: str
    began: float = field(default_factory=time.monotonic)
    streams: Counter[str] = field(default_factory=Counter)
    ends: Counter[str] = field(default_factory=Counter)
    runs: Counter[str] = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)
    #: What went wrong, in words (a scenario that checks many things lists them all here).
    problems: list[str] = field(default_factory=list)

    def count_stream(self, kind: str, result: StreamResult | None) -> None:
        self.streams[kind] += 1
        if result is None:
            self.ends["(no answer)"] += 1
            return
        if result.status != 200:
            self.ends[f"http {result.status}"] += 1
            return
        ends = result.ends
        if not ends:
            self.ends["(none)" if result.clean or result.left else "(none, cut)"] += 1
        for end in ends:
            self.ends[str(end.data.get("reason"))] += 1

    def line(self) -> str:
        def fmt(counter: Counter[str]) -> str:
            return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(counter.items())) + "}"

        parts = [f"streams={sum(self.streams.values())} {fmt(self.streams)}",
                 f"ends={fmt(self.ends)}", f"runs={fmt(self.runs)}"]
        parts += [f"{k}={v}" for k, v in self.extra.items()]
        parts.append(f"load={os.getloadavg()[0]:.1f}")
        if self.problems:
            parts.append("problems=" + " | ".join(p[:300] for p in self.problems))
        parts.append(f"took={time.monotonic() - self.began:.1f}s")
        return f"CHAOS {self.name}: " + " ".join(parts)


@contextlib.contextmanager
def summary(name: str) -> Iterator[Tally]:
    """Print the scenario's line at the end, pass or fail (a failure says what was lost)."""
    tally = Tally(name)
    try:
        yield tally
    except BaseException as e:
        tally.extra["failed"] = type(e).__name__
        raise
    finally:
        print("\n" + tally.line(), flush=True)


# Clients ----------------------------------------------------------------------------------


async def runs_by_status(client: httpx.AsyncClient, run_ids: Iterable[str],
                         concurrency: int = 16) -> dict[str, dict[str, Any]]:
    """GET /api/runs/{id} for each run, a few at a time."""
    found: dict[str, dict[str, Any]] = {}
    limiter = trio.CapacityLimiter(concurrency)

    async def one(run_id: str) -> None:
        async with limiter:
            response = await client.get(f"/api/runs/{run_id}")
            assert response.status_code == 200, (run_id, response.status_code, response.text)
            found[run_id] = response.json()

    async with trio.open_nursery() as nursery:
        for run_id in set(run_ids):
            nursery.start_soon(one, run_id)
    return found


def count_statuses(runs: Iterable[dict[str, Any]]) -> Counter[str]:
    return Counter(str(r["status"]) for r in runs)


def not_final(runs: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {rid: r["status"] for rid, r in runs.items() if r["status"] not in FINAL}


_RUN_ID = re.compile(rb'"run_id": "([0-9a-f-]+)"')


@dataclass
class Stalled:
    """A client that sent a streaming request, read its first event, and stopped reading."""

    sock: trio.socket.SocketType
    head: bytes

    @property
    def run_id(self) -> str | None:
        found = _RUN_ID.search(self.head)
        return found.group(1).decode() if found else None

    def close(self) -> None:
        self.sock.close()


async def open_stalled(port: int, body: dict[str, Any], path: str = "/api/chat/stream"
                       ) -> Stalled:
    sock = trio.socket.socket()
    # A small receive buffer (set before connecting: it bounds the window advertised),
    # so the server's writes block after a few KiB instead of megabytes.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    payload = json.dumps(body).encode()
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
    await sock.send(request)
    head = b""
    with trio.move_on_after(30):
        while _RUN_ID.search(head) is None:
            chunk = await sock.recv(1024)
            if not chunk:
                break
            head += chunk
    return Stalled(sock, head)


@contextlib.contextmanager
def dead_endpoint() -> Iterator[str]:
    """http://127.0.0.1:PORT that accepts (into its backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


# Processes --------------------------------------------------------------------------------


def role_procs(tree: AgentdTree, role: str) -> list[psutil.Process]:
    """The tree's processes of `role`: web, agent, embedding, redis, or postgres (the
    postmaster only: the supervisor's direct child)."""
    procs = tree_processes(tree.pid)
    if role == "postgres":
        return [p for p in procs.by_role.get("postgres", []) if p.ppid() == tree.pid]
    return [p for p in procs.by_role.get(role, []) if _alive(p)]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def all_pids(tree: AgentdTree) -> list[int]:
    """The supervisor and every process under it (PostgreSQL's backends included)."""
    return [tree.pid, *(p.pid for p in tree_processes(tree.pid).all)]


async def gone_within(pids: Iterable[int], timeout: float) -> list[int]:
    """The pids still alive after `timeout` (empty: all gone in time)."""
    pids = list(pids)
    deadline = trio.current_time() + timeout
    while True:
        left = [pid for pid in pids if _pid_alive(pid)]
        if not left or trio.current_time() >= deadline:
            return left
        await trio.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
