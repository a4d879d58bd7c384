"""A scripted OpenAI-compatible LLM server: the one fake in agentd's tests.

It stands in for what lies outside the machine. Each request's behaviour comes from a
directive in its last user message (syntax in `tests.support.llm_script`), so tests pick
slow streams, hangs, resets, failures or tool calls per request, against one server.

It is a bare HTTP/1.1 server on trio and h11 rather than a web framework because benchmarks
run it next to agentd at 500 streams x 20 tokens/s: per chunk it does one timer wake-up, one
string format and one socket write, so its CPU stays out of agentd's numbers.

In a test::

    async with open_scripted_llm(tokens=5) as llm:
        client = openai.AsyncOpenAI(base_url=llm.base_url, api_key="test")
        ...
        assert llm.chat_requests[-1].body["messages"][0]["role"] == "system"

As a process (benchmarks)::

    python -m tests.support.scripted_llm --port 0 --tokens 20 --rate 20
    # prints "LISTENING http://127.0.0.1:PORT/v1"; SIGTERM or SIGINT stops it
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import sys
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import h11
import trio

from tests.support.llm_script import (
    Answer,
    DirectiveError,
    Renderer,
    Script,
    error_body,
    last_user_text,
    parse_directive,
    plan_answer,
    token_text,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

__all__ = ["RecordedRequest", "ScriptedLLM", "main", "open_scripted_llm", "token_text"]

MAX_BODY = 32 * 1024 * 1024
_SSE_HEADERS = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")]
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)
_BOTH_DONE = {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    at: float  # trio.current_time() when the request was complete
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the parsed JSON body, or None


class _Exchange:
    """One connection: its socket, its h11 state, and whether the client has left."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER)
        self.client_gone = False
        self.reset = False
        self.finishing = False

    async def send(self, *events: h11.Event) -> None:
        await self.stream.send_all(b"".join(self.conn.send(e) or b"" for e in events))

    async def send_body(self, parts: list[bytes], *, end: bool = False) -> None:
        """Send (and clear) `parts` as one piece of a streamed body, then end it if asked."""
        data = b"".join(parts)
        parts.clear()
        if self.conn.their_http_version != b"1.1":
            events: list[h11.Event] = [h11.Data(data=data)] if data else []
            await self.send(*events, *([h11.EndOfMessage()] if end else []))
            return
        # To an HTTP/1.1 client h11 frames a body without a length as chunked. Writing that
        # frame here costs a twentieth of h11's `send(Data)`, which shows at 10,000 chunks/s;
        # the framing is stateless, so h11's view of the connection stays right.
        frame = b"%x\r\n%b\r\n" % (len(data), data) if data else b""
        if end:
            frame += self.conn.send(h11.EndOfMessage()) or b""
        if frame:
            await self.stream.send_all(frame)


class ScriptedLLM:
    """The server. Constructor keywords are the defaults of a `Script` (plus `model`)."""

    def __init__(self, *, model: str = "scripted-model", **defaults: Any) -> None:
        self.model = model
        self.defaults = Script(**defaults)
        self.base_url = ""
        self.requests: list[RecordedRequest] = []
        self.open_connections = 0
        self.connections_total = 0
        self.open_streams = 0
        self.streams_completed = 0
        self.streams_closed_by_client = 0
        self.streams_reset = 0
        self.requests_closed_by_client = 0  # non-streamed requests abandoned while waiting
        self._failures: Counter[str] = Counter()
        self._ids = 0
        self._changed = trio.Event()

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds; re-checked whenever the server's counters move."""
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; `nursery.start` returns the base URL once listening."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        self.base_url = f"http://{f'[{host}]' if ':' in host else host}:{bound}/v1"
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._connection, listeners)
            task_status.started(self.base_url)

    async def _connection(self, stream: trio.SocketStream) -> None:
        ex = _Exchange(stream)
        self.open_connections += 1
        self.connections_total += 1
        self._notify()
        try:
            await self._requests(ex)
        except (*_GONE, h11.RemoteProtocolError):
            ex.client_gone = True  # the client hung up or spoke garbage; nothing to answer
        finally:
            self.open_connections -= 1
            self._notify()
            if ex.reset:
                _abort(stream)
            await stream.aclose()

    async def _requests(self, ex: _Exchange) -> None:
        while (request := await self._read_request(ex)) is not None:
            await self._handle(ex, *request)
            if ex.client_gone or ex.reset or ex.conn.states != _BOTH_DONE:
                return  # closed, or h11 says this connection cannot carry another request
            ex.conn.start_next_cycle()

    async def _read_request(self, ex: _Exchange) -> tuple[h11.Request, bytes] | None:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = ex.conn.next_event()
            if event is h11.NEED_DATA:
                ex.conn.receive_data(await ex.stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise h11.RemoteProtocolError("request body too large")
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                return request, bytes(body)
            else:  # ConnectionClosed: a keep-alive connection the client has finished with
                return None

    async def _handle(self, ex: _Exchange, request: h11.Request, raw: bytes) -> None:
        method = request.method.decode()
        path = request.target.decode("latin-1").split("?", 1)[0].removeprefix("/v1")
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            await self._send_json(ex, 400, error_body(400, "the body is not valid JSON"))
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
        self.requests.append(RecordedRequest(trio.current_time(), method, path, headers, body))
        self._notify()
        if path == "/models" and method == "GET":
            await self._send_json(ex, 200, self._models())
        elif path == "/chat/completions" and method == "POST":
            await self._chat(ex, body)
        else:
            await self._send_json(ex, 404, error_body(404, f"no route {method} {path}"))

    def _models(self) -> dict[str, Any]:
        model = {"id": self.model, "object": "model", "created": 0, "owned_by": "agentd-tests"}
        return {"object": "list", "data": [model]}

    async def _chat(self, ex: _Exchange, body: Any) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            await self._send_json(ex, 400, error_body(400, "'messages' must be a list"))
            return
        try:
            directive, script = parse_directive(last_user_text(body["messages"]), self.defaults)
        except DirectiveError as exc:
            await self._send_json(ex, 400, error_body(400, f"bad script directive: {exc}"))
            return
        if self._failures[directive] < script.fail:
            await self._fail(ex, directive, script)
            return
        answer = plan_answer(body, script)
        self._ids += 1
        model = body["model"] if isinstance(body.get("model"), str) else self.model
        renderer = Renderer(f"chatcmpl-{self._ids}", int(time.time()), model)
        if body.get("stream"):
            options = body.get("stream_options")
            usage = isinstance(options, dict) and bool(options.get("include_usage"))
            await self._stream(ex, script, renderer.chunks(answer), renderer.tail(answer, usage))
        else:
            await self._complete(ex, script, answer, renderer)

    async def _fail(self, ex: _Exchange, directive: str, script: Script) -> None:
        # Counted per directive text, so "fail=2" fails twice for each test that uses it and
        # then succeeds: exactly what a client's retry loop needs to be tested against.
        self._failures[directive] += 1
        count = self._failures[directive]
        headers = []
        if script.retry_after is not None:
            headers.append(("retry-after", f"{script.retry_after:g}"))
        message = f"scripted failure {count} of {script.fail}"
        await self._send_json(ex, script.status, error_body(script.status, message), headers)

    async def _stream(
        self, ex: _Exchange, script: Script, chunks: list[bytes], tail: bytes
    ) -> None:
        self.open_streams += 1
        self._notify()
        outcome = "closed_by_client"
        try:
            outcome = await self._watched(ex, self._write_stream, ex, script, chunks, tail)
        finally:
            self.open_streams -= 1
            if outcome == "completed":
                self.streams_completed += 1
            elif outcome == "reset":
                self.streams_reset += 1
            else:
                self.streams_closed_by_client += 1
            self._notify()

    async def _write_stream(
        self, ex: _Exchange, script: Script, chunks: list[bytes], tail: bytes
    ) -> str:
        await ex.send(h11.Response(status_code=200, headers=[*_SSE_HEADERS, *self._id_header()]))
        await trio.sleep(script.ttft)
        stop, how = _stop_point(script, len(chunks))
        start = trio.current_time()
        pending: list[bytes] = []
        for index, chunk in enumerate(chunks[:stop]):
            # Chunks due at the same moment go out in one write; with rate=0 that is all.
            if script.rate > 0 and index > 0:
                await ex.send_body(pending)
                await trio.sleep_until(start + index / script.rate)
            pending.append(chunk)
        if how == "hang":
            await ex.send_body(pending)
            await trio.sleep_forever()
        if how == "reset":
            await ex.send_body(pending)
            ex.reset = True
            return "reset"
        # The finish chunk rides with the last token, as OpenAI's does; the watcher must not
        # cancel this last write if the client, having read everything, hangs up meanwhile.
        pending.append(tail)
        ex.finishing = True
        await ex.send_body(pending, end=True)
        return "completed"

    async def _complete(
        self, ex: _Exchange, script: Script, answer: Answer, renderer: Renderer
    ) -> None:
        outcome = await self._watched(ex, self._write_completion, ex, script, answer, renderer)
        if outcome == "closed_by_client":
            self.requests_closed_by_client += 1
            self._notify()

    async def _write_completion(
        self, ex: _Exchange, script: Script, answer: Answer, renderer: Renderer
    ) -> str:
        pieces = len(answer.content) or len(answer.tool_calls)
        stop, how = _stop_point(script, pieces)
        seconds_per_piece = 1 / script.rate if script.rate > 0 else 0.0
        await trio.sleep(script.ttft + stop * seconds_per_piece)
        if how == "hang":
            await trio.sleep_forever()
        if how == "reset":
            ex.reset = True
            return "reset"
        ex.finishing = True
        await self._send_json(ex, 200, renderer.completion(answer))
        return "completed"

    async def _watched(self, ex: _Exchange, fn: Callable[..., Awaitable[str]], *args: Any) -> str:
        """Run a response writer while watching the socket for the client leaving.

        A writer that is sleeping (ttft, pacing, `hang_after`) would never notice a client
        that has gone; a concurrent read does, at once, and cancels the writer.
        """
        outcome = "closed_by_client"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, ex, nursery.cancel_scope)
            try:
                outcome = await fn(*args)
            except _GONE:
                ex.client_gone = True
            nursery.cancel_scope.cancel()
        return outcome

    async def _watch(self, ex: _Exchange, scope: trio.CancelScope) -> None:
        while True:
            try:
                data = await ex.stream.receive_some(65536)
            except _GONE:
                data = b""
            if not data:
                ex.client_gone = True
                if not ex.finishing:
                    scope.cancel()
                return
            ex.conn.receive_data(data)  # a pipelined next request: h11 keeps it for later

    def _id_header(self) -> list[tuple[str, str]]:
        return [("x-request-id", f"req_{len(self.requests)}")]

    async def _send_json(
        self,
        ex: _Exchange,
        status: int,
        payload: Any,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        data = json.dumps(payload).encode()
        all_headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(data))),
            *self._id_header(),
            *(headers or []),
        ]
        response = h11.Response(status_code=status, headers=all_headers)
        await ex.send(response, h11.Data(data=data), h11.EndOfMessage())


def _stop_point(script: Script, pieces: int) -> tuple[int, str | None]:
    """Where a response stops early, and how: `hang` or `reset` (the earlier one wins)."""
    cuts = ((script.reset_after, "reset"), (script.hang_after, "hang"))
    chosen = [(min(n, pieces), how) for n, how in cuts if n is not None]
    return min(chosen) if chosen else (pieces, None)


def _abort(stream: trio.SocketStream) -> None:
    """Close with RST instead of FIN, as a crashed upstream or a dropped proxy would."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already closed by the peer: it has its abrupt end either way
    stream.socket.close()


@asynccontextmanager
async def open_scripted_llm(
    *, host: str = "127.0.0.1", port: int = 0, **defaults: Any
) -> AsyncIterator[ScriptedLLM]:
    """A running server for the duration of the block."""
    llm = ScriptedLLM(**defaults)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(llm.serve, host, port)
            yield llm
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The block's own exception comes back wrapped by the nursery it ran in; hand it over
        # unwrapped, so `pytest.raises` around the block sees what the block raised. (`from`
        # its own cause: keep the chain it had, and hide the group it was wrapped in.)
        if len(group.exceptions) != 1:
            raise
        exc = group.exceptions[0]
        raise exc from exc.__cause__


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Scripted OpenAI-compatible LLM server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="scripted-model")
    # The defaults of every request without a directive; see `Script` for their meaning.
    for name, kind in [
        ("tokens", int),
        ("rate", float),
        ("ttft", float),
        ("hang_after", int),
        ("reset_after", int),
        ("fail", int),
        ("status", int),
        ("retry_after", float),
    ]:
        default = getattr(Script(), name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    return parser.parse_args(argv)


async def _serve_until_signalled(args: argparse.Namespace) -> ScriptedLLM:
    defaults = {f.name: getattr(args, f.name) for f in fields(Script) if f.name != "tools"}
    llm = ScriptedLLM(model=args.model, **defaults)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            base_url = await nursery.start(llm.serve, args.host, args.port)
            print(f"LISTENING {base_url}", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    return llm


def main(argv: list[str] | None = None) -> int:
    llm = trio.run(_serve_until_signalled, _arguments(argv))
    stats = {
        "requests": len(llm.requests),
        "connections": llm.connections_total,
        "streams_completed": llm.streams_completed,
        "streams_closed_by_client": llm.streams_closed_by_client,
        "streams_reset": llm.streams_reset,
    }
    print(f"STATS {json.dumps(stats)}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
