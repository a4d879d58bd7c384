"""Document rows: found again by source or by text, claimed unindexed, completed, deleted
(app/db/documents.py), against the session's real PostgreSQL."""

from __future__ import annotations

import uuid
from functools import partial

import trio

from app.db import documents as q
from app.db.migrations import migrate
from app.db.pool import open_database


def claim(owner: str, *, source: str | None, digest: str = "h1", title: str | None = None):
    return partial(q.claim, owner=owner, source=source, title=title, content_hash=digest,
                   metadata={"k": 1})


async def test_the_same_source_or_the_same_text_claims_the_earlier_row_unindexed(infra):
    owner, other = f"u-{uuid.uuid4().hex[:8]}", f"v-{uuid.uuid4().hex[:8]}"
    with trio.fail_after(30):
        async with open_database(infra.database_url) as db:
            await migrate(db)
            first = await db.run(claim(owner, source="/a.md"))
            assert first.created
            assert await db.run(partial(q.complete, document_id=first.document_id, owner=owner,
                                        title="A", content_hash="h1", metadata={}, chunks=3))
            again = await db.run(claim(owner, source="/a.md", digest="h2"))
            theirs = await db.run(claim(other, source="/a.md"))
            by_text = await db.run(claim(owner, source=None, digest="h9"))
            by_text_again = await db.run(claim(owner, source=None, digest="h9"))
            rows = await db.run(partial(q.list_documents, owner=owner, limit=10, offset=0))
    assert (again.document_id, again.created) == (first.document_id, False)
    assert theirs.created and theirs.document_id != first.document_id
    assert by_text.created and (by_text_again.document_id, by_text_again.created) == (
        by_text.document_id, False)
    [a] = [r for r in rows if r["source"] == "/a.md"]
    assert a["chunks"] == 0 and a["title"] == "A"  # unindexed until the new version completes
    assert {r["document_id"] for r in rows} == {first.document_id, by_text.document_id}


async def test_a_deleted_row_is_not_completed_and_an_unknown_id_is_not_marked(infra):
    owner = f"u-{uuid.uuid4().hex[:8]}"
    with trio.fail_after(30):
        async with open_database(infra.database_url) as db:
            await migrate(db)
            row = await db.run(claim(owner, source="/gone.md"))
            assert not await db.run(partial(q.mark_unindexed, document_id=row.document_id,
                                            owner="someone else"))
            assert await db.run(partial(q.mark_unindexed, document_id=row.document_id,
                                        owner=owner))
            await db.run(partial(q.forget, document_id=row.document_id, owner=owner))
            completed = await db.run(partial(
                q.complete, document_id=row.document_id, owner=owner, title=None,
                content_hash="h1", metadata={}, chunks=1))
            marked = await db.run(partial(q.mark_unindexed, document_id="not-a-uuid",
                                          owner=owner))
    assert not completed and not marked
