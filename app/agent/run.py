"""One run: the tool loop, its events, and how it ends (Agent behaviour, Run events).

Every token is appended to the run's event stream and to `RunState.content` in the same
step, so what is stored at the end (complete or not) is exactly what clients were sent.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog
import trio

from app import metrics
from app.agent.llm import LLMError, LLMStalled, Turn
from app.db.runs import STORED
from app.events import EventWriter, encode, encode_token

if TYPE_CHECKING:
    from app.agent.tools import ToolRegistry
    from app.db.runs import Outcome
    from app.events import Event

log = structlog.get_logger("run")

SLOW_RUN_S = 10.0


class Provider(Protocol):
    model: str

    async def stream_turn(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                          on_token: Any) -> Turn: ...


@dataclass
class RunState:
    run: dict[str, Any]
    content: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tool_results: list[dict[str, Any]] = field(default_factory=list)
    iterations: int = 0
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0,
                                                           "completion_tokens": 0})
    fallback: str | None = None
    cancel_reason: str | None = None
    cached: bool = False
    detail: str | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def run_id(self) -> str:
        return str(self.run["run_id"])


@dataclass
class RunDeps:
    provider: Provider
    tools: ToolRegistry
    writer: EventWriter
    system_prompt: str
    max_iterations: int


async def execute(state: RunState, deps: RunDeps, history: list[dict[str, Any]], user: str,
                  time_limit: float) -> str:
    """Run the tool loop; return the end reason (``completed`` or ``error``).

    Cancellation (timeout, cancel, shutdown) propagates out of here; the caller decides
    the reason from why its scope was cancelled.
    """
    run_id = state.run_id
    writer = deps.writer

    def on_token(text: str) -> None:
        state.content.append(text)
        writer.append(run_id, "token", encode_token(run_id, text))

    messages = build_messages(deps, history, user)
    tools = deps.tools.openai_tools()
    writer.append(run_id, "thinking", encode("thinking", run_id))
    while True:
        final_turn = _budget_spent(state, deps, time_limit)
        state.iterations += 1
        try:
            turn = await deps.provider.stream_turn(messages, None if final_turn else tools,
                                                   on_token)
        except LLMStalled as e:
            state.detail = e.detail
            raise _Stalled() from e
        except LLMError as e:
            state.detail = f"{e.detail}. The partial answer so far is saved."
            log.warning("run_llm_failed", run_id=run_id, detail=e.detail)
            return "error"
        for key in ("prompt_tokens", "completion_tokens"):
            state.usage[key] += turn.usage.get(key, 0)
        if not turn.tool_calls or final_turn:
            return "completed"
        await _run_tools(state, deps, turn, messages)


def build_messages(deps: RunDeps, history: list[dict[str, Any]], user: str
                   ) -> list[dict[str, Any]]:
    """What the LLM is sent: the system prompt, the session's history, the user's text."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": deps.system_prompt}]
    messages += [{"role": m["role"], "content": m["content"]} for m in history
                 if m["role"] in ("user", "assistant") and m["content"]]
    messages.append({"role": "user", "content": user})
    return messages


class _Stalled(Exception):
    """The upstream stopped sending: the run ends ``timeout``."""


def _budget_spent(state: RunState, deps: RunDeps, time_limit: float) -> bool:
    """True when this turn must be the last, tool-less one (Agent behaviour)."""
    if state.iterations + 1 >= deps.max_iterations and state.iterations > 0:
        if state.fallback is None:
            state.fallback = "max_iterations"
            log.warning("max_iterations_reached", run_id=state.run_id,
                        iterations=state.iterations)
        return True
    if state.iterations > 0 and time.monotonic() - state.started > time_limit / 2:
        if state.fallback is None:
            state.fallback = "time_budget"
            log.warning("time_budget_reached", run_id=state.run_id,
                        elapsed_s=round(time.monotonic() - state.started, 2))
        return True
    return False


async def _run_tools(state: RunState, deps: RunDeps, turn: Turn,
                     messages: list[dict[str, Any]]) -> None:
    """Announce every call, run them in parallel, report each result as it lands."""
    run_id, writer = state.run_id, deps.writer
    calls = [turn.tool_calls[i] for i in sorted(turn.tool_calls)]
    messages.append({"role": "assistant", "content": turn.text or None, "tool_calls": [
        {"id": c.id or f"call_{i}", "type": "function",
         "function": {"name": c.name, "arguments": c.arguments or "{}"}}
        for i, c in enumerate(calls)]})
    results: dict[int, dict[str, Any]] = {}
    for i, call in enumerate(calls):
        call.id = call.id or f"call_{i}"
        record = {"call_id": call.id, "name": call.name, "arguments": call.arguments or "{}"}
        state.tool_calls.append(record)
        writer.append(run_id, "tool_call", encode("tool_call", run_id, **record))

    async def one(i: int) -> None:
        call = calls[i]
        began = time.monotonic()
        outcome = await deps.tools.call(call.name, call.arguments or "{}")
        result: dict[str, Any] = {"call_id": call.id, "name": call.name}
        if outcome.success:
            result["result"] = outcome.result
        else:
            result["error"] = outcome.error
        results[i] = result
        state.tool_results.append(result)
        writer.append(run_id, "tool_result", encode("tool_result", run_id, **result))
        elapsed = time.monotonic() - began
        metrics.tool_calls.labels(call.name, "success" if outcome.success else "error").inc()
        metrics.tool_duration.labels(call.name).observe(elapsed)
        log.info("tool_called", run_id=run_id, tool=call.name, success=outcome.success,
                 duration_ms=round(elapsed * 1000, 1))

    async with trio.open_nursery() as nursery:
        for i in range(len(calls)):
            nursery.start_soon(one, i)
    for i, call in enumerate(calls):
        r = results[i]
        content = json.dumps(r.get("result")) if "result" in r else f"error: {r['error']}"
        messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name,
                         "content": content})


Stalled = _Stalled


# How a run ends (worker.py stores it) ---------------------------------------------------


def end_event(outcome: Outcome) -> str:
    """The run's `end` event (API.md, Run events), naming the message it is stored as."""
    run_id = outcome.run["run_id"]
    end: dict[str, Any] = {"reason": outcome.reason, "message_id": outcome.message_id,
                           "resumable": outcome.reason == "server_shutdown"}
    if outcome.detail:
        end["detail"] = outcome.detail
    if outcome.fallback:
        end["fallback"] = outcome.fallback
    return encode("end", run_id, **end)


def rebuilt(run: dict[str, Any], events: list[Event]) -> RunState:
    """A run's state as its stream tells it (for a run whose agent is gone)."""
    state = RunState(run)
    for e in events:
        data = e.payload()
        if e.type == "token":
            state.content.append(data["content"])
        elif e.type == "tool_call":
            state.tool_calls.append({k: data[k] for k in ("call_id", "name", "arguments")})
        elif e.type == "tool_result":
            state.tool_results.append({k: v for k, v in data.items()
                                       if k not in ("type", "run_id")})
    return state


def record(model: str, state: RunState, reason: str) -> None:
    """A run reached a final status: count it."""
    metrics.runs.labels(STORED[reason][0]).inc()
    metrics.run_ends.labels(reason).inc()
    metrics.run_duration.observe(time.monotonic() - state.started)
    metrics.run_iterations.observe(state.iterations)
    metrics.llm_tokens.labels(model, "in").inc(state.usage["prompt_tokens"])
    metrics.llm_tokens.labels(model, "out").inc(state.usage["completion_tokens"])
