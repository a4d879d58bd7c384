"""How web and agent processes reach the embedding process: HTTP over its unix socket.

No torch, no qdrant-client here: this is the only part of app/embedding that light
processes import. Errors cross the boundary once, in `_request`:

- `EmbeddingUnavailable`: the socket is missing, the connection is refused or dropped, the
  call timed out, or the service answered 5xx (including 503 ``shutting_down``).
- `EmbeddingOverloaded` (a kind of `EmbeddingUnavailable`): 503 ``overloaded``, the queue is
  full; retry after a moment.
- `EmbeddingRequestError`: 4xx, the service refused the input (a bug in the caller, or an
  input over a documented limit); `.code` says which.

Lists longer than the service takes in one request (256) are sent in several. Vectors come
back as float32 (see protocol.py). The requests go over unix_http.py's small HTTP/1.1 pool,
not httpx's, whose cost grows with the square of the connections in use (see there); a test
may pass an httpx transport instead (an ASGI app, a mock).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h11
import httpx
import trio

from app.embedding import protocol
from app.embedding.protocol import MAX_TEXTS
from app.embedding.unix_http import Response, UnixHTTP

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import TracebackType

    from app.config import Settings

SOCKET_NAME = "embedding.sock"


class EmbeddingError(Exception):
    """Something went wrong talking to the embedding service."""


class EmbeddingUnavailable(EmbeddingError):
    """The embedding service cannot answer now (not running, restarting, failing)."""


class EmbeddingOverloaded(EmbeddingUnavailable):
    """The embedding service's queue is full: back off and retry."""


class EmbeddingRequestError(EmbeddingError):
    """The embedding service refused the request (4xx)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def default_socket_path(settings: Settings) -> Path:
    """``$AGENTD_RUNTIME_DIR/embedding.sock`` (the supervisor sets it), else under the data dir."""
    runtime = os.environ.get("AGENTD_RUNTIME_DIR") or settings.runtime_dir
    return Path(runtime) / SOCKET_NAME


class EmbeddingClient:
    """``async with EmbeddingClient(path) as client: await client.embed([...])``."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self._unix = UnixHTTP(str(self.socket_path)) if transport is None else None
        self._http = None if transport is None else httpx.AsyncClient(
            transport=transport, base_url="http://embedding", timeout=None)

    async def __aenter__(self) -> EmbeddingClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._unix is not None:
            await self._unix.aclose()
        if self._http is not None:
            await self._http.aclose()

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One normalised vector per text, in order."""
        vectors: list[list[float]] = []
        for start in range(0, len(texts), MAX_TEXTS):
            part = list(texts[start : start + MAX_TEXTS])
            answer = await self._request("POST", "/embed", {"texts": part}, vectors=True)
            vectors += answer["vectors"]
        return vectors

    async def upsert(self, points: Sequence[Mapping[str, Any]]) -> int:
        """Embed and store chunks (see chunking.chunk_points); how many were stored."""
        count = 0
        for start in range(0, len(points), MAX_TEXTS):
            part = [dict(p) for p in points[start : start + MAX_TEXTS]]
            count += int((await self._request("POST", "/upsert", {"points": part}))["count"])
        return count

    async def search(self, query: str, k: int, owner: str) -> list[dict[str, Any]]:
        """`owner`'s `k` closest chunks, best first: document_id, text, score, source, title,
        chunk."""
        body = {"query": query, "k": k, "owner": owner}
        results: list[dict[str, Any]] = (await self._request("POST", "/search", body))["results"]
        return results

    async def delete(self, document_id: str, owner: str | None = None) -> None:
        """Remove a document's chunks (only `owner`'s, when given)."""
        body: dict[str, Any] = {"document_id": document_id}
        if owner is not None:
            body["owner"] = owner
        await self._request("POST", "/delete", body)

    async def health(self) -> dict[str, Any]:
        return await self._request("GET", "/health")

    async def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None, *,
        vectors: bool = False,
    ) -> dict[str, Any]:
        headers = [("accept", protocol.VECTORS_TYPE if vectors else "application/json")]
        content = b""
        if body is not None:
            content = json.dumps(body, separators=(",", ":")).encode()
            headers.append(("content-type", "application/json"))
        try:
            with trio.fail_after(self.timeout):
                response = await self._send(method, path, headers, content)
            data = _decode(response)
        except trio.TooSlowError as e:
            raise EmbeddingUnavailable(f"embedding service: {path} timed out") from e
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError,
                httpx.HTTPError) as e:
            raise EmbeddingUnavailable(
                f"embedding service at {self.socket_path} unreachable: {e!r}"
            ) from e
        except ValueError as e:
            raise EmbeddingUnavailable(f"embedding service: {path} answered garbage: {e}") from e
        if response.status < 400 and isinstance(data, dict):
            return data
        error = data.get("error", {}) if isinstance(data, dict) else {}
        code = str(error.get("code", "unknown"))
        message = f"embedding service: {error.get('message', f'HTTP {response.status}')}"
        if response.status == 503 and code == "overloaded":
            raise EmbeddingOverloaded(message)
        if response.status >= 500 or response.status < 400:
            raise EmbeddingUnavailable(message)
        raise EmbeddingRequestError(response.status, code, message)

    async def _send(
        self, method: str, path: str, headers: list[tuple[str, str]], content: bytes
    ) -> Response:
        if self._unix is not None:
            return await self._unix.request(method, path, headers, content)
        assert self._http is not None
        answer = await self._http.request(method, path, headers=headers, content=content)
        return Response(answer.status_code, dict(answer.headers), answer.content)


def _decode(response: Response) -> Any:
    """The answer's body: JSON, or float32 vectors (ValueError if it is neither)."""
    if response.headers.get("content-type") == protocol.VECTORS_TYPE:
        dim = int(response.headers.get(protocol.DIM_HEADER, "0"))
        return {"vectors": protocol.unpack_vectors(response.content, dim), "dim": dim}
    return json.loads(response.content)
