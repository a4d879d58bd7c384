"""The knowledge base through the whole tree: documents added, listed, replaced, deleted and
searched per user; the agent's search_knowledge_base tool; the local provider quoting
passages; `agentd ingest` against a running tree and with none (API.md: Knowledge base,
Command line, Agent behaviour).

Trees: one with two API keys (two users) and the scripted LLM; and a data dir that `agentd
ingest` starts its own tree on (twice), then a tree without an LLM on the same data dir.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psutil
import pytest
import trio

from app.web.documents import THREAD_CHARS
from tests.e2e.conftest import SHARED_ENV, AgentdTree, read_stream, tree_root

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

pytestmark = pytest.mark.slow

AGENTD = str(Path(sys.executable).with_name("agentd"))
SUMMARY = re.compile(r"^ingested (\d+) files? \((\d+) chunks?\), skipped (\d+) unchanged, "
                     r"(\d+) failed in [\d.]+ s", re.MULTILINE)
INGEST_S = 150  # a run that starts its own tree: its start (~20 s), the upload, its stop

CATS = ("Domestic cats sleep between twelve and sixteen hours a day, mostly in short naps, "
        "and are most active at dawn and dusk.")
VOLCANO = ("Mount Etna on Sicily is one of the most active volcanoes in the world; its "
           "eruptions are recorded as far back as 1500 BC.")
BREAD = "Sourdough bread rises thanks to wild yeast and lactic acid bacteria in the starter."


@pytest.fixture(scope="module")
def kb_tree(llm) -> Iterator[AgentdTree]:
    with tree_root("knowledge") as root:
        agentd = AgentdTree(root, llm.base_url, {**SHARED_ENV, "AGENTD_API_KEYS": "k1,k2"})
        try:
            agentd.start()
            yield agentd
            assert agentd.stop(timeout=20) == 0, agentd.text()[-3000:]
        finally:
            agentd.kill()


@pytest.fixture
async def alice(kb_tree) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=kb_tree.base_url, timeout=60,
                                 headers={"Authorization": "Bearer k1"}) as c:
        yield c


@pytest.fixture
async def bob(kb_tree) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=kb_tree.base_url, timeout=60,
                                 headers={"Authorization": "Bearer k2"}) as c:
        yield c


def unique(name: str) -> str:
    return f"/test/{name}-{uuid.uuid4().hex[:8]}.md"


async def add(client: httpx.AsyncClient, text: str, **fields: Any) -> dict[str, Any]:
    response = await client.post("/api/documents", json={"text": text, **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def search(client: httpx.AsyncClient, q: str, k: int = 10) -> list[dict[str, Any]]:
    response = await client.get("/api/search", params={"q": q, "k": k})
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    return results


async def listed(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    response = await client.get("/api/documents")
    assert response.status_code == 200, response.text
    return {d["document_id"]: d for d in response.json()["documents"]}


# Documents and search --------------------------------------------------------------------------


async def test_documents_are_listed_and_a_relevant_passage_ranks_first(alice):
    sources = {name: unique(name) for name in ("cats", "volcano", "bread")}
    with trio.fail_after(30):
        ids = {}
        for name, text in (("cats", CATS), ("volcano", VOLCANO), ("bread", BREAD)):
            added = await add(alice, text, source=sources[name], title=name.title(),
                              metadata={"topic": name})
            assert added["chunks"] == 1 and uuid.UUID(added["document_id"])
            ids[name] = added["document_id"]
        docs = await listed(alice)
        results = await search(alice, "How many hours per day do cats sleep?", k=3)
    cats = docs[ids["cats"]]
    assert cats["source"] == sources["cats"] and cats["title"] == "Cats"
    assert cats["chunks"] == 1 and cats["metadata"] == {"topic": "cats"} and cats["created_at"]
    assert results[0]["document_id"] == ids["cats"], results
    assert results[0]["text"] == CATS and results[0]["source"] == sources["cats"]
    assert results[0]["title"] == "Cats"
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and len(results) <= 3


async def test_the_same_source_again_keeps_its_id_and_replaces_its_chunks(alice):
    source = unique("replaced")
    old = " ".join(f"Paragraph {i} tells of the quartz mine at Pelican Ridge." for i in range(450))
    assert len(old) > THREAD_CHARS  # cut in a worker thread
    with trio.fail_after(30):
        first = await add(alice, old, source=source)
        assert first["chunks"] > 1
        second = await add(alice, "Pelican Ridge is now a nature reserve with herons.",
                           source=source, title="Reserve")
        hits = [r for r in await search(alice, "quartz mine at Pelican Ridge", k=20)
                if r["source"] == source]
        docs = await listed(alice)
    assert second == {"document_id": first["document_id"], "chunks": 1}
    assert [r["text"] for r in hits] == ["Pelican Ridge is now a nature reserve with herons."]
    mine = [d for d in docs.values() if d["source"] == source]
    assert len(mine) == 1 and mine[0]["chunks"] == 1 and mine[0]["title"] == "Reserve"


async def test_without_a_source_the_same_text_is_the_same_document(alice):
    text = f"Anonymous note {uuid.uuid4().hex}: the key is under the blue flowerpot."
    with trio.fail_after(20):
        first = await add(alice, text)
        second = await add(alice, text)
        other = await add(alice, text + " Or the red one.")
    assert first["document_id"] == second["document_id"] != other["document_id"]


async def test_a_deleted_document_is_gone_from_search_and_the_list(alice):
    with trio.fail_after(20):
        added = await add(alice, "The lighthouse at Cape Wrath was built in 1828.",
                          source=unique("lighthouse"))
        assert any(r["document_id"] == added["document_id"]
                   for r in await search(alice, "Cape Wrath lighthouse"))
        deleted = await alice.delete(f"/api/documents/{added['document_id']}")
        assert deleted.status_code == 204
        assert all(r["document_id"] != added["document_id"]
                   for r in await search(alice, "Cape Wrath lighthouse"))
        assert added["document_id"] not in await listed(alice)
        again = await alice.delete(f"/api/documents/{added['document_id']}")
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"


async def test_another_users_document_is_404_and_never_in_their_search(alice, bob):
    secret = f"Alice's locker code is {uuid.uuid4().int % 10**6:06d}, next to the gym."
    with trio.fail_after(30):
        added = await add(alice, secret, source=unique("secret"))
        bobs = await search(bob, secret)
        bob_delete = await bob.delete(f"/api/documents/{added['document_id']}")
        bob_docs = await listed(bob)
        tool = await bob.post("/api/tools/search_knowledge_base", json={"query": secret})
        alices = await search(alice, secret, k=1)
    assert all(r["document_id"] != added["document_id"] for r in bobs)
    assert bob_delete.status_code == 404 and added["document_id"] not in bob_docs
    assert tool.status_code == 200 and tool.json()["success"], tool.text
    assert all(p["document_id"] != added["document_id"]
               for p in tool.json()["result"]["passages"])
    assert alices[0]["document_id"] == added["document_id"]


@pytest.mark.parametrize("params", [
    {}, {"q": ""}, {"q": "   "}, {"q": "x" * 2001}, {"q": "cats", "k": "0"},
    {"q": "cats", "k": "101"}, {"q": "cats", "k": "many"}, {"q": "cats", "k": "2.5"},
])
async def test_bad_q_or_k_is_422_in_the_error_shape(alice, params):
    with trio.fail_after(10):
        response = await alice.get("/api/search", params=params)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error" and error["message"]


@pytest.mark.parametrize("body", [
    {"text": ""}, {"text": "  \n "}, {"text": "x", "metadata": [1]}, {"text": "x", "source": 5},
    {"text": "x", "title": "t" * 501}, {"source": "/no/text.md"},
])
async def test_bad_documents_are_422(alice, body):
    with trio.fail_after(10):
        response = await alice.post("/api/documents", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"


async def test_health_checks_the_embedding_process_and_metrics_count_its_batches(alice, kb_tree):
    with trio.fail_after(20):
        await add(alice, "Metrics count every embedding batch.", source=unique("metrics"))
        health = (await alice.get("/health")).json()
        metrics = (await alice.get("/metrics")).text
    assert health["checks"]["embedding"] == "ok", health
    count = re.search(r"^agentd_embedding_batch_size_count (\S+)$", metrics, re.MULTILINE)
    assert count and float(count.group(1)) > 0, metrics[-2000:]
    assert re.search(r"^agentd_embedding_seconds_count [1-9]", metrics, re.MULTILINE)


# The agent's tool ------------------------------------------------------------------------------


async def test_the_agents_tool_returns_the_runs_owners_passage_in_its_tool_result(alice, bob):
    fact = f"The harbour master of Port {uuid.uuid4().hex[:6]} keeps a tame seal named Oskar."
    source = unique("harbour")
    directive = ('[[script tokens=2 tool=search_knowledge_base:{"query":"who keeps a tame '
                 'seal named Oskar"}]]')
    with trio.fail_after(40):
        await add(alice, fact, source=source, title="Harbour")
        mine = await read_stream(alice, "POST", "/api/chat/stream",
                                 json={"message": f"Who keeps the seal? {directive}"})
        theirs = await read_stream(bob, "POST", "/api/chat/stream",
                                   json={"message": f"Who keeps the seal? {directive}"})
    [result] = [e.data for e in mine.events if e.type == "tool_result"]
    assert result["name"] == "search_knowledge_base" and "error" not in result, result
    top = result["result"]["passages"][0]
    assert top["text"] == fact and top["source"] == source and top["title"] == "Harbour"
    assert isinstance(top["score"], float)
    assert mine.ends[0].data["reason"] == "completed"
    [other] = [e.data for e in theirs.events if e.type == "tool_result"]
    assert fact not in json.dumps(other["result"]["passages"])


# agentd ingest ---------------------------------------------------------------------------------


def write_corpus(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"cats": folder / "cats.md", "etna": folder / "sub" / "etna.html"}
    files["etna"].parent.mkdir(exist_ok=True)
    files["cats"].write_text(f"# Cats\n\n{CATS}\n")
    files["etna"].write_text(f"<html><head><title>Etna</title></head><body><p>{VOLCANO}</p>"
                             "<script>var x = 1;</script></body></html>")
    (folder / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return files


def ingest_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AGENTD_", "OPENAI_", "LISTEN_", "NOTIFY_SOCKET"))}
    env.update(AGENTD_DATA_DIR=str(data_dir), AGENTD_LOG_FORMAT="json",
               AGENTD_SHUTDOWN_TIMEOUT="10", PYTHONUNBUFFERED="1", **extra)
    return env


async def run_ingest(args: list[str], env: dict[str, str], cwd: Path, timeout: float
                     ) -> tuple[int, str, str]:
    with trio.fail_after(timeout):
        done = await trio.run_process([AGENTD, "ingest", *args], env=env, cwd=cwd,
                                      capture_stdout=True, capture_stderr=True, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def summary(stdout: str) -> tuple[int, int, int, int]:
    match = SUMMARY.search(stdout)
    assert match, stdout
    ingested, chunks, unchanged, failed = (int(g) for g in match.groups())
    return ingested, chunks, unchanged, failed


async def test_ingest_against_a_running_tree_skips_unchanged_files_the_second_time(
    alice, kb_tree, tmp_path
):
    files = write_corpus(tmp_path / "corpus")
    env = ingest_env(tmp_path / "unused-var")
    args = ["--url", kb_tree.base_url, "--api-key", "k1", str(tmp_path / "corpus")]
    status, out, err = await run_ingest(args, env, tmp_path, 60)
    assert status == 0, (out, err)
    assert summary(out)[:1] == (2,) and summary(out)[2:] == (0, 0)
    assert "starting agentd" not in err and "logo.png" in err  # skipped with a note
    with trio.fail_after(20):
        hits = await search(alice, "an active volcano on Sicily", k=1)
    assert hits[0]["source"] == str(files["etna"].resolve()) and hits[0]["title"] == "Etna"
    assert "var x" not in hits[0]["text"] and "<p>" not in hits[0]["text"]

    files["cats"].write_text(f"# Cats\n\n{CATS} They also purr.\n")
    status, out, err = await run_ingest(args, env, tmp_path, 60)
    assert status == 0, (out, err)
    assert summary(out)[0] == 1 and summary(out)[2:] == (1, 0)


async def test_ingest_names_a_missing_path_and_exits_2(tmp_path):
    status, out, err = await run_ingest([str(tmp_path / "nope")], ingest_env(tmp_path),
                                        tmp_path, 30)
    assert status == 2 and out == ""
    assert err.strip().splitlines() == [f"agentd ingest: no such file or directory: "
                                        f"{tmp_path / 'nope'}"]


class LocalTree(AgentdTree):
    """A tree with no LLM configured: the local provider answers."""

    def _env(self) -> dict[str, str]:
        env = super()._env()
        for key in ("AGENTD_LLM_BASE_URL", "AGENTD_LLM_API_KEY", "AGENTD_LLM_MODEL"):
            env.pop(key)
        return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ingest_tree_ended_cleanly(data_dir: Path, starts: int) -> None:
    lines = (data_dir / "ingest-agentd.log").read_text().splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    ends = [e for e in events if e.get("event") == "shutdown_complete"]
    assert len(ends) == starts and all(e["exit_status"] == 0 for e in ends), ends
    supervisors = {e["pid"] for e in events if e.get("role") == "supervisor"}
    assert supervisors and not any(psutil.pid_exists(pid) for pid in supervisors)


async def test_ingest_with_no_agentd_starts_one_then_the_local_provider_quotes_it(llm):
    with tree_root("ingest-local") as root:
        files = write_corpus(root / "corpus")
        data_dir = root / "var"  # the data dir LocalTree(root) uses too
        env = ingest_env(data_dir, AGENTD_BIND=f"127.0.0.1:{free_port()}")
        status, out, err = await run_ingest([str(root / "corpus")], env, root, INGEST_S)
        assert status == 0, (out, err)
        assert "starting agentd" in err and summary(out) == (2, 2, 0, 0)
        ingest_tree_ended_cleanly(data_dir, 1)

        status, out, err = await run_ingest([str(root / "corpus")], env, root, INGEST_S)
        assert status == 0, (out, err)
        assert summary(out) == (0, 0, 2, 0)
        ingest_tree_ended_cleanly(data_dir, 2)

        agentd = LocalTree(root, llm.base_url, SHARED_ENV)
        try:
            agentd.start()
            async with httpx.AsyncClient(base_url=agentd.base_url, timeout=60) as client:
                with trio.fail_after(30):
                    response = await client.post("/api/chat", json={
                        "message": "How many hours a day do cats sleep?"})
            assert response.status_code == 200, response.text
            answer = response.json()["response"]
            assert "No LLM endpoint is configured" in answer and "AGENTD_LLM_BASE_URL" in answer
            assert f"From {files['cats'].resolve()}: “# Cats Domestic cats sleep" in answer
            assert agentd.stop(timeout=20) == 0
        finally:
            agentd.kill()
