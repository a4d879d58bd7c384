"""The vector store: Qdrant, in local mode under the data directory or as a server.

Local mode is qdrant-client's embedded engine (SQLite on disk, brute-force search): no server
to run, fine for thousands of chunks. It is driven through the *sync* client from worker
threads, one call at a time (`CapacityLimiter(1)`): the async client's local mode runs its
work on the event loop and would block it, and the engine is not safe for concurrent calls.
It takes a lock on its directory, so exactly one process — the embedding process — opens
it. A server (`AGENTD_QDRANT_URL`) is reached over REST; gRPC does not work under trio.

All points live in one collection, `agentd_chunks`, of the model's dimension with cosine
distance. Opening a collection made with another dimension fails with `DimensionMismatch`
naming both sides and the fix, rather than storing vectors nobody can compare.

qdrant-client's exceptions are turned into `StoreError` here and nowhere else.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import trio
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ApiException

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path

COLLECTION = "agentd_chunks"
PAYLOAD_FIELDS = ("text", "document_id", "owner", "source", "title", "chunk")
#: Points per upsert call: local mode writes each point to SQLite; big calls hold the lock long.
UPSERT_BATCH = 64
#: Concurrent REST calls to a server (local mode is always one at a time).
SERVER_CONCURRENCY = 8


class StoreError(Exception):
    """The vector store failed or cannot be reached."""


class DimensionMismatch(StoreError):
    """The collection on disk (or on the server) was made for vectors of another size."""


#: What qdrant-client raises for a failed call: HTTP errors, a local engine's complaints
#: (RuntimeError for a locked directory, ValueError for bad requests), I/O errors.
_STORE_ERRORS = (ApiException, RuntimeError, ValueError, OSError)


def _owner_filter(owner: str, document_id: str | None = None) -> models.Filter:
    must: list[models.Condition] = [
        models.FieldCondition(key="owner", match=models.MatchValue(value=owner))
    ]
    if document_id is not None:
        must.append(
            models.FieldCondition(key="document_id", match=models.MatchValue(value=document_id))
        )
    return models.Filter(must=must)


def _document_filter(document_id: str, owner: str | None) -> models.Filter:
    if owner is not None:
        return _owner_filter(owner, document_id)
    return models.Filter(
        must=[models.FieldCondition(key="document_id", match=models.MatchValue(value=document_id))]
    )


class VectorStore:
    """One collection of chunk vectors, with an owner on every point."""

    def __init__(self, client: QdrantClient, *, where: str, dim: int, local: bool) -> None:
        self._client = client
        self.where = where  # "local:<path>" or "server:<url>", for /health and logs
        self.dim = dim
        self.local = local
        self.closed = False
        self._limiter = trio.CapacityLimiter(1 if local else SERVER_CONCURRENCY)

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one client call in a worker thread, its errors as `StoreError`."""
        if self.closed:
            raise StoreError("the vector store is closed")

        def call() -> Any:
            try:
                return fn(*args, **kwargs)
            except _STORE_ERRORS as e:
                raise StoreError(f"vector store ({self.where}): {e}") from e

        # Abandoned when cancelled, so a stop never waits for a call here: the limiter stays
        # held until the call has really finished, so no other call (nor the close) runs
        # beside it, and local mode commits each point on its own (SQLite), so a call cut
        # short by the process's exit leaves whole points behind.
        return await trio.to_thread.run_sync(call, limiter=self._limiter, abandon_on_cancel=True)

    async def upsert(
        self, points: Sequence[Mapping[str, Any]], vectors: Sequence[Sequence[float]]
    ) -> int:
        """Insert or replace `points` (each with an ``id`` and the payload fields)."""
        if len(points) != len(vectors):
            raise ValueError("one vector per point")
        structs = [
            models.PointStruct(
                id=str(point["id"]),
                vector=list(vector),
                payload={name: point.get(name) for name in PAYLOAD_FIELDS},
            )
            for point, vector in zip(points, vectors, strict=True)
        ]
        for start in range(0, len(structs), UPSERT_BATCH):
            await self._call(
                self._client.upsert, COLLECTION, points=structs[start : start + UPSERT_BATCH]
            )
        return len(structs)

    async def search(
        self, vector: Sequence[float], *, k: int, owner: str
    ) -> list[dict[str, Any]]:
        """The `k` chunks of `owner` closest to `vector`, best first (cosine: higher = closer)."""
        response = await self._call(
            self._client.query_points,
            COLLECTION,
            query=list(vector),
            query_filter=_owner_filter(owner),
            limit=k,
            with_payload=True,
        )
        results = []
        for point in response.points:
            payload = point.payload or {}
            results.append(
                {
                    "document_id": payload.get("document_id"),
                    "text": payload.get("text"),
                    "score": float(point.score),
                    "source": payload.get("source"),
                    "title": payload.get("title"),
                    "chunk": payload.get("chunk"),
                }
            )
        return results

    async def delete(self, document_id: str, *, owner: str | None = None) -> None:
        """Remove every chunk of a document (only `owner`'s, when given)."""
        selector = models.FilterSelector(filter=_document_filter(document_id, owner))
        await self._call(self._client.delete, COLLECTION, points_selector=selector)

    async def count(self, owner: str | None = None) -> int:
        flt = _owner_filter(owner) if owner is not None else None
        result = await self._call(self._client.count, COLLECTION, count_filter=flt, exact=True)
        return int(result.count)

    async def aclose(self) -> None:
        """Close the client (local mode: its SQLite files and directory lock). Idempotent.

        The close waits for a call in progress (same limiter). A caller's deadline may
        abandon it: the process is about to exit then, and the lock goes with it.
        """
        if self.closed:
            return
        self.closed = True
        await trio.to_thread.run_sync(
            self._close, limiter=self._limiter, abandon_on_cancel=True
        )

    def _close(self) -> None:
        with contextlib.suppress(*_STORE_ERRORS):
            self._client.close()


def _connect(path: Path | None, url: str | None) -> tuple[QdrantClient, str]:
    try:
        if url:
            # No compatibility check: qdrant-client runs it in a thread of its own that only
            # warns; an unreachable or incompatible server fails in _ensure_collection instead.
            client = QdrantClient(url=url, prefer_grpc=False, timeout=10,
                                  check_compatibility=False)
            return client, f"server:{url}"
        assert path is not None
        path.mkdir(parents=True, exist_ok=True)
        return QdrantClient(path=str(path)), f"local:{path}"
    except _STORE_ERRORS as e:
        where = url or path
        raise StoreError(f"cannot open the vector store at {where}: {e}") from e


def _ensure_collection(client: QdrantClient, *, where: str, dim: int, model: str) -> None:
    """Create `agentd_chunks` for `dim`-sized vectors, or check that the existing one fits."""
    if not client.collection_exists(COLLECTION):
        try:
            client.create_collection(
                COLLECTION,
                vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                metadata={"embedding_model": model, "dim": dim},
            )
            if where.startswith("server:"):
                for field in ("owner", "document_id"):
                    client.create_payload_index(
                        COLLECTION, field, field_schema=models.PayloadSchemaType.KEYWORD
                    )
            return
        except ApiException:
            if not client.collection_exists(COLLECTION):
                raise
            # Another host created it between our check and our create: check theirs.
    config = client.get_collection(COLLECTION).config
    params = config.params.vectors
    made_by = (config.metadata or {}).get("embedding_model", "an unknown model")
    size = params.size if isinstance(params, models.VectorParams) else None
    distance = params.distance if isinstance(params, models.VectorParams) else None
    if size != dim or distance != models.Distance.COSINE:
        found = f"{size}-dimensional {distance} vectors" if size else "named vectors"
        raise DimensionMismatch(
            f"collection {COLLECTION} in {where} holds {found} made by {made_by}, but "
            f"embedding model {model} makes {dim}-dimensional vectors: set "
            f"AGENTD_EMBEDDING_MODEL to the model that filled it, or delete the collection "
            f"({_how_to_delete(where)}) and ingest the documents again"
        )


def _how_to_delete(where: str) -> str:
    kind, _, place = where.partition(":")
    if kind == "local":
        return f"stop agentd and remove the local store, {place}"
    return f"DELETE {place.rstrip('/')}/collections/{COLLECTION}"


async def open_store(
    *, dim: int, model: str, path: Path | None = None, url: str | None = None
) -> VectorStore:
    """Connect (server `url`, else local mode at `path`) and make sure the collection fits.

    The caller owns the store and must `aclose()` it (main.py does, shielded, at shutdown).
    """

    def connect() -> VectorStore:
        client, where = _connect(path, url)
        try:
            _ensure_collection(client, where=where, dim=dim, model=model)
        except DimensionMismatch:
            client.close()
            raise
        except _STORE_ERRORS as e:
            client.close()
            raise StoreError(f"vector store ({where}): {e}") from e
        return VectorStore(client, where=where, dim=dim, local=not url)

    return await trio.to_thread.run_sync(connect)
