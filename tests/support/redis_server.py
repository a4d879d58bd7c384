"""A private redis-server that a test may SIGKILL and start again (on the same socket and
append-only file), for code that must survive Redis going away. The session's `infra`
Redis is shared by every test: never kill that one."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from app.redis import RedisUnavailable, open_redis
from supervisor.infra import find_redis

if TYPE_CHECKING:
    from collections.abc import Iterator


class RedisServer:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = base / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    async def start(self, timeout: float = 10) -> None:
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(
            [str(find_redis()), "--port", "0", "--unixsocket", str(self.socket),
             "--dir", str(self.base), "--appendonly", "yes", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with trio.fail_after(timeout):
            while True:
                try:
                    async with open_redis(self.url, connect_timeout=1):
                        return
                except RedisUnavailable:
                    await trio.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, as the chaos tests do to the embedded one."""
        assert self.proc is not None, "not running"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            self.kill()


def private_redis() -> Iterator[RedisServer]:
    """The body of a fixture: a started-on-demand server in its own directory."""
    base = Path(tempfile.mkdtemp(prefix="agentd-redis-"))
    server = RedisServer(base)
    try:
        yield server
    finally:
        server.close()
        shutil.rmtree(base, ignore_errors=True)
