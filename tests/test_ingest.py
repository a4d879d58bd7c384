"""`agentd ingest` without a server: which files, what text, what is skipped, what is retried,
and the line it ends with (app/ingest.py, app/ingest_formats.py)."""

from __future__ import annotations

import hashlib
import json
import re
from argparse import Namespace
from pathlib import Path

import httpx
import pytest
import trio

from app import ingest
from app.config import Settings
from app.ingest import Tally, ingest_files, retry_delay, unchanged, upload
from app.ingest_formats import (
    MAX_TEXT,
    Document,
    Unreadable,
    UsageError,
    discover,
    extract,
    html_text,
    read_document,
    table_text,
)

# Finding files -------------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    (root / "docs" / "deep" / "deeper").mkdir(parents=True)
    (root / "docs" / "a.md").write_text("# A\n\nalpha")
    (root / "docs" / "deep" / "b.txt").write_text("beta")
    (root / "docs" / "deep" / "deeper" / "c.html").write_text("<p>gamma</p>")
    (root / "docs" / "photo.png").write_bytes(b"\x89PNG\x00\x00")
    (root / "docs" / ".hidden.md").write_text("hidden")
    (root / "docs" / ".git").mkdir()
    (root / "docs" / ".git" / "HEAD.txt").write_text("ref")
    (root / "docs" / "node_modules").mkdir()
    (root / "docs" / "node_modules" / "x.md").write_text("dependency")


def test_discover_walks_folders_recursively_leaving_out_hidden_and_dependency_folders(tmp_path):
    make_tree(tmp_path)
    found = discover([tmp_path / "docs"])
    names = [p.name for p in found.files]
    assert names == ["a.md", "b.txt", "c.html"]
    assert all(p.is_absolute() for p in found.files)
    assert [(p.name, why) for p, why in found.notes] == [
        ("photo.png", "not a supported format (.png)")]
    assert found.refused == []


def test_a_named_unsupported_file_is_refused_and_a_file_named_twice_is_read_once(tmp_path):
    make_tree(tmp_path)
    docs = tmp_path / "docs"
    found = discover([docs / "photo.png", docs / "a.md", docs, docs / "a.md"])
    assert [p.name for p in found.files] == ["a.md", "b.txt", "c.html"]
    assert [p.name for p, _ in found.refused] == ["photo.png"]
    assert found.notes == []  # the folder's photo.png was already named


def test_a_path_that_does_not_exist_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such file or directory: .*missing"):
        discover([tmp_path / "missing"])


async def test_ingest_exits_2_with_one_line_for_a_missing_path(tmp_path, capsys):
    args = Namespace(paths=[str(tmp_path / "missing")], config=None)
    status = await ingest.ingest(args, Settings(), "http://127.0.0.1:9", {})
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such file or directory" in err


# Reading them --------------------------------------------------------------------------------


def test_html_loses_tags_scripts_and_styles_and_gives_its_title():
    text, title = html_text(
        "<html><head><title> Pets &amp; co </title><style>p {color: red}</style></head>"
        "<body><h1>Cats</h1><p>Cats   sleep<br>16 hours &lt;a day&gt;.</p>"
        "<script>alert('x')</script><ul><li>one</li><li>two</li></ul></body></html>")
    assert title == "Pets & co"
    assert "alert" not in text and "color" not in text and "<" not in text.replace("<a", "")
    assert text.splitlines()[0] == "Cats"
    assert "Cats sleep" in text and "16 hours <a day>." in text
    assert "one" in text.splitlines() and "two" in text.splitlines()


def test_markdown_title_is_its_first_heading_and_other_text_is_kept_as_is():
    assert extract("intro\n# The Title #\n\nbody", ".md") == ("intro\n# The Title #\n\nbody",
                                                               "The Title")
    assert extract("plain *text*", ".rst") == ("plain *text*", None)


def test_json_is_indented_and_text_that_is_not_json_is_kept():
    text, _ = extract('{"a":[1,2],"b":"é"}', ".json")
    assert json.loads(text) == {"a": [1, 2], "b": "é"} and "\n" in text and "é" in text
    assert extract("{not json", ".json") == ("{not json", None)


def test_csv_and_tsv_rows_become_column_value_lines():
    assert table_text("name,colour\nbanana,yellow\n\napple,\n", ",") == (
        "name: banana; colour: yellow\nname: apple")
    assert extract("a\tb\n1\t2\n", ".tsv")[0] == "a: 1; b: 2"
    assert table_text("just a header\n", ",") == "just a header\n"


def test_read_document_skips_binary_and_empty_files_and_refuses_huge_text(tmp_path):
    binary = tmp_path / "data.txt"
    binary.write_bytes(b"abc\x00def")
    assert read_document(binary) is None
    empty = tmp_path / "empty.md"
    empty.write_text("  \n\n")
    assert read_document(empty) is None
    huge = tmp_path / "huge.txt"
    huge.write_text("x" * (MAX_TEXT + 1))
    with pytest.raises(Unreadable, match="over one document's limit"):
        read_document(huge)


def test_read_document_decodes_utf8_with_bom_or_latin1_and_names_the_source(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffcafé".encode())
    doc = read_document(bom)
    assert doc is not None and doc.text == "café" and doc.title == "bom.txt"
    assert doc.source == str(bom) and doc.format == "txt"
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    latin_doc = read_document(latin)
    assert latin_doc is not None and latin_doc.text == "café"


# The skip decision ---------------------------------------------------------------------------


def doc(text: str = "hello", path: str = "/kb/a.md") -> Document:
    return Document(Path(path), text, "a.md", "md", len(text))


def test_digest_is_the_sha256_the_server_stores_for_the_text():
    assert doc("héllo").digest == hashlib.sha256("héllo".encode()).hexdigest()


def test_a_file_is_unchanged_only_when_its_path_has_the_same_hash_and_stored_chunks():
    d = doc()
    same = {"content_hash": d.digest, "chunks": 2}
    assert unchanged(d, {d.source: same})
    assert not unchanged(d, {})
    assert not unchanged(d, {d.source: {**same, "content_hash": "0" * 64}})
    assert not unchanged(d, {d.source: {**same, "chunks": 0}})  # an add that did not finish
    assert not unchanged(d, {"/kb/other.md": same})


# The summary line ----------------------------------------------------------------------------


def test_summary_line_counts_files_chunks_unchanged_and_failures():
    tally = Tally(ingested=3, chunks=12, unchanged=1, failed=[(Path("/x"), "why")])
    assert tally.summary(2.345) == (
        "ingested 3 files (12 chunks), skipped 1 unchanged, 1 failed in 2.3 s")
    assert tally.exit_status == 1
    one = Tally(ingested=1, chunks=1, notes=[(Path("/y.png"), "not supported")])
    assert one.summary(0.04) == ("ingested 1 file (1 chunk), skipped 0 unchanged, 0 failed in "
                                 "0.0 s (1 other file skipped, see above)")
    assert one.exit_status == 0


# Uploads against a fake server ---------------------------------------------------------------


class FakeServer:
    """/api/documents in memory, with a number of 503s to answer first."""

    def __init__(self, busy: int = 0, existing: list[dict] | None = None) -> None:
        self.busy = busy
        self.posted: list[dict] = []
        self.existing = existing or []

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            offset = int(request.url.params["offset"])
            return httpx.Response(200, json={"documents": self.existing[offset:]})
        if self.busy:
            self.busy -= 1
            return httpx.Response(503, headers={"Retry-After": "0"},
                                  json={"error": {"code": "busy", "message": "busy"}})
        body = json.loads(request.content)
        if "refuse" in body["text"]:
            return httpx.Response(422, json={"error": {"code": "validation_error",
                                                       "message": "text: refused"}})
        self.posted.append(body)
        return httpx.Response(201, json={"document_id": "d", "chunks": 2})

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle),
                                 base_url="http://agentd")


async def test_upload_retries_503s_then_returns_the_chunks():
    server = FakeServer(busy=2)
    async with server.client() as client:
        with trio.fail_after(5):
            assert await upload(client, doc()) == 2
    assert len(server.posted) == 1 and server.posted[0]["source"] == "/kb/a.md"
    assert server.posted[0]["metadata"] == {"format": "md", "bytes": 5, "file_name": "a.md"}


async def test_upload_gives_up_with_the_servers_reason():
    async with FakeServer().client() as client:
        with trio.fail_after(5), pytest.raises(Unreadable, match="HTTP 422: text: refused"):
            await upload(client, doc("please refuse"))


def test_retry_delay_honours_retry_after_within_bounds():
    assert retry_delay(httpx.Response(503, headers={"Retry-After": "3"}), 0) == 3
    assert retry_delay(httpx.Response(503, headers={"Retry-After": "999"}), 0) == 10
    assert retry_delay(None, 2) == 2.0


async def test_ingest_files_uploads_changed_files_skips_unchanged_and_names_failures(tmp_path):
    for name, text in (("same.md", "kept"), ("new.md", "fresh"), ("bad.md", "refuse me")):
        (tmp_path / name).write_text(text)
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01")
    same = str(tmp_path / "same.md")
    server = FakeServer(existing=[{"source": same, "chunks": 1,
                                   "content_hash": hashlib.sha256(b"kept").hexdigest()}])
    async with server.client() as client:
        with trio.fail_after(10):
            tally = await ingest_files(client, discover([tmp_path]))
    assert [Path(p["source"]).name for p in server.posted] == ["new.md"]
    assert (tally.ingested, tally.chunks, tally.unchanged) == (1, 2, 1)
    failed = [(p.name, re.sub(r":.*", "", why)) for p, why in tally.failed]
    assert failed == [("bad.md", "HTTP 422")]
    assert [p.name for p, _ in tally.notes] == ["bin.txt"]
    assert tally.exit_status == 1


async def test_probe_says_nothing_runs_when_the_connection_is_refused():
    import socket

    with socket.socket() as s:  # a port bound but not listening refuses connections
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with trio.fail_after(10):
            assert await ingest.probe(f"http://127.0.0.1:{port}", {}) is False
