"""batcher.py: the pure batching decision, and MicroBatcher with a fake encoder on virtual time."""

from __future__ import annotations

import math
import threading
import time

import pytest
import trio
import trio.testing

from app.embedding.batcher import (
    BatcherClosed,
    EncodeError,
    MicroBatcher,
    Overloaded,
    flush_deadline,
    loop_was_busy,
    plan_batch,
    thread_encoder,
)

ENCODE_S = 0.1  # virtual seconds one batch takes in the fake encoder


# The decision -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remaining", "max_batch", "expected"),
    [
        ([], 64, []),
        ([3], 64, [3]),
        ([3, 70, 5], 64, [3, 61]),
        ([64, 1], 64, [64]),
        ([200], 64, [64]),
        ([1] * 100, 64, [1] * 64),
        ([10, 20, 30], 64, [10, 20, 30]),
    ],
)
def test_plan_batch_takes_oldest_first_up_to_max_batch(remaining, max_batch, expected):
    assert plan_batch(remaining, max_batch) == expected


def test_flush_deadline():
    def deadline(queued: int, oldest: float | None, newest: float | None) -> float:
        return flush_deadline(queued, oldest, newest, max_batch=64, max_wait=0.025,
                              linger=0.003)

    assert deadline(0, None, None) == math.inf  # nothing waits
    assert deadline(1, 10.0, 10.0) == pytest.approx(10.003)  # a lone request: linger only
    # arrivals keep coming: linger after the newest ...
    assert deadline(3, 10.0, 10.002) == pytest.approx(10.005)
    # ... but never past max_wait after the oldest
    assert deadline(30, 10.0, 10.024) == pytest.approx(10.025)
    assert deadline(64, 10.0, 10.001) == -math.inf  # full: now
    assert deadline(100, 10.0, 10.001) == -math.inf


# MicroBatcher --------------------------------------------------------------------------


class FakeEncoder:
    """Vectors that name their text; records each batch and when it started."""

    def __init__(self, seconds: float = ENCODE_S) -> None:
        self.seconds = seconds
        self.batches: list[list[str]] = []
        self.started: list[float] = []
        self.gate: trio.Event | None = None
        self.fail_next = False

    async def __call__(self, texts: list[str]) -> list[list[float]]:
        self.batches.append(list(texts))
        self.started.append(trio.current_time())
        if self.gate is not None:
            await self.gate.wait()
        await trio.sleep(self.seconds)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        return [[float(len(t)), float(hash(t) % 1000)] for t in texts]


def vec(text: str) -> list[float]:
    return [float(len(text)), float(hash(text) % 1000)]


async def _started(nursery: trio.Nursery, **kw: object) -> tuple[MicroBatcher, FakeEncoder]:
    encoder = FakeEncoder()
    batcher = MicroBatcher(encoder, **kw)  # type: ignore[arg-type]
    await nursery.start(batcher.serve)
    return batcher, encoder


async def test_concurrent_requests_are_coalesced_and_routed_back(autojump_clock):
    results: dict[int, list[list[float]]] = {}
    async with trio.open_nursery() as nursery:
        batcher, encoder = await _started(nursery, max_batch=64, max_wait=0.005)

        async def one(i: int) -> None:
            results[i] = await batcher.embed([f"text {i}", f"more {i}"])

        with trio.fail_after(5):
            async with trio.open_nursery() as clients:
                for i in range(10):
                    clients.start_soon(one, i)
        nursery.cancel_scope.cancel()
    assert [len(b) for b in encoder.batches] == [20]
    for i in range(10):
        assert results[i] == [vec(f"text {i}"), vec(f"more {i}")]
    assert batcher.stats.batches == 1 and batcher.stats.mean_batch_size == 20


async def test_a_lone_request_waits_only_linger_then_goes(autojump_clock):
    async with trio.open_nursery() as nursery:
        batcher, encoder = await _started(nursery, max_batch=64, max_wait=0.025,
                                          linger=0.003)
        t0 = trio.current_time()
        with trio.fail_after(5):
            assert await batcher.embed(["a"]) == [vec("a")]
        assert encoder.started == [pytest.approx(t0 + 0.003)]
        assert trio.current_time() == pytest.approx(t0 + 0.003 + ENCODE_S)
        nursery.cancel_scope.cancel()


async def _trickle(batcher: MicroBatcher, count: int, every: float) -> None:
    """`count` single-text requests, one every `every` seconds, each waited for."""
    async with trio.open_nursery() as clients:
        for i in range(count):
            clients.start_soon(batcher.embed, [f"t{i}"])
            await trio.sleep(every)


async def test_requests_arriving_a_millisecond_apart_make_one_batch(autojump_clock):
    # 20 requests over 19 ms: the way 64 concurrent HTTP requests reach the batcher. A
    # fixed 5 ms wait would have encoded the first 6 alone, then the rest.
    async with trio.open_nursery() as nursery:
        batcher, encoder = await _started(nursery, max_batch=64, max_wait=0.025,
                                          linger=0.003)
        t0 = trio.current_time()
        with trio.fail_after(5):
            await _trickle(batcher, 20, 0.001)
        nursery.cancel_scope.cancel()
    assert [len(b) for b in encoder.batches] == [20]
    # it went `linger` after the last arrival
    assert encoder.started == [pytest.approx(t0 + 0.019 + 0.003)]


async def test_a_pause_longer_than_linger_starts_the_batch(autojump_clock):
    async with trio.open_nursery() as nursery:
        batcher, encoder = await _started(nursery, max_batch=64, max_wait=0.025,
                                          linger=0.003)
        with trio.fail_after(5):
            async with trio.open_nursery() as clients:
                clients.start_soon(_trickle, batcher, 3, 0.001)
                await trio.sleep(0.010)  # quiet: the three go
                clients.start_soon(_trickle, batcher, 2, 0.001)
        nursery.cancel_scope.cancel()
    assert [len(b) for b in encoder.batches] == [3, 2]


async def test_a_steady_trickle_waits_at_most_max_wait(autojump_clock):
    async with trio.open_nursery() as nursery:
        batcher, encoder = await _started(nursery, max_batch=64, max_wait=0.025,
                                          linger=0.003)
        t0 = trio.current_time()
        with trio.fail_after(5):
            await _trickle(batcher, 40, 0.002)  # never quiet for 3 ms
        nursery.cancel_scope.cancel()
    assert encoder.started[0] == pytest.approx(t0 + 0.025)  # the oldest waited max_wait
    assert len(encoder.batches[0]) == 13  # arrivals at 0, 2, ..., 24 ms
    assert sum(len(b) for b in encoder.batches) == 40


def test_loop_was_busy():
    assert not loop_was_busy(0.00003)  # two I/O polls on a quiet loop
    assert loop_was_busy(0.004)  # other tasks ran: a pass over dozens of requests


async def _busy_then_burst(clock: trio.testing.MockClock, batcher: MicroBatcher, passes: int,
                           burst: int) -> None:
    """What hypercorn taking in a burst looks like to the batcher: `passes` scheduler passes
    of 2 ms each (the clock jumps while the loop runs, as real time would), then `burst`
    requests reaching the batcher in one pass, each after 0.2 ms of parsing."""
    for _ in range(passes):
        clock.jump(0.002)
        await trio.lowlevel.checkpoint()

    async def parsed(i: int) -> None:
        clock.jump(0.0002)
        await batcher.embed([f"burst {i}"])

    async with trio.open_nursery() as clients:
        for i in range(burst):
            clients.start_soon(parsed, i)


async def test_a_batch_waits_while_the_loop_is_busy_taking_requests_in(autojump_clock):
    async with trio.open_nursery() as nursery:
        batcher, encoder = await _started(nursery, max_batch=64, max_wait=0.05, linger=0.003)
        with trio.fail_after(5):
            async with trio.open_nursery() as clients:
                clients.start_soon(batcher.embed, ["first, alone"])
                await trio.sleep(0.001)
                # 20 ms of parsing: far past `linger`, but the loop is never quiet
                clients.start_soon(_busy_then_burst, autojump_clock, batcher, 10, 20)
        nursery.cancel_scope.cancel()
    assert [len(b) for b in encoder.batches] == [21]  # not [1, 20]


async def test_a_busy_loop_holds_a_batch_back_at_most_max_wait(autojump_clock):
    async with trio.open_nursery() as nursery:
        batcher, encoder = await _started(nursery, max_batch=64, max_wait=0.05, linger=0.003)
        t0 = trio.current_time()
        with trio.fail_after(5):
            async with trio.open_nursery() as clients:
                clients.start_soon(batcher.embed, ["first"])
                await trio.sleep(0.001)
                clients.start_soon(_busy_then_burst, autojump_clock, batcher, 100, 1)
        nursery.cancel_scope.cancel()
    assert [len(b) for b in encoder.batches] == [1, 1]
    # max_wait, then at most the busy pass it ends in and the two passes of a probe
    assert t0 + 0.05 <= encoder.started[0] <= t0 + 0.05 + 3 * 0.002 + 1e-9


async def test_a_full_batch_goes_at_once_and_the_rest_follows(autojump_clock):
    async with trio.open_nursery() as nursery:
        batcher, encoder = await _started(nursery, max_batch=64, max_wait=0.005)
        t0 = trio.current_time()
        with trio.fail_after(5):
            async with trio.open_nursery() as clients:
                for i in range(100):
                    clients.start_soon(batcher.embed, [f"t{i}"])
        nursery.cancel_scope.cancel()
    assert [len(b) for b in encoder.batches] == [64, 36]
    assert encoder.started[0] == pytest.approx(t0)  # full: no max_wait
    # The rest waited while the first batch was encoding: longer than max_wait, so it went
    # as soon as the encoder was free (one batch at a time).
    assert encoder.started[1] == pytest.approx(t0 + ENCODE_S)
    assert batcher.stats.max_batch_size == 64 and batcher.stats.last_batch_size == 36


async def test_a_large_request_is_spread_over_batches_in_order(autojump_clock):
    texts = [f"text number {i}" for i in range(150)]
    async with trio.open_nursery() as nursery:
        batcher, encoder = await _started(nursery, max_batch=64, max_wait=0.005)
        with trio.fail_after(5):
            vectors = await batcher.embed(texts)
        nursery.cancel_scope.cancel()
    assert [len(b) for b in encoder.batches] == [64, 64, 22]
    assert vectors == [vec(t) for t in texts]


async def test_a_request_cancelled_before_encoding_drops_out_of_its_batch(autojump_clock):
    async with trio.open_nursery() as nursery:
        batcher, encoder = await _started(nursery, max_batch=64, max_wait=0.05, linger=0.05)
        with trio.fail_after(5):
            async with trio.open_nursery() as clients:
                leaver = trio.CancelScope()
                clients.start_soon(_embed_in, batcher, ["leaves"], leaver)
                await trio.sleep(0.01)
                assert batcher.queue_depth == 1
                leaver.cancel()
                await trio.testing.wait_all_tasks_blocked()
                assert batcher.queue_depth == 0
                assert await batcher.embed(["stays"]) == [vec("stays")]
        nursery.cancel_scope.cancel()
    assert encoder.batches == [["stays"]]


async def _embed_in(batcher: MicroBatcher, texts: list[str], scope: trio.CancelScope) -> None:
    with scope:
        await batcher.embed(texts)
        raise AssertionError("should have been cancelled")


async def test_a_request_cancelled_while_encoding_is_discarded(autojump_clock):
    async with trio.open_nursery() as nursery:
        batcher, encoder = await _started(nursery, max_batch=64, max_wait=0.005)
        kept: list[list[float]] = []
        with trio.fail_after(5):
            async with trio.open_nursery() as clients:
                leaver = trio.CancelScope()
                clients.start_soon(_embed_in, batcher, ["leaves"], leaver)

                async def stays() -> None:
                    kept.extend(await batcher.embed(["stays"]))

                clients.start_soon(stays)
                await trio.sleep(0.005 + ENCODE_S / 2)  # the batch is in the encoder
                assert len(encoder.batches) == 1 and batcher.in_flight == 2
                leaver.cancel()
        assert kept == [vec("stays")]
        assert [sorted(b) for b in encoder.batches] == [["leaves", "stays"]]
        assert batcher.in_flight == 0
        # and the batcher carries on
        with trio.fail_after(5):
            assert await batcher.embed(["next"]) == [vec("next")]
        nursery.cancel_scope.cancel()


async def test_a_full_queue_refuses_at_once(autojump_clock):
    async with trio.open_nursery() as nursery:
        batcher, encoder = await _started(nursery, max_batch=4, max_wait=0.005, max_queue=8)
        encoder.gate = trio.Event()  # the encoder is stuck on the first batch
        nursery.start_soon(batcher.embed, ["a"] * 4)
        await trio.sleep(0.01)
        assert len(encoder.batches) == 1 and batcher.queue_depth == 0
        nursery.start_soon(batcher.embed, ["b"] * 8)
        await trio.sleep(0.01)
        assert batcher.queue_depth == 8
        t0 = trio.current_time()
        with pytest.raises(Overloaded):
            await batcher.embed(["c"])
        assert trio.current_time() == t0  # immediately, no waiting
        assert batcher.stats.overloaded == 1
        encoder.gate.set()
        await trio.sleep(1)
        assert batcher.queue_depth == 0
        assert await batcher.embed(["c"]) == [vec("c")]  # room again
        nursery.cancel_scope.cancel()


async def test_an_encoder_failure_fails_its_batch_only(autojump_clock):
    async with trio.open_nursery() as nursery:
        batcher, encoder = await _started(nursery)
        encoder.fail_next = True
        with trio.fail_after(5):
            with pytest.raises(EncodeError, match="boom"):
                await batcher.embed(["x"])
            assert await batcher.embed(["y"]) == [vec("y")]
        nursery.cancel_scope.cancel()


async def test_stopping_fails_waiting_requests_and_refuses_new_ones(autojump_clock):
    errors: list[BaseException] = []
    encoder = FakeEncoder()
    encoder.gate = trio.Event()
    batcher = MicroBatcher(encoder, max_batch=2, max_wait=0.005)  # type: ignore[arg-type]

    async def client(texts: list[str]) -> None:
        try:
            await batcher.embed(texts)
        except BatcherClosed as e:
            errors.append(e)

    with pytest.raises(BatcherClosed):
        await batcher.embed(["before start"])
    async with trio.open_nursery() as outer, trio.open_nursery() as serving:
        await serving.start(batcher.serve)
        outer.start_soon(client, ["in the encoder", "too"])
        outer.start_soon(client, ["queued"])
        await trio.sleep(0.01)
        assert batcher.queue_depth == 1 and batcher.in_flight == 2
        serving.cancel_scope.cancel()
    assert len(errors) == 2
    with pytest.raises(BatcherClosed):
        await batcher.embed(["after stop"])


async def test_empty_request_needs_no_batch(autojump_clock):
    async with trio.open_nursery() as nursery:
        batcher, encoder = await _started(nursery)
        assert await batcher.embed([]) == []
        nursery.cancel_scope.cancel()
    assert encoder.batches == []


async def test_thread_encoder_runs_one_batch_at_a_time_in_a_worker_thread():
    active, peak, threads = 0, 0, set()
    lock = threading.Lock()

    def encode(texts: list[str]) -> list[list[float]]:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        threads.add(threading.get_ident())
        time.sleep(0.02)
        with lock:
            active -= 1
        return [[1.0] for _ in texts]

    run = thread_encoder(encode)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(run, ["x"])
    assert peak == 1
    assert threading.get_ident() not in threads


async def test_cancelling_serve_abandons_the_batch_in_the_worker_thread():
    # The encoder is stuck (a long batch on a busy CPU): stopping must not wait for it.
    started, finish = threading.Event(), threading.Event()

    def encode(texts: list[str]) -> list[list[float]]:
        started.set()
        finish.wait(10)
        return [[1.0] for _ in texts]

    batcher = MicroBatcher(thread_encoder(encode), max_batch=4, max_wait=0.001, linger=0.001)
    errors: list[BaseException] = []

    async def client() -> None:
        try:
            await batcher.embed(["a"] * 4)
        except BatcherClosed as e:
            errors.append(e)

    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as outer, trio.open_nursery() as serving:
                await serving.start(batcher.serve)
                outer.start_soon(client)
                await trio.to_thread.run_sync(started.wait, 5)
                began = time.monotonic()
                serving.cancel_scope.cancel()
            assert time.monotonic() - began < 1
            assert not finish.is_set() and len(errors) == 1  # told, while the thread runs
    finally:
        finish.set()


async def test_shrink_makes_the_following_batches_small(autojump_clock):
    async with trio.open_nursery() as nursery:
        batcher, encoder = await _started(nursery, max_batch=64, max_wait=0.005)
        encoder.gate = trio.Event()
        with trio.fail_after(5):
            async with trio.open_nursery() as clients:
                clients.start_soon(batcher.embed, ["first"] * 10)
                await trio.sleep(0.01)  # in the encoder, stuck
                clients.start_soon(batcher.embed, ["rest"] * 40)
                await trio.sleep(0.01)
                batcher.shrink(16)
                encoder.gate.set()
        nursery.cancel_scope.cancel()
    assert [len(b) for b in encoder.batches] == [10, 16, 16, 8]
    batcher.shrink(100)  # never larger than it was
    assert batcher.max_batch == 16
