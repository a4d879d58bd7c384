"""`agentd chat`: a terminal client that streams answers as they are generated.

Each line read from stdin is one message, posted to `POST /api/chat/stream` in one session
(the `session_id` of the first answer is sent with every later one). Tokens are printed as
they arrive; tool calls as `[tool NAME ARGUMENTS → RESULT]`; an answer that did not complete
ends with `[ended: REASON — DETAIL]`.

When the connection drops mid-answer (network, a web process restarted) the answer is not
lost: the run goes on in an agent, so the client follows it again with
`GET /api/runs/{run_id}/events` and `Last-Event-ID`, retrying with backoff for up to
`RESUME_FOR` seconds, and prints only what it had not printed yet. Ctrl-C or end of input
exits 0 (an answer being streamed is then cancelled, as `on_disconnect: cancel` says).

`Turn` is the pure half (events in, text out, what to resume from), tested without a server.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import httpx

from app.web.sse import SSEParser

if TYPE_CHECKING:
    from collections.abc import Iterator

RESUME_FOR = 60.0
READ_TIMEOUT = 45.0  # the server sends a keep-alive at least every 15 s
PROMPT = "you> "


def backoff(attempt: int) -> float:
    """Seconds before resume attempt `attempt` (0, 1, ...): 0.5 s doubling, at most 5 s."""
    return float(min(5.0, 0.5 * 2**attempt))


def seen(event_id: str, last_id: str | None) -> bool:
    """Whether `event_id` is at or before `last_id`. Redis stream ids (`<ms>-<seq>`) sort
    numerically; other opaque ids (API.md: they sort in event order) as strings."""
    if last_id is None:
        return False
    a, b = _numeric(event_id), _numeric(last_id)
    if a is not None and b is not None:
        return a <= b
    return event_id <= last_id


def _numeric(event_id: str) -> tuple[int, int] | None:
    ms, _, seq = event_id.partition("-")
    return (int(ms), int(seq or 0)) if ms.isdigit() and (seq or "0").isdigit() else None


@dataclass
class Turn:
    """One answer's state across connections: what was shown, and where to resume."""

    session_id: str | None = None
    run_id: str | None = None
    last_id: str | None = None
    end: dict[str, Any] | None = None
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    at_line_start: bool = True

    def feed(self, event_id: str | None, event_type: str, data: dict[str, Any]) -> str:
        """The text to print for one event; "" for one already seen (a resumed replay)."""
        if event_id is not None:
            if seen(event_id, self.last_id):
                return ""
            self.last_id = event_id
        if event_type == "run":
            self.run_id = data.get("run_id", self.run_id)
            self.session_id = data.get("session_id", self.session_id)
            return ""
        if event_type == "token":
            text = str(data.get("content", ""))
            if text:
                self.at_line_start = text.endswith("\n")
            return text
        if event_type == "tool_call":
            self.calls[str(data.get("call_id"))] = data
            return ""
        if event_type == "tool_result":
            return self.line(tool_line(self.calls.get(str(data.get("call_id")), {}), data))
        if event_type == "end":
            self.end = data
            reason = data.get("reason")
            if reason == "completed":
                return self.line("")
            detail = data.get("detail")
            return self.line(f"[ended: {reason}{f' — {detail}' if detail else ''}]")
        return ""  # thinking, and whatever later versions add

    def line(self, text: str) -> str:
        """`text` on a line of its own (after the answer so far), then a newline."""
        before = "" if self.at_line_start else "\n"
        self.at_line_start = True
        return f"{before}{text}\n" if text else before


def tool_line(call: dict[str, Any], result: dict[str, Any]) -> str:
    name = result.get("name") or call.get("name") or "?"
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    shown = arguments if isinstance(arguments, str) else json.dumps(arguments)
    if result.get("error") is not None:
        return f"[tool {name} {shown} → error: {result['error']}]"
    value = result.get("result")
    if isinstance(value, dict) and "result" in value:  # e.g. {"expression": ..., "result": 5}
        value = value["result"]
    return f"[tool {name} {shown} → {value if isinstance(value, str) else json.dumps(value)}]"


def events(response: httpx.Response) -> Iterator[tuple[str | None, str, dict[str, Any]]]:
    """(its own id or None, type, data) for each event of an SSE response."""
    parser = SSEParser()
    previous: str | None = None
    for chunk in response.iter_bytes():
        for message in parser.feed(chunk):
            own = message.id if message.id != previous else None
            previous = message.id
            try:
                data = json.loads(message.data)
            except ValueError:
                continue
            yield own, message.event, data if isinstance(data, dict) else {}


class Chat:
    """The conversation: one session, one answer at a time, printed to `out`."""

    def __init__(self, client: httpx.Client, out: TextIO) -> None:
        self.client = client
        self.out = out
        self.session_id: str | None = None

    def ask(self, message: str) -> None:
        turn = Turn(session_id=self.session_id)
        body: dict[str, Any] = {"message": message}
        if self.session_id:
            body["session_id"] = self.session_id
        try:
            self._follow(turn, "POST", "/api/chat/stream", json=body)
        except httpx.TransportError as e:
            if turn.run_id is None:
                self._say(turn, f"[cannot reach agentd: {e}]")
            else:
                self._resume(turn, e)
        self.session_id = turn.session_id or self.session_id

    def _follow(self, turn: Turn, method: str, path: str, **kwargs: Any) -> None:
        """Print a stream's events until its `end`; raise TransportError when it drops."""
        with self.client.stream(method, path, **kwargs) as response:
            if response.status_code != 200:
                response.read()
                raise Refused(response.status_code, _error_message(response))
            for event_id, event_type, data in events(response):
                self._write(turn.feed(event_id, event_type, data))
                if turn.end is not None:
                    return
        raise httpx.RemoteProtocolError("the stream ended before the answer did")

    def _resume(self, turn: Turn, cause: Exception) -> None:
        deadline = time.monotonic() + RESUME_FOR
        attempt = 0
        while time.monotonic() < deadline:
            time.sleep(min(backoff(attempt), max(0.0, deadline - time.monotonic())))
            attempt += 1
            headers = {"Last-Event-ID": turn.last_id} if turn.last_id else {}
            try:
                self._follow(turn, "GET", f"/api/runs/{turn.run_id}/events", headers=headers)
                return
            except httpx.TransportError as e:
                cause = e
            except Refused as e:
                if e.status not in (429, 502, 503, 504):
                    self._say(turn, f"[cannot resume the answer: {e}]")
                    return
                cause = e
        self._say(turn, f"[gave up resuming the answer after {RESUME_FOR:g} s: {cause}]")

    def _say(self, turn: Turn, text: str) -> None:
        self._write(turn.line(text))

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()


class Refused(Exception):
    """agentd answered, but not with a stream."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", {})
        return str(error.get("message") or error)
    except (ValueError, AttributeError):
        return response.text[:200]


def lines(interactive: bool) -> Iterator[str]:
    """Messages typed (with a prompt on a terminal) or piped in, until end of input."""
    while True:
        if interactive:
            try:
                yield input(PROMPT)
            except EOFError:
                print()
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
            yield line


def chat(url: str, headers: dict[str, str]) -> int:
    """Read lines until end of input (or Ctrl-C); 0 then."""
    timeout = httpx.Timeout(10.0, read=READ_TIMEOUT)
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
            conversation = Chat(client, sys.stdout)
            for line in lines(sys.stdin.isatty()):
                if not line.strip():
                    continue
                try:
                    conversation.ask(line.strip())
                except Refused as e:
                    print(f"[agentd refused the message: {e}]", flush=True)
    except KeyboardInterrupt:
        print()
    return 0
