"""SSE framing and parsing: what agentd writes is what its clients read back."""

from __future__ import annotations

import json

import pytest

from app.web.sse import (
    KEEPALIVE,
    SSEError,
    SSEMessage,
    SSEParser,
    encode_comment,
    encode_event,
)

EVENTS = [
    ("1-0", "run", json.dumps({"type": "run", "run_id": "r1", "status": "queued"})),
    ("1-1", "token", json.dumps({"type": "token", "content": "héllo wörld ✓ 🚀"})),
    (
        "1-2",
        "token",
        json.dumps({"type": "token", "content": "line\nbreak\u2028sep"}, ensure_ascii=False),
    ),
    ("1-3", "end", json.dumps({"type": "end", "reason": "completed"}, indent=2)),
]


def _stream() -> bytes:
    parts = [KEEPALIVE]
    for event_id, event_type, data in EVENTS:
        parts.append(encode_event(event_id, event_type, data))
        parts.append(encode_comment("keep-alive"))
    return b"".join(parts)


def _expected() -> list[SSEMessage]:
    return [SSEMessage(i, t, d) for i, t, d in EVENTS]


def test_encode_event_writes_id_event_and_single_data_line():
    assert encode_event("5-1", "token", '{"a":1}') == b'id: 5-1\nevent: token\ndata: {"a":1}\n\n'


def test_encode_event_without_id_omits_the_id_field():
    assert encode_event(None, "end", "{}") == b"event: end\ndata: {}\n\n"


def test_multiline_json_becomes_several_data_lines():
    frame = encode_event("1", "end", '{\n  "a": 1\r\n}')
    assert frame == b'id: 1\nevent: end\ndata: {\ndata:   "a": 1\ndata: }\n\n'
    assert SSEParser().feed(frame) == [SSEMessage("1", "end", '{\n  "a": 1\n}')]


def test_unicode_line_separator_is_not_a_line_break():
    data = json.dumps({"c": "a\u2028b\x0cc"}, ensure_ascii=False)
    frame = encode_event("1", "token", data)
    assert frame.count(b"data:") == 1
    assert json.loads(SSEParser().feed(frame)[0].data) == {"c": "a\u2028b\x0cc"}


@pytest.mark.parametrize(("event_id", "event_type"), [("a\nb", "token"), ("1", "to\rken")])
def test_newlines_in_id_or_event_type_are_refused(event_id, event_type):
    with pytest.raises(SSEError):
        encode_event(event_id, event_type, "{}")


def test_keepalive_and_comments_are_comments():
    parser = SSEParser()
    assert parser.feed(KEEPALIVE + encode_comment("two\nlines")) == []
    assert parser.comments == 3
    assert parser.last_comment == "lines"
    assert encode_comment("keep-alive") == KEEPALIVE


def test_whole_stream_round_trips():
    assert SSEParser().feed(_stream()) == _expected()


def test_every_single_split_point_gives_the_same_events():
    stream = _stream()
    for cut in range(len(stream) + 1):
        parser = SSEParser()
        got = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert got == _expected(), f"split at byte {cut}"


def test_every_pair_of_split_points_gives_the_same_events():
    stream = encode_event("1", "token", '{"c":"é✓"}') + encode_event("2", "end", "{}")
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            parser = SSEParser()
            got = [
                *parser.feed(stream[:first]),
                *parser.feed(stream[first:second]),
                *parser.feed(stream[second:]),
            ]
            assert got == [SSEMessage("1", "token", '{"c":"é✓"}'), SSEMessage("2", "end", "{}")]


def test_byte_at_a_time_feed_round_trips():
    parser = SSEParser()
    got: list[SSEMessage] = []
    for i in range(len(_stream())):
        got += parser.feed(_stream()[i : i + 1])
    assert got == _expected()


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_all_three_line_terminators_are_understood(newline):
    raw = newline.join([b"id: 7", b"event: token", b"data: a", b"data: b", b"", b""])
    for cut in range(len(raw) + 1):
        parser = SSEParser()
        got = parser.feed(raw[:cut]) + parser.feed(raw[cut:])
        assert got == [SSEMessage("7", "token", "a\nb")], f"split at byte {cut}"


def test_crlf_split_between_cr_and_lf_yields_no_spurious_blank_line():
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r") == []
    assert parser.feed(b"\n\r") == [SSEMessage(None, "message", "a\nb")]
    assert parser.feed(b"\n") == []


def test_cr_only_stream_dispatches_without_waiting_for_more_bytes():
    assert SSEParser().feed(b"data: x\r\r") == [SSEMessage(None, "message", "x")]


def test_spec_field_rules():
    raw = (
        b"\xef\xbb\xbfdata:no-space\n"  # BOM at start; no space after the colon
        b"data\n"  # a field with no colon: empty value
        b"data:  two spaces\n"  # only one leading space is stripped
        b"unknown: ignored\n"
        b"retry: 2500\n"
        b"\n"
    )
    parser = SSEParser()
    assert parser.feed(raw) == [SSEMessage(None, "message", "no-space\n\n two spaces")]
    assert parser.retry == 2500


def test_last_event_id_persists_and_blocks_without_data_dispatch_nothing():
    parser = SSEParser()
    got = parser.feed(b"id: 1\nevent: token\n\nevent: other\ndata: x\n\nid\ndata: y\n\n")
    # The first block has no data: nothing dispatched, but its id and reset event type stick.
    assert got == [SSEMessage("1", "other", "x"), SSEMessage("", "message", "y")]
    assert parser.last_event_id == ""


def test_id_with_nul_is_ignored_and_bad_retry_is_ignored():
    parser = SSEParser()
    assert parser.feed(b"id: 3\n\nid: a\0b\nretry: 1x\ndata: z\n\n") == [
        SSEMessage("3", "message", "z")
    ]
    assert parser.retry is None


def test_utf8_sequence_split_across_chunks():
    frame = encode_event("1", "token", '{"c":"🚀"}')
    cut = frame.index("🚀".encode()) + 2
    parser = SSEParser()
    assert parser.feed(frame[:cut]) == []
    assert parser.feed(frame[cut:]) == [SSEMessage("1", "token", '{"c":"🚀"}')]


def test_incomplete_trailing_event_is_held_back():
    parser = SSEParser()
    assert parser.feed(b"id: 1\ndata: partial\n") == []
    assert parser.feed(b"\n") == [SSEMessage("1", "message", "partial")]


def test_an_endless_line_is_refused_instead_of_buffered_forever():
    parser = SSEParser(max_line=100)
    parser.feed(b"data: " + b"x" * 90)
    with pytest.raises(SSEError):
        parser.feed(b"x" * 20)
