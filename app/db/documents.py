"""Queries for the knowledge base's documents: one row per document, its chunks live in the
vector store (app/web/documents.py says in which order the two are written, and why).

A document is found again by its owner and `source`, or, without a source, by its owner and
the sha256 of its text (the table's two unique indexes). Each function is one transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

if TYPE_CHECKING:
    import psycopg

COLUMNS = ("id::text AS document_id, source, title, chunks, content_hash, metadata,"
           " created_at, updated_at")


@dataclass(frozen=True)
class Claimed:
    document_id: str
    #: False when an earlier document of the same source (or text) is being replaced.
    created: bool


def claim(conn: psycopg.Connection[Any], *, owner: str, source: str | None, title: str | None,
          content_hash: str, metadata: dict[str, Any]) -> Claimed:
    """The row a new version will fill: a new one, or the earlier document's, keeping its id.

    Either way it is left with ``chunks = 0`` ("not indexed") until `complete` says how many
    chunks went into the store. One statement, so two writers of one source get one row.
    """
    proposed = uuid.uuid4()
    target = ("(owner, source)" if source is not None
              else "(owner, content_hash) WHERE source IS NULL")
    row = conn.execute(
        "INSERT INTO documents (id, owner, source, title, content_hash, chunks, metadata)"
        " VALUES (%s, %s, %s, %s, %s, 0, %s)"
        f" ON CONFLICT {target} DO UPDATE SET chunks = 0"
        " RETURNING id",
        (proposed, owner, source, title, content_hash, Jsonb(metadata))).fetchone()
    assert row is not None
    return Claimed(str(row[0]), row[0] == proposed)


def complete(conn: psycopg.Connection[Any], *, document_id: str, owner: str, title: str | None,
             content_hash: str, metadata: dict[str, Any], chunks: int) -> bool:
    """Its chunks are in the store: record them. False when the row is gone (deleted meanwhile)."""
    cur = conn.execute(
        "UPDATE documents SET chunks = %s, title = %s, content_hash = %s, metadata = %s"
        " WHERE id = %s AND owner = %s",
        (chunks, title, content_hash, Jsonb(metadata), uuid.UUID(document_id), owner))
    return cur.rowcount == 1


def forget(conn: psycopg.Connection[Any], *, document_id: str, owner: str) -> None:
    conn.execute("DELETE FROM documents WHERE id = %s AND owner = %s",
                 (uuid.UUID(document_id), owner))


def mark_unindexed(conn: psycopg.Connection[Any], *, document_id: str, owner: str) -> bool:
    """``chunks = 0`` before its chunks are deleted; False when `owner` has no such document."""
    try:
        key = uuid.UUID(document_id)
    except ValueError:
        return False
    cur = conn.execute("UPDATE documents SET chunks = 0 WHERE id = %s AND owner = %s",
                       (key, owner))
    return cur.rowcount == 1


def list_documents(conn: psycopg.Connection[Any], *, owner: str, limit: int, offset: int
                   ) -> list[dict[str, Any]]:
    """`owner`'s documents, oldest first."""
    cur = conn.cursor(row_factory=dict_row)
    return cur.execute(
        f"SELECT {COLUMNS} FROM documents WHERE owner = %s ORDER BY created_at, id"
        " LIMIT %s OFFSET %s", (owner, limit, offset)).fetchall()
