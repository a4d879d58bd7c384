"""Micro-batching: coalesce concurrent embed requests into batches for one encoder.

A model encodes a batch of 64 sentences in about the time of 16 single calls (stack.md), so
requests that arrive together — from every web and agent process — are encoded together:

- A batch starts when `max_batch` texts are waiting, or once arrivals pause: `linger`
  after the last sign of activity, but never later than `max_wait` after the oldest
  waiting request arrived. It holds at most `max_batch` texts. A request larger than that
  is spread over consecutive batches, so a batch already in the encoder is always bounded
  by `max_batch` texts.
- Why a pause and not a fixed wait: concurrent requests do not arrive together. 64 sent at
  once by a client reach this process over a few milliseconds, and hypercorn then parses
  them side by side, a pass over all of them at a time, so they reach the batcher last and
  together, 30-60 ms after the first one (which came in alone, while the loop was idle).
  A fixed 5 ms wait started a batch of the first few, and the encoder — one batch at a
  time — spent ~50 ms on them while the rest queued behind it: two passes where one would
  do (bench/embed.py saw 7+57, then 1+63).
- Signs of activity: the newest waiting request's arrival, and a busy loop. When `linger`
  has passed with no arrival, the batcher lets the loop run two passes and times them: a
  quiet loop is back in tens of microseconds; one that is taking in a burst of requests
  (each pass parsing dozens of them) takes milliseconds, and the batch waits on. A lone
  request on a quiet loop still goes after only `linger`; `max_wait` bounds what a steady
  trickle or a busy loop can make the oldest wait.
- One batch at a time: a single loop (`serve`) takes a batch, awaits the encoder, routes
  each slice of vectors back to its request, and only then takes the next.
- A request cancelled before its texts went to the encoder leaves the queue; one cancelled
  while they are being encoded has its vectors discarded.
- Stopping: once the process drains, `shrink` makes batches smaller, so the encoder is
  free again sooner and requests cancelled at the drain deadline leave the queue instead of
  being encoded. Cancelling `serve` does not wait for the batch in the encoder: its worker
  thread is abandoned (`thread_encoder`), so a stop is never held up by a batch that takes
  seconds on a busy CPU.
- Back-pressure: at most `max_queue` texts wait; beyond that `embed` raises `Overloaded`
  at once instead of queueing work nobody will wait for.

What goes into the next batch and when it starts are pure functions (`plan_batch`,
`flush_deadline`, `loop_was_busy`), tested without a loop; `MicroBatcher` is the thin trio
part around them.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from app import metrics

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

Vector = list[float]
#: A checkpoint that takes longer than this to come back found the loop busy.
BUSY_ROUND_TRIP_S = 0.0005


class Overloaded(Exception):
    """The queue is full: the caller should back off and retry (HTTP 503)."""


class BatcherClosed(Exception):
    """The batcher is not running (not started yet, or stopped for shutdown)."""


class EncodeError(Exception):
    """The encoder failed on a batch this request was part of."""


# The decisions, pure --------------------------------------------------------------------


def plan_batch(remaining: Sequence[int], max_batch: int) -> list[int]:
    """How many texts of each waiting request (oldest first) go into the next batch.

    Requests are taken in arrival order until the batch is full; the last one taken may be
    split (its rest stays first in line). ``plan_batch([3, 70, 5], 64) == [3, 61]``.
    """
    counts: list[int] = []
    room = max_batch
    for waiting in remaining:
        if room <= 0:
            break
        take = min(waiting, room)
        counts.append(take)
        room -= take
    return counts


def flush_deadline(
    queued: int,
    oldest_arrival: float | None,
    last_activity: float | None,
    *,
    max_batch: int,
    max_wait: float,
    linger: float,
) -> float:
    """When the next batch should start: now if a full one waits; else `linger` after the
    last activity (the newest arrival, or a later moment the loop was seen busy), and at
    the latest `max_wait` after the oldest waiting request arrived; never (``inf``) while
    nothing waits."""
    if queued <= 0 or oldest_arrival is None or last_activity is None:
        return math.inf
    if queued >= max_batch:
        return -math.inf
    return min(oldest_arrival + max_wait, last_activity + linger)


def loop_was_busy(round_trip: float) -> bool:
    """Whether two scheduler passes that took `round_trip` seconds found other tasks
    running: on a quiet loop they take tens of microseconds (two I/O polls)."""
    return round_trip > BUSY_ROUND_TRIP_S


# The trio part --------------------------------------------------------------------------


class _Request:
    __slots__ = ("texts", "arrived", "sent", "received", "vectors", "done", "error", "gone")

    def __init__(self, texts: list[str], arrived: float) -> None:
        self.texts = texts
        self.arrived = arrived
        self.sent = 0  # texts handed to a batch
        self.received = 0  # vectors routed back
        self.vectors: list[Vector] = [[] for _ in texts]
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.gone = False  # the caller stopped waiting

    @property
    def unsent(self) -> int:
        return len(self.texts) - self.sent


@dataclass
class BatchStats:
    batches: int = 0
    texts: int = 0
    last_batch_size: int = 0
    max_batch_size: int = 0
    encode_seconds: float = 0.0
    overloaded: int = 0

    @property
    def mean_batch_size(self) -> float:
        return self.texts / self.batches if self.batches else 0.0

    @property
    def texts_per_second(self) -> float:
        return self.texts / self.encode_seconds if self.encode_seconds > 0 else 0.0


_Slice = tuple[_Request, int, int]


class MicroBatcher:
    def __init__(
        self,
        # Encodes a batch of texts into one vector each, in order (see `thread_encoder`).
        encode: Callable[[list[str]], Awaitable[list[Vector]]],
        *,
        max_batch: int = 64,
        max_wait: float = 0.05,
        linger: float = 0.003,
        max_queue: int = 1024,
    ) -> None:
        if max_batch < 1 or max_queue < max_batch or max_wait < 0 or linger < 0:
            raise ValueError("need max_batch >= 1, max_queue >= max_batch, max_wait >= 0, "
                             "linger >= 0")
        self._encode = encode
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_wait, self.linger = max_wait, min(linger, max_wait)
        self.stats = BatchStats()
        self._pending: deque[_Request] = deque()
        self._queued = 0  # texts waiting, not yet in a batch
        self._in_flight = 0  # requests whose caller is waiting
        self._current: list[_Slice] = []  # the batch in the encoder
        self._arrived = trio.Event()
        self._running = False

    def shrink(self, max_batch: int) -> None:
        """From now on, batches of at most `max_batch` texts (main.py: once draining)."""
        self.max_batch = max(1, min(self.max_batch, max_batch))
        if self._queued >= self.max_batch:
            self._arrived.set()

    @property
    def queue_depth(self) -> int:
        """Texts waiting for a batch."""
        return self._queued

    @property
    def in_flight(self) -> int:
        """Requests waiting for their vectors (queued or being encoded)."""
        return self._in_flight

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        """The vectors of `texts`, in order, encoded together with whatever else is waiting."""
        if not self._running:
            raise BatcherClosed("the embedding batcher is not running")
        if len(texts) > self.max_queue:
            raise ValueError(f"at most {self.max_queue} texts per request")
        if not texts:
            return []
        if self._queued + len(texts) > self.max_queue:
            self.stats.overloaded += 1
            raise Overloaded(f"{self._queued} texts already waiting (limit {self.max_queue})")
        request = _Request(list(texts), trio.current_time())
        self._pending.append(request)
        self._queued += len(texts)
        # The loop needs waking only for a first arrival (to start its timer) or a full
        # batch (to stop waiting). Any other arrival only moves the start later, which the
        # loop finds out when its timer fires and it recomputes the deadline.
        if len(self._pending) == 1 or self._queued >= self.max_batch:
            self._arrived.set()
        self._in_flight += 1
        try:
            await request.done.wait()
        finally:
            self._in_flight -= 1
            if not request.done.is_set():
                self._forget(request)
        if request.error is not None:
            raise request.error
        return request.vectors

    def _forget(self, request: _Request) -> None:
        """The caller left: drop what of its request is still queued, ignore the rest."""
        request.gone = True
        if request in self._pending:
            self._pending.remove(request)
            self._queued -= request.unsent

    def _fail(self, request: _Request, error: BaseException) -> None:
        if request.done.is_set():
            return
        if request in self._pending:
            self._pending.remove(request)
            self._queued -= request.unsent
        request.error = error
        request.done.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run batches until cancelled; then every waiting request fails with BatcherClosed."""
        self._running = True
        task_status.started()
        try:
            while True:
                await self._wait_for_batch()
                self._current = self._take()
                await self._run(self._current)
                self._current = []
        finally:
            self._running = False
            closed = BatcherClosed("the embedding service is shutting down")
            for request, _, _ in self._current:
                self._fail(request, closed)
            for request in list(self._pending):
                self._fail(request, closed)
            self._current = []

    async def _wait_for_batch(self) -> None:
        busy_at = -math.inf  # when the loop was last seen busy
        while True:
            oldest = self._pending[0].arrived if self._pending else None
            newest = self._pending[-1].arrived if self._pending else None
            last = None if newest is None else max(newest, busy_at)
            deadline = flush_deadline(self._queued, oldest, last, max_batch=self.max_batch,
                                      max_wait=self.max_wait, linger=self.linger)
            now = trio.current_time()
            if now >= deadline:
                if deadline == -math.inf or oldest is None or now >= oldest + self.max_wait:
                    return
                # Quiet for `linger`, as far as arrivals tell. Is the loop quiet too?
                await _two_passes()
                if not loop_was_busy(trio.current_time() - now):
                    return
                busy_at = trio.current_time()
                continue
            self._arrived = trio.Event()
            with trio.move_on_at(deadline):
                await self._arrived.wait()

    def _take(self) -> list[_Slice]:
        counts = plan_batch([r.unsent for r in self._pending], self.max_batch)
        batch: list[_Slice] = []
        for request, count in zip(list(self._pending), counts, strict=False):
            batch.append((request, request.sent, request.sent + count))
            request.sent += count
            self._queued -= count
            if request.unsent == 0:
                self._pending.popleft()
        return batch

    async def _run(self, batch: list[_Slice]) -> None:
        texts = [text for request, start, stop in batch for text in request.texts[start:stop]]
        started = trio.current_time()
        try:
            vectors = await self._encode(texts)
            if len(vectors) != len(texts):
                raise EncodeError(f"encoder returned {len(vectors)} vectors for {len(texts)}")
        except Exception as e:  # one bad batch fails its requests, not the service
            error = e if isinstance(e, EncodeError) else EncodeError(f"encoding failed: {e!r}")
            for request, _, _ in batch:
                self._fail(request, error)
            return
        finally:
            self._record(len(texts), trio.current_time() - started)
        position = 0
        for request, start, stop in batch:
            if not request.gone and not request.done.is_set():
                request.vectors[start:stop] = vectors[position : position + stop - start]
                request.received += stop - start
                if request.received == len(request.texts):
                    request.done.set()
            position += stop - start

    def _record(self, size: int, seconds: float) -> None:
        stats = self.stats
        stats.batches += 1
        stats.texts += size
        stats.last_batch_size = size
        stats.max_batch_size = max(stats.max_batch_size, size)
        stats.encode_seconds += seconds
        metrics.embedding_batch.observe(size)
        metrics.embedding_latency.observe(seconds)


async def _two_passes() -> None:
    """Let the loop run two passes. One is not enough: the tasks that the I/O poll before
    a pass wakes (requests just read) run in the same pass as we do, and maybe after us."""
    await trio.lowlevel.checkpoint()
    await trio.lowlevel.checkpoint()


def thread_encoder(
    encode: Callable[[list[str]], list[Vector]], limiter: trio.CapacityLimiter | None = None
) -> Callable[[list[str]], Awaitable[list[Vector]]]:
    """Run a blocking `encode` in a worker thread, one call at a time.

    Cancelled, the caller stops waiting at once and the thread is abandoned: it finishes
    its batch in the background and its vectors are dropped. Nothing can interrupt a
    model's forward pass, and a batch of 64 takes seconds on a busy CPU, more than the
    model layer's share of a shutdown (issue 7: SIGKILLed while it waited). It is safe:
    the limiter stays held until the thread has really finished, so no second batch
    starts beside it, and `service.Model` releases the model only under the lock its
    `encode` holds, so the model is never freed under a running batch.
    """
    one_at_a_time = limiter if limiter is not None else trio.CapacityLimiter(1)

    async def run(texts: list[str]) -> list[Vector]:
        return await trio.to_thread.run_sync(encode, texts, limiter=one_at_a_time,
                                             abandon_on_cancel=True)

    return run
