"""The knowledge base over HTTP (API.md, Knowledge base): /api/documents and /api/search.

    POST   /api/documents          {"text", "source"?, "title"?, "metadata"?} → 201
    GET    /api/documents          ?limit=&offset= → the caller's documents, oldest first
    DELETE /api/documents/{id}     204; someone else's or unknown → 404
    GET    /api/search             ?q=&k= → the caller's closest chunks, best first

Limits, each enforced here (422 ``validation_error`` unless said otherwise): ``text`` 1 to
1,000,000 characters and not blank; ``source`` at most 2,000 characters, ``title`` at most
500; ``metadata`` a JSON object of at most 16 KiB once encoded; ``q`` 1 to 2,000 characters,
not blank; ``k`` 1 to 100 (default 5); ``limit`` 1 to 10,000 (default 1,000), ``offset`` >= 0.
The body as a whole is bounded by AGENTD_MAX_BODY_BYTES (413). The embedding process down
→ 503 ``embedding_unavailable``; its queue full → 503 ``busy``; both with Retry-After.

A document is a row in PostgreSQL (owner, source, hash of the text, number of chunks) and its
chunks in the vector store, which belongs to the embedding process. The two cannot commit
together, so the writes go in an order that keeps one rule true whatever fails or crashes:
**a row says ``chunks > 0`` only when all of its chunks are in the store, and every chunk in
the store has its row** (so its owner can see it in the list and delete it):

1. Claim the row, committed, with ``chunks = 0`` ("not indexed"): a new row, or the earlier
   document's (same source, or same text without one), which keeps its id.
2. Delete the earlier version's chunks (a shorter new text would leave the old tail behind:
   chunk ids are per index), then upsert the new ones.
3. Record the number of chunks, the hash, title and metadata in the row.

If 2 fails, a new row is removed again with what was upserted, and an earlier document's row
stays with ``chunks = 0``: honest, listed, and replaced by the retry the 503 asks for. A
crash between the steps leaves the same states. Deleting runs the other way round: the row
is marked ``chunks = 0``, the chunks are deleted, then the row.

Two writers of one document in this process take turns (a lock per owner and source or
hash); in different web processes the later row update wins and chunks may mix until the
next write of that source.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, TypeVar

import structlog
import trio
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)
from quart import Quart, Response, request

from app.db import documents as q
from app.db.pool import DatabaseError, DatabaseUnavailable
from app.embedding.chunking import chunk_points
from app.embedding.client import (
    EmbeddingClient,
    EmbeddingError,
    EmbeddingOverloaded,
    EmbeddingRequestError,
    EmbeddingUnavailable,
)
from app.web.api import owner_of, parse_body
from app.web.errors import NotFound, Unavailable, ValidationFailed
from app.web.models import NO_NUL, NOT_BLANK, storable

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from app.web.app import WebState

log = structlog.get_logger("web")

MAX_TEXT = 1_000_000
MAX_SOURCE = 2_000
MAX_TITLE = 500
MAX_METADATA_BYTES = 16 * 1024
MAX_QUERY = 2_000
MAX_K = 100
DEFAULT_K = 5
MAX_LIST = 10_000
DEFAULT_LIST = 1_000
#: Texts at least this long are cut into chunks in a worker thread.
THREAD_CHARS = 20_000
#: Undoing a failed add (shielded: it must run even when the client has left).
CLEANUP_S = 5.0


class DocumentRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"text": "Trio is a structured concurrency library.", "source": "notes/trio.md",
         "title": "Trio"}]})

    text: str = Field(min_length=1, max_length=MAX_TEXT, description=(
        "the text to index; not blank, no lone surrogates"), json_schema_extra={
        "pattern": NOT_BLANK})
    source: str | None = Field(None, max_length=MAX_SOURCE, description=(
        "where it comes from; the same source again replaces that document (blank: none)"),
        json_schema_extra={"pattern": NO_NUL})
    title: str | None = Field(None, max_length=MAX_TITLE, description="blank: none",
                              json_schema_extra={"pattern": NO_NUL})
    metadata: dict[str, Any] | None = Field(None, description=(
        f"kept with the document: at most {MAX_METADATA_BYTES} bytes as JSON, no NUL "
        "characters"))


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("blank")
    return value


def _integer(value: Any) -> Any:
    """A query string's integer, read as `int()` reads it (" 7", "+7" and "0_7" too)."""
    return int(value) if isinstance(value, str) else value


QueryInt = Annotated[int, BeforeValidator(_integer)]


class SearchQuery(BaseModel):
    """GET /api/search's query string, read by `query_params`; a field it refuses is
    refused with that field's message in `refusals`."""

    q: Annotated[str, AfterValidator(_not_blank)] = Field(
        min_length=1, max_length=MAX_QUERY, description="what to look for; not blank",
        json_schema_extra={"pattern": NOT_BLANK})
    k: QueryInt = Field(DEFAULT_K, ge=1, le=MAX_K, description="how many results, at most")

    refusals: ClassVar[dict[str, str]] = {
        "q": f"q: 1 to {MAX_QUERY} characters, not blank",
        "k": f"k: an integer from 1 to {MAX_K}"}


class DocumentListQuery(BaseModel):
    """GET /api/documents's query string: a page of the caller's documents, oldest first."""

    limit: QueryInt = Field(DEFAULT_LIST, ge=1, le=MAX_LIST, description="at most this many")
    offset: QueryInt = Field(0, ge=0, description="skip this many")

    refusals: ClassVar[dict[str, str]] = {
        "limit": f"limit: an integer from 1 to {MAX_LIST}",
        "offset": "offset: an integer of at least 0"}


Query = TypeVar("Query", SearchQuery, DocumentListQuery)


def query_params(model: type[Query], args: Any) -> Query:
    """A query string through its model. An empty value is no value (its default)."""
    given = {name: args.get(name) for name in model.model_fields}
    try:
        return model.model_validate({k: v for k, v in given.items() if v not in (None, "")})
    except ValidationError as e:
        raise ValidationFailed(model.refusals[str(e.errors()[0]["loc"][0])]) from None


def content_hash(text: str) -> str:
    """What identifies a text without a source (and tells `agentd ingest` it is unchanged)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def checked(body: DocumentRequest) -> DocumentRequest:
    """Limits pydantic does not express. PostgreSQL stores neither NUL nor lone surrogates,
    so a source, title or metadata with them is refused here rather than failing there."""
    if not body.text.strip():
        raise ValidationFailed("text: must not be blank")
    # A blank source or title is no source or title (the store keeps "" for none).
    body.source = body.source if body.source and body.source.strip() else None
    body.title = body.title if body.title and body.title.strip() else None
    for name, value in (("text", body.text), ("source", body.source), ("title", body.title)):
        if value is not None and not storable(value, allow_nul=name == "text"):
            raise ValidationFailed(f"{name}: NUL characters and lone surrogates are not allowed")
    if body.metadata is not None:
        encoded = json.dumps(body.metadata, ensure_ascii=False)
        if "\\u0000" in encoded or not storable(encoded):
            raise ValidationFailed("metadata: NUL characters and lone surrogates are not allowed")
        if len(encoded.encode()) > MAX_METADATA_BYTES:
            raise ValidationFailed(f"metadata: at most {MAX_METADATA_BYTES} bytes as JSON")
    return body


def search_params(args: Any) -> tuple[str, int]:
    query = query_params(SearchQuery, args)
    return query.q, query.k


@asynccontextmanager
async def embedding_errors() -> AsyncIterator[None]:
    """The embedding client's errors as HTTP errors (errors.py picks the status)."""
    try:
        yield
    except EmbeddingOverloaded:
        raise Unavailable("the embedding service is busy; retry shortly", code="busy",
                          retry_after=2) from None
    except EmbeddingUnavailable:
        raise Unavailable("the embedding service is unavailable (it may be restarting); "
                          "retry shortly", code="embedding_unavailable") from None
    except EmbeddingRequestError as e:
        raise ValidationFailed(str(e)) from None
    except DatabaseUnavailable:
        raise Unavailable("the database is unavailable; retry shortly") from None


class KeyLocks:
    """One trio.Lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[trio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: tuple[str, str]) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (trio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class KnowledgeBase:
    """The routes' logic over the database and the embedding client (one per web process)."""

    def __init__(self, state: WebState, embedding: EmbeddingClient) -> None:
        self.db = state.db
        self.embedding = embedding
        self.locks = KeyLocks()

    async def add(self, body: DocumentRequest, owner: str) -> dict[str, Any]:
        digest = content_hash(body.text)
        metadata = body.metadata or {}
        async with self.locks.hold((owner, body.source or f"sha256:{digest}")):
            claimed = await self.db.run(partial(
                q.claim, owner=owner, source=body.source, title=body.title,
                content_hash=digest, metadata=metadata))
            chunk = partial(chunk_points, claimed.document_id, body.text, owner=owner,
                            source=body.source or "", title=body.title or "")
            try:
                # Cutting a long text takes ~0.2 s per million characters: not on the loop
                # that serves this process's streams.
                points = chunk() if len(body.text) < THREAD_CHARS else (
                    await trio.to_thread.run_sync(chunk))
                if not claimed.created:
                    await self.embedding.delete(claimed.document_id, owner=owner)
                await self.embedding.upsert(points)
                stored = await self.db.run(partial(
                    q.complete, document_id=claimed.document_id, owner=owner,
                    title=body.title, content_hash=digest, metadata=metadata,
                    chunks=len(points)))
            except BaseException:
                with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_S):
                    await self._undo(claimed, owner)
                raise
        if not stored:  # deleted while we were adding it: leave no chunks without a row
            await self._undo(q.Claimed(claimed.document_id, created=True), owner)
            raise Unavailable("the document was deleted while it was being added; retry",
                              code="conflict", retry_after=1)
        return {"document_id": claimed.document_id, "chunks": len(points)}

    async def _undo(self, claimed: q.Claimed, owner: str) -> None:
        """A failed add: remove a new row and its chunks; an earlier one stays unindexed."""
        if not claimed.created:
            return
        try:
            await self.embedding.delete(claimed.document_id, owner=owner)
            await self.db.run(partial(q.forget, document_id=claimed.document_id, owner=owner))
        except (EmbeddingError, DatabaseError) as e:
            # The row stays with chunks = 0: listed, deletable, and replaced by a retry.
            log.warning("document_cleanup_failed", document_id=claimed.document_id,
                        error=str(e))

    async def delete(self, document_id: str, owner: str) -> None:
        marked = await self.db.run(partial(q.mark_unindexed, document_id=document_id,
                                           owner=owner))
        if not marked:
            raise NotFound("no such document")
        await self.embedding.delete(document_id, owner=owner)
        await self.db.run(partial(q.forget, document_id=document_id, owner=owner))

    async def documents(self, owner: str, limit: int, offset: int) -> list[dict[str, Any]]:
        rows = await self.db.run(partial(q.list_documents, owner=owner, limit=limit,
                                         offset=offset))
        for row in rows:
            row["created_at"] = row["created_at"].isoformat()
            row["updated_at"] = row["updated_at"].isoformat()
        return rows

    async def search(self, query: str, k: int, owner: str) -> list[dict[str, Any]]:
        hits = await self.embedding.search(query, k, owner)
        return [{"document_id": h.get("document_id"), "text": h.get("text"),
                 "score": h.get("score"), "source": h.get("source") or None,
                 "title": h.get("title") or None, "chunk": h.get("chunk")} for h in hits]


def register(app: Quart, state: WebState) -> None:
    from app.web.app import json_response

    kb = KnowledgeBase(state, state.embedding)
    limit = state.settings.max_body_bytes

    @app.post("/api/documents")
    async def add_document() -> Response:
        body = checked(parse_body(await request.get_data(), DocumentRequest, limit))
        async with embedding_errors():
            added = await kb.add(body, owner_of(request.scope))
        return json_response(added, 201)

    @app.get("/api/documents")
    async def list_documents() -> Response:
        page = query_params(DocumentListQuery, request.args)
        async with embedding_errors():
            rows = await kb.documents(owner_of(request.scope), page.limit, page.offset)
        return json_response({"documents": rows})

    @app.delete("/api/documents/<document_id>")
    async def delete_document(document_id: str) -> Response:
        async with embedding_errors():
            await kb.delete(document_id, owner_of(request.scope))
        return Response(b"", status=204)

    @app.get("/api/search")
    async def search() -> Response:
        query, k = search_params(request.args)
        async with embedding_errors():
            results = await kb.search(query, k, owner_of(request.scope))
        return json_response({"results": results})
