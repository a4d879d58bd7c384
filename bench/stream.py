"""Streaming benchmark: agentd's whole tree against the seeds' relay, in the same run.

N concurrent streams x R tokens/s, through

- **agentd**: `agentd serve` (supervisor, web, agent, embedding, PostgreSQL, Redis), every
  token durable in Redis, every run in PostgreSQL;
- **baseline**: bench/baseline_relay.py, the seeds' design (seeds/001): one FastAPI + uvicorn
  process relaying the openai client's stream, no durability;

both fed by the same scripted LLM (tests/support/scripted_llm.py, its own process) and the same
load generator (this process: raw trio sockets, one connection per stream, token events counted
by a byte marker, no parsing on the hot path).

Per side and load it prints: delivered (tokens due in the window that arrived by its end + 200
ms, / N x R x window), tok/s, inter-token gap p50/p99 across all streams, first-token latency,
and CPU per relayed token of the side's whole process tree (agentd: the supervisor and every
descendant, PostgreSQL backends and Redis included; baseline: the uvicorn process). The scripted
LLM's and the load generator's CPU are measured too, and counted in neither side; so is what the
rest of the host used.

Method: streams start spread evenly over `--ramp` seconds (real clients do not arrive in
lock-step), then `--settle` seconds pass, then the window of `--seconds` (>= 10: psutil counts
CPU in 10 ms ticks). Each stream asks for enough tokens to outlast the window and is read to its
`end`; the next load starts once the tree is quiet again.

    .venv/bin/python bench/stream.py                      # 100 streams x 20 tok/s, both sides
    .venv/bin/python bench/stream.py --capacity           # max streams per side (< 10 min)
    .venv/bin/python bench/stream.py --streams 200 --sides agentd
    .venv/bin/python bench/stream.py --agentd-src ../other-checkout   # compare a branch

Targets (issue 4, as restated in notes/stack.md): agentd carries at least 1.5x the baseline's
streams at the same rate with >= 99% delivered and p99 gap <= 200 ms, and its whole-tree CPU per
token is at most 0.7x the baseline's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import trio

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
AGENTD = str(Path(PYTHON).with_name("agentd"))

TARGET_DELIVERED = 0.99
TARGET_P99_GAP_MS = 200.0
TARGET_CAPACITY_RATIO = 1.5
TARGET_CPU_RATIO = 0.7

SAMPLE_EVERY = 0.5  # CPU samples inside the window, so a process that exits mid-window counts


# Processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child:
    """A subprocess with its output in a log file; stopped by SIGTERM, then SIGKILL, by PID."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path,
                 cwd: Path = ROOT) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                                      cwd=cwd, start_new_session=True)
        self.pid = self.popen.pid
        self.seen: dict[int, float] = {}  # every descendant ever sampled: pid -> create_time

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    async def wait_for_line(self, prefix: str, timeout: float) -> str:
        with trio.fail_after(timeout):
            while True:
                for line in self.log_path.read_text(errors="replace").splitlines():
                    if line.startswith(prefix):
                        return line[len(prefix):].strip()
                if self.popen.poll() is not None:
                    raise RuntimeError(f"{self.name} exited {self.popen.returncode}:\n"
                                       + self.tail())
                await trio.sleep(0.05)

    async def stop(self, timeout: float) -> int | None:
        """SIGTERM, wait (bounded), then SIGKILL it and any descendant still alive, by PID."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            with trio.move_on_after(timeout):
                while self.popen.poll() is None:
                    await trio.sleep(0.05)
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        for pid, created in self.seen.items():  # leftovers, if the supervisor failed us
            try:
                proc = psutil.Process(pid)
                if abs(proc.create_time() - created) < 0.01:
                    proc.kill()
                    print(f"  killed leftover {self.name} descendant {pid}", file=sys.stderr)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self._log.close()
        return self.popen.returncode


def label(proc: psutil.Process) -> str:
    """A short name for a process of either tree, for the per-process breakdown."""
    name = proc.name()
    if name.startswith("agentd: "):
        return name[len("agentd: "):]
    if name.startswith("postgres"):
        return "postgres"
    if name.startswith("redis"):
        return "redis"
    return "supervisor" if name == "agentd" else name


def tree_cpu(child: Child) -> dict[int, tuple[float, float, str]]:
    """pid -> (create_time, user + system seconds, label) for the child and its descendants."""
    out: dict[int, tuple[float, float, str]] = {}
    try:
        root = psutil.Process(child.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for proc in procs:
        try:
            with proc.oneshot():
                t = proc.cpu_times()
                out[proc.pid] = (proc.create_time(), t.user + t.system, label(proc))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for pid, (created, _, _) in out.items():
        child.seen[pid] = created
    return out


class CpuMeter:
    """CPU seconds a process tree spends between `start` and `stop`, sampled in between."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.first: dict[int, tuple[float, float, str]] = {}
        self.last: dict[int, tuple[float, float, str]] = {}
        self.t0 = 0.0

    def start(self) -> None:
        self.t0 = time.time()
        self.first = tree_cpu(self.child)
        self.last = dict(self.first)

    def sample(self) -> None:
        self.last.update(tree_cpu(self.child))

    def by_label(self) -> dict[str, float]:
        """CPU seconds in the window per kind of process."""
        out: dict[str, float] = {}
        for pid, (created, cpu, name) in self.last.items():
            before = self.first.get(pid)
            if before is not None and before[0] == created:
                used = cpu - before[1]
            elif created >= self.t0 - 0.01:
                used = cpu  # born inside the window
            else:
                continue
            out[name] = out.get(name, 0.0) + used
        return out

    def seconds(self) -> float:
        return sum(self.by_label().values())

    def processes(self) -> int:
        return len(self.last)


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def host_busy() -> tuple[float, float]:
    """(busy CPU seconds of the whole host, wall time), for what everything else used."""
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + \
        getattr(t, "steal", 0)
    return busy, time.time()


# Load generator -----------------------------------------------------------------------------


@dataclass
class Side:
    name: str
    port: int
    child: Child
    token_marker: bytes  # one occurrence per token event in the SSE bytes
    end_marker: bytes


@dataclass
class StreamRecord:
    requested: float = 0.0
    status: int | None = None
    error: str | None = None
    arrivals: list[float] = field(default_factory=list)
    ended: bool = False


async def one_stream(side: Side, request: bytes, start_at: float, rec: StreamRecord) -> None:
    await trio.sleep_until(start_at)
    rec.requested = trio.current_time()
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", side.port)
    except OSError as e:
        rec.error = f"connect: {type(e).__name__}: {e}"
        return
    marker, end = side.token_marker, side.end_marker
    keep = max(len(marker), len(end)) - 1
    arrivals = rec.arrivals
    try:
        async with stream:
            await stream.send_all(request)
            head = b""
            while b"\r\n\r\n" not in head:
                data = await stream.receive_some(65536)
                if not data:
                    rec.error = "closed before the response head"
                    return
                head += data
            head, _, body = head.partition(b"\r\n\r\n")
            rec.status = int(head.split(b" ", 2)[1])
            if rec.status != 200:
                with trio.move_on_after(1):
                    while len(body) < 2000 and (data := await stream.receive_some(65536)):
                        body += data
                detail = body.decode(errors="replace").replace("\r\n", " ")[-300:]
                rec.error = f"HTTP {rec.status}: {detail}"
                return
            tail = b""
            data = body
            while True:
                if data:
                    buf = tail + data
                    count = buf.count(marker)
                    if count:
                        now = trio.current_time()
                        if count == 1:
                            arrivals.append(now)
                        else:
                            arrivals.extend([now] * count)
                    if end in buf:
                        rec.ended = True
                        return
                    tail = buf[-keep:]
                data = await stream.receive_some(65536)
                if not data:
                    rec.error = "closed before the end event"
                    return
    except (trio.BrokenResourceError, OSError) as e:
        rec.error = f"{type(e).__name__}: {e}"


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


@dataclass
class Result:
    side: str
    streams: int
    rate: float
    seconds: float
    delivered: float = 0.0
    tok_s: float = 0.0
    gap_p50_ms: float = math.nan
    gap_p99_ms: float = math.nan
    gap_max_ms: float = math.nan
    ttft_p50_ms: float = math.nan
    ttft_p99_ms: float = math.nan
    cpu_us_per_token: float = math.nan
    tree_cores: float = 0.0
    processes: int = 0
    llm_us_per_token: float = math.nan
    loadgen_us_per_token: float = math.nan
    other_cores: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)
    breakdown: dict[str, float] = field(default_factory=dict)  # µs per token, per process kind
    ended: int = 0
    loadavg: float = 0.0

    @property
    def passed(self) -> bool:
        return (self.delivered >= TARGET_DELIVERED and self.gap_p99_ms <= TARGET_P99_GAP_MS
                and not self.errors)


async def measure(side: Side, llm: Child, n: int, rate: float, tokens: int, seconds: float,
                  ramp: float, settle: float) -> Result:
    message = f"[[script tokens={tokens} rate={rate:g}]] go"
    body = json.dumps({"message": message}).encode()
    request = (f"POST /api/chat/stream HTTP/1.1\r\nHost: 127.0.0.1:{side.port}\r\n"
               "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    records = [StreamRecord() for _ in range(n)]
    tree, llm_meter = CpuMeter(side.child), CpuMeter(llm)
    result = Result(side.name, n, rate, seconds, loadavg=os.getloadavg()[0])
    began = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i, rec in enumerate(records):
            nursery.start_soon(one_stream, side, request, began + ramp * i / n, rec)
        await trio.sleep_until(began + ramp + settle)
        # The window.
        t0 = trio.current_time()
        host0 = host_busy()
        me0 = self_cpu()
        tree.start()
        llm_meter.start()
        while trio.current_time() < t0 + seconds - SAMPLE_EVERY:
            await trio.sleep(SAMPLE_EVERY)
            tree.sample()
            llm_meter.sample()
        await trio.sleep_until(t0 + seconds)
        t1 = trio.current_time()
        tree.sample()
        llm_meter.sample()
        me1 = self_cpu()
        host1 = host_busy()
        # Every stream has tokens left past the window; give them time to reach their `end`
        # (a lagging side takes longer), then cut what is left.
        nursery.cancel_scope.deadline = t1 + ramp + 15.0

    window = t1 - t0
    gaps: list[float] = []
    ttfts: list[float] = []
    in_window = 0
    on_time = 0
    expected = 0
    per_stream = math.floor(rate * window)
    for rec in records:
        a = rec.arrivals
        expected_here = per_stream  # a stream that never got going still owed its tokens
        if a:
            # Token k of a stream is due k/R after its first one (the scripted LLM's pacing).
            # Delivered: due in the window and arrived by its end (+ the gap target as grace).
            # A constant latency is absorbed; a stream falling behind is not; a backlog drained
            # in the window cannot count twice.
            first = a[0]
            k0 = max(0, math.ceil((t0 - first) * rate))
            k1 = max(0, math.ceil((t1 - first) * rate))
            limit = t1 + TARGET_P99_GAP_MS / 1000
            on_time += sum(1 for j in range(k0, min(k1, len(a))) if a[j] <= limit)
            expected_here = max(k1 - k0, per_stream)
        expected += expected_here
        if rec.error:
            key = rec.error.split(":")[0]
            result.errors[key] = result.errors.get(key, 0) + 1
            result.error_examples.setdefault(key, rec.error[:400])
        if rec.ended:
            result.ended += 1
        a = rec.arrivals
        if a:
            ttfts.append(a[0] - rec.requested)
        for j, at in enumerate(a):
            if t0 <= at < t1:
                in_window += 1
                if j > 0:
                    gaps.append(at - a[j - 1])
    gaps.sort()
    ttfts.sort()
    result.delivered = on_time / expected if expected else 0.0
    result.tok_s = in_window / window
    result.gap_p50_ms = percentile(gaps, 0.50) * 1000
    result.gap_p99_ms = percentile(gaps, 0.99) * 1000
    result.gap_max_ms = (gaps[-1] if gaps else math.nan) * 1000
    result.ttft_p50_ms = percentile(ttfts, 0.50) * 1000
    result.ttft_p99_ms = percentile(ttfts, 0.99) * 1000
    cpu = tree.seconds()
    result.processes = tree.processes()
    result.tree_cores = cpu / window
    llm_cpu = llm_meter.seconds()
    me = me1 - me0
    if in_window:
        result.cpu_us_per_token = cpu / in_window * 1e6
        result.llm_us_per_token = llm_cpu / in_window * 1e6
        result.loadgen_us_per_token = me / in_window * 1e6
        result.breakdown = {k: v / in_window * 1e6 for k, v in
                            sorted(tree.by_label().items(), key=lambda kv: -kv[1])}
    result.other_cores = max(0.0, (host1[0] - host0[0]) - cpu - llm_cpu - me) / window
    return result


async def wait_quiet(child: Child, *, below: float = 0.05, limit: float = 20.0) -> None:
    """Until the tree uses less than `below` of a core over half a second (bounded)."""
    meter = CpuMeter(child)
    with trio.move_on_after(limit):
        while True:
            meter.start()
            await trio.sleep(0.5)
            meter.sample()
            if meter.seconds() / 0.5 < below:
                return


# Printing -----------------------------------------------------------------------------------

HEADER = (f"{'side':<9} {'streams':>7} {'deliv%':>7} {'tok/s':>8} {'gap p50':>8} "
          f"{'gap p99':>8} {'gap max':>8} {'ttft p50':>8} {'ttft p99':>8} {'µs/tok':>7} "
          f"{'cores':>6} {'procs':>5} {'llm µs':>7} {'gen µs':>7} {'other':>6} {'ends':>6}  ok")


def row(r: Result) -> str:
    errors = " " + ",".join(f"{k}x{v}" for k, v in r.errors.items()) if r.errors else ""
    return (f"{r.side:<9} {r.streams:>7} {r.delivered * 100:>7.2f} {r.tok_s:>8.0f} "
            f"{r.gap_p50_ms:>8.1f} {r.gap_p99_ms:>8.1f} {r.gap_max_ms:>8.0f} "
            f"{r.ttft_p50_ms:>8.0f} {r.ttft_p99_ms:>8.0f} {r.cpu_us_per_token:>7.0f} "
            f"{r.tree_cores:>6.2f} {r.processes:>5} {r.llm_us_per_token:>7.0f} "
            f"{r.loadgen_us_per_token:>7.0f} {r.other_cores:>6.2f} {r.ended:>6}  "
            f"{'yes' if r.passed else 'NO'}{errors}")


def legend(args: argparse.Namespace) -> None:
    print(f"rate {args.rate:g} tok/s per stream, window {args.seconds:g} s after a "
          f"{args.ramp:g} s ramp + {args.settle:g} s settle, {args.tokens} tokens per stream; "
          f"{psutil.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    print("columns: deliv% = tokens due in the window (token k is due k/rate after a stream's "
          "first) that arrived\n  by its end + 200 ms, / (streams x rate x window); tok/s = "
          "tokens received in the window per s;\n  gaps and ttft in ms; µs/tok = CPU (user+sys) "
          "of the side's whole tree per token received;\n  cores = the same as cores busy; "
          "procs = processes in the tree; llm µs / gen µs = the scripted LLM's /\n  load "
          "generator's CPU per token (in neither side); other = cores the rest of the host used "
          "in the window;\n  ends = streams that reached their end event")


async def print_result(r: Result) -> None:
    print(row(r), flush=True)
    if len(r.breakdown) > 1:
        parts = ", ".join(f"{k} {v:.0f}" for k, v in r.breakdown.items())
        print(f"{'':<9} {'':>7}  µs/token by process: {parts}", flush=True)
    for key, example in r.error_examples.items():
        print(f"{'':<9} {'':>7}  error {key} x{r.errors[key]}, e.g.: {example}", flush=True)


# Main ---------------------------------------------------------------------------------------


async def start_sides(args: argparse.Namespace, logdir: Path, stack: list[Child]
                      ) -> tuple[Child, dict[str, Side]]:
    llm = Child("scripted_llm", [PYTHON, "-m", "tests.support.scripted_llm", "--port", "0",
                                 "--tokens", str(args.tokens), "--rate", f"{args.rate:g}"],
                {}, logdir)
    stack.append(llm)
    args.llm_url = await llm.wait_for_line("LISTENING ", 15)
    sides = {name: start_side(name, args, logdir, stack) for name in ("baseline", "agentd")
             if name in args.sides}
    for side in sides.values():
        await wait_ready(side, 180 if side.name == "agentd" else 30)
        tree_cpu(side.child)  # remember the tree's PIDs, to kill leftovers by PID at the end
    return llm, sides


def start_side(name: str, args: argparse.Namespace, logdir: Path, stack: list[Child]) -> Side:
    port = free_port()
    if name == "baseline":
        child = Child("baseline", [PYTHON, "-m", "uvicorn", "bench.baseline_relay:app",
                                   "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop",
                                   "--http", "httptools", "--log-level", "warning",
                                   "--no-access-log", "--timeout-graceful-shutdown", "2",
                                   "--backlog", "4096"],
                      {"BASELINE_LLM_BASE_URL": args.llm_url}, logdir)
        stack.append(child)
        return Side("baseline", port, child, b'"type": "token"', b'"type": "done"')
    data_dir = Path(tempfile.mkdtemp(prefix="agentd-bench-"))
    env = {"AGENTD_DATA_DIR": str(data_dir), "AGENTD_BIND": f"127.0.0.1:{port}",
           "AGENTD_LLM_BASE_URL": args.llm_url, "AGENTD_LLM_API_KEY": "x",
           "AGENTD_LLM_MODEL": "scripted", "AGENTD_MAX_CONCURRENT_RUNS": "2000",
           "AGENTD_LOG_LEVEL": "warning"}
    if args.llm_max_connections:
        env["AGENTD_LLM_MAX_CONNECTIONS"] = str(args.llm_max_connections)
    cwd = ROOT
    if args.agentd_src:  # another checkout of agentd (app/, supervisor/), same venv
        cwd = Path(args.agentd_src).resolve()
        env["PYTHONPATH"] = str(cwd)
    child = Child(f"agentd-{len(stack)}", [AGENTD, "serve"], env, logdir, cwd)
    stack.append(child)
    return Side("agentd", port, child, b"event: token\n", b"event: end\n")


async def healthy_side(side: Side, args: argparse.Namespace, logdir: Path, stack: list[Child]
                       ) -> Side:
    """The side itself, or a fresh one if a failed load left it unready (say so)."""
    try:
        await wait_ready(side, 10)
        return side
    except (trio.TooSlowError, RuntimeError):
        pass
    print(f"  ({side.name} is not ready after the failed load: restarting it)", flush=True)
    await side.child.stop(60)
    fresh = start_side(side.name, args, logdir, stack)
    await wait_ready(fresh, 180)
    tree_cpu(fresh.child)
    return fresh


async def wait_ready(side: Side, timeout: float) -> None:
    request = b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with trio.fail_after(timeout):
        while True:
            if side.child.popen.poll() is not None:
                raise RuntimeError(f"{side.name} exited {side.child.popen.returncode}:\n"
                                   + side.child.tail())
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", side.port)
                async with stream:
                    await stream.send_all(request)
                    reply = await stream.receive_some(4096)
                if reply.startswith(b"HTTP/1.1 200"):
                    return
            except OSError:
                pass
            await trio.sleep(0.2)


async def run_default(args: argparse.Namespace, llm: Child, sides: dict[str, Side]
                      ) -> list[Result]:
    results = []
    for _ in range(args.repeat):
        for name in ("baseline", "agentd"):
            if name in sides:
                await wait_quiet(sides[name].child)
                r = await measure(sides[name], llm, args.streams, args.rate, args.tokens,
                                  args.seconds, args.ramp, args.settle)
                await print_result(r)
                results.append(r)
    return results


async def run_capacity(args: argparse.Namespace, llm: Child, sides: dict[str, Side],
                       logdir: Path, stack: list[Child]) -> tuple[list[Result], dict[str, int]]:
    """Raise N per side by `--step` until a load fails; then bisect between the last pass and
    the failure (`--refine` times at most, on a fresh tree if the failure left it unready)."""
    results: list[Result] = []
    best: dict[str, int] = dict.fromkeys(sides, 0)
    failed_at: dict[str, int] = {}
    n = args.start
    deadline = time.monotonic() + args.budget

    async def attempt(name: str, load: int) -> bool:
        sides[name] = await healthy_side(sides[name], args, logdir, stack)
        await wait_quiet(sides[name].child)
        r = await measure(sides[name], llm, load, args.rate, args.tokens, args.seconds,
                          args.ramp, args.settle)
        await print_result(r)
        results.append(r)
        return r.passed

    while n <= args.max_streams and len(failed_at) < len(sides):
        for name in sides:
            if name in failed_at:
                continue
            if time.monotonic() > deadline:
                print(f"  (time budget of {args.budget:g} s spent: stopping)")
                return results, best
            if await attempt(name, n):
                best[name] = n
            else:
                failed_at[name] = n
        n += args.step
    for name in sides:
        for _ in range(args.refine):
            if name not in failed_at or time.monotonic() > deadline:
                break
            mid = (best[name] + failed_at[name]) // 2
            if mid <= best[name] or failed_at[name] - best[name] < max(2, args.step // 4):
                break
            if await attempt(name, mid):
                best[name] = mid
            else:
                failed_at[name] = mid
    return results, best


def summary(results: list[Result], best: dict[str, int] | None, args: argparse.Namespace) -> None:
    print()
    print("targets: agentd streams >= 1.5x baseline's (same rate, >= 99% delivered, "
          "p99 gap <= 200 ms); agentd CPU/token <= 0.7x baseline's")
    by_n: dict[int, dict[str, list[Result]]] = {}
    for r in results:
        by_n.setdefault(r.streams, {}).setdefault(r.side, []).append(r)
    for n in sorted(by_n):
        pair = by_n[n]
        if "agentd" not in pair or "baseline" not in pair:
            continue
        # With --repeat, each side's figure is the mean over its measurements at this load.
        a, b = (_mean_cpu(pair[side]) for side in ("agentd", "baseline"))
        runs = f" (mean of {len(pair['agentd'])} and {len(pair['baseline'])})" \
            if len(pair["agentd"]) > 1 or len(pair["baseline"]) > 1 else ""
        if math.isnan(a) or math.isnan(b):
            print(f"CPU per token at {n} streams: n/a (a side delivered no tokens in the window)")
            continue
        ratio = a / b
        verdict = "meets" if ratio <= TARGET_CPU_RATIO else "MISSES"
        print(f"CPU per token at {n} streams{runs}: agentd {a:.0f} µs / baseline {b:.0f} µs = "
              f"{ratio:.2f}x ({verdict} <= {TARGET_CPU_RATIO}x)")
    if best is not None:
        for name, n in best.items():
            capped = " (not reached: the step limit or the time budget stopped it)" \
                if not any(r.side == name and not r.passed for r in results) else ""
            print(f"max streams at {args.rate:g} tok/s: {name} {n}{capped}")
        if best.get("baseline"):
            ratio = best.get("agentd", 0) / best["baseline"]
            verdict = "meets" if ratio >= TARGET_CAPACITY_RATIO else "MISSES"
            print(f"capacity ratio agentd/baseline = {ratio:.2f}x ({verdict} >= "
                  f"{TARGET_CAPACITY_RATIO}x)")


def _mean_cpu(results: list[Result]) -> float:
    values = [r.cpu_us_per_token for r in results if not math.isnan(r.cpu_us_per_token)]
    return sum(values) / len(values) if values else math.nan


async def amain(args: argparse.Namespace) -> int:
    logdir = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    stack: list[Child] = []
    code = 0
    try:
        started = time.monotonic()
        llm, sides = await start_sides(args, logdir, stack)
        print(f"started {', '.join(sides)} and the scripted LLM in "
              f"{time.monotonic() - started:.1f} s (logs in {logdir})")
        if "agentd" in sides:
            idle = CpuMeter(sides["agentd"].child)
            await wait_quiet(sides["agentd"].child)
            idle.start()
            await trio.sleep(3)
            idle.sample()
            print(f"agentd tree idle: {idle.seconds() / 3 * 100:.1f}% of a core, "
                  f"{idle.processes()} processes")
        legend(args)
        print(HEADER, flush=True)
        if args.capacity:
            results, best = await run_capacity(args, llm, sides, logdir, stack)
            summary(results, best, args)
        else:
            summary(await run_default(args, llm, sides), None, args)
    except Exception as e:  # noqa: BLE001 - report, then clean up below
        print(f"bench failed: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    finally:
        with trio.CancelScope(shield=True):
            for child in reversed(stack):
                rc = await child.stop(60 if child.name.startswith("agentd") else 10)
                if child.name.startswith("agentd") and rc not in (0, None):
                    print(f"agentd exited {rc}:\n{child.tail(2000)}", file=sys.stderr)
    return code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=100, help="concurrent streams (default 100)")
    p.add_argument("--rate", type=float, default=20.0, help="tokens/s per stream (default 20)")
    p.add_argument("--seconds", type=float, default=15.0, help="measurement window (default 15)")
    p.add_argument("--ramp", type=float, default=3.0, help="streams start over this long")
    p.add_argument("--settle", type=float, default=2.0, help="wait after the ramp")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per stream (default: rate x (ramp + settle + seconds + 2))")
    p.add_argument("--sides", default="baseline,agentd", help="baseline,agentd (default both)")
    p.add_argument("--repeat", type=int, default=1, help="default mode: measure each side n times")
    p.add_argument("--capacity", action="store_true",
                   help="raise the streams per side until delivered < 99%% or p99 gap > 200 ms")
    p.add_argument("--start", type=int, default=100, help="capacity: first load")
    p.add_argument("--step", type=int, default=100, help="capacity: increment")
    p.add_argument("--max-streams", type=int, default=1000, help="capacity: stop here")
    p.add_argument("--refine", type=int, default=2,
                   help="capacity: bisection steps after the first failure (default 2)")
    p.add_argument("--budget", type=float, default=480.0,
                   help="capacity: seconds of measuring before it stops (default 480)")
    p.add_argument("--llm-max-connections", type=int, default=2000,
                   help="AGENTD_LLM_MAX_CONNECTIONS (agentd's default of 100 caps concurrent "
                        "LLM streams; 0 leaves agentd's default)")
    p.add_argument("--agentd-src", default=None,
                   help="run agentd from this checkout (its app/ and supervisor/) instead")
    args = p.parse_args(argv)
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if args.tokens is None:
        args.tokens = math.ceil(args.rate * (args.ramp + args.settle + args.seconds + 2))
    if args.seconds < 10:
        print("note: windows under 10 s measure CPU coarsely (psutil counts 10 ms ticks)",
              file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of sockets per side
    return trio.run(amain, args)


if __name__ == "__main__":
    sys.exit(main())
