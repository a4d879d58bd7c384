"""Helpers for tests that run real processes: spawn with stderr to a file, wait for a log
event, find descendants. Every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import trio

if TYPE_CHECKING:
    from collections.abc import Sequence

ROOT = Path(__file__).resolve().parents[2]


class Proc:
    """A process whose stderr (JSON log lines) goes to a file we can search."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            list(argv), stdout=self._log, stderr=self._log, env=full_env, cwd=cwd or ROOT
        )
        self.pid = self.popen.pid

    def events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def find(self, event: str, **match: object) -> list[dict]:
        return [
            e
            for e in self.events()
            if e.get("event") == event and all(e.get(k) == v for k, v in match.items())
        ]

    async def wait_event(self, event: str, timeout: float = 30, **match: object) -> dict:
        with trio.fail_after(timeout):
            while True:
                found = self.find(event, **match)
                if found:
                    return found[0]
                if self.popen.poll() is not None:
                    raise AssertionError(
                        f"exited {self.popen.returncode} before {event}:\n" + self.text()[-4000:]
                    )
                await trio.sleep(0.05)

    async def wait(self, timeout: float) -> int:
        with trio.fail_after(timeout):
            while self.popen.poll() is None:
                await trio.sleep(0.02)
        return self.popen.returncode

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def close(self) -> None:
        if self.popen.poll() is None:
            kill_tree(self.pid)
            self.popen.wait(10)
        self._log.close()


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int) -> None:
    for p in [*descendants(pid)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def alive(pids: Sequence[int]) -> list[int]:
    result = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                result.append(pid)
        except psutil.NoSuchProcess:
            continue
    return result


PYTHON = sys.executable
