"""`agentd chat`'s pure half (app/chat_client.py): events in, text out, where to resume."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest

from app.chat_client import Chat, Turn, backoff, seen, tool_line


def feed_all(turn: Turn, events: list[tuple[str | None, str, dict[str, Any]]]) -> str:
    return "".join(turn.feed(*event) for event in events)


ANSWER = [
    (None, "run", {"run_id": "r1", "session_id": "s1", "status": "queued"}),
    ("1-0", "thinking", {}),
    ("1-1", "token", {"content": "Let me "}),
    ("1-2", "tool_call", {"call_id": "c1", "name": "calculator",
                          "arguments": '{"expression":"2+3"}'}),
    ("1-3", "tool_result", {"call_id": "c1", "name": "calculator", "result": 5}),
    ("1-4", "token", {"content": "It is 5."}),
    ("1-5", "end", {"reason": "completed", "message_id": "m1", "resumable": False}),
]


def test_tokens_print_as_they_come_and_a_tool_call_gets_a_line_of_its_own():
    turn = Turn()
    assert feed_all(turn, ANSWER) == (
        'Let me \n[tool calculator {"expression": "2+3"} → 5]\nIt is 5.\n')
    assert (turn.run_id, turn.session_id, turn.last_id) == ("r1", "s1", "1-5")
    assert turn.end is not None and turn.end["reason"] == "completed"


def test_an_answer_that_did_not_complete_says_how_it_ended():
    turn = Turn()
    text = feed_all(turn, [("1-0", "token", {"content": "tok0 "}),
                           ("1-1", "end", {"reason": "server_shutdown", "resumable": True,
                                           "detail": "the answer so far is saved"})])
    assert text == "tok0 \n[ended: server_shutdown — the answer so far is saved]\n"


def test_a_resumed_stream_prints_nothing_twice():
    turn = Turn()
    first = feed_all(turn, ANSWER[:3])
    # The resumed stream starts with its own `run` event; a replay from an older id (a
    # server that ignored Last-Event-ID) must not print again.
    again = feed_all(turn, [ANSWER[0], *ANSWER[1:]])
    assert first + again == feed_all(Turn(), ANSWER)


def test_tool_results_show_errors_and_the_result_inside_a_result_object():
    call = {"name": "calculator", "arguments": {"expression": "1/0"}}
    assert tool_line(call, {"error": "division by zero"}) == (
        '[tool calculator {"expression": "1/0"} → error: division by zero]')
    assert tool_line(call, {"result": {"expression": "1/0", "result": 7}}).endswith("→ 7]")
    assert tool_line({}, {"name": "clock", "result": "12:00"}) == "[tool clock {} → 12:00]"


@pytest.mark.parametrize(("event_id", "last", "expected"), [
    ("1-2", None, False), ("1-2", "1-2", True), ("1-10", "1-9", False), ("2-0", "10-0", True),
    ("b", "a", False),
])
def test_event_ids_compare_in_event_order(event_id, last, expected):
    assert seen(event_id, last) is expected


def test_backoff_doubles_up_to_five_seconds():
    assert [backoff(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def sse(events: list[tuple[str | None, str, str]]) -> bytes:
    out = b""
    for event_id, event_type, data in events:
        out += (f"id: {event_id}\n" if event_id else "").encode()
        out += f"event: {event_type}\ndata: {data}\n\n".encode()
    return out


def test_a_dropped_stream_is_resumed_from_the_last_event_id_in_the_same_session(monkeypatch):
    monkeypatch.setattr("app.chat_client.time.sleep", lambda s: None)
    calls: list[tuple[str, str, str | None]] = []
    run = '{"type":"run","run_id":"r1","session_id":"s1","status":"queued"}'

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path, request.headers.get("last-event-id")))
        if request.method == "POST":
            # The connection drops after one token: no `end`.
            return httpx.Response(200, content=sse([(None, "run", run),
                                                    ("1-0", "token", '{"content":"a "}')]))
        if len(calls) == 2:
            return httpx.Response(503, json={"error": {"code": "draining", "message": "x"}})
        return httpx.Response(200, content=sse([
            (None, "run", run), ("1-1", "token", '{"content":"b"}'),
            ("1-2", "end", '{"reason":"completed","message_id":"m","resumable":false}')]))

    out = io.StringIO()
    with httpx.Client(base_url="http://agentd", transport=httpx.MockTransport(handler)) as c:
        chat = Chat(c, out)
        chat.ask("hello")
    assert out.getvalue() == "a b\n"
    assert calls == [("POST", "/api/chat/stream", None),
                     ("GET", "/api/runs/r1/events", "1-0"),
                     ("GET", "/api/runs/r1/events", "1-0")]
    assert chat.session_id == "s1"
