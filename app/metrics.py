"""Prometheus metrics for the whole tree (API.md, Metrics).

Every process (web, agent, embedding) defines the same metrics; in a tree, prometheus-client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by `agentd serve`) writes each process's
values to files that the web process's /metrics sums, including processes that have since
exited; the supervisor drops an exited process's live gauges (`mark_process_dead`). Outside
a tree (a child run by hand, unit tests) the default in-process registry is used.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

MULTIPROC = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

http_requests = Counter("agentd_http_requests_total", "HTTP requests",
                        ["route", "method", "status"])
http_duration = Histogram("agentd_http_request_duration_seconds", "HTTP request duration",
                          ["route"])
open_streams = Gauge("agentd_open_streams", "open SSE streams", multiprocess_mode="livesum")
runs = Counter("agentd_runs_total", "runs that reached a final status", ["status"])
run_ends = Counter("agentd_run_ends_total", "runs ended, by end reason", ["reason"])
run_duration = Histogram("agentd_run_duration_seconds", "run duration",
                         buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600))
run_iterations = Histogram("agentd_run_iterations", "LLM turns per run",
                           buckets=(1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 50))
llm_requests = Counter("agentd_llm_requests_total", "LLM requests", ["model", "outcome"])
llm_retries = Counter("agentd_llm_retries_total", "LLM request retries", ["model"])
llm_tokens = Counter("agentd_llm_tokens_total", "LLM tokens", ["model", "direction"])
tool_calls = Counter("agentd_tool_calls_total", "tool calls", ["tool", "outcome"])
tool_duration = Histogram("agentd_tool_duration_seconds", "tool call duration", ["tool"])
embedding_batch = Histogram("agentd_embedding_batch_size", "texts per embedding batch",
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
embedding_latency = Histogram("agentd_embedding_seconds", "embedding batch latency")
cache_hits = Counter("agentd_cache_hits_total", "answers served from the cache")
rate_limited = Counter("agentd_rate_limited_total", "requests refused by the rate limit")
shutdown_streams = Counter("agentd_shutdown_streams_ended_total",
                           "streams ended while draining, by reason", ["reason"])


def render(extra: list[str]) -> tuple[bytes, str]:
    """The whole tree's metrics in Prometheus text, plus lines computed at scrape time."""
    if MULTIPROC:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        text = generate_latest(registry)
    else:
        text = generate_latest()
    return text + ("\n".join(extra) + "\n").encode() if extra else text, CONTENT_TYPE_LATEST


def tree_lines(runtime_dir: str | None) -> list[str]:
    """Figures the supervisor knows: restarts by role, and the last shutdown's summary."""
    if not runtime_dir:
        return []
    lines: list[str] = []
    tree = _read_json(Path(runtime_dir) / "tree.json")
    lines += ["# HELP agentd_process_restarts_total child restarts by role",
              "# TYPE agentd_process_restarts_total counter"]
    for role, n in sorted((tree.get("restarts_by_role") or {}).items()):
        lines.append(f'agentd_process_restarts_total{{role="{role}"}} {n}')
    last = _read_json(Path(runtime_dir) / "last_shutdown.json")
    if last:
        lines += ["# HELP agentd_last_shutdown_duration_seconds the previous shutdown's length",
                  "# TYPE agentd_last_shutdown_duration_seconds gauge",
                  f"agentd_last_shutdown_duration_seconds {last.get('duration_s', 0)}",
                  "# HELP agentd_last_shutdown_killed_processes processes SIGKILLed then",
                  "# TYPE agentd_last_shutdown_killed_processes gauge",
                  f"agentd_last_shutdown_killed_processes {len(last.get('killed', []))}",
                  "# HELP agentd_last_shutdown_streams_ended streams ended then, by reason",
                  "# TYPE agentd_last_shutdown_streams_ended gauge"]
        for reason, n in sorted(_ends(last).items()):
            lines.append(f'agentd_last_shutdown_streams_ended{{reason="{reason}"}} {n}')
    return lines


def _ends(summary: dict[str, Any]) -> dict[str, int]:
    """Sum the web processes' "streams ended: a=1 b=2" reports."""
    total: dict[str, int] = {}
    for report in (summary.get("reports") or {}).values():
        if isinstance(report, str) and report.startswith("streams ended:"):
            for part in report.split(":", 1)[1].split():
                reason, _, n = part.partition("=")
                if n.isdigit():
                    total[reason] = total.get(reason, 0) + int(n)
    return total


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def gauge_line(name: str, help_text: str, value: float) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]


def now() -> float:
    return time.perf_counter()
