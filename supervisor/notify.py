"""The systemd notify protocol, both ends: the only copy of it in agentd.

A notification is a datagram of newline-separated ``KEY=VALUE`` assignments sent to the
unix socket named by ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).
Children speak it to the supervisor exactly as the supervisor speaks it to systemd.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

MAX_DATAGRAM = 4096


def parse(datagram: bytes) -> dict[str, str]:
    """``b"READY=1\\nSTATUS=ok"`` → ``{"READY": "1", "STATUS": "ok"}``; junk lines are skipped."""
    fields: dict[str, str] = {}
    for line in datagram.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key.strip()] = value
    return fields


def format_message(fields: Mapping[str, str]) -> bytes:
    return "\n".join(f"{key}={value}" for key, value in fields.items()).encode()


def _address(path: str) -> str:
    return "\0" + path[1:] if path.startswith("@") else path


class Notifier:
    """The sending end. Does nothing when there is no ``NOTIFY_SOCKET`` (not supervised).

    Sending is a non-blocking datagram write: it never blocks the event loop, and a
    supervisor that is gone (ECONNREFUSED, ENOENT) is not an error for the child.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path if path is not None else os.environ.get("NOTIFY_SOCKET")
        self._sock: socket.socket | None = None
        if self.path:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        if self._sock is None or self.path is None:
            return False
        data = format_message({key: str(value) for key, value in fields.items()})
        try:
            self._sock.sendto(data, _address(self.path))
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class NotifyListener:
    """The receiving end: a datagram socket bound at ``path`` that a child gets as NOTIFY_SOCKET."""

    def __init__(self, path: str) -> None:
        self.path = path
        if os.path.exists(path):
            os.unlink(path)
        # Bound now, synchronously, so the path exists before the child that writes to it
        # is spawned (binding a unix socket is local and does not block).
        self._raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._raw.bind(path)
        os.chmod(path, 0o600)
        self._sock = trio.socket.from_stdlib_socket(self._raw)

    async def receive(self) -> dict[str, str]:
        data = await self._sock.recv(MAX_DATAGRAM)
        return parse(data)

    def pending(self) -> list[dict[str, str]]:
        """Messages already queued, without waiting (what a child said just before exit)."""
        found = []
        while True:
            try:
                found.append(parse(self._raw.recv(MAX_DATAGRAM, socket.MSG_DONTWAIT)))
            except (BlockingIOError, OSError):
                return found

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
