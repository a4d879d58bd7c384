"""`agentd serve` as a black box, for the end-to-end tests and `bench/startup.py`.

`Serve` runs the real command in a clean environment (no AGENTD_*, OPENAI_* or systemd
variables inherited from whoever runs the tests) on a free loopback port, with its JSON log in
a file; `tree_processes` finds the processes of the tree the way an operator would, by what
`ps` shows. Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import trio

from tests.support.procs import Proc, descendants

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

AGENTD = str(Path(sys.executable).with_name("agentd"))
#: Variables a developer's shell or a systemd unit may have set that would change the tree.
_INHERITED = ("AGENTD_", "OPENAI_", "LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_", "CREDENTIALS_DIR")
APP_ROLES = ("web", "agent", "embedding")
_APP_TITLE = re.compile(r"^agentd:? (web|agent|embedding)\b")


def free_port() -> int:
    """A loopback port nobody listens on right now (bind port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED)}
    env.update(PYTHONUNBUFFERED="1", AGENTD_LOG_FORMAT="json")
    env.update(settings)
    return env


def timestamp(event: dict) -> float:
    """A log event's `timestamp` (ISO 8601, UTC) as seconds since the epoch."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


class Serve(Proc):
    """`agentd serve` on `data_dir`, bound to 127.0.0.1:`port`, its stderr in `log_path`.

    A `Proc` (events, wait_event, close), but with an environment built from scratch
    rather than on top of ours, so no setting of the caller's leaks into the tree.
    """

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        *,
        port: int | None = None,
        shutdown_timeout: float = 6,
        settings: dict[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.shutdown_timeout = shutdown_timeout
        env = clean_env(
            AGENTD_DATA_DIR=str(data_dir),
            AGENTD_BIND=f"127.0.0.1:{self.port}",
            AGENTD_SHUTDOWN_TIMEOUT=str(shutdown_timeout),
            **(settings or {}),
        )
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.spawned_at = time.time()
        # cwd: the data dir's parent, so that no `.env` of the checkout is read.
        self.popen = subprocess.Popen(
            [AGENTD, "serve", *args], stdout=self._log, stderr=self._log, env=env,
            cwd=data_dir.parent,
        )
        self.pid = self.popen.pid

    async def ready(self, timeout: float = 60) -> dict:
        return await self.wait_event("tree_ready", timeout=timeout)

    async def wait_for(self, predicate: Callable[[dict], bool], timeout: float) -> dict:
        """The first log event for which `predicate` holds; fails after `timeout`."""
        with trio.fail_after(timeout):
            while True:
                for event in self.events():
                    if predicate(event):
                        return event
                if self.popen.poll() is not None:
                    raise AssertionError(
                        f"exited {self.popen.returncode}:\n" + self.text()[-4000:]
                    )
                await trio.sleep(0.05)

    def summary(self) -> dict:
        events = self.events()
        assert events, self.text()[-4000:]
        return events[-1]

    def processes(self) -> TreeProcesses:
        return tree_processes(self.pid)


@dataclass
class TreeProcesses:
    supervisor: psutil.Process
    #: role (web, agent, embedding, postgres, redis) → its processes; postgres includes
    #: the postmaster's children (backends, checkpointer...).
    by_role: dict[str, list[psutil.Process]]
    cmdlines: dict[int, str]

    def one(self, role: str) -> psutil.Process:
        found = self.by_role.get(role, [])
        assert len(found) == 1, f"expected one {role} process, found {self.cmdlines}"
        return found[0]

    def postmaster(self) -> psutil.Process:
        postmasters = [
            p for p in self.by_role.get("postgres", []) if p.ppid() == self.supervisor.pid
        ]
        assert len(postmasters) == 1, f"expected one postmaster, found {self.cmdlines}"
        return postmasters[0]

    @property
    def all(self) -> list[psutil.Process]:
        return [p for group in self.by_role.values() for p in group]


def role_of(cmdline: str) -> str | None:
    if match := _APP_TITLE.match(cmdline):
        return match.group(1)
    first = cmdline.split(" ", 1)[0]
    if first == "postgres:" or os.path.basename(first) == "postgres":
        return "postgres"
    if os.path.basename(first) == "redis-server":
        return "redis"
    return None


def tree_processes(pid: int) -> TreeProcesses:
    by_role: dict[str, list[psutil.Process]] = {}
    cmdlines: dict[int, str] = {}
    for proc in descendants(pid):
        try:
            cmdline = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        cmdlines[proc.pid] = cmdline
        role = role_of(cmdline) or "other"
        by_role.setdefault(role, []).append(proc)
    return TreeProcesses(psutil.Process(pid), by_role, cmdlines)


async def watch_deaths(
    procs: Sequence[psutil.Process],
    timeout: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> dict[int, float]:
    """pid → `time.monotonic()` at which each process ended (became a zombie or vanished),
    for as many as end within `timeout`. A pidfd becomes readable the moment its process
    exits, so the order is exact, not a polling interval's guess. Ready (`nursery.start`)
    once every pidfd is open: signal the processes only then."""
    died: dict[int, float] = {}
    fds: dict[int, int] = {}
    for proc in procs:
        try:
            fds[proc.pid] = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            died[proc.pid] = time.monotonic()

    async def watch(pid: int, fd: int) -> None:
        await trio.lowlevel.wait_readable(fd)
        died[pid] = time.monotonic()

    try:
        task_status.started()
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for pid, fd in fds.items():
                    nursery.start_soon(watch, pid, fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    return died


def rss_mb(procs: Sequence[psutil.Process]) -> float:
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / (1024 * 1024)
