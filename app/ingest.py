"""`agentd ingest [--url URL] PATH…`: files and folders into the knowledge base (API.md).

What goes in. Folders are walked recursively (hidden files and folders, ``__pycache__`` and
``node_modules`` left out, symlinked folders not followed). Plain text and markup go in as
they are (txt, md, rst, adoc, org, tex, log, yaml, toml, ini, source code…); HTML loses its
tags (stdlib ``html.parser``; script and style dropped, its ``<title>`` becomes the title);
JSON is re-indented so it can be cut between values; CSV/TSV rows become ``column: value``
lines. A file found in a folder that is binary (a NUL byte in its first 8 KiB) or of another
format is skipped with a note; one named on the command line counts as failed, since it was
asked for and did not go in. A file over 16 MiB, or over 1,000,000 characters of text (one
document's limit), fails with the reason.

Each file is one document whose ``source`` is its absolute path, so ingesting it again
replaces it (and keeps its id). Unchanged files are skipped: before uploading, ingest asks
the server for the caller's documents (GET /api/documents) and skips a file whose path is
there with the same sha256 of its text and its chunks stored. The server is the judge, so the
skip is right after a server's data was wiped or another machine ingested the same files,
and there is no local state to go stale.

Where it goes. To the agentd at ``--url`` (default: the address AGENTD_BIND names), as the
user of ``--api-key`` (default: the first of AGENTD_API_KEYS). When nothing listens there
(connection refused on a loopback address), ingest starts the whole tree itself, ``agentd
serve`` with the same settings and data dir but on a free loopback port, its log in
``<data dir>/ingest-agentd.log``; it waits for /ready (at most 120 s), ingests, then stops it
with SIGTERM and waits for a clean exit.

Up to 4 uploads run at once; a 503 or 429 is retried (its Retry-After honoured) up to 5 times.
The end is one line on stdout: ``ingested N files (M chunks), skipped K unchanged, F failed
in T s``. Exit 0 when every file went in (or was unchanged), 1 when some failed (each named on
stderr) or agentd could not be reached, 2 for a usage error (a path that does not exist).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from app.ingest_formats import Document, Found, Unreadable, UsageError, discover, read_document

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator, Callable

    from rich.progress import Progress

    from app.config import Settings

CONCURRENCY = 4
ATTEMPTS = 5
MAX_RETRY_AFTER = 10.0
READY_TIMEOUT = 120.0
REQUEST_TIMEOUT = 120.0
PAGE = 10_000


# The decisions -------------------------------------------------------------------------------


def unchanged(doc: Document, existing: dict[str, dict[str, Any]]) -> bool:
    """The server already holds exactly this text for this path, with its chunks."""
    known = existing.get(doc.source)
    return (known is not None and known.get("content_hash") == doc.digest
            and int(known.get("chunks") or 0) > 0)


@dataclass
class Tally:
    ingested: int = 0
    chunks: int = 0
    unchanged: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self, seconds: float) -> str:
        line = (f"ingested {self.ingested} file{'s' if self.ingested != 1 else ''} "
                f"({self.chunks} chunk{'s' if self.chunks != 1 else ''}), skipped "
                f"{self.unchanged} unchanged, {len(self.failed)} failed in {seconds:.1f} s")
        if self.notes:
            other = len(self.notes)
            line += f" ({other} other file{'s' if other != 1 else ''} skipped, see above)"
        return line

    @property
    def exit_status(self) -> int:
        return 1 if self.failed else 0


def retry_delay(response: httpx.Response | None, attempt: int) -> float:
    """Retry-After when the server gave one (bounded), else 0.5 s × 2ⁿ."""
    value = response.headers.get("retry-after") if response is not None else None
    try:
        if value is not None:
            return min(max(float(value), 0.0), MAX_RETRY_AFTER)
    except ValueError:
        pass
    return float(min(0.5 * 2**attempt, MAX_RETRY_AFTER))


def error_message(response: httpx.Response) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200] or response.reason_phrase
    return f"HTTP {response.status_code}: {message}"


# Talking to agentd ---------------------------------------------------------------------------


class Unreachable(Exception):
    """agentd cannot be used at this URL (the message says why)."""


async def existing_documents(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    """The caller's documents by source, every page of GET /api/documents."""
    found: dict[str, dict[str, Any]] = {}
    offset = 0
    while True:
        response = await client.get("/api/documents", params={"limit": PAGE, "offset": offset})
        if response.status_code != 200:
            raise Unreachable(f"GET /api/documents answered {error_message(response)}")
        page = response.json()["documents"]
        found.update({d["source"]: d for d in page if d.get("source")})
        if len(page) < PAGE:
            return found
        offset += PAGE


async def upload(client: httpx.AsyncClient, doc: Document) -> int:
    """POST one document, retrying what may pass (503, 429, a dropped connection): its
    number of chunks, or `Unreadable` with the server's reason."""
    for attempt in range(ATTEMPTS):
        response: httpx.Response | None = None
        try:
            response = await client.post("/api/documents", json=doc.body())
        except httpx.TransportError as e:
            reason = f"cannot reach agentd ({type(e).__name__})"
        else:
            if response.status_code == 201:
                return int(response.json()["chunks"])
            reason = error_message(response)
            if response.status_code not in (429, 503):
                break
        if attempt + 1 < ATTEMPTS:
            await trio.sleep(retry_delay(response, attempt))
    raise Unreadable(reason)


async def ingest_files(client: httpx.AsyncClient, found: Found,
                       progress: Progress | None = None) -> Tally:
    """Read, compare and upload every file, `CONCURRENCY` at a time."""
    tally = Tally(failed=list(found.refused), notes=list(found.notes))
    existing = await existing_documents(client)
    task = progress.add_task("ingesting", total=len(found.files)) if progress else None
    send, receive = trio.open_memory_channel[Path](0)

    async def worker() -> None:
        async for path in receive:
            await _one(client, path, existing, tally)
            if progress is not None and task is not None:
                progress.update(task, advance=1, description=_short(path))

    async with trio.open_nursery() as nursery:
        for _ in range(CONCURRENCY):
            nursery.start_soon(worker)
        async with send:
            for path in found.files:
                await send.send(path)
    return tally


async def _one(client: httpx.AsyncClient, path: Path, existing: dict[str, dict[str, Any]],
               tally: Tally) -> None:
    try:
        doc = await trio.to_thread.run_sync(read_document, path)
        if doc is None:
            tally.notes.append((path, "binary or no text"))
        elif unchanged(doc, existing):
            tally.unchanged += 1
        else:
            chunks = await upload(client, doc)  # not `+= await`: that loses updates
            tally.chunks += chunks
            tally.ingested += 1
    except (Unreadable, OSError) as e:
        tally.failed.append((path, str(e)))


def _short(path: Path, width: int = 40) -> str:
    name = str(path)
    return name if len(name) <= width else "…" + name[-width + 1:]


# A tree of our own, when none runs -----------------------------------------------------------


def _loopback(url: str) -> bool:
    host = httpx.URL(url).host
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


async def probe(url: str, headers: dict[str, str]) -> bool:
    """True when an agentd answers at `url` (waiting while it starts); False when nothing
    listens there; `Unreachable` for anything else."""
    async with httpx.AsyncClient(base_url=url, timeout=5, headers=headers) as client:
        try:
            await client.get("/live")
        except httpx.ConnectError:
            return False
        except httpx.HTTPError as e:
            raise Unreachable(f"cannot reach agentd at {url}: {e}") from None
    await wait_ready(url, READY_TIMEOUT)
    return True


async def wait_ready(url: str, within: float, process: trio.Process | None = None) -> None:
    """Poll /ready until 200; bounded; `Unreachable` if `process` exits meanwhile."""
    with trio.move_on_after(within):
        async with httpx.AsyncClient(base_url=url, timeout=2) as client:
            while process is None or process.returncode is None:
                try:
                    response = await client.get("/ready")
                    if response.status_code == 200:
                        return
                    if response.json().get("status") == "draining":
                        raise Unreachable(f"agentd at {url} is shutting down")
                except (httpx.HTTPError, ValueError):
                    pass
                await trio.sleep(0.2)
            raise Unreachable(f"agentd exited with status {process.returncode} while starting")
    raise Unreachable(f"agentd at {url} was not ready within {within:g} s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _agentd_command(config_file: str | None) -> list[str]:
    beside = Path(sys.executable).with_name("agentd")
    command = str(beside) if beside.exists() else (shutil.which("agentd") or "agentd")
    return [command, "serve", *(["--config", config_file] if config_file else [])]


@asynccontextmanager
async def local_agentd(settings: Settings, config_file: str | None,
                       say: Callable[[str], None]) -> AsyncIterator[str]:
    """`agentd serve` on the same settings and data dir, on a free loopback port, for the
    length of the block; its URL. Stopped with SIGTERM, waited for (bounded)."""
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update(AGENTD_BIND=f"127.0.0.1:{port}", AGENTD_DATA_DIR=str(data_dir))
    log_path = data_dir / "ingest-agentd.log"
    say(f"starting agentd… (none answers at the configured address; its log: {log_path})")
    with log_path.open("ab") as log:
        process = await trio.lowlevel.open_process(
            _agentd_command(config_file), env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, READY_TIMEOUT, process)
        yield url
    finally:
        budget = settings.shutdown_timeout + 5  # its own shutdown bound, and some slack
        with trio.CancelScope(shield=True, deadline=trio.current_time() + budget + 10):
            await _stop(process, budget, say)


async def _stop(process: trio.Process, budget: float, say: Callable[[str], None]) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(budget):
            await process.wait()
    if process.returncode is None:
        say(f"agentd did not stop within {budget:g} s of SIGTERM; killing it")
        process.kill()
        with trio.move_on_after(5):
            await process.wait()
    elif process.returncode != 0:
        say(f"the agentd started for ingest exited with status {process.returncode}")


# The command ---------------------------------------------------------------------------------


async def ingest(args: argparse.Namespace, settings: Settings, url: str,
                 headers: dict[str, str]) -> int:
    began = time.monotonic()
    try:
        found = discover(args.paths)
    except UsageError as e:
        say(f"agentd ingest: {e}")
        return 2
    try:
        if await probe(url, headers):
            tally = await _ingest_at(url, headers, found)
        elif _loopback(url):
            async with local_agentd(settings, getattr(args, "config", None), say) as own:
                tally = await _ingest_at(own, headers, found)
        else:
            raise Unreachable(f"nothing answers at {url}")
    except Unreachable as e:
        say(f"agentd ingest: {e}")
        return 1
    for path, why in tally.notes:
        say(f"skipped {path}: {why}")
    for path, why in tally.failed:
        say(f"failed {path}: {why}")
    print(tally.summary(time.monotonic() - began), flush=True)
    return tally.exit_status


def say(line: str) -> None:
    """A note on stderr, one line whatever the terminal's width."""
    print(line, file=sys.stderr, flush=True)


async def _ingest_at(url: str, headers: dict[str, str], found: Found) -> Tally:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    timeout = httpx.Timeout(REQUEST_TIMEOUT, connect=10)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout) as client:
        # Only on a terminal: in a pipe or a log the summary line says it all.
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True,
                      disable=not console.is_terminal) as progress:
            return await ingest_files(client, found, progress)


def main(args: argparse.Namespace, settings: Settings, url: str, headers: dict[str, str]
         ) -> int:
    """`agentd ingest`, from app/clients.py."""
    return trio.run(ingest, args, settings, url, headers)
