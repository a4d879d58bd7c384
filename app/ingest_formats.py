"""What `agentd ingest` sends for each file: finding the files, and their text by format.

Pure and blocking (no network, no trio): app/ingest.py runs `read_document` in a worker
thread. The rules are in app/ingest.py's docstring.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_TEXT = 1_000_000  # app/web/documents.py MAX_TEXT
SKIP_DIRS = {"__pycache__", "node_modules"}

PLAIN = {
    ".txt", ".text", ".md", ".markdown", ".rst", ".adoc", ".asciidoc", ".org", ".tex", ".log",
    ".yaml", ".yml", ".toml", ".ini", ".cfg", ".conf", ".jsonl", ".ndjson", ".xml", ".svg",
    ".py", ".js", ".ts", ".go", ".rs", ".java", ".c", ".h", ".cc", ".cpp", ".hpp", ".rb",
    ".sh", ".sql", ".css",
}  # fmt: skip
HTML = {".html", ".htm", ".xhtml"}
FORMATS = PLAIN | HTML | {".json", ".csv", ".tsv"}


class UsageError(Exception):
    """The command line asks for something impossible (exit 2)."""


class Unreadable(Exception):
    """This file cannot go in: the message says why."""


# Finding files ------------------------------------------------------------------------------


@dataclass
class Found:
    files: list[Path] = field(default_factory=list)  # to read, in order
    notes: list[tuple[Path, str]] = field(default_factory=list)  # skipped, from folders
    refused: list[tuple[Path, str]] = field(default_factory=list)  # named, not supported


def discover(paths: Sequence[str | os.PathLike[str]]) -> Found:
    """The files under `paths`, each once; `UsageError` for a path that does not exist."""
    found, seen = Found(), set[Path]()
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise UsageError(f"no such file or directory: {raw}")
        if path.is_dir():
            for file in _walk(path):
                _add(found, seen, file, named=False)
        else:
            _add(found, seen, path, named=True)
    return found


def _walk(top: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root, name)


def _add(found: Found, seen: set[Path], path: Path, *, named: bool) -> None:
    real = path.resolve()
    if real in seen or not real.is_file():
        return
    seen.add(real)
    if real.suffix.lower() in FORMATS:
        found.files.append(real)
    else:
        why = f"not a supported format ({real.suffix or 'no extension'})"
        (found.refused if named else found.notes).append((real, why))


# Reading them --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    path: Path
    text: str
    title: str
    format: str
    size: int

    @property
    def source(self) -> str:
        return str(self.path)

    @property
    def digest(self) -> str:
        """sha256 of the text as sent: what the server stores as the document's content_hash."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def body(self) -> dict[str, Any]:
        return {"text": self.text, "source": self.source, "title": self.title,
                "metadata": {"format": self.format, "bytes": self.size,
                             "file_name": self.path.name}}


def read_document(path: Path) -> Document | None:
    """The file as a document; None when it is binary or holds no text (skip with a note).

    Blocking: run it in a worker thread.
    """
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise Unreadable(f"too large ({size / 2**20:.1f} MiB; at most "
                         f"{MAX_FILE_BYTES // 2**20} MiB)")
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        return None
    raw = _decode(data)
    suffix = path.suffix.lower()
    text, title = extract(raw, suffix)
    if not text.strip():
        return None
    if len(text) > MAX_TEXT:
        raise Unreadable(f"{len(text):,} characters of text, over one document's limit of "
                         f"{MAX_TEXT:,}")
    return Document(path, text, title or path.name, suffix.lstrip("."), size)


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # every byte is a character; better than nothing


def extract(raw: str, suffix: str) -> tuple[str, str | None]:
    """The text to index and a title (None: use the file name), by format."""
    if suffix in HTML:
        return html_text(raw)
    if suffix == ".json":
        return json_text(raw), None
    if suffix in (".csv", ".tsv"):
        return table_text(raw, "\t" if suffix == ".tsv" else ","), None
    if suffix in (".md", ".markdown"):
        heading = re.search(r"^#\s+(.+?)\s*#*\s*$", raw, re.MULTILINE)
        return raw, heading.group(1) if heading else None
    return raw, None


class _HTMLText(HTMLParser):
    SKIP = {"script", "style", "noscript", "template", "head"}
    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre",
              "blockquote", "section", "article", "header", "footer", "table", "ul", "ol",
              "dl", "dt", "dd", "hr", "main", "nav", "aside", "figure", "figcaption"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title: list[str] = []
        self._skipping: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in self.SKIP:
            self._skipping.append(tag)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n" if tag in ("p", "pre", "table") or tag[0] == "h" else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in self.SKIP and tag in self._skipping:
            while self._skipping and self._skipping.pop() != tag:
                pass
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title.append(data)
        elif not self._skipping:
            self.parts.append(data)


def html_text(raw: str) -> tuple[str, str | None]:
    parser = _HTMLText()
    parser.feed(raw)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    title = " ".join("".join(parser.title).split())
    return text, title or None


def json_text(raw: str) -> str:
    """Indented, so that the chunker can cut between values; as is when it is not JSON."""
    try:
        return json.dumps(json.loads(raw), indent=2, ensure_ascii=False)
    except ValueError:
        return raw


def table_text(raw: str, delimiter: str) -> str:
    """One line per row, ``column: value; …``, which reads (and embeds) like a sentence."""
    rows = [row for row in csv.reader(io.StringIO(raw), delimiter=delimiter) if any(row)]
    if len(rows) < 2:
        return raw
    header, lines = rows[0], []
    for row in rows[1:]:
        cells = [f"{header[i] if i < len(header) else i + 1}: {value}"
                 for i, value in enumerate(row) if value.strip()]
        lines.append("; ".join(cells))
    return "\n".join(lines)
