"""Server-sent events: the one place agentd frames and parses SSE.

Framing sits on the hot path (one call per relayed token), so the encoder is plain string
formatting on JSON the caller already serialised: no pydantic, no per-event allocation beyond
the bytes written. The parser follows the WHATWG "event stream interpretation" algorithm and
is incremental, so a client can feed it whatever the socket hands over, however it is split.

Wire format written by agentd (API.md, "Run events")::

    id: <opaque>
    event: <type>
    data: {"type": "<type>", ...}

followed by a blank line. Comment lines (`: keep-alive`) keep idle connections open.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = [
    "KEEPALIVE",
    "SSEError",
    "SSEMessage",
    "SSEParser",
    "encode_comment",
    "encode_event",
]

KEEPALIVE = b": keep-alive\n\n"

# The spec's only line terminators are CRLF, LF and CR. `str.splitlines` would also split on
# U+2028, form feeds and friends, which `json.dumps(..., ensure_ascii=False)` may leave raw
# inside a string: splitting there would corrupt the payload on the way back together.
_LINE_END = re.compile(r"\r\n|\r|\n")


class SSEError(ValueError):
    """A field that cannot be framed, or a stream the parser refuses to buffer."""


def _check_field(name: str, value: str) -> None:
    # A newline in `id` or `event` would end the field early and let its tail be read as
    # another field: refuse it rather than emit a stream a client parses differently.
    if "\n" in value or "\r" in value:
        raise SSEError(f"SSE {name} must be a single line, got {value!r}")


def _data_lines(data: str) -> str:
    """`data:` lines for a payload that spans lines; a parser joins them back with LF."""
    return "".join(f"data: {line}\n" for line in _LINE_END.split(data))


def encode_event(event_id: str | None, event_type: str, data_json: str) -> bytes:
    """One complete event, ready to write: `id`, `event`, `data`, then the blank line.

    `data_json` is expected to be compact single-line JSON (the fast path). If it does contain
    line breaks, it is split into several `data:` lines as the spec requires; a parser returns
    it joined with LF, which for JSON is the same document.
    """
    _check_field("event type", event_type)
    if "\n" in data_json or "\r" in data_json:
        data = _data_lines(data_json)
    else:
        data = f"data: {data_json}\n"
    if event_id is None:
        return f"event: {event_type}\n{data}\n".encode()
    _check_field("id", event_id)
    return f"id: {event_id}\nevent: {event_type}\n{data}\n".encode()


def encode_comment(text: str) -> bytes:
    """A comment block (ignored by clients; used to keep idle connections alive)."""
    return ("".join(f": {line}\n" for line in _LINE_END.split(text)) + "\n").encode()


@dataclass(frozen=True, slots=True)
class SSEMessage:
    """One dispatched event.

    `id` is the stream's *last event id* as the spec defines it: it persists from the last
    `id:` field seen, so an event sent without an id reports its predecessor's. That is what a
    client must echo in `Last-Event-ID` to resume. `event` is `"message"` when none was given.
    """

    id: str | None
    event: str
    data: str


class SSEParser:
    """Incremental SSE parser: `feed(bytes) -> [SSEMessage, ...]`.

    Bytes may be split anywhere, even inside a UTF-8 sequence or between the CR and LF of a
    CRLF. An event is returned only once its terminating blank line has arrived; what is
    still buffered when the stream ends is an incomplete event and, per the spec, discarded.
    """

    def __init__(self, *, max_line: int = 16 * 1024 * 1024) -> None:
        self.last_event_id: str | None = None
        self.retry: int | None = None  # the server's `retry:` advice, in milliseconds
        self.comments = 0
        self.last_comment: str | None = None
        self._max_line = max_line
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self._skip_lf = False
        self._started = False
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[SSEMessage]:
        """Consume bytes; return the events they completed, in order."""
        text = self._decoder.decode(chunk)
        if not text:
            return []
        text = self._strip_prelude(text)
        lines = _LINE_END.split(self._partial + text)
        self._partial = lines.pop()
        # A CR that ends the text may be the first half of a CRLF still in flight. The line
        # is already complete (dispatching now keeps latency down for CR-only servers); just
        # remember to drop an LF that starts the next chunk.
        self._skip_lf = text.endswith("\r")
        if len(self._partial) > self._max_line:
            raise SSEError(f"SSE line longer than {self._max_line} characters")
        out: list[SSEMessage] = []
        for line in lines:
            self._line(line, out)
        return out

    def _strip_prelude(self, text: str) -> str:
        if self._skip_lf and text[0] == "\n":
            text = text[1:]
        if not self._started:
            # A byte-order mark is allowed once, at the very start of the stream.
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        return text

    def _line(self, line: str, out: list[SSEMessage]) -> None:
        if not line:
            self._dispatch(out)
        elif line[0] == ":":
            self.comments += 1
            self.last_comment = line[2:] if line.startswith(": ") else line[1:]
        else:
            name, _, value = line.partition(":")
            self._field(name, value[1:] if value.startswith(" ") else value)

    def _field(self, name: str, value: str) -> None:
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:  # the spec ignores ids containing NUL
                self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        # Any other field name is ignored, as the spec requires.

    def _dispatch(self, out: list[SSEMessage]) -> None:
        # A blank line with no `data:` since the last one dispatches nothing, but still
        # resets the event type (an `id:`-only block just moves the last event id).
        if self._data:
            out.append(
                SSEMessage(self.last_event_id, self._event or "message", "\n".join(self._data))
            )
            self._data = []
        self._event = ""
