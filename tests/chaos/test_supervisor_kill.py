"""SIGKILL of the supervisor itself at random moments — while the tree starts (during
PostgreSQL's initdb, then while the model loads), while it serves, while it drains — on one
data directory (DESIGN.md I8; API.md, Precise points → No orphans; I3, I4).

After each kill no process of the tree is left 2 s later (PostgreSQL's backends and a
half-done initdb included), and the next `agentd serve` on the same data directory starts,
recovers what the killed one was doing (every accepted run reaches a final status; a stream
cut by the kill resumes with `Last-Event-ID` and ends once, with what is stored), and serves.
The moment of each kill comes from a seeded generator (AGENTD_CHAOS_SEED replays it).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from typing import TYPE_CHECKING, Any

import httpx
import psutil
import pytest
import trio

from tests.chaos.conftest import gone_within, summary
from tests.e2e.conftest import (
    AGENTD,
    FINAL,
    AgentdTree,
    Ev,
    StreamResult,
    eventually,
    nonce,
    read_stream,
    run_final,
    tree_root,
)
from tests.support.tree import tree_processes

if TYPE_CHECKING:
    from tests.chaos.conftest import Tally

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("AGENTD_CHAOS_SEED", "20261201"))
TIMEOUT = 10  # AGENTD_SHUTDOWN_TIMEOUT: a 6.7 s drain, a 3.3 s reserve
#: Lease 15 s, reclaim every 5 s, plus the new tree's agent start.
RECOVERY_S = 45
ORPHAN_S = 2.0


def spawn(tree: AgentdTree) -> None:
    """`agentd serve` on the tree's data dir and port, without waiting for it."""
    with tree.log_path.open("ab") as log:
        log.write(f"--- start {tree.starts} (spawn) ---\n".encode())
        log.flush()
        tree.popen = subprocess.Popen([AGENTD, "serve"], stdout=log, stderr=log,
                                      env=tree._env(), cwd=tree.root)
    tree.starts += 1


class Pids:
    """Every pid seen in the tree so far: polled, so short-lived ones (initdb) count too."""

    def __init__(self, tree: AgentdTree) -> None:
        self.tree = tree
        self.seen: set[int] = set()

    def poll(self) -> None:
        assert self.tree.popen is not None
        self.seen.add(self.tree.popen.pid)
        try:
            self.seen.update(p.pid for p in tree_processes(self.tree.popen.pid).all)
        except psutil.NoSuchProcess:
            pass  # the supervisor was just SIGKILLed (and reaped): nothing new to see

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        self.poll()
        task_status.started()
        while True:
            self.poll()
            await trio.sleep(0.05)


async def kill_supervisor(tree: AgentdTree, pids: Pids, tally: Tally, phase: str,
                          problems: list[str]) -> None:
    assert tree.popen is not None
    pids.poll()
    tree.popen.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    left = await gone_within(pids.seen - {tree.popen.pid}, ORPHAN_S)
    tree.popen.wait(5)
    tally.extra[f"{phase}_pids"] = len(pids.seen)
    if left:
        names = {}
        for pid in left:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    names[pid] = f.read().replace(b"\0", b" ").decode()[:80]
            except OSError:
                names[pid] = "?"
        problems.append(f"{phase}: {len(left)} processes alive {ORPHAN_S} s after the "
                        f"supervisor's SIGKILL: {names}")
        for pid in left:  # do not leave them to the next phase
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    tally.extra[f"{phase}_gone_s"] = round(time.monotonic() - killed_at, 2)


async def wait_log(tree: AgentdTree, event: str, timeout: float, **match: Any) -> float:
    """Wait for a log event of the current start; returns when it was seen."""
    def found() -> bool:
        text = tree.text()
        current = text[text.rfind("--- start "):]
        return any(f'"event": "{event}"' in line and all(
            f'"{k}": "{v}"' in line for k, v in match.items()) for line in current.splitlines())

    await eventually(found, timeout)
    return time.monotonic()


async def kill_while_starting(tree: AgentdTree, rng: random.Random, tally: Tally,
                              problems: list[str], phase: str, after: str,
                              window: tuple[float, float], **match: Any) -> None:
    pids = Pids(tree)
    spawn(tree)
    async with trio.open_nursery() as nursery:
        await nursery.start(pids.watch)
        await wait_log(tree, after, 60, **match)
        delay = rng.uniform(*window)
        await trio.sleep(delay)
        nursery.cancel_scope.cancel()
    ready = '"event": "tree_ready"' in tree.text()[tree.text().rfind("--- start "):]
    tally.extra[phase] = f"{after}+{delay:.1f}s{' (ready already)' if ready else ''}"
    await kill_supervisor(tree, pids, tally, phase, problems)


async def open_work(client: httpx.AsyncClient, tag: str, seen: dict[str, list[Ev]],
                    results: dict[str, StreamResult], nursery: trio.Nursery) -> list[str]:
    """Six streams in flight and four runs accepted with 202; returns the accepted run ids."""

    async def chat(i: int) -> None:
        key = f"{tag}-{i}"
        try:
            results[key] = await read_stream(
                client, "POST", "/api/chat/stream",
                json={"message": f"{tag} {i} {nonce()} [[script tokens=200 rate=5]]",
                      "on_disconnect": "continue"},
                on_event=lambda events: seen.__setitem__(key, events))
        except httpx.TransportError:
            pass  # cut before the first byte: the kill came first; recorded as missing

    for i in range(6):
        nursery.start_soon(chat, i)
    await eventually(lambda: sum(1 for k, e in seen.items() if k.startswith(tag)
                                 and any(x.type == "token" for x in e)) == 6, 30)
    accepted = []
    for i in range(4):
        created = await client.post("/api/runs", json={
            "message": f"{tag} run {i} {nonce()} [[script tokens=30 rate=5]]"})
        assert created.status_code == 202, created.text
        accepted.append(created.json()["run_id"])
    return accepted


async def readers_done(seen: dict[str, list[Ev]], results: dict[str, StreamResult],
                       tag: str) -> None:
    """The clients' connections died with the webs: their readers return (bounded)."""
    with trio.move_on_after(10):
        await eventually(lambda: all(k in results for k in seen if k.startswith(tag)), 11)


async def check_recovered(client: httpx.AsyncClient, tag: str, seen: dict[str, list[Ev]],
                          results: dict[str, StreamResult], accepted: list[str],
                          tally: Tally, problems: list[str]) -> None:
    """After a restart: every run of the killed tree final; each stream ends once."""
    for run_id in accepted:
        try:
            run = await run_final(client, run_id, RECOVERY_S)
        except trio.TooSlowError:
            problems.append(f"{tag}: accepted run {run_id} not final {RECOVERY_S} s after "
                            "the restart")
            continue
        tally.runs[run["status"]] += 1
    for key, events in sorted(seen.items()):
        if not key.startswith(tag):
            continue
        run_id = events[0].data["run_id"]
        got = results.get(key)
        if got is not None and got.ends:
            whole = got
            tally.ends[got.ends[-1].data["reason"]] += 1
        else:
            last = next((e.id for e in reversed(events) if e.id is not None), None)
            with trio.fail_after(RECOVERY_S + 10):
                rest = await read_stream(client, "GET", f"/api/runs/{run_id}/events",
                                         headers={"Last-Event-ID": last} if last else {})
            whole = StreamResult(rest.status, rest.headers, events + rest.events[1:], rest.clean)
            tally.ends[f"resumed:{rest.ends[-1].data['reason']}" if rest.ends else "(none)"] += 1
        tally.streams[tag] += 1
        types = [e.type for e in whole.events]
        if types.count("end") != 1 or types[-1] != "end" or not whole.clean:
            problems.append(f"{key}: {types.count('end')} ends, clean={whole.clean}")
            continue
        run = (await client.get(f"/api/runs/{run_id}")).json()
        tally.runs[run["status"]] += 1
        if run["status"] not in FINAL or run["output"] != whole.tokens:
            problems.append(f"{key}: run {run['status']} stores {len(run['output'] or '')} "
                            f"chars, its stream had {len(whole.tokens)}")


async def test_supervisor_sigkill_leaves_no_process_and_the_next_start_recovers(llm):
    rng = random.Random(SEED)
    env = {"AGENTD_SHUTDOWN_TIMEOUT": str(TIMEOUT), "AGENTD_WEB_WORKERS": "2",
           "AGENTD_AGENT_WORKERS": "2"}
    with summary("supervisor_sigkill") as tally, tree_root("supervisor-kill") as root:
        tally.extra["seed"] = SEED
        tree = AgentdTree(root / "tree0", llm.base_url, env)
        try:
            await phases(tree, rng, tally, tally.problems)
        finally:
            tree.kill()


async def phases(tree: AgentdTree, rng: random.Random, tally: Tally, problems: list[str]
                 ) -> None:
    seen: dict[str, list[Ev]] = {}
    results: dict[str, StreamResult] = {}

    # Starting: during initdb on the fresh data dir, then while the model loads.
    await kill_while_starting(tree, rng, tally, problems, "initdb", "postgres_initdb",
                              (0.0, 1.5))
    await kill_while_starting(tree, rng, tally, problems, "model_load", "child_started",
                              (0.5, 6.0), child="embedding")

    # Serving: streams and accepted runs in flight.
    await trio.to_thread.run_sync(tree.start)
    tally.extra["restarted"] = tree.starts
    pids = Pids(tree)
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=tree.base_url, timeout=60, limits=limits) as client:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(pids.watch)
                serving = await open_work(client, "serving", seen, results, nursery)
                delay = rng.uniform(0.5, 3.0)
                await trio.sleep(delay)
                tally.extra["serving"] = f"+{delay:.1f}s"
                await kill_supervisor(tree, pids, tally, "serving", problems)
                await readers_done(seen, results, "serving")
                nursery.cancel_scope.cancel()

    # Draining: the next start recovers the serving phase, then is killed mid-drain.
    await trio.to_thread.run_sync(tree.start)
    pids = Pids(tree)
    async with httpx.AsyncClient(base_url=tree.base_url, timeout=60, limits=limits) as client:
        with trio.fail_after(RECOVERY_S * 3):
            await check_recovered(client, "serving", seen, results, serving, tally,
                                  problems)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(pids.watch)
                draining = await open_work(client, "draining", seen, results, nursery)
                tree.sigterm()
                delay = rng.uniform(0.1, TIMEOUT * 2 / 3)
                await trio.sleep(delay)
                tally.extra["draining"] = f"SIGTERM+{delay:.1f}s"
                await kill_supervisor(tree, pids, tally, "draining", problems)
                await readers_done(seen, results, "draining")
                nursery.cancel_scope.cancel()

    # And once more: the drain phase recovered, the service answers, a clean stop.
    await trio.to_thread.run_sync(tree.start)
    async with httpx.AsyncClient(base_url=tree.base_url, timeout=60) as client:
        with trio.fail_after(RECOVERY_S * 3):
            await check_recovered(client, "draining", seen, results, draining, tally,
                                  problems)
            chat = await client.post("/api/chat", json={"message": "[[script tokens=3]]"})
        if chat.status_code != 200:
            problems.append(f"after the kills a chat answers {chat.status_code}")
        status = (await client.get("/api/status")).json()["runs"]
    tally.extra["runs_now"] = status
    assert not problems, problems
    assert status.get("running", 0) == 0 and status.get("queued", 0) == 0, status
    assert tree.stop(timeout=TIMEOUT + 5) == 0
