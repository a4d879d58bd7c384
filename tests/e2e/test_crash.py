"""An agent process SIGKILLed mid-run: the supervisor replaces it, the run's lease expires,
and the run is recovered (interrupted, partial kept, `end` sent), never left `running`
(API.md: Signals and exit; DESIGN.md: I3)."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
import trio

from tests.e2e.conftest import LiveChat, assistant_message, eventually
from tests.support.scripted_llm import token_text

pytestmark = pytest.mark.slow

# The dead agent's lease (15 s) must run out, and a live agent's renew loop (every 5 s)
# find it: ~20 s at worst, plus the restarted agent's start.
RECOVERY_S = 40


async def test_agent_killed_mid_run_is_replaced_and_its_run_ends_interrupted_with_the_partial(
    tree,
):
    # On the shared tree (a start costs ~15 s): it must come back whole, which is the point.
    [agent] = tree.role_pids("agent")
    async with httpx.AsyncClient(base_url=tree.base_url, timeout=60) as client:
        chat = LiveChat(client, "tokens=400 rate=10")
        with trio.fail_after(RECOVERY_S + 15):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(chat.read)
                await eventually(lambda: chat.tokens() >= 5, 10)
                os.kill(agent, signal.SIGKILL)
                killed_at = time.monotonic()
                replaced = await eventually(
                    lambda: [p for p in tree.role_pids("agent") if p != agent], 15)
                with trio.fail_after(RECOVERY_S):
                    await eventually(lambda: any(e.type == "end" for e in chat.seen),
                                     RECOVERY_S, interval=0.2)
                recovered_after = time.monotonic() - killed_at
        result = chat.result
        assert result is not None
        types = [e.type for e in result.events]
        assert types.count("end") == 1 and types[-1] == "end", types
        end = result.events[-1].data
        assert end["reason"] == "server_shutdown" and end["resumable"] is True
        assert end["detail"] and end["message_id"]
        assert result.clean
        assert result.tokens and token_text(400).startswith(result.tokens)
        assert len(result.tokens) < len(token_text(400))

        run = (await client.get(f"/api/runs/{result.run_id}")).json()
        assert run["status"] == "interrupted" and run["reason"] == "server_shutdown"
        stored = await assistant_message(client, result.session_id, result.run_id)
        assert stored["status"] == "interrupted" and stored["content"] == result.tokens
        assert stored["message_id"] == end["message_id"]

        # The service recovered: a new agent answers.
        assert len(replaced) == 1 and tree.alive()
        with trio.fail_after(20):
            again = await client.post("/api/chat", json={"message": "[[script tokens=3]]"})
        assert again.status_code == 200 and again.json()["response"] == token_text(3)
    assert recovered_after < RECOVERY_S
    exits = [e for e in tree.events("child_exited") if e.get("child_pid") == agent]
    assert exits and "SIGKILL" in exits[0]["outcome"], exits
