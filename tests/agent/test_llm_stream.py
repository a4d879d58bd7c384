"""llm.py's hand-made SSE reader: its lazily moved stall deadline, on virtual time, and its
JSON parsing (pydantic_core's, with json.loads behind it)."""

from __future__ import annotations

import json

import httpx2 as httpx
import pytest
import trio
import trio.testing

from app.agent.llm import Turn, _parse_json, _read_events

TIMEOUT = 2.0
SLACK = TIMEOUT / 10


def token(i: int) -> bytes:
    delta = {"choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}
    return b"data: " + json.dumps(delta).encode() + b"\n\n"


class Paced(httpx.AsyncByteStream):
    """A body whose pieces come `gap` seconds apart, then `[DONE]`, or nothing ever."""

    def __init__(self, pieces: int, gap: float, *, hang: bool) -> None:
        self.pieces, self.gap, self.hang = pieces, gap, hang
        self.last_sent = 0.0

    async def __aiter__(self):
        for i in range(self.pieces):
            await trio.sleep(self.gap)
            self.last_sent = trio.current_time()
            yield token(i)
        if self.hang:
            await trio.sleep_forever()
        yield b"data: [DONE]\n\n"


async def read(body: Paced) -> tuple[Turn, bool, float]:
    """As llm.py's `_stream` does: one stall scope around `_read_events`."""
    turn = Turn()
    with trio.CancelScope(deadline=trio.current_time() + TIMEOUT) as stall:
        await _read_events(httpx.Response(200, stream=body), turn, lambda _: None, stall,
                           TIMEOUT)
    return turn, stall.cancelled_caught, trio.current_time()


@pytest.mark.parametrize("gap", [0.01, 0.3, 1.9])
async def test_a_stall_comes_no_sooner_than_the_timeout_after_the_last_chunk_nor_much_later(
        gap, autojump_clock):
    body = Paced(12, gap, hang=True)
    turn, stalled, at = await read(body)
    assert stalled
    assert len(turn.content) == 12
    assert TIMEOUT <= at - body.last_sent <= TIMEOUT + SLACK + 1e-9


async def test_chunks_just_within_the_timeout_of_each_other_never_stall(autojump_clock):
    turn, stalled, _ = await read(Paced(10, TIMEOUT - 0.01, hang=False))
    assert not stalled
    assert turn.text == "".join(f"t{i} " for i in range(10))


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.mark.parametrize("payload", [
    b'{"choices":[{"delta":{"content":"h\\u00e9 \\ud83d\\ude00"}}],"usage":null}',
    b'{"a":1e400,"b":123456789012345678901234567890,"c":0.1,"d":[true,null]}',
    b'{"content":"\\ud800 a lone surrogate"}',
])
def test_json_is_parsed_as_json_loads_parses_it(payload):
    assert repr(_parse_json(payload)) == repr(json.loads(payload))


def test_json_that_is_not_json_is_a_value_error():
    with pytest.raises(ValueError):  # noqa: PT011 - json.loads' own error, as before
        _parse_json(b"{not json")
