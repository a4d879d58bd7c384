"""The knowledge base routes' checks and the per-document lock, without a server
(app/web/documents.py)."""

from __future__ import annotations

import hashlib

import pytest
import trio

from app.web.api import parse_body
from app.web.documents import DocumentRequest, KeyLocks, checked, content_hash, search_params
from app.web.errors import ValidationFailed


@pytest.mark.parametrize(("fields", "message"), [
    ({"text": " \n"}, "text: must not be blank"),
    ({"text": "x", "source": "a\x00b"}, "source: NUL"),
    ({"text": "x", "metadata": {"a": "\x00"}}, "metadata: NUL"),
    ({"text": "x", "metadata": {"a": "b" * 17_000}}, "metadata: at most 16384 bytes"),
])
def test_what_postgresql_cannot_store_or_the_limits_refuse_is_a_422(fields, message):
    with pytest.raises(ValidationFailed, match=message):
        checked(DocumentRequest.model_validate(fields))


def test_lone_surrogates_are_refused_by_the_body_parser():
    with pytest.raises(ValidationFailed, match="title"):
        parse_body('{"text": "x", "title": "\\ud800"}', DocumentRequest, 1000)


def test_a_blank_source_or_title_is_none_and_nul_in_the_text_is_fine():
    body = checked(DocumentRequest.model_validate(
        {"text": "a\x00b", "source": "  ", "title": ""}))
    assert body.source is None and body.title is None


def test_content_hash_is_the_sha256_of_the_utf8_text():
    assert content_hash("é") == hashlib.sha256("é".encode()).hexdigest()


@pytest.mark.parametrize(("args", "expected"), [
    ({"q": "cats"}, ("cats", 5)), ({"q": "cats", "k": "100"}, ("cats", 100)),
    ({"q": "cats", "k": ""}, ("cats", 5)),
])
def test_search_params_defaults_and_bounds(args, expected):
    assert search_params(args) == expected


@pytest.mark.parametrize("args", [
    {}, {"q": " "}, {"q": "x" * 2001}, {"q": "x", "k": "0"}, {"q": "x", "k": "101"},
    {"q": "x", "k": "1.5"},
])
def test_bad_search_params_are_422(args):
    with pytest.raises(ValidationFailed):
        search_params(args)


async def test_writers_of_one_document_take_turns_and_the_lock_is_dropped_after():
    locks = KeyLocks()
    order: list[str] = []

    async def write(key: tuple[str, str], name: str) -> None:
        async with locks.hold(key):
            order.append(f"{name} in")
            await trio.sleep(0.01)
            order.append(f"{name} out")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write, ("u", "/a"), "first")
            await trio.sleep(0.001)
            nursery.start_soon(write, ("u", "/a"), "second")
            nursery.start_soon(write, ("u", "/b"), "other")
    assert order.index("first out") < order.index("second in")
    assert order.index("other in") < order.index("first out")  # another key does not wait
    assert locks._locks == {}
