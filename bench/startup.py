"""How fast `agentd serve` comes up, and how much memory its processes take once it has.

    .venv/bin/python bench/startup.py [--runs N]

Each run starts the tree twice on the embedded defaults: cold (a fresh data dir, so initdb
is included) and warm (the same dir again). For each start it reads the JSON log: the time
from spawning `agentd serve` to `tree_ready`, and each child's `child_started` →
`child_ready`; then the RSS of every process of the tree, and the SIGTERM stop. It prints
the figures (the median over runs, with the range when there are several) next to the
targets. Numbers only: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.tree import Serve, rss_mb, timestamp  # noqa: E402

TARGET_TREE_COLD_S = 12.0
TARGET_LIGHT_READY_S = 2.0
TARGET_LIGHT_RSS_MB = 120.0
LIGHT = ("web", "agent")
ROLES = ("supervisor", "web", "agent", "embedding", "postgres", "redis")


@dataclass
class Start:
    tree_ready_s: float = 0.0
    supervisor_s: float = 0.0  # spawn → the supervisor's first log line (its imports)
    initdb_s: float = float("nan")  # postgres_initdb → postgres child_started (cold only)
    child_ready_s: dict[str, float] = field(default_factory=dict)
    rss_mb: dict[str, float] = field(default_factory=dict)
    processes: dict[str, int] = field(default_factory=dict)
    stop_s: float = 0.0
    exit_status: int | None = None


async def measure(data_dir: Path, log_path: Path) -> Start:
    proc = Serve(data_dir, log_path, shutdown_timeout=10)
    result = Start()
    try:
        ready = await proc.ready(timeout=180)
        result.tree_ready_s = timestamp(ready) - proc.spawned_at
        events = proc.events()
        started = {e["child"]: timestamp(e) for e in events if e["event"] == "child_started"}
        for e in events:
            if e["event"] == "child_ready":
                result.child_ready_s[e["child"]] = timestamp(e) - started[e["child"]]
        result.supervisor_s = timestamp(events[0]) - proc.spawned_at
        initdb = [e for e in events if e["event"] == "postgres_initdb"]
        if initdb and "postgres" in started:
            result.initdb_s = started["postgres"] - timestamp(initdb[0])
        tree = proc.processes()
        groups = {"supervisor": [tree.supervisor], **tree.by_role}
        for role in ROLES:
            result.rss_mb[role] = rss_mb(groups.get(role, []))
            result.processes[role] = len(groups.get(role, []))
        began = time.monotonic()
        proc.signal(signal.SIGTERM)
        result.exit_status = await proc.wait(20)
        result.stop_s = time.monotonic() - began
    finally:
        proc.close()
    return result


async def one_run(base: Path) -> tuple[Start, Start]:
    data_dir = base / "data"
    cold = await measure(data_dir, base / "cold.log")
    warm = await measure(data_dir, base / "warm.log")
    return cold, warm


def figure(values: list[float], digits: int) -> str:
    values = [v for v in values if v == v]  # NaN: not measured in this start
    if not values:
        return "-"
    text = f"{statistics.median(values):.{digits}f}"
    if len(values) > 1:
        text += f" ({min(values):.{digits}f}-{max(values):.{digits}f})"
    return text


def verdict(worst: float, target: float) -> str:
    return "ok" if worst <= target else "OVER"


def report(runs: list[tuple[Start, Start]]) -> None:
    colds, warms = [c for c, _ in runs], [w for _, w in runs]
    row = "{:<28} {:>20} {:>20}   {}"
    print(row.format("", "cold", "warm", "target"))

    def line(label: str, get, digits: int = 2, target: str = "") -> None:  # noqa: ANN001
        print(row.format(label, figure([get(s) for s in colds], digits),
                         figure([get(s) for s in warms], digits), target))

    worst_tree = max(s.tree_ready_s for s in colds)
    line("tree_ready after spawn (s)", lambda s: s.tree_ready_s,
         target=f"<= {TARGET_TREE_COLD_S:g} s cold: {verdict(worst_tree, TARGET_TREE_COLD_S)}")
    line("  spawn -> supervisor log (s)", lambda s: s.supervisor_s)
    line("  initdb (s)", lambda s: s.initdb_s)
    print("child_started -> child_ready (s)")
    for name in colds[0].child_ready_s:
        target = ""
        if name.split("-")[0] in LIGHT:
            worst = max(s.child_ready_s.get(name, float("inf")) for s in colds + warms)
            target = f"<= {TARGET_LIGHT_READY_S:g} s: {verdict(worst, TARGET_LIGHT_READY_S)}"
        line(f"  {name}", lambda s, n=name: s.child_ready_s.get(n, float("nan")),
             target=target)
    print("RSS once ready (MB)")
    for role in ROLES:
        target = ""
        if role in LIGHT:
            worst = max(s.rss_mb[role] for s in colds + warms)
            target = f"<= {TARGET_LIGHT_RSS_MB:g} MB: {verdict(worst, TARGET_LIGHT_RSS_MB)}"
        count = colds[0].processes[role]
        label = f"  {role}" + (f" (sum of {count})" if count > 1 else "")
        line(label, lambda s, r=role: s.rss_mb[r], digits=1, target=target)
    line("SIGTERM -> exit (s)", lambda s: s.stop_s)
    statuses = sorted({s.exit_status for s in colds + warms}, key=str)
    print(f"exit status after SIGTERM: {', '.join(str(x) for x in statuses)}")


async def main(runs: int) -> None:
    results = []
    for index in range(runs):
        base = Path(tempfile.mkdtemp(prefix="agentd-bench-"))
        try:
            results.append(await one_run(base))
        finally:
            shutil.rmtree(base, ignore_errors=True)
        print(f"run {index + 1}/{runs} done", file=sys.stderr, flush=True)
    print(f"agentd serve startup: {runs} run(s), {os.cpu_count()} CPUs, embedded defaults")
    print("(RSS of postgres is summed over its processes: shared buffers count once each)")
    report(results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="cold+warm pairs (default 1)")
    trio.run(main, parser.parse_args().runs)
