"""store.py in local mode on a private directory, with small hand-made vectors."""

from __future__ import annotations

import uuid

import pytest
import trio

from app.embedding.store import COLLECTION, DimensionMismatch, StoreError, open_store


def point(document_id: str, chunk: int, owner: str, text: str = "") -> dict:
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{document_id}/{chunk}")),
        "text": text or f"{document_id} chunk {chunk}",
        "document_id": document_id,
        "owner": owner,
        "source": f"{document_id}.md",
        "title": document_id.title(),
        "chunk": chunk,
    }


async def _store(directory, dim=4, model="fake"):
    with trio.fail_after(30):
        return await open_store(dim=dim, model=model, path=directory / "qdrant")


async def test_upsert_then_search_best_first_within_the_owner(private_dir):
    store = await _store(private_dir)
    try:
        points = [point("a", 0, "alice"), point("a", 1, "alice"), point("b", 0, "bob")]
        vectors = [[1, 0, 0, 0], [0.7, 0.7, 0, 0], [1, 0, 0, 0]]
        with trio.fail_after(30):
            assert await store.upsert(points, vectors) == 3
            results = await store.search([1, 0, 0, 0], k=5, owner="alice")
        assert [(r["document_id"], r["chunk"]) for r in results] == [("a", 0), ("a", 1)]
        assert results[0]["score"] == pytest.approx(1.0)
        assert results[0]["score"] > results[1]["score"]
        assert results[0] == {"document_id": "a", "text": "a chunk 0", "score": results[0]["score"],
                              "source": "a.md", "title": "A", "chunk": 0}
        assert store.where == f"local:{private_dir / 'qdrant'}"
    finally:
        await store.aclose()


async def test_upserting_the_same_id_replaces_the_point(private_dir):
    store = await _store(private_dir)
    try:
        with trio.fail_after(30):
            await store.upsert([point("a", 0, "alice", "old")], [[1, 0, 0, 0]])
            await store.upsert([point("a", 0, "alice", "new")], [[1, 0, 0, 0]])
            assert await store.count() == 1
            [hit] = await store.search([1, 0, 0, 0], k=5, owner="alice")
        assert hit["text"] == "new"
    finally:
        await store.aclose()


async def test_many_points_are_upserted_in_batches(private_dir):
    store = await _store(private_dir)
    try:
        points = [point("big", i, "alice") for i in range(150)]
        with trio.fail_after(60):
            assert await store.upsert(points, [[1, i, 0, 0] for i in range(150)]) == 150
            assert await store.count(owner="alice") == 150
    finally:
        await store.aclose()


async def test_delete_removes_every_chunk_of_the_document_only(private_dir):
    store = await _store(private_dir)
    try:
        points = [point("a", 0, "alice"), point("a", 1, "alice"), point("b", 0, "alice")]
        with trio.fail_after(30):
            await store.upsert(points, [[1, 0, 0, 0]] * 3)
            await store.delete("a")
            results = await store.search([1, 0, 0, 0], k=5, owner="alice")
        assert [r["document_id"] for r in results] == ["b"]
    finally:
        await store.aclose()


async def test_delete_with_an_owner_spares_other_owners(private_dir):
    store = await _store(private_dir)
    try:
        with trio.fail_after(30):
            await store.upsert([point("same", 0, "alice"), point("same", 1, "bob")],
                               [[1, 0, 0, 0]] * 2)
            await store.delete("same", owner="mallory")
            assert await store.count() == 2
            await store.delete("same", owner="bob")
            assert await store.count(owner="alice") == 1
            assert await store.count(owner="bob") == 0
    finally:
        await store.aclose()


async def test_points_survive_a_reopen(private_dir):
    store = await _store(private_dir)
    with trio.fail_after(30):
        await store.upsert([point("a", 0, "alice")], [[0, 1, 0, 0]])
    await store.aclose()
    await store.aclose()  # idempotent
    store = await _store(private_dir)
    try:
        with trio.fail_after(30):
            assert await store.count() == 1
    finally:
        await store.aclose()


async def test_a_collection_of_another_dimension_is_a_clear_error(private_dir):
    store = await _store(private_dir, dim=4, model="small-model")
    await store.aclose()
    with pytest.raises(DimensionMismatch) as caught:
        await _store(private_dir, dim=8, model="big-model")
    message = str(caught.value)
    assert COLLECTION in message
    assert "4-dimensional" in message and "small-model" in message
    assert "big-model" in message and "8-dimensional" in message
    assert "AGENTD_EMBEDDING_MODEL" in message and "delete" in message
    # and the directory lock was let go: the right dimension opens fine
    store = await _store(private_dir, dim=4)
    await store.aclose()


async def test_a_second_opener_of_the_same_directory_gets_a_store_error(private_dir):
    store = await _store(private_dir)
    try:
        with pytest.raises(StoreError, match="already accessed"):
            await _store(private_dir)
    finally:
        await store.aclose()


async def test_a_closed_store_refuses_calls(private_dir):
    store = await _store(private_dir)
    await store.aclose()
    with pytest.raises(StoreError, match="closed"):
        await store.search([1, 0, 0, 0], k=1, owner="alice")


async def test_an_unreachable_server_is_a_store_error():
    with trio.fail_after(30), pytest.raises(StoreError, match="cannot|vector store"):
        await open_store(dim=4, model="fake", url="http://127.0.0.1:9")
