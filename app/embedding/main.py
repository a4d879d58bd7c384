"""The embedding process: the only one that imports torch (see service.py).

    lifecycle ─ model ─ vector store ─ nursery
                                       ├── batcher (one batch at a time, in a worker thread)
                                       ├── status to the supervisor every few seconds
                                       └── hypercorn on <runtime dir>/embedding.sock
                                           └── stop_when_done

Start: the model is imported and loaded in a worker thread (6–15 s), so the event loop keeps
pinging the watchdog meanwhile; the process says READY only once the model has answered a
warm-up encode, the store is open and the socket listens.

Stop (I6): it is in the model layer, so the supervisor signals it only after every agent and
web process has exited, about a second before the model layer's kill time (run/shutdown.json;
lifecycle.py makes that, less a margin, this process's deadline). On SIGTERM it stops
accepting connections and makes batches small (`DRAIN_BATCH`), lets requests in flight
finish until the drain deadline (often already past by then), then cancels them. The
batcher does not wait for a batch still in the encoder, which may take seconds on a busy
CPU: its worker thread is abandoned (batcher.thread_encoder). Then it releases, innermost
first and each under its own short shielded deadline, never past the process's: the vector
store (closed, flushed; it waits for a store call still running, if any), then the model
(dropped once the abandoned batch, if any, is done; garbage-collected; on CUDA the cache
emptied). One `released` log line says what was released and the memory before/after, and
the process exits 0 before its kill time, whether or not every step finished in time.
"""

from __future__ import annotations

import contextlib
import os
import sys
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import structlog
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve

from app.embedding.batcher import MicroBatcher, thread_encoder
from app.embedding.client import default_socket_path
from app.embedding.service import (
    EmbeddingService,
    ModelError,
    ModelInfo,
    load_model,
    resolve_model_name,
)
from app.embedding.store import StoreError, open_store
from app.lifecycle import open_lifecycle

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from app.config import Settings
    from app.embedding.service import Model
    from app.embedding.store import VectorStore
    from app.lifecycle import Lifecycle

log = structlog.get_logger("embedding")
T = TypeVar("T")

STORE_CLOSE_S = 3.0
MODEL_RELEASE_S = 3.0
#: Kept free before the process's deadline for the exit itself: the kernel takes ~0.1 s to
#: tear down a process that holds torch and a model (measured from the `stopped` line).
EXIT_RESERVE_S = 0.15
STATUS_EVERY_S = 5.0
MAX_BATCH, MAX_WAIT_S, LINGER_S, MAX_QUEUE = 64, 0.05, 0.003, 1024
#: Texts per batch once draining: half the worst case in the encoder, at no cost in
#: throughput (stack.md: sentences/s are flat from batches of 32 up).
DRAIN_BATCH = 32


class SocketError(Exception):
    """The internal API's socket cannot be made."""


async def run(settings: Settings) -> int:
    code = 0
    async with open_lifecycle("embedding", budget=settings.shutdown_timeout,
                              reserve=settings.reserve) as life:
        try:
            await _run(settings, life)
        except (ModelError, StoreError, SocketError) as e:
            log.error("start_failed", error=str(e))
            code = 1
    log.info("stopped")
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown.

    With torch and transformers imported, tearing the interpreter down (clearing every
    module, deallocating ~500k objects, torch's own static state) takes 0.3–0.7 s on a small
    machine: more than the model layer's share of a short shutdown reserve. Nothing is left
    for it to do: the store was closed and the model released explicitly above, and the
    log is flushed here, so the process ends at once.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _run(settings: Settings, life: Lifecycle) -> None:
    socket_path = _prepare_socket(default_socket_path(settings))
    name = resolve_model_name(settings.embedding_model)
    started = trio.current_time()
    model = await _unless_draining(life, load_model, name, settings.embedding_device)
    if model is None:  # SIGTERM while loading: the half-loaded model goes with the process
        log.info("released", model=name, detail="stopped while loading; nothing was serving")
        return
    log.info("model_loaded", model=name, device=model.device, dim=model.dim,
             load_s=round(trio.current_time() - started, 2))
    released: dict[str, Any] = {"model": name, "device": model.device}
    try:
        store = await open_store(dim=model.dim, model=name, path=settings.data_dir / "qdrant",
                                 url=settings.qdrant_url)
        released["store"] = store.where
        try:
            await _serve(settings, life, model, store, socket_path)
        finally:

            async def close_store() -> bool:
                await store.aclose()
                return True

            began = trio.current_time()
            # At most half of what is left: the model's release comes next.
            released["store_closed"] = bool(await _release(life, STORE_CLOSE_S, close_store,
                                                           share=0.5))
            released["store_close_s"] = round(trio.current_time() - began, 3)
    finally:
        began = trio.current_time()
        report = await _release(
            life, MODEL_RELEASE_S, partial(trio.to_thread.run_sync, model.release,
                                           abandon_on_cancel=True))
        released.update(report or {"model_released": False})
        released.setdefault("model_released", True)
        released["model_release_s"] = round(trio.current_time() - began, 3)
        log.info("released", **released)


async def _serve(
    settings: Settings, life: Lifecycle, model: Model, store: VectorStore, socket_path: Path
) -> None:
    batcher = MicroBatcher(thread_encoder(model.encode), max_batch=MAX_BATCH,
                           max_wait=MAX_WAIT_S, linger=LINGER_S, max_queue=MAX_QUEUE)
    service = EmbeddingService(model=ModelInfo(model.name, model.device, model.dim),
                               batcher=batcher, store=store, draining=life.draining)
    config = _hypercorn_config(socket_path, settings)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.serve)
            with trio.CancelScope() as server:
                async with trio.open_nursery() as serving:
                    serving.start_soon(_stop_when_done, life, service, server)
                    await serving.start(partial(serve, service, config,  # type: ignore[arg-type]
                                                shutdown_trigger=life.draining.wait))
                    os.chmod(socket_path, 0o600)
                    nursery.start_soon(_report_status, life, service)
                    if not life.draining.is_set():
                        life.ready(service.summary())
            # Requests are over. Cancelling the batcher abandons a batch still in the
            # encoder; Model.release waits for it, within its own deadline.
            nursery.cancel_scope.cancel()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
    log.info("served", **service.batcher.stats.__dict__)


async def _stop_when_done(life: Lifecycle, service: EmbeddingService,
                          server: trio.CancelScope) -> None:
    """Once draining: stop as soon as nothing is in flight (idle keep-alive connections
    must not hold the shutdown open), and at the latest at the drain deadline."""
    await life.draining.wait()
    service.batcher.shrink(DRAIN_BATCH)
    server.deadline = life.drain_deadline
    await service.wait_idle()
    server.cancel()


async def _report_status(life: Lifecycle, service: EmbeddingService) -> None:
    while True:
        life.status(service.summary())
        await trio.sleep(STATUS_EVERY_S)


async def _release(life: Lifecycle, budget: float, fn: Callable[[], Awaitable[T]], *,
                   share: float = 1.0) -> T | None:
    """Run a release step shielded, under its own short deadline: `budget`, and never more
    than `share` of the time left until the process's deadline less `EXIT_RESERVE_S`; None
    if it was cut short."""
    now = trio.current_time()
    deadline = min(now + budget, now + share * (life.deadline - EXIT_RESERVE_S - now))
    with trio.CancelScope(shield=True, deadline=deadline):
        return await fn()
    log.warning("release_timed_out", step=getattr(fn, "__qualname__", repr(fn)), budget_s=budget)
    return None


async def _unless_draining(life: Lifecycle, fn: Callable[..., T], *args: Any) -> T | None:
    """`fn(*args)` in a worker thread, abandoned (None) if the drain starts first.

    Its exception is carried out of the nursery by hand and raised as itself, not wrapped
    in the ExceptionGroup a nursery would make of it: `run` reports ModelError in one line.
    """
    result: list[T] = []
    errors: list[Exception] = []

    def call() -> None:
        try:
            result.append(fn(*args))
        except Exception as e:  # raised below, outside the nursery
            errors.append(e)

    async with trio.open_nursery() as nursery:

        async def cancel_on_drain() -> None:
            await life.draining.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(cancel_on_drain)
        await trio.to_thread.run_sync(call, abandon_on_cancel=True)
        nursery.cancel_scope.cancel()
    if errors and not life.draining.is_set():
        raise errors[0]
    return result[0] if result else None


def _prepare_socket(path: Path) -> Path:
    if len(os.fsencode(path)) > 107:  # sun_path holds 108 bytes with the final NUL
        raise SocketError(f"socket path too long for a unix socket ({path}): use a shorter "
                          "AGENTD_RUNTIME_DIR or AGENTD_DATA_DIR")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # left by an earlier incarnation
    except OSError as e:
        raise SocketError(f"cannot prepare {path}: {e.strerror}") from e
    return path


def _hypercorn_config(socket_path: Path, settings: Settings) -> HyperConfig:
    config = HyperConfig()
    config.bind = [f"unix:{socket_path}"]
    config.accesslog = None
    config.loglevel = "WARNING"
    config.backlog = 1024  # every web and agent process connects here
    # The drain is bounded by our own deadline (stop_when_done), not hypercorn's.
    config.graceful_timeout = settings.shutdown_timeout
    return config
