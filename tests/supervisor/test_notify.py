from __future__ import annotations

import trio

from supervisor.notify import Notifier, NotifyListener, format_message, parse


def test_parse_reads_assignments_and_skips_junk():
    assert parse(b"READY=1\nSTATUS=a=b\n\njunk\n=x") == {"READY": "1", "STATUS": "a=b"}


def test_format_then_parse_round_trips():
    fields = {"READY": "1", "STATUS": "3/3 children ready"}
    assert parse(format_message(fields)) == fields


def test_notifier_without_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert Notifier().notify(READY=1) is False


async def test_notifier_reaches_listener(tmp_path):
    listener = NotifyListener(str(tmp_path / "n.sock"))
    try:
        with Notifier(str(tmp_path / "n.sock")) as n:
            assert n.notify(READY=1, STATUS="up")
            with trio.fail_after(5):
                assert await listener.receive() == {"READY": "1", "STATUS": "up"}
    finally:
        listener.close()


def test_notifier_survives_a_missing_listener(tmp_path):
    with Notifier(str(tmp_path / "gone.sock")) as n:
        assert n.notify(WATCHDOG=1) is False
