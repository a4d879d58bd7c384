"""LLM providers: any OpenAI-compatible endpoint, and the local provider when none is set.

The OpenAI client is kept for what it is good at (auth, base URLs, error types), but its
stream is read raw and parsed by hand: building its pydantic chunk objects costs more CPU
per token than everything else on the hot path together (notes/stack.md). Retries are ours,
so they follow API.md exactly: connection errors, 408, 409, 429 and 5xx, backoff 1 s × 2ⁿ
with jitter or the server's Retry-After, and never once a token has been relayed (a retry
then would repeat text the client already has).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx2 as httpx
import openai
import pydantic_core
import structlog
import trio
import trio.lowlevel

from app import metrics
from app.config import DEFAULT_LLM_MODEL

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from app.config import Settings

log = structlog.get_logger("llm")

RETRYABLE = {408, 409, 429}
MAX_RETRY_AFTER = 60.0


class LLMError(Exception):
    """The LLM failed for good (after retries). `detail` is for a person to act on."""

    def __init__(self, detail: str, *, streamed: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.streamed = streamed


class LLMStalled(LLMError):
    """No token within the LLM timeout (a hung upstream)."""


@dataclass
class ToolCallDelta:
    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class Turn:
    """One LLM answer: its text, any tool calls, and token usage."""

    content: list[str] = field(default_factory=list)
    tool_calls: dict[int, ToolCallDelta] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.content)


@dataclass(frozen=True)
class Endpoint:
    base_url: str | None
    api_key: str
    model: str


class OpenAIProvider:
    """Streams chat turns from an OpenAI-compatible endpoint, with a fallback endpoint."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient) -> None:
        self.settings = settings
        primary = Endpoint(settings.llm_base_url, settings.llm_api_key or "none",
                           settings.llm_model or DEFAULT_LLM_MODEL)
        self.endpoints = [primary]
        if settings.llm_fallback_base_url or settings.llm_fallback_model:
            self.endpoints.append(Endpoint(
                settings.llm_fallback_base_url or settings.llm_base_url,
                settings.llm_api_key or "none",
                settings.llm_fallback_model or primary.model))
        self._clients = [
            openai.AsyncOpenAI(base_url=e.base_url, api_key=e.api_key, max_retries=0,
                               timeout=httpx.Timeout(settings.llm_timeout, connect=10.0),
                               http_client=http)
            for e in self.endpoints
        ]
        self.model = primary.model

    async def stream_turn(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                          on_token: Callable[[str], None]) -> Turn:
        last: LLMError | None = None
        for client, endpoint in zip(self._clients, self.endpoints, strict=True):
            try:
                turn = await self._with_retries(client, endpoint, messages, tools, on_token)
                metrics.llm_requests.labels(endpoint.model, "success").inc()
                return turn
            except LLMError as e:
                metrics.llm_requests.labels(endpoint.model, "failure").inc()
                if e.streamed or isinstance(e, LLMStalled):
                    raise
                last = e
                log.warning("llm_endpoint_failed", model=endpoint.model, detail=e.detail)
        assert last is not None
        raise last

    async def _with_retries(self, client: openai.AsyncOpenAI, endpoint: Endpoint,
                            messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                            on_token: Callable[[str], None]) -> Turn:
        attempt = 0
        while True:
            turn = Turn()
            try:
                await self._stream(client, endpoint, messages, tools, turn, on_token)
                return turn
            except (openai.APIConnectionError, openai.APIStatusError, httpx.TransportError) as e:
                streamed = bool(turn.content or turn.tool_calls)
                status = getattr(e, "status_code", None)
                retryable = status is None or status in RETRYABLE or status >= 500
                if streamed or not retryable or attempt >= self.settings.llm_max_retries:
                    raise LLMError(_friendly(e, endpoint), streamed=streamed) from e
                delay = _retry_delay(e, attempt)
                attempt += 1
                metrics.llm_retries.labels(endpoint.model).inc()
                log.info("llm_retry", model=endpoint.model, status=status, attempt=attempt,
                         delay_s=round(delay, 2))
                await trio.sleep(delay)

    async def _stream(self, client: openai.AsyncOpenAI, endpoint: Endpoint,
                      messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                      turn: Turn, on_token: Callable[[str], None]) -> None:
        kwargs: dict[str, Any] = {"model": endpoint.model, "messages": messages, "stream": True,
                                  "stream_options": {"include_usage": True}}
        if tools:
            kwargs["tools"] = tools
        if self.settings.llm_temperature is not None:
            kwargs["temperature"] = self.settings.llm_temperature
        timeout = self.settings.llm_timeout
        with trio.fail_after(timeout + 10):  # connect + headers; the body is bounded below
            response_cm = client.chat.completions.with_streaming_response.create(**kwargs)
            response = await response_cm.__aenter__()
        try:
            # One scope for the whole body, its deadline pushed on as chunks arrive: a scope
            # per line cost more CPU than parsing the line (bench/stream.py).
            with trio.CancelScope(deadline=trio.current_time() + timeout) as stall:
                await _read_events(response.http_response, turn, on_token, stall, timeout)
            if stall.cancelled_caught:
                raise LLMStalled(f"the LLM sent nothing for {timeout:g} s (AGENTD_LLM_TIMEOUT)",
                                 streamed=bool(turn.content))
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
                await response_cm.__aexit__(None, None, None)


async def _read_events(http_response: httpx.Response, turn: Turn,
                       on_token: Callable[[str], None], stall: trio.CancelScope,
                       stall_after: float) -> None:
    """Parse the SSE body by hand: ``data: {json}`` lines until ``data: [DONE]``."""
    # Moving a scope's deadline re-files it in trio's deadline heap, which cost more than
    # parsing the chunk; so the deadline is moved at most once per `slack` seconds, and set
    # `slack` further out: a stall is still never declared before `stall_after` of silence,
    # and always within `stall_after + slack`.
    slack = min(1.0, stall_after / 10)
    move_after = stall.deadline - stall_after  # the first chunk moves it
    # aiter_raw is aiter_bytes less a decoder and a generator, when there is nothing to decode.
    encoded = http_response.headers.get("content-encoding", "identity") != "identity"
    chunks = http_response.aiter_bytes() if encoded else http_response.aiter_raw()
    pending = b""
    async for chunk in chunks:
        now = trio.current_time()
        if now > move_after:
            stall.deadline = now + stall_after + slack
            move_after = now + slack
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            if payload:
                _apply_chunk(_parse_json(payload), turn, on_token)


def _parse_json(payload: bytes) -> Any:
    """pydantic_core's parser (pydantic's Rust core): a third of json.loads' CPU per chunk,
    the same values; json.loads for what only it takes (an escaped lone surrogate)."""
    try:
        return pydantic_core.from_json(payload)
    except ValueError:
        return json.loads(payload)


def _apply_chunk(chunk: dict[str, Any], turn: Turn, on_token: Callable[[str], None]) -> None:
    if chunk.get("usage"):
        usage = chunk["usage"]
        turn.usage = {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
                      "completion_tokens": int(usage.get("completion_tokens") or 0)}
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        content = delta.get("content")
        if content:
            turn.content.append(content)
            on_token(content)
        for call in delta.get("tool_calls") or ():
            slot = turn.tool_calls.setdefault(call.get("index", 0),
                                              ToolCallDelta(call.get("index", 0)))
            slot.id = call.get("id") or slot.id
            function = call.get("function") or {}
            slot.name = function.get("name") or slot.name
            slot.arguments += function.get("arguments") or ""
        if choice.get("finish_reason"):
            turn.finish_reason = choice["finish_reason"]


def _retry_delay(error: Exception, attempt: int) -> float:
    response = getattr(error, "response", None)
    if response is not None:
        value = response.headers.get("retry-after")
        try:
            if value is not None:
                return min(max(float(value), 0.0), MAX_RETRY_AFTER)
        except ValueError:
            pass
    return float(1.0 * 2**attempt * (0.5 + random.random() / 2))


def _friendly(error: Exception, endpoint: Endpoint) -> str:
    where = endpoint.base_url or "the default OpenAI endpoint"
    status = getattr(error, "status_code", None)
    if status == 401:
        return f"the LLM at {where} refused the API key (401): check AGENTD_LLM_API_KEY"
    if status == 404:
        return f"the LLM at {where} does not know model {endpoint.model!r}: check AGENTD_LLM_MODEL"
    if status == 429:
        return f"the LLM at {where} is rate limiting us (429); retry later"
    if status is not None:
        return f"the LLM at {where} answered HTTP {status}; retry later or set a fallback"
    return f"cannot reach the LLM at {where}: check AGENTD_LLM_BASE_URL and the network"


LOCAL_MODEL = "agentd-local"


class LocalProvider:
    """No LLM configured: an honest answer, plus what it can do with the tools on its own.

    Arithmetic goes to the calculator; anything else is looked up in the user's knowledge
    base, and the answer quotes the top passages with their sources. It asks for both as an
    LLM would, with a tool call, so the run's events show what was looked up, and the search
    is made for the run's owner like any tool call (tools/knowledge.py). What it does is
    decided by two pure functions, `local_tool_call` and `local_answer`.
    """

    model = LOCAL_MODEL

    async def stream_turn(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                          on_token: Callable[[str], None]) -> Turn:
        turn = Turn()
        call = local_tool_call(messages, tools)
        if call is not None:
            turn.tool_calls[0] = call
            turn.finish_reason = "tool_calls"
            return turn
        async for word in _words(local_answer(messages)):
            turn.content.append(word)
            on_token(word)
        turn.finish_reason = "stop"
        return turn


KB_TOOL = "search_knowledge_base"
KB_QUERY_CHARS = 2000
QUOTES = 3
QUOTE_CHARS = 300
RELATIVE_SCORE = 0.5
NO_LLM = ("No LLM endpoint is configured, so this is agentd's local provider answering. "
          "Set AGENTD_LLM_BASE_URL, AGENTD_LLM_MODEL and AGENTD_LLM_API_KEY (or "
          "OPENAI_BASE_URL / OPENAI_API_KEY) to use a real model. ")


def local_tool_call(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
                    ) -> ToolCallDelta | None:
    """The one tool call the local provider makes before it answers, if any."""
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    if not tools or any(m["role"] == "tool" for m in messages):
        return None
    if _looks_arithmetic(user):
        return ToolCallDelta(0, "call_local_0", "calculator",
                             json.dumps({"expression": _arithmetic(user)}))
    offered = {t.get("function", {}).get("name") for t in tools}
    query = " ".join(str(user).split())[:KB_QUERY_CHARS]
    if KB_TOOL in offered and query:
        return ToolCallDelta(0, "call_local_0", KB_TOOL,
                             json.dumps({"query": query, "k": QUOTES}))
    return None


def local_answer(messages: list[dict[str, Any]]) -> str:
    """The honest preamble, then what each tool said (knowledge-base passages quoted)."""
    text = NO_LLM
    for m in messages:
        if m["role"] != "tool":
            continue
        if m.get("name") == KB_TOOL:
            text += _knowledge_text(str(m["content"]))
        else:
            text += f"The {m.get('name', 'tool')} tool said: {m['content']}. "
    return text


def _knowledge_text(content: str) -> str:
    """A search_knowledge_base result (JSON, or ``error: …`` as run.py reports failures)."""
    try:
        passages = json.loads(content)["passages"][:QUOTES]
    except (ValueError, KeyError, TypeError):
        detail = content.removeprefix("error:").strip().removeprefix(f"{KB_TOOL}:").strip()
        return f"The knowledge base could not be searched ({detail}). "
    if not passages:
        return ("Your knowledge base has nothing to quote yet (add documents with `agentd "
                "ingest PATH` or POST /api/documents). ")
    # The best passage always; the others only when they are about as close (a passage at a
    # tenth of the best one's score is noise to a reader).
    best = float(passages[0].get("score") or 0)
    quotes: list[str] = []
    for p in passages:
        if quotes and float(p.get("score") or 0) < best * RELATIVE_SCORE:
            break
        label = p.get("source") or p.get("title") or "an untitled document"
        quotes.append(f"From {label}: “{_trim(str(p.get('text', '')))}”")
    return "The closest passages in your knowledge base: " + " ".join(quotes) + " "


def _trim(text: str, limit: int = QUOTE_CHARS) -> str:
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    cut = flat[:limit].rsplit(" ", 1)[0] or flat[:limit]
    return cut.rstrip(" ,;:.") + "…"


_ARITH = set("0123456789+-*/%().^ ")


def _arithmetic(text: str) -> str:
    start = next((i for i, c in enumerate(text) if c.isdigit() or c == "("), 0)
    expr = "".join(c for c in text[start:] if c in _ARITH).strip().rstrip("=?")
    return expr.replace("^", "**")


def _looks_arithmetic(text: str) -> bool:
    expr = _arithmetic(text)
    return any(c.isdigit() for c in expr) and any(op in expr for op in "+-*/%")


async def _words(text: str) -> AsyncIterator[str]:
    for word in text.split(" "):
        await trio.lowlevel.checkpoint()
        yield word + " "
