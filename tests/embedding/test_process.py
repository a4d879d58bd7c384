"""The real embedding process (`python -m app.child embedding`) with the real model.

One process serves the whole scenario, start to SIGTERM, because starting one costs 6–15 s
(importing torch and sentence-transformers); a second, shorter one checks the start-up
error for a collection of the wrong dimension.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from typing import TYPE_CHECKING

import pytest
import trio

from app.embedding.chunking import chunk_points
from app.embedding.client import EmbeddingClient, EmbeddingUnavailable
from supervisor.notify import NotifyListener
from tests.support.procs import Proc

if TYPE_CHECKING:
    from pathlib import Path

START_S = 120
WATCHDOG_S = 10.0


def _env(base: Path) -> dict[str, str]:
    runtime = base / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return {
        "AGENTD_DATA_DIR": str(base / "data"),
        "AGENTD_RUNTIME_DIR": str(runtime),
        "AGENTD_LOG_FORMAT": "json",
        "AGENTD_SHUTDOWN_TIMEOUT": "10",
        "AGENTD_QDRANT_URL": "",
        "AGENTD_EMBEDDING_MODEL": "",
        "NOTIFY_SOCKET": str(base / "notify.sock"),
        "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6)),
    }


def _spawn(base: Path) -> Proc:
    return Proc([sys.executable, "-m", "app.child", "embedding"], base / "embedding.log",
                env=_env(base))


async def _until_ready(listener: NotifyListener, proc: Proc) -> tuple[list[float], dict]:
    """Watchdog pings (trio times) until READY=1, and the READY message."""
    pings: list[float] = []
    with trio.fail_after(START_S):
        while True:
            with trio.move_on_after(1):
                message = await listener.receive()
                if message.get("WATCHDOG") == "1":
                    pings.append(trio.current_time())
                if message.get("READY") == "1":
                    return pings, message
            if proc.popen.poll() is not None:
                raise AssertionError(f"exited {proc.popen.returncode}:\n{proc.text()[-4000:]}")


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def test_the_embedding_process_serves_batches_and_releases_on_sigterm(private_dir):
    listener = NotifyListener(str(private_dir / "notify.sock"))
    proc = _spawn(private_dir)
    try:
        started = trio.current_time()
        pings, ready = await _until_ready(listener, proc)
        # The loop kept pinging while torch was imported in a thread: no gap near the
        # watchdog interval (the supervisor SIGABRTs a child that misses it).
        gaps = [b - a for a, b in zip([started, *pings], [*pings, trio.current_time()],
                                      strict=True)]
        assert max(gaps) < WATCHDOG_S / 2, gaps
        assert "on cpu" in ready["STATUS"] or "on cuda" in ready["STATUS"]
        socket_path = private_dir / "run" / "embedding.sock"
        assert socket_path.is_socket()
        assert os.stat(socket_path).st_mode & 0o077 == 0

        async with EmbeddingClient(socket_path) as client:
            await _check_embed(client)
            await _check_store(client)
            await _check_batching(client)
            health = await client.health()
            assert health["store"] == f"local:{private_dir / 'data' / 'qdrant'}"
            with trio.fail_after(15):
                while "in flight" not in (listener.pending() or [{}])[-1].get("STATUS", ""):
                    await trio.sleep(0.5)
            await _check_sigterm_answers_the_request_in_flight(client, proc)
            with pytest.raises(EmbeddingUnavailable):
                await client.embed(["too late"])

        assert await proc.wait(timeout=15) == 0
        assert proc.find("draining")
        [released] = proc.find("released")
        assert released["model_released"] is True and released["store_closed"] is True
        assert released["store"].startswith("local:")
        assert "rss_bytes" in released["memory_after"]
        if released["device"] == "cuda":
            assert released["memory_after"]["cuda_allocated_bytes"] == 0  # I6
        assert not socket_path.exists()
        assert not proc.find("start_failed")
    finally:
        proc.close()
        listener.close()


async def _check_embed(client: EmbeddingClient) -> None:
    with trio.fail_after(30):
        cat, kitten, money = await client.embed([
            "A cat is sleeping on the sofa.",
            "A kitten naps on the couch.",
            "Quarterly revenue grew by five percent.",
        ])
    assert len(cat) == 384  # all-MiniLM-L6-v2
    assert _dot(cat, cat) == pytest.approx(1.0, abs=1e-4)  # normalised
    assert _dot(cat, kitten) > _dot(cat, money) + 0.2


async def _check_store(client: EmbeddingClient) -> None:
    cats, taxes = str(uuid.uuid4()), str(uuid.uuid4())
    points = chunk_points(cats, "Cats purr when they are content. They sleep a lot.",
                          owner="alice", source="cats.md", title="Cats")
    points += chunk_points(taxes, "Income tax is due in April.", owner="alice")
    points += chunk_points(str(uuid.uuid4()), "Cats purr and sleep.", owner="bob")
    with trio.fail_after(60):
        assert await client.upsert(points) == 3
        results = await client.search("why does my cat purr?", 5, "alice")
        assert [r["document_id"] for r in results] == [cats, taxes]
        assert results[0]["title"] == "Cats" and results[0]["score"] > results[1]["score"]
        await client.delete(cats)
        results = await client.search("why does my cat purr?", 5, "alice")
    assert [r["document_id"] for r in results] == [taxes]


async def _check_batching(client: EmbeddingClient) -> None:
    before = await client.health()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(48):
                nursery.start_soon(client.embed, [f"sentence number {i} about batching"])
    after = await client.health()
    batches = after["batches"] - before["batches"]
    texts = after["texts_embedded"] - before["texts_embedded"]
    assert texts == 48
    assert texts / batches > 1, (texts, batches)  # concurrent requests were coalesced
    assert after["mean_batch_size"] > 1


async def _check_sigterm_answers_the_request_in_flight(client: EmbeddingClient,
                                                       proc: Proc) -> None:
    texts = [f"a long request, text {i}, still being embedded at SIGTERM" for i in range(256)]
    vectors: list[list[float]] = []

    async def in_flight() -> None:
        vectors.extend(await client.embed(texts))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_flight)
            while (await client.health())["in_flight"] == 0:
                await trio.sleep(0.005)
            proc.signal(signal.SIGTERM)
    assert len(vectors) == 256


async def test_a_collection_of_another_dimension_stops_the_start_with_one_clear_line(
    private_dir,
):
    from app.embedding.store import open_store

    store = await open_store(dim=8, model="an-8-dim-model", path=private_dir / "data" / "qdrant")
    await store.aclose()
    listener = NotifyListener(str(private_dir / "notify.sock"))
    proc = _spawn(private_dir)
    try:
        assert await proc.wait(timeout=START_S) == 1
        [failed] = proc.find("start_failed")
        assert "8-dimensional" in failed["error"] and "384-dimensional" in failed["error"]
        assert "an-8-dim-model" in failed["error"] and "AGENTD_EMBEDDING_MODEL" in failed["error"]
        assert not any(m.get("READY") for m in listener.pending())
        assert proc.find("released")  # the model it had loaded was released all the same
    finally:
        proc.close()
        listener.close()


def test_cuda_memory_is_zero_after_release():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from app.embedding.service import load_model, resolve_model_name

    model = load_model(resolve_model_name(None), "cuda")
    assert torch.cuda.memory_allocated() > 0
    assert len(model.encode(["hello"])[0]) == model.dim
    report = model.release()
    assert torch.cuda.memory_allocated() == 0
    assert report["memory_after"]["cuda_allocated_bytes"] == 0
