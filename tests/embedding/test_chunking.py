"""chunking.py: sizes, boundaries, overlap, deterministic ids."""

from __future__ import annotations

import uuid

import pytest

from app.embedding.chunking import chunk_id, chunk_points, chunk_text

SENTENCE = "The quick brown fox jumps over the lazy dog number {}."


def _paragraphs(count: int, sentences: int) -> str:
    return "\n\n".join(
        " ".join(SENTENCE.format(p * 100 + s) for s in range(sentences)) for p in range(count)
    )


def test_blank_text_has_no_chunks():
    assert chunk_text("") == []
    assert chunk_text(" \n\n\t ") == []


def test_short_text_is_one_chunk_stripped():
    assert chunk_text("  hello world \n") == ["hello world"]


def test_every_chunk_is_within_the_size():
    text = _paragraphs(12, 9)
    chunks = chunk_text(text, size=300, overlap=50)
    assert len(chunks) > 5
    assert all(0 < len(c) <= 300 for c in chunks)


def test_paragraphs_are_kept_whole_when_they_fit():
    paragraphs = [f"Paragraph {i}. " + "word " * 30 for i in range(6)]
    text = "\n\n".join(p.strip() for p in paragraphs)
    chunks = chunk_text(text, size=400, overlap=0)
    for paragraph in paragraphs:
        assert sum(paragraph.strip() in c for c in chunks) == 1


def test_long_paragraph_is_cut_at_sentence_ends():
    sentences = [SENTENCE.format(i) for i in range(40)]
    chunks = chunk_text(" ".join(sentences), size=250, overlap=0)
    assert len(chunks) > 1
    for c in chunks:
        assert c.endswith("."), c
        assert c[0].isupper(), c


def test_sentence_end_keeps_closing_quote():
    text = ('He said "stop." ' * 20 + "Then he left. " * 20).strip()
    chunks = chunk_text(text, size=100, overlap=0)
    assert all(c.endswith(('."', ".")) for c in chunks)
    assert not any(c.startswith('"') for c in chunks)


def test_overlap_repeats_the_end_of_the_previous_chunk_from_a_word():
    chunks = chunk_text(_paragraphs(1, 30), size=200, overlap=60)
    for before, after in zip(chunks, chunks[1:], strict=False):
        seed = after.split(" ", 1)[0]
        assert before[-60:].find(seed) >= 0
        assert before.split()[-1] in after  # the last word of a chunk is in the next


def test_no_overlap_means_the_chunks_rebuild_the_words():
    text = _paragraphs(5, 7)
    chunks = chunk_text(text, size=180, overlap=0)
    assert " ".join(chunks).split() == text.split()


def test_a_word_longer_than_a_chunk_is_cut():
    chunks = chunk_text("x" * 250 + " tail", size=100, overlap=10)
    assert all(len(c) <= 100 for c in chunks)
    assert "".join(chunks).replace(" ", "").count("x") >= 250


def test_chunking_is_deterministic():
    text = _paragraphs(8, 6)
    assert chunk_text(text) == chunk_text(text)


@pytest.mark.parametrize(("size", "overlap"), [(0, 0), (100, 100), (100, -1)])
def test_bad_parameters_are_refused(size, overlap):
    with pytest.raises(ValueError, match="size"):
        chunk_text("text", size=size, overlap=overlap)


def test_chunk_ids_are_uuid5_of_the_document_and_index():
    document_id = str(uuid.uuid4())
    assert chunk_id(document_id, 3) == str(uuid.uuid5(uuid.UUID(document_id), "3"))
    assert chunk_id(document_id, 3) != chunk_id(document_id, 4)
    assert chunk_id("not-a-uuid", 0) == chunk_id("not-a-uuid", 0)
    uuid.UUID(chunk_id("not-a-uuid", 0))


def test_chunk_points_carry_the_payload():
    document_id = str(uuid.uuid4())
    points = chunk_points(document_id, _paragraphs(4, 8), owner="alice", source="a.md",
                          title="A")
    assert [p["chunk"] for p in points] == list(range(len(points)))
    assert {p["owner"] for p in points} == {"alice"}
    assert points[1]["id"] == chunk_id(document_id, 1)
    assert all(p["source"] == "a.md" and p["title"] == "A" for p in points)
