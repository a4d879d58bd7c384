"""A child whose event loop blocks (DESIGN.md, Supervision → Watchdog; API.md: Signals and
exit → "SIGKILL or SIGSTOP of one child"): the supervisor sees the missed watchdog pings,
sends SIGABRT, faulthandler dumps the child's stacks to the log, the child is replaced and
the service recovers.

Blocking a real child's loop: gdb asks the interpreter to run ``time.sleep(…)`` as a pending
call (`Py_AddPendingCall(PyRun_SimpleString, …)`), which the main thread runs at its next
bytecode boundary, inside trio's loop: the loop is blocked for real, and the dump shows the
sleep (``File "<string>", line 1``) above trio's `get_events`. Without gdb the child is
SIGSTOPped instead and SIGCONTinued once the watchdog has fired, so that the pending SIGABRT
is delivered and faulthandler still writes its dump. A plain SIGSTOP (never continued) is
the other case API.md names: the supervisor kills the stopped child after its grace period.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import TYPE_CHECKING

import httpx
import psutil
import pytest
import trio

from tests.chaos.conftest import role_procs, summary
from tests.e2e.conftest import (
    LiveChat,
    assistant_message,
    eventually,
    read_stream,
    run_final,
)
from tests.support.scripted_llm import token_text

if TYPE_CHECKING:
    from tests.e2e.conftest import AgentdTree

pytestmark = pytest.mark.slow

WATCHDOG_S = 2.0
BLOCK_S = 60  # far longer than the watchdog: only the supervisor ends it
RECOVERY_S = 45  # lease 15 s + reclaim every 5 s + the replacement's start


def block_loop_with_gdb(pid: int) -> bool:
    """Make `pid`'s main thread run time.sleep(BLOCK_S) inside its event loop."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return False
    code = f"import time; time.sleep({BLOCK_S})"
    call = f'call (int)Py_AddPendingCall((void*)PyRun_SimpleString, (void*)strdup("{code}"))'
    try:
        done = subprocess.run([gdb, "-p", str(pid), "-batch", "-nx", "-ex", call],
                              capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and "$1 = 0" in done.stdout


async def block_loop(tree: AgentdTree, pid: int) -> str:
    """Block `pid`'s loop; returns how ("gdb" or "sigstop+sigcont")."""
    if await trio.to_thread.run_sync(block_loop_with_gdb, pid):
        return "gdb"
    os.kill(pid, signal.SIGSTOP)
    await eventually(lambda: watchdog_fired(tree, pid), 10 + WATCHDOG_S)
    os.kill(pid, signal.SIGCONT)  # the SIGABRT the supervisor sent is delivered now
    return "sigstop+sigcont"


def streams_on(proc: psutil.Process, port: int) -> int:
    """Established connections of `proc` on the public port (its clients)."""
    try:
        conns = proc.net_connections(kind="tcp")
    except psutil.Error:
        return 0
    return sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in conns)


def watchdog_fired(tree: AgentdTree, pid: int) -> bool:
    return any(e.get("pid") == pid for e in tree.events("child_watchdog_timeout"))


def exit_of(tree: AgentdTree, pid: int) -> str | None:
    found = [e["outcome"] for e in tree.events("child_exited") if e.get("child_pid") == pid]
    return found[0] if found else None


def dump_after_watchdog(tree: AgentdTree, pid: int) -> str:
    """The faulthandler dump written after the watchdog fired for `pid` (log text)."""
    text = tree.text()
    marker = text.find(f'"pid": {pid}, "interval_s"')
    assert marker >= 0, "no child_watchdog_timeout line"
    start = text.find("Fatal Python error: Aborted", marker)
    return "" if start < 0 else text[start:start + 6000]


async def test_blocked_event_loop_is_dumped_killed_and_replaced_and_the_run_recovered(
    start_tree,
):
    with summary("watchdog_blocked_loop") as tally:
        tree = start_tree(AGENTD_WATCHDOG_INTERVAL=str(WATCHDOG_S), AGENTD_WEB_WORKERS="2",
                          AGENTD_SHUTDOWN_TIMEOUT="10")
        [agent] = role_procs(tree, "agent")
        async with httpx.AsyncClient(base_url=tree.base_url, timeout=60) as client:
            chat = LiveChat(client, "tokens=400 rate=10")

            with trio.fail_after(RECOVERY_S + 60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(chat.read)
                    await eventually(lambda: chat.tokens() >= 5, 15)
                    blocked_at = time.monotonic()
                    tally.extra["how"] = await block_loop(tree, agent.pid)
                    await eventually(lambda: watchdog_fired(tree, agent.pid), 10 + WATCHDOG_S)
                    tally.extra["detected_s"] = round(time.monotonic() - blocked_at, 1)
                    await eventually(lambda: exit_of(tree, agent.pid), 10)
                    await eventually(lambda: [p for p in role_procs(tree, "agent")
                                              if p.pid != agent.pid], 15)
                    tally.extra["replaced_s"] = round(time.monotonic() - blocked_at, 1)
            result = chat.result
            assert result is not None
            tally.count_stream("chat", result)
            run = await run_final(client, result.run_id, RECOVERY_S)
            tally.runs[run["status"]] += 1
            stored = await assistant_message(client, result.session_id, result.run_id)
            with trio.fail_after(30):
                again = await client.post("/api/chat", json={"message": "[[script tokens=3]]"})

        assert exit_of(tree, agent.pid) == "watchdog", tree.events("child_exited")
        dump = dump_after_watchdog(tree, agent.pid)
        assert "Current thread" in dump and "trio/_core/_run.py" in dump, dump[:2000]
        if tally.extra["how"] == "gdb":
            assert 'File "<string>", line 1' in dump, dump[:2000]  # the blocking call itself
        types = [e.type for e in result.events]
        assert types.count("end") == 1 and types[-1] == "end" and result.clean, types[-3:]
        assert result.events[-1].data["reason"] == "server_shutdown"
        assert run["status"] == "interrupted" and run["output"] == result.tokens
        assert stored["content"] == result.tokens and stored["status"] == "interrupted"
        assert again.status_code == 200 and again.json()["response"] == token_text(3)
        assert tree.alive() and tree.stop(timeout=20) == 0


async def test_stopped_web_process_is_killed_after_its_watchdog_and_its_streams_resume(
    start_tree,
):
    with summary("watchdog_sigstop_web") as tally:
        tree = start_tree(AGENTD_WATCHDOG_INTERVAL=str(WATCHDOG_S), AGENTD_WEB_WORKERS="2",
                          AGENTD_SHUTDOWN_TIMEOUT="10")
        webs = role_procs(tree, "web")
        limits = httpx.Limits(max_connections=20, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=tree.base_url, timeout=30, limits=limits) as client:
            chats = [LiveChat(client, "tokens=120 rate=10", on_disconnect="continue")
                     for _ in range(8)]

            with trio.fail_after(90):
                async with trio.open_nursery() as nursery:
                    for chat in chats:
                        nursery.start_soon(chat.read)
                    await eventually(lambda: all(chat.tokens() >= 3 for chat in chats), 15)
                    # The web that carries the most streams (both accept on the listener).
                    victim = max(webs, key=lambda p: streams_on(p, tree.port))
                    tally.extra["victim_streams"] = streams_on(victim, tree.port)
                    stopped_at = time.monotonic()
                    os.kill(victim.pid, signal.SIGSTOP)
                    await eventually(lambda: watchdog_fired(tree, victim.pid), 10 + WATCHDOG_S)
                    tally.extra["detected_s"] = round(time.monotonic() - stopped_at, 1)
                    await eventually(lambda: exit_of(tree, victim.pid), 15)
                    tally.extra["replaced_s"] = round(time.monotonic() - stopped_at, 1)
                    # Its connections die with it: those clients are cut, the others go on.
            ends: list[str] = []
            for i, chat in enumerate(chats):
                events, done = chat.seen, chat.result
                if done is not None and done.ends:
                    ends.append(done.ends[-1].data["reason"])
                    assert done.clean and done.tokens == token_text(120), i
                    continue
                last = next(e.id for e in reversed(events) if e.id is not None)
                with trio.fail_after(30):
                    rest = await read_stream(client, "GET",
                                             f"/api/runs/{events[0].data['run_id']}/events",
                                             headers={"Last-Event-ID": last})
                tokens = "".join(e.data["content"] for e in events + rest.events[1:]
                                 if e.type == "token")
                ends.append(f"resumed:{rest.ends[-1].data['reason']}" if rest.ends else "none")
                assert rest.clean and [e.type for e in rest.events].count("end") == 1
                assert tokens == token_text(120), i
            tally.ends.update(ends)
            tally.streams["chat"] = len(chats)
        assert exit_of(tree, victim.pid) in ("watchdog", "killed by SIGKILL"), exit_of(
            tree, victim.pid)
        assert len(role_procs(tree, "web")) == 2
        assert tree.alive() and tree.stop(timeout=20) == 0
