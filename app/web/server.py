"""Serving HTTP with hypercorn's protocol code, but with our own listener and lifetimes.

`hypercorn.trio.serve` ties two things together that the drain must keep apart: when its
shutdown trigger fires it stops accepting *and* marks itself terminated, after which every
kept-alive connection is closed after its next response. API.md wants the listener closed
at once but a request on a connection opened before SIGTERM answered (503 for new work,
`/ready` draining). So this module runs hypercorn's per-connection `TCPServer` itself:

    lifespan (Quart's startup/shutdown)
    └── connections nursery                  lives until the drain is over
        └── accepting nursery                lives until the drain starts
            └── serve_listeners(listener)    closing it closes the listening socket

At the drain the accepting nursery is cancelled: `serve_listeners` leaves the listener's
`async with`, which closes our copy of the socket (the supervisor and the other web
processes close theirs). Connections carry on until nothing is in flight (an idle
keep-alive connection does not count) or the deadline, then they are cancelled.
"""

from __future__ import annotations

import socket
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

if TYPE_CHECKING:
    from hypercorn.config import Config

    from app.web.app import WebState

#: Once idle, how long connections may still finish writing (e.g. a final chunk).
CLOSE_GRACE_S = 0.2


async def serve_http(app: Any, config: Config, fd: int, state: WebState,
                     *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    life = state.life
    wrapped = wrap_app(app, config.wsgi_max_body_size, None)
    lifespan = Lifespan(wrapped, config, {})
    context = WorkerContext(None)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    handler = partial(TCPServer, wrapped, config, context, ConnectionState({}))
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(partial(trio.serve_listeners, handler, [listener],
                                             handler_nursery=connections))
                task_status.started()
                await life.draining.wait()
                accepting.cancel_scope.cancel()
            with trio.move_on_at(state.close_connections_at()):
                await state.idle_or_deadline()
            # From now on hypercorn closes each connection after its response.
            await context.terminated.set()
            with trio.move_on_at(min(trio.current_time() + CLOSE_GRACE_S, life.deadline)):
                await state.idle_or_deadline()
            connections.cancel_scope.cancel()
        with trio.move_on_after(1):
            await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
