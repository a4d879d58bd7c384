"""Shutdown benchmark: SIGTERM with N open streams, agentd against the seeds' stack, same run.

For each side and each size N (default 10, 100, 1000) it starts the side fresh, opens N SSE
streams that would outlast the shutdown budget (the scripted LLM's `[[script tokens=100000
rate=2]]`: open but cheap), waits until every stream has its first token (bounded), sends
SIGTERM to the side's main process, and measures from that moment:

- **ready→503**: the first `/ready` answered 503 on a keep-alive connection opened before the
  SIGTERM, polled every `--poll-ms` (the last 200 is printed too: the switch lies in between);
- **listener closed**: the first time a new TCP connection to the port is refused (a connect
  every `--poll-ms`);
- **exit**: when the main process exits, and its exit status;
- per stream: whether it got exactly one terminal event (agentd: `event: end`, with its
  reason; the seeds: `{"type": "end", "reason": ...}` or `{"type": "done"}`), and whether its
  body ended cleanly (the chunked terminator `0\\r\\n\\r\\n` arrived) rather than by EOF or reset.

Sides:

- **agentd**: `agentd serve` (the whole tree) in a fresh temporary data dir,
  `POST /api/chat/stream`, `AGENTD_SHUTDOWN_TIMEOUT` = `--budget`;
- **seeds**: bench/seed_shutdown_relay.py, the seeds' FastAPI + uvicorn relay with seeds/000's
  shutdown flag, stream manager and lifespan shutdown, and a `/ready` that answers 503 once that
  flag is set (exactly what is emulated is in that module's docstring), run by uvicorn with
  `--timeout-graceful-shutdown` = `--budget` (uvicorn's option is whole seconds);
- **seeds-nolimit** (smallest size only; `--no-nolimit` skips it): the same relay under
  uvicorn's defaults, which wait for open streams forever: it is SIGKILLed at budget + `--grace`.

Every side is stopped by PID: the main process (SIGKILL past budget + `--grace`), then any
process of its tree still alive 0.5 s after it exited (reported as leftovers). Never by name.

    .venv/bin/python bench/shutdown.py                       # 10, 100, 1000 streams, both sides
    .venv/bin/python bench/shutdown.py --sizes 10,100 --sides agentd --budget 6

Targets (the issue): `/ready` → 503 within 100 ms; exit within budget + 1 s at every size, with
100% of streams getting their `end`. Also checked against API.md (Precise points): clean ends
(chunked terminator), exit status 0, and new connections refused within 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stream import AGENTD, PYTHON, Child, Side, free_port, tree_cpu, wait_ready  # noqa: E402

TARGET_READY_MS = 100.0
TARGET_EXIT_OVER_BUDGET_S = 1.0
TARGET_ENDS = 1.0
# API.md, Drain timing: "From 0.5 s later: a new connection is refused"
CONTRACT_LISTENER_MS = 500.0


# HTTP/1.1 reading ---------------------------------------------------------------------------


class Closed(Exception):
    """The peer closed the connection (EOF) where more was expected."""


class Reader:
    """Buffered reads of HTTP/1.1 responses from a trio stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def _more(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise Closed
        self.buf += data

    async def head(self) -> tuple[int, dict[str, str]]:
        while (i := self.buf.find(b"\r\n\r\n")) < 0:
            await self._more()
        head, self.buf = self.buf[:i], self.buf[i + 4:]
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    async def body(self, headers: dict[str, str]) -> bytes:
        """A whole (small) body: Content-Length or chunked."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parser = Chunked()
            out = [parser.feed(self.buf)]
            while not parser.done:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise Closed
                out.append(parser.feed(data))
            self.buf = parser.rest
            return b"".join(out)
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            await self._more()
        body, self.buf = self.buf[:length], self.buf[length:]
        return body


class Chunked:
    """Incremental chunked-transfer decoder: `feed` returns payload bytes; `done` once the
    zero-size chunk and the blank line after its (empty) trailers have arrived."""

    def __init__(self) -> None:
        self.buf = b""
        self.remaining = 0  # payload bytes of the current chunk still to come
        self.crlf = False  # the CRLF after a chunk's payload is due
        self.trailers = False  # after the zero-size chunk: trailer lines until a blank one
        self.done = False
        self.rest = b""  # bytes past the terminator (the next response on this connection)
        self.error: str | None = None

    def feed(self, data: bytes) -> bytes:
        buf = self.buf + data
        out = []
        while not self.done and self.error is None:
            if self.remaining:
                take = buf[:self.remaining]
                out.append(take)
                buf = buf[len(take):]
                self.remaining -= len(take)
                if self.remaining:
                    break
                self.crlf = True
            if self.crlf:
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    self.error = "bad chunk framing"
                    break
                buf = buf[2:]
                self.crlf = False
            i = buf.find(b"\r\n")
            if i < 0:
                break
            line, buf = buf[:i], buf[i + 2:]
            if self.trailers:
                if not line:
                    self.done = True
                continue
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.error = f"bad chunk size line {line[:40]!r}"
                break
            if size == 0:
                self.trailers = True
            else:
                self.remaining = size
        if self.done:
            self.rest, buf = buf, b""
        self.buf = buf
        return b"".join(out)


# Streams ------------------------------------------------------------------------------------


@dataclass
class StreamRec:
    status: int | None = None
    error: str | None = None  # before a 200 head: connect failure, HTTP status, ...
    chunked: bool = False
    first_token: float | None = None
    tokens: int = 0
    terminal: list[tuple[float, str]] = field(default_factory=list)  # (at, reason)
    extra_after_end: int = 0  # events after the first terminal one
    terminator_at: float | None = None
    closed_at: float | None = None  # EOF or reset without the terminator
    close_kind: str | None = None  # "eof", "reset: ...", "framing: ..."
    closed_after_terminator: bool | None = None  # the server closed the connection after it


def request_bytes(port: int, message: str) -> bytes:
    body = json.dumps({"message": message}).encode()
    return (f"POST /api/chat/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def event_kind(block: bytes) -> tuple[str | None, bytes]:
    """An SSE event's type and data: the `event:` field, else the data's JSON `type`."""
    kind = None
    data = []
    for line in block.split(b"\n"):
        if line.startswith(b"event:"):
            kind = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            data.append(line[5:].strip())
    payload = b"\n".join(data)
    if kind is None and payload:
        if payload.startswith(b'{"type": "token"'):
            return "token", payload
        try:
            kind = json.loads(payload).get("type")
        except (ValueError, AttributeError):
            kind = None
    return kind, payload


def terminal_reason(kind: str, payload: bytes) -> str:
    if kind == "done":
        return "done"
    try:
        data = json.loads(payload)
    except ValueError:
        return "?"
    if not isinstance(data, dict):
        return "?"
    reason = str(data.get("reason"))
    if "message_id" in data and data["message_id"] is None:
        reason += " (message_id null)"  # agentd: the web's own end, the agent's did not come
    return reason


async def one_stream(port: int, request: bytes, start_at: float, rec: StreamRec) -> None:
    await trio.sleep_until(start_at)
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError as e:
        rec.error = f"connect: {type(e).__name__}: {e}"
        return
    async with stream:
        reader = Reader(stream)
        try:
            await stream.send_all(request)
            rec.status, headers = await reader.head()
        except Closed:
            rec.error = "closed before the response head"
            return
        except (trio.BrokenResourceError, OSError) as e:
            rec.error = f"before the head: {type(e).__name__}: {e}"
            return
        if rec.status != 200:
            with trio.move_on_after(1):
                try:
                    body = await reader.body(headers)
                except (Closed, trio.BrokenResourceError, OSError, ValueError):
                    body = reader.buf
            rec.error = f"HTTP {rec.status}: {body[:200].decode(errors='replace')}"
            return
        rec.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        parser = Chunked() if rec.chunked else None
        sse = b""
        data = reader.buf
        try:
            while True:
                if data:
                    now = trio.current_time()
                    payload = parser.feed(data) if parser else data
                    if payload:
                        sse += payload.replace(b"\r\n", b"\n")
                        *blocks, sse = sse.split(b"\n\n")
                        for block in blocks:
                            kind, body = event_kind(block)
                            if kind is None:
                                continue  # a comment (keep-alive) or empty
                            if rec.terminal:
                                rec.extra_after_end += 1
                            if kind == "token":
                                rec.tokens += 1
                                if rec.first_token is None:
                                    rec.first_token = now
                            elif kind in ("end", "done"):
                                rec.terminal.append((now, terminal_reason(kind, body)))
                    if parser and parser.error:
                        rec.closed_at, rec.close_kind = now, f"framing: {parser.error}"
                        return
                    if parser and parser.done:
                        rec.terminator_at = now
                        break
                data = await stream.receive_some(65536)
                if not data:
                    rec.closed_at, rec.close_kind = trio.current_time(), "eof"
                    return
        except (trio.BrokenResourceError, OSError) as e:
            rec.closed_at = trio.current_time()
            rec.close_kind = f"reset: {type(e).__name__}"
            return
        # After the terminator: does the server close the connection (API.md, Clean ends)?
        rec.closed_after_terminator = False
        with trio.move_on_after(3):
            try:
                while await stream.receive_some(65536):
                    pass
            except (trio.BrokenResourceError, OSError):
                pass
            rec.closed_after_terminator = True


# Probes -------------------------------------------------------------------------------------


@dataclass
class Probes:
    t_sig: float | None = None
    t_sig_wall: float = 0.0  # time.time() at the SIGTERM, to place the side's log lines
    ready_warm: trio.Event = field(default_factory=trio.Event)
    ready_ok_before: int = 0  # 200s before the SIGTERM
    last_200: float | None = None
    first_503: float | None = None
    ready_body: str = ""
    ready_closed_at: float | None = None
    ready_closed_how: str = ""
    ready_error: str | None = None
    refused_at: float | None = None
    accepted_after: int = 0  # new connections the port still accepted after the SIGTERM
    exit_at: float | None = None
    exit_status: int | None = None
    killed: bool = False


async def ready_probe(port: int, probes: Probes, poll: float) -> None:
    """GET /ready every `poll` s on one kept-alive connection, until a 503 after the SIGTERM
    or until the server closes the connection."""
    request = b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError as e:
        probes.ready_error = f"connect: {e}"
        probes.ready_warm.set()
        return
    async with stream:
        reader = Reader(stream)
        next_at = trio.current_time()
        while True:
            try:
                await stream.send_all(request)
                status, headers = await reader.head()
                body = await reader.body(headers)
            except Closed:
                probes.ready_closed_at, probes.ready_closed_how = trio.current_time(), "EOF"
                probes.ready_warm.set()
                return
            except (trio.BrokenResourceError, OSError) as e:
                probes.ready_closed_at = trio.current_time()
                probes.ready_closed_how = type(e).__name__
                probes.ready_warm.set()
                return
            now = trio.current_time()
            if probes.t_sig is None:
                if status == 200:
                    probes.ready_ok_before += 1
                    probes.last_200 = now
                    if probes.ready_ok_before >= 5:
                        probes.ready_warm.set()
                else:
                    probes.ready_error = f"/ready {status} before SIGTERM"
            elif status == 200:
                probes.last_200 = now
            elif status == 503:
                probes.first_503 = now
                probes.ready_body = body[:80].decode(errors="replace")
                return
            if headers.get("connection", "").lower() == "close":
                with trio.move_on_after(1):
                    while await stream.receive_some(65536):
                        pass
                probes.ready_closed_at = trio.current_time()
                probes.ready_closed_how = f"Connection: close after a {status}"
                probes.ready_warm.set()
                return
            next_at += poll
            await trio.sleep_until(max(next_at, trio.current_time()))


async def listener_probe(port: int, probes: Probes, poll: float) -> None:
    """A new TCP connection every `poll` s until one is refused."""
    while True:
        sock = trio.socket.socket()
        try:
            await sock.connect(("127.0.0.1", port))
            probes.accepted_after += 1
        except ConnectionRefusedError:
            probes.refused_at = trio.current_time()
            return
        except OSError:
            pass
        finally:
            sock.close()
        await trio.sleep(poll)


async def exit_watch(child: Child, probes: Probes, deadline: float, poll: float) -> None:
    while child.popen.poll() is None:
        if trio.current_time() >= deadline:
            child.popen.kill()
            child.popen.wait()
            probes.killed = True
            probes.exit_at = trio.current_time()
            probes.exit_status = child.popen.returncode
            return
        await trio.sleep(poll)
    probes.exit_at = trio.current_time()
    probes.exit_status = child.popen.returncode


# One trial ----------------------------------------------------------------------------------


@dataclass
class Trial:
    side: str
    streams: int
    budget: float
    probes: Probes = field(default_factory=Probes)
    records: list[StreamRec] = field(default_factory=list)
    start_s: float = 0.0
    open_s: float = 0.0
    live: int = 0  # streams with a first token at the SIGTERM
    leftovers: list[str] = field(default_factory=list)
    note: str = ""
    load: float = 0.0  # the host's 1-minute load average at the SIGTERM
    timeline: list[str] = field(default_factory=list)  # agentd: what its own files and logs say

    def ms(self, t: float | None) -> float:
        if t is None or self.probes.t_sig is None:
            return math.nan
        return (t - self.probes.t_sig) * 1000

    @property
    def ready_ms(self) -> float:
        return self.ms(self.probes.first_503)

    @property
    def listener_ms(self) -> float:
        return self.ms(self.probes.refused_at)

    @property
    def exit_s(self) -> float:
        return self.ms(self.probes.exit_at) / 1000

    @property
    def ends(self) -> int:
        return sum(1 for r in self.records if len(r.terminal) == 1)

    @property
    def clean(self) -> int:
        return sum(1 for r in self.records if r.terminator_at is not None)

    def verdicts(self) -> list[tuple[str, bool]]:
        n = max(1, self.streams)
        exit_ok = (not self.probes.killed and not math.isnan(self.exit_s)
                   and self.exit_s <= self.budget + TARGET_EXIT_OVER_BUDGET_S)
        return [
            ("ready", not math.isnan(self.ready_ms) and self.ready_ms <= TARGET_READY_MS),
            ("exit", exit_ok),
            ("ends", self.ends / n >= TARGET_ENDS),
            # API.md (Precise points), beyond the targets:
            ("clean", self.clean / n >= 1.0),
            ("status", self.probes.exit_status == 0),
            ("listener", not math.isnan(self.listener_ms)
             and self.listener_ms <= CONTRACT_LISTENER_MS),
        ]


def start_side(side: str, n: int, args: argparse.Namespace, llm_url: str, logdir: Path,
               tag: str) -> tuple[Child, int, Path | None]:
    port = free_port()
    if side == "agentd":
        data_dir = Path(tempfile.mkdtemp(prefix="agentd-shutdown-"))
        env = {"AGENTD_DATA_DIR": str(data_dir), "AGENTD_BIND": f"127.0.0.1:{port}",
               "AGENTD_LLM_BASE_URL": llm_url, "AGENTD_LLM_API_KEY": "x",
               "AGENTD_LLM_MODEL": "scripted", "AGENTD_LOG_LEVEL": args.agentd_log_level,
               **agentd_limits(n, args)}
        return Child(f"agentd-{tag}", [AGENTD, "serve"], env, logdir), port, data_dir
    argv = [PYTHON, "-m", "uvicorn", "bench.seed_shutdown_relay:app", "--host", "127.0.0.1",
            "--port", str(port), "--loop", "uvloop", "--http", "httptools",
            "--log-level", "info", "--no-access-log", "--backlog", "4096"]
    if side == "seeds":
        argv += ["--timeout-graceful-shutdown", str(uvicorn_budget(args))]
    return Child(f"{side}-{tag}", argv, {"BASELINE_LLM_BASE_URL": llm_url}, logdir), port, None


def agentd_limits(n: int, args: argparse.Namespace) -> dict[str, str]:
    return {"AGENTD_SHUTDOWN_TIMEOUT": f"{args.budget:g}",
            "AGENTD_MAX_CONCURRENT_RUNS": str(max(50, n + 50)),
            "AGENTD_LLM_MAX_CONNECTIONS": str(max(100, n + 50)),
            "AGENTD_MAX_OPEN_STREAMS": str(max(1000, n + 50)),
            "AGENTD_MAX_QUEUED_RUNS": str(max(1000, 2 * n))}


def uvicorn_budget(args: argparse.Namespace) -> int:
    return max(1, round(float(args.budget)))


async def trial(side: str, n: int, args: argparse.Namespace, llm_url: str, logdir: Path
                ) -> Trial:
    budget = args.budget if side == "agentd" else float(uvicorn_budget(args))
    t = Trial(side, n, budget)
    t.records = [StreamRec() for _ in range(n)]
    began = time.monotonic()
    child, port, data_dir = start_side(side, n, args, llm_url, logdir, str(n))
    probes = t.probes
    poll = args.poll_ms / 1000
    try:
        await wait_ready(Side(side, port, child, b"", b""), 180 if side == "agentd" else 30)
        t.start_s = time.monotonic() - began
        tree_cpu(child)  # remember the tree's PIDs, for the leftover check
        request = request_bytes(port, f"[[script tokens={args.tokens} rate={args.rate:g}]] go")
        ramp = min(args.ramp_max, n / args.ramp_rate)
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            for i, rec in enumerate(t.records):
                nursery.start_soon(one_stream, port, request, t0 + ramp * i / n, rec)
            with trio.move_on_after(ramp + args.first_token_timeout):
                while True:
                    await trio.sleep(0.05)
                    started = sum(1 for r in t.records if r.first_token is not None)
                    failed = sum(1 for r in t.records if r.first_token is None
                                 and (r.error or r.closed_at or r.terminal))
                    if started + failed >= n:
                        break
            t.open_s = trio.current_time() - t0
            t.live = sum(1 for r in t.records if r.first_token is not None
                         and not r.terminal and r.closed_at is None)
            tree_cpu(child)
            nursery.start_soon(ready_probe, port, probes, poll)
            with trio.move_on_after(5):
                await probes.ready_warm.wait()
            if child.popen.poll() is not None:
                raise RuntimeError(f"{side} exited {child.popen.returncode} before SIGTERM:\n"
                                   + child.tail())
            t.load = os.getloadavg()[0]
            probes.t_sig, probes.t_sig_wall = trio.current_time(), time.time()
            child.popen.send_signal(signal.SIGTERM)
            nursery.start_soon(listener_probe, port, probes, poll)
            await exit_watch(child, probes, probes.t_sig + budget + args.grace, poll)
            # The streams and probes see the EOF now; give them a moment, then stop.
            nursery.cancel_scope.deadline = trio.current_time() + 3.5
        if probes.killed:
            t.note = f"did not exit within budget+{args.grace:g} s, killed"
    finally:
        with trio.CancelScope(shield=True):
            if child.popen.poll() is None:
                child.popen.kill()
                child.popen.wait()
                probes.killed = True
            await trio.sleep(0.5)
            for pid, created in child.seen.items():
                if pid == child.pid:
                    continue
                try:
                    proc = psutil.Process(pid)
                    if abs(proc.create_time() - created) < 0.01:
                        t.leftovers.append(f"{pid} {proc.name()}")
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            await child.stop(1)  # kills the leftovers, by PID; closes the log
            if data_dir is not None and probes.t_sig is not None:
                t.timeline = agentd_timeline(data_dir, child.log_path, probes.t_sig_wall, budget)
            if data_dir is not None:
                shutil.rmtree(data_dir, ignore_errors=True)
    return t


def agentd_timeline(data_dir: Path, log_path: Path, t_sig_wall: float, budget: float
                    ) -> list[str]:
    """When agentd's supervisor set its deadline and its children began draining (ms after
    the SIGTERM), and its own shutdown summary (data_dir/run/*.json, the JSON log)."""
    out = []
    marks = []
    try:
        handed = json.loads((data_dir / "run" / "shutdown.json").read_text())
        marks.append(f"supervisor {(handed['deadline'] - budget - t_sig_wall) * 1000:.0f} ms")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for line in log_path.read_text(errors="replace").splitlines():
        if '"draining"' not in line:
            continue
        try:
            e = json.loads(line)
            at = datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
            marks.append(f"{e.get('role', '?')} {(at - t_sig_wall) * 1000:.0f} ms")
        except (ValueError, KeyError, TypeError):
            continue
    if marks:
        out.append("drain began (agentd's clocks): " + ", ".join(marks)
                   + ("" if len(marks) > 1 else " (children: with --agentd-log-level info)"))
    try:
        last = json.loads((data_dir / "run" / "last_shutdown.json").read_text())
        out.append(f"agentd's summary: duration {last.get('duration_s')} s, killed "
                   f"{last.get('killed')}, exit_status {last.get('exit_status')}, reports "
                   f"{json.dumps(last.get('reports'), separators=(',', ':'))[:300]}")
    except (OSError, ValueError):
        pass
    return out


# Output -------------------------------------------------------------------------------------


HEADER = (f"{'side':<14} {'streams':>7} {'live':>5} {'ready→503':>10} {'listener':>9} "
          f"{'exit':>7} {'status':>8} {'ends':>7} {'clean':>7}  targets | API.md")


def fmt_ms(v: float) -> str:
    return "never" if math.isnan(v) else f"{v:.0f} ms"


def fmt_status(t: Trial) -> str:
    s = t.probes.exit_status
    if t.probes.killed:
        return "killed"
    if s is None:
        return "?"
    if s < 0:
        return f"{signal.Signals(-s).name}"
    return str(s)


def row(t: Trial) -> str:
    n = max(1, t.streams)
    v = dict(t.verdicts())

    def mark(k: str) -> str:
        return f"{k} {'ok' if v[k] else 'MISS'}"

    exit_s = "n/a" if math.isnan(t.exit_s) else f"{t.exit_s:.2f} s"
    return (f"{t.side:<14} {t.streams:>7} {t.live:>5} {fmt_ms(t.ready_ms):>10} "
            f"{fmt_ms(t.listener_ms):>9} {exit_s:>7} {fmt_status(t):>8} "
            f"{t.ends / n * 100:>6.1f}% {t.clean / n * 100:>6.1f}%  "
            f"{mark('ready')}, {mark('exit')}, {mark('ends')} | "
            f"{mark('clean')}, {mark('status')}, {mark('listener')}")


def details(t: Trial) -> list[str]:
    p = t.probes
    out = [f"started in {t.start_s:.1f} s; {t.live}/{t.streams} streams had a token before "
           f"the SIGTERM ({t.open_s:.1f} s after the first was opened); load average "
           f"{t.load:.1f} at the SIGTERM"]
    ready = []
    if p.ready_error:
        ready.append(p.ready_error)
    if p.first_503 is not None:
        ready.append(f"503 {p.ready_body.strip()} at {t.ms(p.first_503):.1f} ms")
    if p.last_200 is not None and p.t_sig is not None:
        ready.append(f"last 200 at {t.ms(p.last_200):.1f} ms")
    if p.ready_closed_at is not None:
        ready.append(f"connection closed ({p.ready_closed_how}) at {t.ms(p.ready_closed_at):.0f} "
                     "ms" + ("" if p.first_503 else ", no 503 seen"))
    out.append("/ready probe: " + "; ".join(ready))
    out.append(f"new connections still accepted after the SIGTERM: {p.accepted_after}"
               + ("" if p.refused_at else "; never refused while polled"))
    reasons: dict[str, int] = {}
    for r in t.records:
        for _, reason in r.terminal[:1]:
            reasons[reason] = reasons.get(reason, 0) + 1
    end_times = sorted(t.ms(r.terminal[0][0]) for r in t.records if r.terminal)
    ends = ", ".join(f"{k} x{v}" for k, v in sorted(reasons.items())) or "none"
    line = f"terminal events: {ends}"
    if end_times:
        line += f"; first at {end_times[0] / 1000:.2f} s, last at {end_times[-1] / 1000:.2f} s"
    multi = sum(1 for r in t.records if len(r.terminal) > 1)
    after = sum(1 for r in t.records if r.extra_after_end)
    if multi or after:
        line += f"; {multi} streams with more than one, {after} with events after it"
    out.append(line)
    kinds: dict[str, int] = {}
    for r in t.records:
        if r.terminator_at is None:
            key = r.close_kind or (r.error.split(":")[0] if r.error else "still open (cut)")
            kinds[key] = kinds.get(key, 0) + 1
    closed = sum(1 for r in t.records if r.closed_after_terminator)
    line = f"bodies: {t.clean} chunked terminators ({closed} then closed by the server)"
    if kinds:
        line += "; without one: " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items()))
    out.append(line)
    errors: dict[str, str] = {}
    for r in t.records:
        if r.error:
            errors.setdefault(r.error.split(":")[0], r.error[:200])
    for key, example in errors.items():
        count = sum(1 for r in t.records if r.error and r.error.startswith(key))
        out.append(f"stream errors {key} x{count}, e.g. {example}")
    out.extend(t.timeline)
    if t.leftovers:
        out.append(f"LEFTOVER processes 0.5 s after exit (killed by PID): {', '.join(t.leftovers)}")
    if t.note:
        out.append(t.note)
    return out


def print_trial(t: Trial) -> None:
    print(row(t), flush=True)
    for line in details(t):
        print(f"{'':<14}   {line}", flush=True)


def summary(trials: list[Trial], args: argparse.Namespace) -> None:
    print()
    print("summary (the issue's targets: ready→503 <= 100 ms; exit <= budget + 1 s; 100% ends):")
    print(HEADER)
    for t in trials:
        print(row(t))
    for side in dict.fromkeys(t.side for t in trials):
        mine = [t for t in trials if t.side == side]
        missed = sorted({k for t in mine for k, ok in t.verdicts()[:3] if not ok})
        print(f"{side}: " + ("meets every target at every size" if not missed
                             else f"MISSES {', '.join(missed)} (sizes "
                             + ", ".join(str(t.streams) for t in mine
                                         if not all(ok for _, ok in t.verdicts()[:3])) + ")"))


def legend(args: argparse.Namespace) -> None:
    print(f"budget {args.budget:g} s: agentd AGENTD_SHUTDOWN_TIMEOUT={args.budget:g} (reserve "
          f"min(5, budget/3) = {min(5.0, args.budget / 3):.2f} s); seeds uvicorn "
          f"--timeout-graceful-shutdown {uvicorn_budget(args)}; seeds-nolimit: uvicorn defaults "
          f"(no graceful timeout), SIGKILLed at budget + {args.grace:g} s")
    print(f"streams: [[script tokens={args.tokens} rate={args.rate:g}]] (open past the budget), "
          f"opened at {args.ramp_rate:g}/s (at most over {args.ramp_max:g} s); polls every "
          f"{args.poll_ms:g} ms; agentd limits at N: MAX_CONCURRENT_RUNS=N+50, "
          "LLM_MAX_CONNECTIONS=max(100, N+50), MAX_OPEN_STREAMS=max(1000, N+50), "
          "MAX_QUEUED_RUNS=max(1000, 2N)")
    print(f"{psutil.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start; "
          f"open files limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}")
    print("columns, all from the SIGTERM to the side's main process: ready→503 = first 503 on "
          "a /ready keep-alive\n  connection opened before it; listener = first refused "
          "connect; exit = main process exit; status = its\n  exit status; live = streams "
          "with a token at the SIGTERM; ends = streams with exactly one terminal event\n  "
          "(agentd `end`, seeds `end`/`done`); clean = streams whose body got the chunked "
          "terminator")


# Main ---------------------------------------------------------------------------------------


async def amain(args: argparse.Namespace) -> int:
    logdir = Path(tempfile.mkdtemp(prefix="bench-shutdown-"))
    llm = Child("scripted_llm", [PYTHON, "-m", "tests.support.scripted_llm", "--port", "0"], {},
                logdir)
    trials: list[Trial] = []
    code = 0
    began = time.monotonic()
    try:
        llm_url = await llm.wait_for_line("LISTENING ", 15)
        print(f"logs in {logdir}")
        legend(args)
        print(HEADER, flush=True)
        plan = [(side, n) for n in args.sizes for side in args.sides]
        if args.nolimit and "seeds" in args.sides:
            plan.append(("seeds-nolimit", min(args.sizes)))
        for side, n in plan:
            try:
                t = await trial(side, n, args, llm_url, logdir)
            except (RuntimeError, trio.TooSlowError) as e:
                print(f"{side:<14} {n:>7}  failed: {type(e).__name__}: {e}", flush=True)
                code = 1
                continue
            trials.append(t)
            print_trial(t)
        summary(trials, args)
        print(f"total {time.monotonic() - began:.0f} s")
    finally:
        with trio.CancelScope(shield=True):
            await llm.stop(10)
    return code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10,100,1000", help="open streams per trial (10,100,1000)")
    p.add_argument("--sides", default="seeds,agentd", help="seeds,agentd (default both)")
    p.add_argument("--budget", type=float, default=10.0,
                   help="shutdown budget, s: AGENTD_SHUTDOWN_TIMEOUT and uvicorn's "
                        "--timeout-graceful-shutdown (default 10)")
    p.add_argument("--grace", type=float, default=5.0,
                   help="SIGKILL a side still running at budget + this (default 5)")
    p.add_argument("--rate", type=float, default=2.0, help="tokens/s per stream (default 2)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens asked per stream (default: enough at --rate to outlast the "
                        "ramp, the first-token wait, the budget and the grace, + 20 s). Keep it "
                        "modest: the scripted LLM renders every chunk of an answer up front "
                        "(100,000 tokens ~ 15 MB and ~0.3 s of its CPU per request)")
    p.add_argument("--ramp-rate", type=float, default=250.0, help="streams opened per second")
    p.add_argument("--ramp-max", type=float, default=5.0, help="open them over at most this long")
    p.add_argument("--first-token-timeout", type=float, default=60.0,
                   help="seconds to wait (after the ramp) for every stream's first token")
    p.add_argument("--poll-ms", type=float, default=5.0, help="probe interval (default 5 ms)")
    p.add_argument("--agentd-log-level", default="warning",
                   help="AGENTD_LOG_LEVEL (default warning; info adds when each child began "
                        "draining, at the cost of a log line per request)")
    p.add_argument("--no-nolimit", dest="nolimit", action="store_false",
                   help="skip the uvicorn-defaults trial (seeds-nolimit)")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if args.tokens is None:
        args.tokens = math.ceil(args.rate * (args.ramp_max + args.first_token_timeout
                                             + args.budget + args.grace + 20))
    for side in args.sides:
        if side not in ("seeds", "agentd"):
            p.error(f"unknown side {side!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000 client sockets and more
    return trio.run(amain, args)


if __name__ == "__main__":
    sys.exit(main())
