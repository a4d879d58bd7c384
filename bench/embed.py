"""Embedding throughput, search latency and ingest rate: the real embedding process measured.

    .venv/bin/python bench/embed.py            # 10k / 100k chunks
    .venv/bin/python bench/embed.py --quick    # 2k / 20k chunks, 5 rounds of (a)
    .venv/bin/python bench/embed.py --quick --large 100000   # quick, but the 100k search too

Time goes mostly into the real chunks of (b), embedded and persisted through the service, and
the naive rounds of (a): --quick took 6 min on 2 cores at load 5-8 (other test runs); the full
run's 10k real chunks alone take 1-2 min on an idle 2-core host, 6+ min on a busy one.

One run starts the real embedding process (`python -m app.child embedding`, local Qdrant in a
temporary data dir) and loads the same model in this process, then measures:

(a) throughput, texts/s: 64 concurrent single-text /embed requests (64 trio tasks, one
    EmbeddingClient) against the same 64 texts as one offline `Model.encode` batch here (the
    service's own encode: batch_size = len(texts), normalised), and against the naive way
    (64 sequential single-text `Model.encode` calls). A round is offline, service, offline,
    naive; its ratio is the service against the mean of the two offline batches around it,
    and medians over `--repeats` rounds are printed. The batch sizes are the service's own
    /health counters, and so is its encoder's busy time; the client's CPU per request is
    this process's CPU time during a service round.
(b) search latency, ms, k=5 with the owner filter agentd always sets:
    - through the service (/search: HTTP + embedding the query + the store) over `--small`
      real chunks upserted through the service into its persistent local store;
    - through app/embedding/store.py's VectorStore in this process over `--small` and
      `--large` random unit vectors with real query vectors (embedded here), in a local
      Qdrant *in memory*: local mode's search runs on in-memory arrays whether or not it
      persists, but persisting writes (and commits) SQLite once per point, which would take
      far too long for 100k points; the figure without the owner filter is a comparison only.
(c) ingest, chunks/s: chunk (chunking.chunk_points) + embed + upsert through the service,
    for `--ingest-kb` of text in 10 KB documents, one document at a time and 4 at a time;
    and the embedding alone (/embed of the same chunk texts), for the store's share.

Numbers only: nothing here passes or fails. The host load average is printed with each
phase: other work on the machine slows every figure, the service's and offline's alike.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.embedding.chunking import chunk_points  # noqa: E402
from app.embedding.client import EmbeddingClient  # noqa: E402
from tests.support.procs import Proc  # noqa: E402

CONCURRENT = 64
START_S = 180
TARGET_RATIO = 0.8  # service / offline
NAIVE_RATIO = 0.25  # the naive way / offline, roughly (stack.md)
UPSERT_CONCURRENCY = 4
OWNER = "bench"

_WORDS = (
    "the a of to and in that is for it on with as was at by be this from or have an they which "
    "one you were all we when there can more if no out so said what up its about into than "
    "them only other new some could time these two may first then do any like my now over "
    "such our man me even most made after also did many before must through back years where "
    "much your way well down should because each just those people how too little state good "
    "very make world still own see men work long get here between both life being under never "
    "day same another know while last might us great old year off come since against go came "
    "right used take three states himself few house use during without again place american "
    "around however home small found thought went say part once general high upon school "
    "every does got united left number course war until always away something fact though "
    "water less public put think almost hand enough far took head yet government system "
    "better set told nothing night end why called didn't eyes find going look asked later "
    "knew point next program city business give group toward young days let room president "
    "side social given present several order national possible rather second face per among "
    "form important often things looked early white case john become large big need four "
    "within felt children along saw best church ever least power development light thing "
    "seemed family interest want members mind country area others done turned although open "
    "god service problem certain kind different thus began door help means sense whole matter "
    "perhaps itself york times law human line above name example action company local show "
    "whether five history gave today either act feet across taken past quite anything seen "
    "having death week experience body word half really field am car words already themselves "
    "information tell together college shall money period held keep sure probably free seems "
    "real behind cannot miss political air question making office brought whose special major "
    "heard problems federal became study ago moment available known result street economic "
    "boy position reason change south board individual job areas society west close turn love"
)
WORDS = _WORDS.split()


# Synthetic text -------------------------------------------------------------------------


def sentence(rng: random.Random, lo: int = 12, hi: int = 22) -> str:
    words = rng.choices(WORDS, k=rng.randint(lo, hi))
    return " ".join(words).capitalize() + "."


def chunk_texts(n: int, seed: int) -> list[str]:
    """`n` distinct chunk-like texts (one or two sentences, ~100-250 characters)."""
    rng = random.Random(seed)
    return [f"{sentence(rng)} {sentence(rng, 4, 10)} ({i})" for i in range(n)]


def document(rng: random.Random, chars: int) -> str:
    paragraphs: list[str] = []
    size = 0
    while size < chars:
        paragraph = " ".join(sentence(rng) for _ in range(rng.randint(3, 7)))
        paragraphs.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(paragraphs)


def queries(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(5, 10))) + "?" for _ in range(n)]


# Figures --------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: with fewer than 100 values, p99 is the largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f} on {os.cpu_count()} cores"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Throughput:
    service: list[float] = field(default_factory=list)
    offline: list[float] = field(default_factory=list)
    naive: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # service / its round's offline
    round_batches: list[int] = field(default_factory=list)
    round_mean_batch: list[float] = field(default_factory=list)
    round_sizes: list[str] = field(default_factory=list)  # "first+last" when 2 batches
    round_wall_s: list[float] = field(default_factory=list)
    round_encoder_s: list[float] = field(default_factory=list)  # the service's encoder busy
    round_client_cpu_s: list[float] = field(default_factory=list)  # this process, the client
    health: dict[str, Any] = field(default_factory=dict)
    load: str = ""


@dataclass
class Latency:
    what: str
    chunks: int
    ms: list[float]
    load: str

    def row(self) -> str:
        p50, p99 = percentile(self.ms, 50), percentile(self.ms, 99)
        return (f"  {self.what:<52} {self.chunks:>7,} {len(self.ms):>4} {p50:>9.1f} "
                f"{p99:>9.1f}   {self.load}")


@dataclass
class Rate:
    what: str
    count: int
    seconds: float
    load: str

    @property
    def per_s(self) -> float:
        return self.count / self.seconds if self.seconds else float("nan")

    def row(self) -> str:
        return (f"  {self.what:<52} {self.count:>7,} {self.seconds:>8.1f} s "
                f"{self.per_s:>8.1f}/s   {self.load}")


@dataclass
class Results:
    throughput: Throughput = field(default_factory=Throughput)
    latencies: list[Latency] = field(default_factory=list)
    rates: list[Rate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# The service ----------------------------------------------------------------------------


def spawn_service(base: Path) -> Proc:
    runtime = base / "run"
    runtime.mkdir(mode=0o700)
    env = {
        "AGENTD_DATA_DIR": str(base / "data"),
        "AGENTD_RUNTIME_DIR": str(runtime),
        "AGENTD_LOG_FORMAT": "json",
        "AGENTD_SHUTDOWN_TIMEOUT": "10",
        "AGENTD_QDRANT_URL": "",
        "AGENTD_EMBEDDING_MODEL": "",
        "AGENTD_EMBEDDING_DEVICE": "cpu",
        "NOTIFY_SOCKET": "",
        "WATCHDOG_USEC": "",
        "AGENTD_SHUTDOWN_FILE": "",
    }
    return Proc([sys.executable, "-m", "app.child", "embedding"], base / "embedding.log", env=env)


async def stop_service(proc: Proc) -> None:
    if proc.popen.poll() is None:
        proc.signal(signal.SIGTERM)
        try:
            code = await proc.wait(timeout=30)
            say(f"embedding process exited {code}")
        except trio.TooSlowError:
            say("embedding process did not stop within 30 s: killed")
    proc.close()  # SIGKILL by PID if still alive


# (a) throughput -------------------------------------------------------------------------


async def measure_throughput(client: EmbeddingClient, model: Any, repeats: int,
                             out: Throughput) -> None:
    texts = chunk_texts(CONCURRENT, seed=1)
    texts = [t.rsplit(" (", 1)[0] for t in texts]  # sentences of 16-32 words

    def encoder_s(health: dict[str, Any]) -> float:
        """Seconds the service's encoder has spent so far (texts / texts per second)."""
        rate = health["texts_per_second"]
        return health["texts_embedded"] / rate if rate else 0.0

    async def service_round() -> tuple[float, int, int]:
        before = await client.health()
        began, cpu = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as nursery:
            for text in texts:
                nursery.start_soon(client.embed, [text])
        elapsed = time.perf_counter() - began
        out.round_client_cpu_s.append(time.process_time() - cpu)
        after = await client.health()
        batches = after["batches"] - before["batches"]
        embedded = after["texts_embedded"] - before["texts_embedded"]
        last = after["last_batch_size"]
        out.round_sizes.append(f"{embedded - last}+{last}" if batches == 2 else f"{batches}")
        out.round_wall_s.append(elapsed)
        out.round_encoder_s.append(encoder_s(after) - encoder_s(before))
        return elapsed, batches, embedded

    def offline_round() -> float:
        began = time.perf_counter()
        model.encode(texts)
        return time.perf_counter() - began

    def naive_round() -> float:
        began = time.perf_counter()
        for text in texts:
            model.encode([text])
        return time.perf_counter() - began

    # Warm-up: the client's 64 connections, the allocator, the model's first batch of 64.
    await service_round()
    del out.round_sizes[:], out.round_wall_s[:], out.round_encoder_s[:]
    del out.round_client_cpu_s[:]
    offline_round()
    for text in texts[:4]:
        model.encode([text])
    # Each round puts the service between two offline batches and compares it with their
    # mean: the host's load changes from second to second (other test runs).
    for r in range(repeats):
        before = offline_round()
        elapsed, batches, embedded = await service_round()
        after = offline_round()
        out.service.append(CONCURRENT / elapsed)
        out.round_batches.append(batches)
        out.round_mean_batch.append(embedded / batches if batches else float("nan"))
        out.offline += [CONCURRENT / before, CONCURRENT / after]
        out.ratios.append((before + after) / 2 / elapsed)
        out.naive.append(CONCURRENT / naive_round())
        say(f"(a) round {r + 1}/{repeats}: service {out.service[-1]:.0f}/s "
            f"({batches} batches), offline {out.offline[-2]:.0f}/s and {out.offline[-1]:.0f}/s"
            f" (ratio {out.ratios[-1]:.2f}), naive {out.naive[-1]:.0f}/s")
    out.health = await client.health()
    out.load = load()


# (b) search latency ---------------------------------------------------------------------


async def upsert_through_service(client: EmbeddingClient, n: int) -> Rate:
    texts = chunk_texts(n, seed=2)
    document_id = str(uuid.uuid4())
    points = [{"id": str(uuid.uuid4()), "text": text, "document_id": document_id,
               "owner": OWNER, "source": "bench", "title": "bench", "chunk": i}
              for i, text in enumerate(texts)]
    parts = [points[i : i + 256] for i in range(0, n, 256)]
    done = 0
    began = time.perf_counter()

    async def worker(receive: trio.MemoryReceiveChannel[list[dict[str, Any]]]) -> None:
        nonlocal done
        async for part in receive:
            stored = await client.upsert(part)  # not `done += await ...`: read before the await
            done += stored
            if done % 2560 < len(part):
                say(f"(b) upserted {done:,}/{n:,} through the service "
                    f"({done / (time.perf_counter() - began):.0f}/s)")

    send, receive = trio.open_memory_channel[list[dict[str, Any]]](len(parts))
    for part in parts:
        send.send_nowait(part)
    send.close()
    async with trio.open_nursery() as nursery:
        for _ in range(UPSERT_CONCURRENCY):
            nursery.start_soon(worker, receive.clone())
    return Rate(f"upsert {n:,} real chunks via service (persistent local)", done,
                time.perf_counter() - began, load())


async def search_through_service(client: EmbeddingClient, n: int, count: int) -> Latency:
    ms = []
    for query in queries(count, seed=3):
        began = time.perf_counter()
        results = await client.search(query, 5, OWNER)
        ms.append((time.perf_counter() - began) * 1000)
        assert len(results) == 5
    return Latency("service /search (HTTP+embed query+store), real", n, ms, load())


async def random_store(n: int, dim: int) -> tuple[Any, float]:
    """A store.py VectorStore over an in-memory local Qdrant holding `n` random unit vectors."""
    import numpy as np
    from qdrant_client import QdrantClient

    from app.embedding.store import VectorStore, _ensure_collection

    client = QdrantClient(location=":memory:")
    _ensure_collection(client, where="memory", dim=dim, model="random")
    store = VectorStore(client, where="memory", dim=dim, local=True)
    rng = np.random.default_rng(n)
    document_id = str(uuid.uuid4())
    began = time.perf_counter()
    step = 2048
    for start in range(0, n, step):
        vectors = rng.standard_normal((min(step, n - start), dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        points = [{"id": str(uuid.uuid4()), "text": f"random chunk {start + i}",
                   "document_id": document_id, "owner": OWNER, "source": "bench",
                   "title": "random", "chunk": start + i} for i in range(len(vectors))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "local mode ... > 20,000 points"
            await store.upsert(points, vectors.tolist())
    return store, time.perf_counter() - began


async def search_store(store: Any, n: int, query_vectors: list[list[float]],
                       filtered: bool = True) -> Latency:
    from app.embedding.store import COLLECTION

    ms = []
    for vector in query_vectors:
        began = time.perf_counter()
        if filtered:
            results = await store.search(vector, k=5, owner=OWNER)
        else:  # comparison only: agentd always filters by owner
            query = partial(store._client.query_points, COLLECTION, query=vector, limit=5)
            results = (await trio.to_thread.run_sync(query)).points
        ms.append((time.perf_counter() - began) * 1000)
        assert len(results) == 5
    what = ("store.search, random vectors, real queries (memory)" if filtered
            else "  same, WITHOUT the owner filter (comparison)")
    return Latency(what, n, ms, load())


# (c) ingest -----------------------------------------------------------------------------


async def measure_ingest(client: EmbeddingClient, kb: int, out: Results) -> None:
    rng = random.Random(4)
    documents = [document(rng, 10_000) for _ in range(max(1, kb // 10))]
    chars = sum(len(d) for d in documents)

    def points_of(doc: str) -> list[Any]:
        return chunk_points(str(uuid.uuid4()), doc, owner="ingest", source="bench.md",
                            title="bench")

    began = time.perf_counter()
    all_points = [points_of(doc) for doc in documents]
    chunk_s = time.perf_counter() - began
    chunks = sum(len(p) for p in all_points)
    out.notes.append(f"(c) {len(documents)} documents, {chars / 1000:.0f} KB, {chunks} chunks "
                     f"of ~{chars // max(1, chunks)} characters; chunking alone "
                     f"{chunk_s * 1000:.0f} ms")

    began = time.perf_counter()
    count = 0
    for doc in documents:
        count += await client.upsert(points_of(doc))
    out.rates.append(Rate("ingest (chunk+embed+upsert), 1 document at a time", count,
                          time.perf_counter() - began, load()))
    say(f"(c) sequential: {out.rates[-1].per_s:.0f} chunks/s")

    count = 0
    limiter = trio.CapacityLimiter(4)

    async def ingest(doc: str) -> None:
        nonlocal count
        async with limiter:
            stored = await client.upsert(points_of(doc))
        count += stored

    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for doc in documents:
            nursery.start_soon(ingest, doc)
    out.rates.append(Rate("ingest (chunk+embed+upsert), 4 documents at a time", count,
                          time.perf_counter() - began, load()))
    say(f"(c) 4 at a time: {out.rates[-1].per_s:.0f} chunks/s")

    texts = [p["text"] for points in all_points for p in points]
    began = time.perf_counter()
    await client.embed(texts)
    out.rates.append(Rate("  embedding alone (/embed of the same chunks)", len(texts),
                          time.perf_counter() - began, load()))


# The run --------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> Results:
    from app.embedding.service import load_model, resolve_model_name

    results = Results()
    base = Path(tempfile.mkdtemp(prefix="agentd-bench-embed-", dir="/tmp"))
    proc = spawn_service(base)
    try:
        say(f"starting the embedding process and loading the model here ({load()})")
        began = time.perf_counter()
        model = await trio.to_thread.run_sync(load_model, resolve_model_name(None), "cpu")
        await proc.wait_event("ready", timeout=START_S)
        say(f"both ready in {time.perf_counter() - began:.1f} s")
        async with EmbeddingClient(base / "run" / "embedding.sock", timeout=120) as client:
            await measure_throughput(client, model, args.repeats, results.throughput)

            say(f"(b) {args.small:,} real chunks through the service ({load()})")
            results.rates.append(await upsert_through_service(client, args.small))
            results.latencies.append(
                await search_through_service(client, args.small, args.queries))
            say(f"(b) service search p50 {percentile(results.latencies[-1].ms, 50):.0f} ms")

            query_vectors = model.encode(queries(args.queries, seed=5))
            for n, count in ((args.small, args.queries),
                             (args.large, max(10, args.queries // 2))):
                say(f"(b) {n:,} random vectors into an in-memory store ({load()})")
                store, insert_s = await random_store(n, model.dim)
                results.notes.append(f"(b) {n:,} random vectors into the in-memory store "
                                     f"in {insert_s:.1f} s")
                results.latencies.append(await search_store(store, n, query_vectors[:count]))
                say(f"(b) store search at {n:,}: p50 "
                    f"{percentile(results.latencies[-1].ms, 50):.0f} ms")
                results.latencies.append(
                    await search_store(store, n, query_vectors[:count], filtered=False))
                await store.aclose()
                del store

            say(f"(c) ingest {args.ingest_kb} KB ({load()})")
            await measure_ingest(client, args.ingest_kb, results)
        await stop_service(proc)
        released = proc.find("released")
        if released:
            results.notes.append(f"service stopped: released {released[0].get('store')}, "
                                 f"store_closed={released[0].get('store_closed')}")
    finally:
        await stop_service(proc)
        shutil.rmtree(base, ignore_errors=True)
    return results


def report(results: Results, args: argparse.Namespace) -> None:
    t = results.throughput
    service, offline, naive = (statistics.median(x) for x in (t.service, t.offline, t.naive))
    ratios = t.ratios

    def spread(xs: list[float]) -> str:
        return f"{min(xs):.0f}-{max(xs):.0f}"

    print()
    print(f"bench/embed.py{' --quick' if args.quick else ''}: all-MiniLM-L6-v2 on cpu, "
          f"{os.cpu_count()} cores; median of {args.repeats} rounds")
    print()
    print(f"(a) throughput, {CONCURRENT} texts ({t.load} at the end)")
    print(f"  {'way':<52} {'texts/s':>9} {'range':>9} {'x offline':>10}   target")
    rows = [
        (f"service: {CONCURRENT} concurrent single-text requests", service, spread(t.service),
         f"{statistics.median(ratios):.2f}", f">= {TARGET_RATIO}x offline"),
        (f"offline: one encode of {CONCURRENT} (this process, x2/round)", offline,
         spread(t.offline),
         "1.00", "(reference)"),
        (f"naive: {CONCURRENT} sequential single encodes", naive, spread(t.naive),
         f"{naive / offline:.2f}", f"~{NAIVE_RATIO}x (what batching avoids)"),
    ]
    for name, value, rng, ratio, target in rows:
        print(f"  {name:<52} {value:>9.1f} {rng:>9} {ratio:>10}   {target}")
    verdict = "meets" if statistics.median(ratios) >= TARGET_RATIO else "BELOW"
    print(f"  service/offline: median of per-round ratios {statistics.median(ratios):.2f} "
          f"(rounds {', '.join(f'{x:.2f}' for x in ratios)}; ratio of medians "
          f"{service / offline:.2f}): {verdict} the {TARGET_RATIO}x target")
    print(f"  batches per service round of {CONCURRENT}: {t.round_batches}, sizes "
          f"{t.round_sizes} (mean size {statistics.median(t.round_mean_batch):.1f})")
    wall, busy = statistics.median(t.round_wall_s), statistics.median(t.round_encoder_s)
    print(f"  service round: {wall * 1000:.0f} ms wall, of which its encoder busy "
          f"{busy * 1000:.0f} ms ({CONCURRENT / busy if busy else float('nan'):.0f} texts/s "
          f"in the encoder); the rest is HTTP, the client and waiting for arrivals")
    client_cpu = statistics.median(t.round_client_cpu_s)
    print(f"  client (this process, its own model idle meanwhile): "
          f"{client_cpu / CONCURRENT * 1e6:.0f} us of CPU per request")
    h = t.health
    print(f"  /health after (a), warm-up included: batches {h.get('batches')}, "
          f"mean_batch_size {h.get('mean_batch_size')}, max_batch_size "
          f"{h.get('max_batch_size')}, texts_embedded {h.get('texts_embedded')}, "
          f"texts_per_second (in the encoder) {h.get('texts_per_second')}")
    print()
    print("(b) search latency, k=5, owner filter (no target set)")
    print(f"  {'what':<52} {'chunks':>7} {'n':>4} {'p50 ms':>9} {'p99 ms':>9}   host")
    for latency in results.latencies:
        print(latency.row())
    print("  p99 is nearest-rank: with n < 100 queries it is the slowest one")
    print()
    print("(c) ingest and upsert rates (no target set; ceiling: embedding alone)")
    print(f"  {'what':<52} {'chunks':>7} {'time':>10} {'rate':>10}   host")
    for rate in results.rates:
        print(rate.row())
    print()
    for note in results.notes:
        print(f"  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2k/20k chunks, 5 rounds")
    parser.add_argument("--repeats", type=int, help="rounds of (a) (9; quick 5)")
    parser.add_argument("--small", type=int, help="real chunks through the service (10k)")
    parser.add_argument("--large", type=int, help="random vectors in the store (100k)")
    parser.add_argument("--queries", type=int, help="search queries per size (30; quick 20)")
    parser.add_argument("--ingest-kb", type=int, help="KB of text for (c) (300; quick 100)")
    args = parser.parse_args()
    defaults = ((5, 2_000, 20_000, 20, 100) if args.quick
                else (9, 10_000, 100_000, 30, 300))
    for name, value in zip(("repeats", "small", "large", "queries", "ingest_kb"), defaults,
                           strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    began = time.perf_counter()
    results = trio.run(run, args)
    report(results, args)
    print(f"\n  whole run {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
