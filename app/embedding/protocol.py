"""The embedding service's wire format: limits, request validation, JSON framing. Pure (no
torch), so the client shares the limits and the tests check the rules without a model.

Limits: 1–256 texts (points) per request, 10,000 characters per text, ``k`` 1–100, a body of
at most 16 MiB. A text over the limit is refused (422 ``text_too_long``), not truncated: a
caller that cut it would store a chunk whose text says more than its vector. (The model
itself reads only its first 256 tokens, roughly 1,000 characters of English; chunking.py
keeps chunks below that.)

Vectors can come back as JSON or, for a request that sends ``Accept: application/
octet-stream`` (the client always does), as raw little-endian float32, row after row, with
the dimension in ``x-embedding-dim``: 1.5 KB per vector instead of ~8 KB of JSON, and no
float formatting, which took ~0.2 ms per 384-dimensional vector, a fifth of what one
request cost the embedding process. The model makes float32, so nothing is lost.

Errors are ``{"error": {"code", "message"}}``, always JSON. The status code for each code is
decided in `_STATUS` and nowhere else: bad JSON 400, a wrong shape 422, a full queue 503
``overloaded`` (with Retry-After), a draining process 503 ``shutting_down``, a failing store
502.
"""

from __future__ import annotations

import json
import sys
import uuid
from array import array
from itertools import chain
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    Receive = Callable[[], Awaitable[dict[str, Any]]]
    Send = Callable[[dict[str, Any]], Awaitable[None]]

Json = dict[str, Any]

MAX_TEXTS = 256
MAX_TEXT_CHARS = 10_000
MAX_K = 100
MAX_BODY = 16 * 1024 * 1024
VECTORS_TYPE = "application/octet-stream"
DIM_HEADER = "x-embedding-dim"

_STATUS = {
    "bad_json": 400, "not_found": 404, "method_not_allowed": 405, "too_large": 413,
    "invalid": 422, "text_too_long": 422, "encode_failed": 500, "store_unavailable": 502,
    "overloaded": 503, "shutting_down": 503,
}  # fmt: skip


class Disconnected(Exception):
    """The client went away before its request body arrived: nobody to answer."""


class ApiError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = _STATUS[code]

    def body(self) -> Json:
        return {"error": {"code": self.code, "message": str(self)}}


def require(cond: bool, message: str, code: str = "invalid") -> None:
    if not cond:
        raise ApiError(code, message)


def string(data: Json, key: str, *, optional: bool = False) -> str:
    value = data.get(key)
    if optional and (value is None or value == ""):
        return ""
    require(isinstance(value, str) and bool(value.strip()), f"{key!r}: a non-empty string")
    assert isinstance(value, str)
    require(len(value) <= MAX_TEXT_CHARS,
            f"{key!r}: at most {MAX_TEXT_CHARS:,} characters", "text_too_long")
    return value


def items(data: Json, key: str) -> list[Any]:
    value = data.get(key)
    require(isinstance(value, list) and 1 <= len(value) <= MAX_TEXTS,
            f"{key!r}: a list of 1 to {MAX_TEXTS} items")
    assert isinstance(value, list)
    return value


def texts(data: Json) -> list[str]:
    found = items(data, "texts")
    for i, text in enumerate(found):
        require(isinstance(text, str), f"'texts'[{i}]: a string")
        require(len(text) <= MAX_TEXT_CHARS,
                f"'texts'[{i}]: at most {MAX_TEXT_CHARS:,} characters", "text_too_long")
    return found


def points(data: Json) -> list[Json]:
    return [_point(raw, i) for i, raw in enumerate(items(data, "points"))]


def _point(raw: Any, i: int) -> Json:
    require(isinstance(raw, dict), f"'points'[{i}]: an object")
    try:
        point_id = str(uuid.UUID(str(raw.get("id"))))
    except ValueError:
        raise ApiError("invalid", f"'points'[{i}]['id']: a UUID") from None
    chunk = raw.get("chunk", 0)
    require(isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 0,
            f"'points'[{i}]['chunk']: an integer >= 0")
    return {
        "id": point_id,
        "text": string(raw, "text"),
        "document_id": string(raw, "document_id"),
        "owner": string(raw, "owner"),
        "source": string(raw, "source", optional=True),
        "title": string(raw, "title", optional=True),
        "chunk": chunk,
    }


def top_k(data: Json) -> int:
    value = data.get("k", 5)
    require(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_K,
            f"'k': an integer from 1 to {MAX_K}")
    assert isinstance(value, int)
    return value


async def read_json(receive: Receive) -> Json:
    """The request body as a JSON object, or ApiError (400 / 413), or Disconnected."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError("too_large", f"the body is over {MAX_BODY // (1024 * 1024)} MiB")
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    try:
        data = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise ApiError("bad_json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError("bad_json", "the body must be a JSON object")
    return data


async def send_json(
    send: Send, status: int, body: Json, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = await _dump(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


async def _dump(body: Json) -> bytes:
    """JSON-encode `body`; a long list of vectors in slices, with checkpoints between them,
    so that 256 vectors (~100 ms of encoding) never block the loop in one piece."""
    vectors = body.get("vectors")
    if not isinstance(vectors, list) or len(vectors) <= 16:
        return json.dumps(body, separators=(",", ":")).encode()
    parts = []
    for start in range(0, len(vectors), 16):
        parts.append(json.dumps(vectors[start : start + 16], separators=(",", ":"))[1:-1])
        await trio.lowlevel.checkpoint()
    rest = json.dumps({k: v for k, v in body.items() if k != "vectors"}, separators=(",", ":"))
    return b'{"vectors":[' + ",".join(parts).encode() + b"]," + rest[1:].encode()


def wants_vectors_binary(scope: Json) -> bool:
    """Whether the request asked for float32 vectors (``Accept: application/octet-stream``)."""
    return any(name == b"accept" and VECTORS_TYPE.encode() in value
               for name, value in scope.get("headers", ()))


def pack_vectors(vectors: list[list[float]]) -> bytes:
    """Vectors as little-endian float32, row after row."""
    packed = array("f", chain.from_iterable(vectors))
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def unpack_vectors(payload: bytes, dim: int) -> list[list[float]]:
    """The inverse of `pack_vectors`; ValueError unless `payload` holds whole vectors."""
    if dim < 1 or len(payload) % (4 * dim):
        raise ValueError(f"{len(payload)} bytes are not whole {dim}-dimensional vectors")
    flat = array("f")
    flat.frombytes(payload)
    if sys.byteorder != "little":
        flat.byteswap()
    return [flat[start : start + dim].tolist() for start in range(0, len(flat), dim)]


async def send_vectors(send: Send, vectors: list[list[float]], dim: int) -> None:
    payload = pack_vectors(vectors)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", VECTORS_TYPE.encode()),
                            (b"content-length", str(len(payload)).encode()),
                            (DIM_HEADER.encode(), str(dim).encode())]})
    await send({"type": "http.response.body", "body": payload})


async def lifespan(receive: Receive, send: Send) -> None:
    """ASGI lifespan: nothing to set up or tear down here (main.py owns the resources)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
