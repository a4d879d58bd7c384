"""A crash loop (DESIGN.md, Supervision → Restarts; API.md, Signals and exit → exit status):
a child that dies again as soon as it is replaced exceeds the restart intensity (more than
5 restarts in 60 s); the supervisor then stops the whole tree the clean way — the drain, one
`end` for each open stream, every process gone — and exits non-zero, for systemd's
`Restart=on-failure` to take over.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest
import trio

from tests.chaos.conftest import all_pids, gone_within, role_procs, summary
from tests.e2e.conftest import LiveChat, eventually

pytestmark = pytest.mark.slow

TIMEOUT = 10  # AGENTD_SHUTDOWN_TIMEOUT
MAX_RESTARTS = 5  # supervisor/policy.py RestartIntensity


async def test_crash_loop_exceeds_the_restart_intensity_and_the_tree_stops_non_zero(start_tree):
    with summary("crash_loop") as tally:
        tree = start_tree(AGENTD_SHUTDOWN_TIMEOUT=str(TIMEOUT))
        pids = all_pids(tree)
        killed: list[int] = []
        async with httpx.AsyncClient(base_url=tree.base_url, timeout=30) as client:
            chat = LiveChat(client, "tokens=4000 rate=5")

            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(chat.read)
                    await eventually(lambda: chat.tokens() >= 2, 15)
                    began = time.monotonic()
                    # Kill each agent as soon as it appears, until the supervisor gives up.
                    while tree.alive() and not tree.events("restart_intensity_exceeded"):
                        agents = [p for p in role_procs(tree, "agent") if p.pid not in killed]
                        for agent in agents:
                            pids.append(agent.pid)
                            try:
                                os.kill(agent.pid, signal.SIGKILL)
                            except ProcessLookupError:
                                continue
                            killed.append(agent.pid)
                        await trio.sleep(0.05)
                    tally.extra["kills"] = len(killed)
                    tally.extra["escalated_s"] = round(time.monotonic() - began, 1)
                    escalated_at = time.monotonic()
                    while tree.alive():
                        pids += [p.pid for p in psutil.Process(tree.pid).children(recursive=True)]
                        await trio.sleep(0.05)
                    assert tree.popen is not None
                    status = tree.popen.wait()
                    took = time.monotonic() - escalated_at
                    tally.extra.update(exit=status, stop_s=round(took, 1))
        left = await gone_within(pids, 2)
        summary_event = tree.events("shutdown_complete")[-1]
        result = chat.result
        assert result is not None
        tally.count_stream("chat", result)
        tally.extra["killed_at_stop"] = summary_event["killed"]

        assert tree.events("restart_intensity_exceeded"), tree.text()[-3000:]
        assert len(killed) == MAX_RESTARTS + 1, killed
        assert status != 0 and summary_event["exit_status"] == status
        assert took <= TIMEOUT + 1, took
        assert summary_event["killed"] == [], summary_event  # stopped, not killed
        assert not left, f"still alive after the tree stopped: {left}"
        types = [e.type for e in result.events]
        assert types.count("end") == 1 and types[-1] == "end" and result.clean, types[-3:]
        assert result.ends[0].data["reason"] == "server_shutdown"
        assert result.ends[0].data["resumable"] is True
