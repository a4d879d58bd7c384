"""An LLM endpoint that misbehaves, many runs at once (API.md: Configuration →
AGENTD_LLM_MAX_RETRIES, AGENTD_LLM_TIMEOUT, AGENTD_LLM_FALLBACK_*; Agent behaviour): 429
with Retry-After, 500s, resets mid-stream and before the first token, hangs. Retries are
bounded and honour Retry-After, the fallback is used when the primary gives up, a run that
cannot be answered ends `error` or `timeout` with a detail a person can act on, what was
streamed is what is stored, and no run is left running.

Each stream's directive is made unique (its `tokens=`), because the scripted LLM counts
`fail=N` per directive text.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from tests.chaos.conftest import summary
from tests.e2e.conftest import (
    FINAL,
    StreamResult,
    assistant_message,
    eventually,
    nonce,
    read_stream,
    requests_with,
    run_final,
)
from tests.support.scripted_llm import token_text

if TYPE_CHECKING:
    from tests.support.scripted_llm import ScriptedLLM

pytestmark = pytest.mark.slow

RETRIES = 2
ATTEMPTS = RETRIES + 1  # per endpoint
LLM_TIMEOUT = 3
FALLBACK = "chaos-fallback-model"
PER_CASE = 4
#: case → (directive without tokens=, end reason, LLM requests per run, tokens streamed
#: (None: all of them), the model that answered last: "primary" or "fallback").
CASES: dict[str, tuple[str, str, int, int | None, str]] = {
    "429_retry_after": ("fail=1 status=429 retry_after=1", "completed", 2, None, "primary"),
    "500_then_ok": ("fail=2 status=500", "completed", 3, None, "primary"),
    "500_to_fallback": ("fail=3 status=502", "completed", ATTEMPTS + 1, None, "fallback"),
    "503_always": ("fail=1000 status=503", "error", 2 * ATTEMPTS, 0, "fallback"),
    "429_always": ("fail=1000 status=429 retry_after=0.2", "error", 2 * ATTEMPTS, 0, "fallback"),
    "reset_mid_stream": ("reset_after=3", "error", 1, 3, "primary"),
    "reset_at_once": ("reset_after=0", "error", 2 * ATTEMPTS, 0, "fallback"),
    "hang_mid_stream": ("hang_after=3", "timeout", 1, 3, "primary"),
    "hang_at_once": ("hang_after=0", "timeout", 1, 0, "primary"),
}
STORED = {"completed": ("completed", "complete"), "error": ("failed", "error"),
          "timeout": ("interrupted", "interrupted")}


def directive(case: str, i: int) -> tuple[str, int]:
    tokens = 20 + 10 * list(CASES).index(case) + i  # unique per stream, stable per session
    return f"[[script {CASES[case][0]} tokens={tokens}]]", tokens


async def test_llm_faults_are_retried_within_bounds_fall_back_and_end_with_a_detail(
    start_tree, llm: ScriptedLLM,
):
    with summary("llm_faults") as tally:
        tree = start_tree(AGENTD_LLM_MAX_RETRIES=str(RETRIES), AGENTD_LLM_TIMEOUT=str(LLM_TIMEOUT),
                          AGENTD_LLM_FALLBACK_MODEL=FALLBACK, AGENTD_SHUTDOWN_TIMEOUT="10")
        results: dict[tuple[str, int], StreamResult] = {}
        markers: dict[tuple[str, int], str] = {}
        async with httpx.AsyncClient(base_url=tree.base_url, timeout=60) as client:

            async def chat(case: str, i: int) -> None:
                markers[(case, i)] = marker = nonce()
                text, _ = directive(case, i)
                results[(case, i)] = await read_stream(
                    client, "POST", "/api/chat/stream",
                    json={"message": f"{case} {marker} {text}"})

            with trio.fail_after(90):
                async with trio.open_nursery() as nursery:
                    for case in CASES:
                        for i in range(PER_CASE):
                            nursery.start_soon(chat, case, i)
            problems = tally.problems
            runs: dict[tuple[str, int], dict[str, Any]] = {}
            for (case, i), result in sorted(results.items()):
                tally.count_stream(case, result)
                _, want, requests, streamed, last_model = CASES[case]
                _, tokens = directive(case, i)
                types = [e.type for e in result.events]
                if types.count("end") != 1 or types[-1] != "end" or not result.clean:
                    problems.append(f"{case}/{i}: ends {types[-3:]}, clean={result.clean}")
                    continue
                end = result.ends[0].data
                expected = token_text(tokens if streamed is None else streamed)
                if end["reason"] != want or result.tokens != expected:
                    problems.append(f"{case}/{i}: ended {end['reason']} after "
                                    f"{len(result.tokens)} chars, not {want}")
                if want != "completed" and not friendly(end.get("detail")):
                    problems.append(f"{case}/{i}: unhelpful detail {end.get('detail')!r}")
                sent = requests_with(llm, markers[(case, i)])
                models = [r.body["model"] for r in sent]
                if len(sent) != requests or models[-1] != (FALLBACK if last_model == "fallback"
                                                           else "scripted"):
                    problems.append(f"{case}/{i}: {len(sent)} LLM requests {models}, "
                                    f"not {requests} ending with the {last_model}")
                if case == "429_retry_after" and len(sent) == 2 and sent[1].at - sent[0].at < 0.95:
                    problems.append(f"{case}/{i}: retried after {sent[1].at - sent[0].at:.2f} s, "
                                    "before its Retry-After of 1 s")
                runs[(case, i)] = run = await run_final(client, result.run_id, 20)
                tally.runs[run["status"]] += 1
                stored = await assistant_message(client, result.session_id, result.run_id)
                if (run["status"], stored["status"]) != STORED[want]:
                    problems.append(f"{case}/{i}: stored {run['status']}/{stored['status']}")
                if stored["content"] != result.tokens:
                    problems.append(f"{case}/{i}: stored content differs from the stream")
            # Nothing stuck: no run of ours (nor any other) is left queued or running.
            status = await eventually(lambda: _idle(client), 20)
            tally.extra["llm_requests"] = sum(len(requests_with(llm, m)) for m in markers.values())
        assert not problems, problems
        assert all(r["status"] in FINAL for r in runs.values())
        assert status, status
        assert tree.stop(timeout=20) == 0


async def _idle(client: httpx.AsyncClient) -> dict[str, int] | None:
    runs: dict[str, int] = (await client.get("/api/status")).json()["runs"]
    busy = Counter({k: v for k, v in runs.items() if k in ("queued", "running")})
    return runs if not busy else None


def friendly(detail: Any) -> bool:
    """A sentence for a person: says it was the LLM, no traceback, not a bare code."""
    return (isinstance(detail, str) and len(detail) > 20 and "LLM" in detail
            and "Traceback" not in detail and "Error(" not in detail)
