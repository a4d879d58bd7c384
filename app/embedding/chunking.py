"""Cutting a document into chunks for the vector store. Pure: no torch, no I/O.

A chunk is at most `size` characters. Cuts fall on paragraph boundaries (blank lines) where
the text allows, else on sentence ends, else between words; only a single "word" longer than
a chunk is cut mid-word. Each chunk after the first starts with up to `overlap` characters
from the end of the one before (cut at a word boundary), so that a sentence that straddles a
cut is still found whole in one chunk or the other.

Chunk ids are deterministic, ``uuid5(document_id, str(index))``: re-ingesting a document
overwrites its chunks instead of duplicating them. (A new version with fewer chunks leaves
the old tail behind, so replacing a document is delete-by-document_id, then upsert.)
"""

from __future__ import annotations

import re
import uuid
from typing import TypedDict

DEFAULT_SIZE = 800
DEFAULT_OVERLAP = 100

_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
# After a sentence's end mark, or after the mark and one closing quote or bracket.
_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])\s+|(?<=[.!?…][\"')\]])\s+")
_SPACE = re.compile(r"\s+")


class ChunkPoint(TypedDict):
    """One chunk as the embedding service's ``/upsert`` takes it."""

    id: str
    text: str
    document_id: str
    owner: str
    source: str
    title: str
    chunk: int


def chunk_text(text: str, size: int = DEFAULT_SIZE, overlap: int = DEFAULT_OVERLAP) -> list[str]:
    """Split `text` into chunks of at most `size` characters; ``[]`` for blank text."""
    if size < 1 or not 0 <= overlap < size:
        raise ValueError("need size >= 1 and 0 <= overlap < size")
    text = text.replace("\r\n", "\n").strip()
    if not text:
        return []
    if len(text) <= size:
        return [text]
    return _pack(_units(text, size), size, overlap)


def _units(text: str, size: int) -> list[tuple[str, str]]:
    """Pieces of at most `size` characters, each with the separator that goes before it."""
    units: list[tuple[str, str]] = []
    for paragraph in _PARAGRAPH.split(text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        pieces = [paragraph] if len(paragraph) <= size else _split_long(paragraph, size)
        units.append(("\n\n", pieces[0]))
        units.extend((" ", piece) for piece in pieces[1:])
    return units


def _split_long(paragraph: str, size: int) -> list[str]:
    """A paragraph over `size`: its sentences, and words of sentences that are still too long."""
    out: list[str] = []
    for sentence in _SENTENCE_END.split(paragraph):
        sentence = sentence.strip()
        if len(sentence) <= size:
            if sentence:
                out.append(sentence)
            continue
        out.extend(_greedy(_SPACE.split(sentence), size))
    return out


def _greedy(words: list[str], size: int) -> list[str]:
    """Join words into runs of at most `size` characters; cut a word longer than `size`."""
    out: list[str] = []
    current = ""
    for word in words:
        while len(word) > size:
            if current:
                out.append(current)
                current = ""
            out.append(word[:size])
            word = word[size:]
        if not word:
            continue
        if current and len(current) + 1 + len(word) > size:
            out.append(current)
            current = ""
        current = f"{current} {word}" if current else word
    if current:
        out.append(current)
    return out


def _pack(units: list[tuple[str, str]], size: int, overlap: int) -> list[str]:
    chunks: list[str] = []
    current = ""
    for sep, piece in units:
        if current and len(current) + len(sep) + len(piece) <= size:
            current += sep + piece
            continue
        if current:
            chunks.append(current)
            seed = _tail(current, overlap)
            # The overlap is a courtesy: it never pushes a chunk over the size.
            current = f"{seed} {piece}" if seed and len(seed) + 1 + len(piece) <= size else piece
        else:
            current = piece
    if current:
        chunks.append(current)
    return chunks


def _tail(chunk: str, overlap: int) -> str:
    """The last `overlap` characters of `chunk`, starting at a word, or "" if none fits."""
    if overlap == 0:
        return ""
    tail = chunk[-overlap:]
    if len(tail) < len(chunk) and not chunk[-overlap - 1].isspace():
        _, space, rest = tail.partition(" ")
        tail = rest if space else ""
    return tail.strip()


def chunk_id(document_id: str, index: int) -> str:
    """``uuid5(document_id, str(index))``; a document id that is not a UUID is hashed first."""
    try:
        namespace = uuid.UUID(document_id)
    except ValueError:
        namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"agentd:document:{document_id}")
    return str(uuid.uuid5(namespace, str(index)))


def chunk_points(
    document_id: str,
    text: str,
    *,
    owner: str,
    source: str = "",
    title: str = "",
    size: int = DEFAULT_SIZE,
    overlap: int = DEFAULT_OVERLAP,
) -> list[ChunkPoint]:
    """A document as the points to upsert: one per chunk, ids from `chunk_id`."""
    return [
        ChunkPoint(
            id=chunk_id(document_id, index),
            text=piece,
            document_id=document_id,
            owner=owner,
            source=source,
            title=title,
            chunk=index,
        )
        for index, piece in enumerate(chunk_text(text, size, overlap))
    ]
