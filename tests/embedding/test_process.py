"""The real embedding process (`python -m app.child embedding`) with the real model.

One process serves the whole scenario, start to SIGTERM, because starting one costs 6–15 s
(importing torch and sentence-transformers); a second, shorter one checks the start-up
error for a collection of the wrong dimension; a third pair stops with a large ingest in
the encoder a second before its kill time, as under the supervisor (issue 7), and restarts.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
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


def _spawn(base: Path, log: str = "embedding.log", **env: str) -> Proc:
    return Proc([sys.executable, "-m", "app.child", "embedding"], base / log,
                env={**_env(base), **env})


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
    # Several batches (64, then 32 once draining): the drain carries on from one to the next.
    texts = [f"a long request, text {i}, still being embedded at SIGTERM" for i in range(96)]
    vectors: list[list[float]] = []

    async def in_flight() -> None:
        vectors.extend(await client.embed(texts))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_flight)
            while (await client.health())["in_flight"] == 0:
                await trio.sleep(0.005)
            proc.signal(signal.SIGTERM)
    assert len(vectors) == 96


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


#: The supervisor SIGTERMs the model layer once web and agent have exited, which is about this
#: long before the layer's kill time (AGENTD_SHUTDOWN_TIMEOUT=15: kill at 14 s, web and agent
#: gone by 13 s at the latest).
KILL_AFTER_S = 1.0


def _write_shutdown_file(path: Path, kill_in: float) -> float:
    """What supervisor/run.py writes at SIGTERM, for a shutdown well under way: the drain
    over, the model layer to be SIGKILLed in `kill_in` seconds. Its kill time (wall clock)."""
    now = time.time()
    kill_at = now + kill_in
    path.write_text(json.dumps({
        "signal_at": now - 13, "deadline": now + kill_in + 1, "drain_end": now - 3,
        "reason": "SIGTERM",
        "kill_at": {"edge": now - 1, "work": now - 1, "model": kill_at, "infra": kill_at + 1},
    }))
    return kill_at


def _long_points(owner: str, n: int) -> list[dict]:
    """`n` chunks of ~2,000 characters: the model reads 256 tokens of each, so a batch of 64
    takes seconds on a CPU."""
    document = str(uuid.uuid4())
    return [{"id": str(uuid.uuid4()), "document_id": document, "owner": owner, "chunk": i,
             "text": " ".join(f"word{(i * 131 + j) % 997} of chunk {i}" for j in range(100))}
            for i in range(n)]


async def test_sigterm_with_a_batch_in_the_encoder_exits_0_before_the_kill_time(private_dir):
    shutdown_file = private_dir / "run" / "shutdown.json"
    env = {"AGENTD_SHUTDOWN_TIMEOUT": "15", "AGENTD_SHUTDOWN_FILE": str(shutdown_file),
           "AGENTD_LAYER": "model"}
    listener = NotifyListener(str(private_dir / "notify.sock"))
    proc = _spawn(private_dir, "first.log", **env)
    kept = chunk_points(str(uuid.uuid4()), "Otters hold hands while they sleep.", owner="kept")
    outcome: list[BaseException | int] = []
    try:
        await _until_ready(listener, proc)
        async with EmbeddingClient(private_dir / "run" / "embedding.sock") as client:
            with trio.fail_after(60):
                assert await client.upsert(kept) == 1

            async def ingest() -> None:
                try:
                    outcome.append(await client.upsert(_long_points("ingest", 256)))
                except EmbeddingUnavailable as e:
                    outcome.append(e)

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ingest)
                    # The first 64 of its 256 texts are in the encoder, 192 wait.
                    while (await client.health())["queue_depth"] != 192:
                        await trio.sleep(0.005)
                    kill_at = _write_shutdown_file(shutdown_file, KILL_AFTER_S)
                    proc.signal(signal.SIGTERM)
                    # The supervisor's part: SIGKILL at the layer's kill time.
                    with trio.move_on_after(kill_at - time.time()):
                        await proc.wait(timeout=KILL_AFTER_S + 1)
                    exited_in = time.time() - (kill_at - KILL_AFTER_S)
                    proc.close()
        assert proc.popen.returncode == 0, (exited_in, proc.text()[-3000:])
        assert exited_in < KILL_AFTER_S
        assert len(outcome) == 1 and isinstance(outcome[0], EmbeddingUnavailable)
        [released] = proc.find("released")
        assert released["store_closed"] is True
        assert not (private_dir / "run" / "embedding.sock").exists()
    finally:
        proc.close()

    # The store is whole after a restart: the process opens it, finds what was committed,
    # and stores and finds new chunks.
    proc = _spawn(private_dir, "second.log", **env)
    try:
        await _until_ready(listener, proc)
        async with EmbeddingClient(private_dir / "run" / "embedding.sock") as client:
            with trio.fail_after(60):
                [found] = await client.search("animals holding hands", 5, "kept")
                assert found["document_id"] == kept[0]["document_id"]
                assert found["text"] == kept[0]["text"]
                assert await client.upsert(_long_points("after", 3)) == 3
                assert len(await client.search("word1 of chunk 1", 5, "after")) == 3
        shutdown_file.unlink()  # a plain SIGTERM now: the whole budget
        proc.signal(signal.SIGTERM)
        assert await proc.wait(timeout=20) == 0
        [released] = proc.find("released")
        assert released["store_closed"] is True and released["model_released"] is True
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
