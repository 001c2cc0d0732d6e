"""`bench stores`: the data layer on the real engines, each figure beside a same-run baseline."""

import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import trio

from node.trust.identity import DeviceIdentity
from simulations.bench_sync import PASSPHRASE, NodeProcess
from simulations.metrics import Metric, metric
from stores import open_sql
from stores.datalayer import DataLayer
from stores.projector import INDEX_STEP_TARGET_S, Projector
from stores.repositories import UnitOfWork

SINGLE_WRITES = 300
# By then even a raw insert (two pages a write) has passed SQLite's first checkpoint, at 1000 pages of log.
REUSED_WAL_AFTER_WRITES = 600
WRITE_ROUNDS = 3  # fresh homes per write figure, which is their median: one round's figure varies by a tenth or more
IMPORT_MESSAGES = 100_000
SEARCH_SIZES = (10_000, 100_000)
SEARCH_QUERIES = 50
WARM_UP_QUERIES = 10
STALL_BASELINE_S = 3.0
STALL_P99_MS_MAX = 4 * INDEX_STEP_TARGET_S * 1000  # the builder aims its steps at INDEX_STEP_TARGET_S
DIMS = 384
# all-MiniLM-L6-v2: 6 encoder layers, each with these weight matrices (inputs, outputs) applied to every word piece.
ENCODER_LAYERS = 6
ENCODER_MATRICES = ((DIMS, 3 * DIMS), (DIMS, DIMS), (DIMS, 4 * DIMS), (4 * DIMS, DIMS))
EMBED_SENTENCE = "Yesterday my sister and I walked along the river to the old mill and talked about her new job there"
EMBED_RUNS = 50
EMBED_BATCH = 1000


def _message_fields(i: int, now_ms: int) -> dict:
    return {
        "conversation": f"conversation-{i % 50}",
        "text": f"message number {i} about tea, walks and music",
        "role": "user" if i % 2 else "assistant",
        "ts_ms": now_ms - (i % 30) * 86_400_000,
        "sentiment": ((i * 37) % 200 - 100) / 100,
        "response_time_ms": float(100 + (i * 53) % 2900),
    }


async def _open_node(home: Path) -> tuple[DeviceIdentity, DataLayer]:
    from node.home import init_home, load_store_config
    from node.trust.identity import unlock_identity
    from stores.datalayer import StoreConfig

    if not (home / "config.json").exists():
        await init_home(home, PASSPHRASE, StoreConfig(), "bench")
    identity = unlock_identity(home, PASSPHRASE)
    return identity, await DataLayer.open(home, identity.device_id, identity.store_key, load_store_config(home))


async def _bench_writes(root: Path) -> list[Metric]:
    rounds = [await _write_round(root / f"writes-{n}") for n in range(WRITE_ROUNDS)]
    (uow_fresh_ms, uow_reused_ms), (raw_fresh_ms, raw_reused_ms) = (
        [statistics.median(round_s[writer][window] * 1000 for round_s in rounds) for window in range(2)]
        for writer in range(2)
    )
    return [
        metric("uow_write_ms", uow_fresh_ms, "ms/write", raw_fresh_ms, "<= 3x baseline", uow_fresh_ms <= 3 * raw_fresh_ms),
        metric("uow_write_reused_wal_ms", uow_reused_ms, "ms/write", raw_reused_ms, "reported", True),
    ]


async def _write_round(folder: Path) -> list[tuple[float, float]]:
    """Return the windows (see _write_windows_s) of a message added through the unit of work to a fresh home, then of
    a raw insert of its row into a fresh plain table.

    One after the other: writes taking turns made, on this machine, the unit of work's 8% faster and the raw insert's
    20% slower, each fsync then following the other store's.
    """
    identity, data = await _open_node(folder / "home")
    now_ms = time.time_ns() // 1_000_000

    async def uow_write(i: int) -> None:
        async with UnitOfWork(data) as uow:
            uow.conversations.add_message(**_single(i, now_ms))
            await uow.commit()

    try:
        uow_s = await _write_windows_s(uow_write)
    finally:
        await data.close()
    raw = open_sql("sqlcipher", folder / "raw.db", identity.store_key("sql"))

    async def raw_write(i: int) -> None:
        f = _message_fields(i, now_ms)
        with raw.transaction():
            raw.execute(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)",
                (f"id-{i}", f["conversation"], f["role"], f["text"], f["ts_ms"], f["sentiment"], f["response_time_ms"]),
            )

    try:
        raw.execute(
            "CREATE TABLE messages (id TEXT PRIMARY KEY, conversation TEXT, role TEXT, text TEXT, ts_ms INTEGER, "
            "sentiment REAL, response_time_ms REAL)"
        )
        return [uow_s, await _write_windows_s(raw_write)]
    finally:
        raw.close()


async def _write_windows_s(write: Callable[[int], Awaitable[None]]) -> tuple[float, float]:
    """Return the mean seconds of a write in a fresh store, and in one whose write-ahead log was checkpointed once.

    Until its first checkpoint SQLite appends to a growing log file, and each commit's fsync then also records the
    file's new size and blocks; afterwards the log is rewritten in place, as in a node that has been running a while.
    """
    windows_s: list[float] = []
    for first in (0, REUSED_WAL_AFTER_WRITES):
        for i in range(len(windows_s) * SINGLE_WRITES, first):
            await write(i)
        started = time.perf_counter()
        for i in range(first, first + SINGLE_WRITES):
            await write(i)
        windows_s.append((time.perf_counter() - started) / SINGLE_WRITES)
    return windows_s[0], windows_s[1]


def _single(i: int, now_ms: int) -> dict:
    fields = _message_fields(i, now_ms)
    return {"conversation": fields.pop("conversation"), "text": fields.pop("text"), **fields}


async def _bench_import(root: Path) -> list[Metric]:
    home = root / "import"
    identity, data = await _open_node(home)
    now_ms = time.time_ns() // 1_000_000
    try:
        # As a running node has it: a projection into an analytics store not loaded yet is skipped (its load covers it).
        await data.analytics_ready()
        started = time.perf_counter()
        async with UnitOfWork(data) as uow:
            for i in range(IMPORT_MESSAGES):
                uow.conversations.add_message(**_single(i, now_ms))
            await uow.commit()
        import_s = time.perf_counter() - started
        started = time.perf_counter()
        await Projector(data).drain()
        project_s = time.perf_counter() - started
        daily_s = _best_of(5, lambda: data.analytics.daily(30, now_ms))
        sqlite_daily_s = await _sqlite_daily(data, now_ms)
    finally:
        await data.close()
    rows = [(f"id-{i}", *_message_fields(i, now_ms).values()) for i in range(IMPORT_MESSAGES)]
    raw_import_s = raw_message_insert_s(root / "raw-import.db", identity.store_key("sql"), rows)
    ready_s = _ready_s(home)
    empty_ready_s = _ready_s(root / "writes")
    return [
        metric("import_100k_messages_s", import_s, "s", raw_import_s, "reported", True),
        metric("project_100k_messages_s", project_s, "s", raw_import_s, "reported", True),
        metric("daily_query_100k_ms", daily_s * 1000, "ms", sqlite_daily_s * 1000, "<= 50 ms", daily_s <= 0.05),
        metric("run_ready_100k_messages_s", ready_s, "s", empty_ready_s, "<= 2.5 s", ready_s <= 2.5),
    ]


def raw_message_insert_s(path: Path, key: bytes, rows: list[tuple]) -> float:
    """Seconds to insert message rows (id and the six fields) with one executemany into a plain SQLCipher table."""
    raw = open_sql("sqlcipher", path, key)
    try:
        raw.execute("CREATE TABLE m (id TEXT PRIMARY KEY, conversation TEXT, role TEXT, text TEXT, ts_ms INTEGER, "
                    "sentiment REAL, response_time_ms REAL)")  # fmt: skip
        started = time.perf_counter()
        with raw.transaction():
            raw.executemany("INSERT INTO m VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        return time.perf_counter() - started
    finally:
        raw.close()


async def _sqlite_daily(data: DataLayer, now_ms: int) -> float:
    """The daily aggregate (without a percentile, which SQLite lacks) on the primary store, as a baseline."""
    query = (
        "SELECT ts_ms / 86400000 AS day, count(*), avg(sentiment) FROM messages WHERE ts_ms > ? "
        "GROUP BY day ORDER BY day DESC"
    )
    started = time.perf_counter()
    await data.sql.query(query, (now_ms - 30 * 86_400_000,))
    return time.perf_counter() - started


def _best_of(times: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(times):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def _ready_s(home: Path) -> float:
    """Seconds from starting `aico-node run` to its ready line."""
    started = time.perf_counter()
    with NodeProcess(home) as node:
        return node.ready_at - started


async def _bench_search(root: Path) -> list[Metric]:
    """At each size: memories written, then a fresh start, timed until exact search answers and until the in-memory
    Chroma index is built (by the node's own background builder), with search figures at each stage."""
    metrics = []
    rng = np.random.default_rng(7)
    home = root / "search"
    _, data = await _open_node(home)
    vectors = np.empty((0, DIMS), dtype="<f4")
    ids: list[str] = []
    try:
        for size in SEARCH_SIZES:
            fresh = rng.standard_normal((size - len(ids), DIMS)).astype("<f4")
            for start in range(0, len(fresh), 5000):
                async with UnitOfWork(data) as uow:
                    ids += [uow.memories.save_memory(f"memory {len(ids) + j}", v) for j, v in enumerate(fresh[start : start + 5000])]
                    await uow.commit()
            await Projector(data).drain()
            vectors = np.vstack([vectors, fresh])
            await data.close()
            _, data = await _open_node(home)  # a start: nothing of the vector index outlives the process
            metrics += await _search_metrics(data, ids, vectors, rng, size)
    finally:
        await data.close()
    return metrics


async def _search_metrics(
    data: DataLayer, ids: list[str], vectors: np.ndarray, rng: np.random.Generator, size: int
) -> list[Metric]:
    units = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    noise = rng.standard_normal((SEARCH_QUERIES, DIMS)).astype("<f4") * 0.5
    queries = vectors[rng.choice(len(vectors), SEARCH_QUERIES, replace=False)] + noise
    exact: list[set[str]] = []
    numpy_latencies = []
    for query in [*queries[:WARM_UP_QUERIES], *queries]:
        started = time.perf_counter()
        scores = units @ (query / np.linalg.norm(query))
        nearest = np.argpartition(-scores, 4)[:5]
        nearest = nearest[np.argsort(-scores[nearest])]
        numpy_latencies.append(time.perf_counter() - started)
        exact.append({ids[i] for i in nearest})
    exact, numpy_latencies = exact[WARM_UP_QUERIES:], numpy_latencies[WARM_UP_QUERIES:]
    numpy_p50_ms = float(np.median(numpy_latencies)) * 1000

    started = time.perf_counter()
    await data.sql.query("SELECT embedding FROM memories")
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    await data.vectors_ready()
    ready_s = time.perf_counter() - started
    exact_p50_ms, exact_recall = await _search_p50_ms_and_recall(data, queries, exact)

    idle_stalls: list[float] = []
    with trio.move_on_after(STALL_BASELINE_S):  # how late the loop wakes a sleeper on this machine, with no build
        await _record_stalls(idle_stalls)
    stalls: list[float] = []
    during: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_record_stalls, stalls)
        started = time.perf_counter()
        nursery.start_soon(Projector(data).index_vectors)
        while data.vectors.unindexed:
            if (done := len(during)) < SEARCH_QUERIES:  # searches meanwhile, as a user's would be
                one = slice(done, done + 1)
                during.append((await _search_p50_ms_and_recall(data, queries[one], exact[one]))[0])
            await trio.sleep(0.05)
        build_s = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    index_p50_ms, index_recall = await _search_p50_ms_and_recall(data, queries, exact)
    label = f"{size // 1000}k"
    during_p50_ms = float(np.median(during)) if during else exact_p50_ms
    stall_p99_ms, idle_p99_ms = (float(np.percentile(s, 99)) * 1000 for s in (stalls or [0.0], idle_stalls))
    stall_max_ms, idle_max_ms = max(stalls, default=0.0) * 1000, max(idle_stalls) * 1000
    reported = "reported"
    return [
        metric(f"search_top5_{label}_p50_ms", index_p50_ms, "ms", numpy_p50_ms, reported, True),
        metric(f"search_top5_{label}_recall", index_recall, "recall@5", 1.0, reported, True),
        metric(f"search_top5_{label}_exact_p50_ms", exact_p50_ms, "ms", numpy_p50_ms, reported, True),
        metric(f"search_top5_{label}_exact_recall", exact_recall, "recall@5", 1.0, "= 1.0", exact_recall == 1.0),
        metric(f"search_top5_{label}_during_build_p50_ms", during_p50_ms, "ms", numpy_p50_ms, reported, True),
        metric(f"vector_search_ready_{label}_s", ready_s, "s", read_s, "reported (baseline: a plain read)", True),
        metric(f"vector_index_built_{label}_s", build_s, "s", ready_s, "reported (baseline: exact search ready)", True),
        metric(f"vector_index_build_loop_stall_p99_{label}_ms", stall_p99_ms, "ms", idle_p99_ms,
               f"<= {STALL_P99_MS_MAX} ms (baseline: idle loop)", stall_p99_ms <= STALL_P99_MS_MAX),  # fmt: skip
        metric(f"vector_index_build_loop_stall_max_{label}_ms", stall_max_ms, "ms", idle_max_ms,
               "reported (baseline: idle loop)", True),  # fmt: skip
    ]


async def _search_p50_ms_and_recall(data: DataLayer, queries: np.ndarray, exact: list[set[str]]) -> tuple[float, float]:
    """Search every query through the repository; return the median latency and the mean recall@5 against `exact`
    (whose first entries belong to these queries)."""
    for query in queries[:WARM_UP_QUERIES]:  # measured: the first few dozen searches after a load ran 5x slower
        async with UnitOfWork(data) as uow:
            await uow.memories.get_memories_by_context(query, limit=5)
    latencies, recalls = [], []
    for query, nearest in zip(queries, exact):
        started = time.perf_counter()
        async with UnitOfWork(data) as uow:
            found = await uow.memories.get_memories_by_context(query, limit=5)
        latencies.append(time.perf_counter() - started)
        recalls.append(len({m.id for m in found} & nearest) / 5)
    return float(np.median(latencies)) * 1000, float(np.mean(recalls))


async def _record_stalls(stalls: list[float], tick_s: float = 0.005) -> None:
    """Record, until cancelled, how much later than asked the event loop wakes a sleeper."""
    while True:
        started = trio.current_time()
        await trio.sleep(tick_s)
        stalls.append(trio.current_time() - started - tick_s)


def _bench_embed(root: Path) -> list[Metric]:
    """The text embedder. Speed is set beside the encoder's weight matrix products alone on the same word pieces (the
    arithmetic no implementation of the model avoids, on this machine in this run); loading beside a warm embedding."""
    from node.embed import TEXTS_MAX, TextEmbedder, embedder_available

    if not embedder_available():
        return []
    started = time.perf_counter()
    embedder = TextEmbedder()
    embedder.embed([EMBED_SENTENCE])
    first_s = time.perf_counter() - started
    [sentence_pieces] = embedder.word_pieces([EMBED_SENTENCE])
    # Each run times the embedder and its floor back to back, so that both meet the same load on the machine.
    latencies, floors = [], []
    for _ in range(EMBED_RUNS):
        started = time.perf_counter()
        embedder.embed([EMBED_SENTENCE])
        latencies.append(time.perf_counter() - started)
        floors.append(_matrix_products_s(sentence_pieces))
    texts = _varied_texts(EMBED_BATCH)
    batch_s = floor_s = 0.0
    for start in range(0, len(texts), TEXTS_MAX):
        chunk = texts[start : start + TEXTS_MAX]
        started = time.perf_counter()
        embedder.embed(chunk)
        batch_s += time.perf_counter() - started
        floor_s += _matrix_products_s(sum(embedder.word_pieces(chunk)))
    first_add_s, second_add_s = _first_memory_add_s(root / "writes")
    p50_ms, floor_p50_ms = float(np.median(latencies)) * 1000, float(np.median(floors)) * 1000
    return [
        metric("embed_one_20_words_p50_ms", p50_ms, "ms", floor_p50_ms, "<= 50 ms", p50_ms <= 50),
        metric("embed_1000_texts_per_s", len(texts) / batch_s, "texts/s", len(texts) / floor_s, "reported", True),
        metric("embed_load_to_first_vector_s", first_s, "s", p50_ms / 1000, "reported", True),
        metric("first_memory_add_after_ready_s", first_add_s, "s", second_add_s, "<= 1 s", first_add_s <= 1.0),
    ]


def _matrix_products_s(pieces: int) -> float:
    """Seconds for the encoder's weight matrix products on `pieces` word pieces, without anything between them, on
    as many BLAS threads as the embedder uses."""
    from threadpoolctl import threadpool_limits

    from node.embed import BLAS_THREADS

    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((pieces, DIMS), dtype=np.float32)
    weights = [rng.standard_normal(shape, dtype=np.float32) for shape in ENCODER_MATRICES]
    wide = np.empty((pieces, 4 * DIMS), dtype=np.float32)
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        started = time.perf_counter()
        for _ in range(ENCODER_LAYERS):
            hidden @ weights[0]
            hidden @ weights[1]
            np.matmul(hidden, weights[2], out=wide)
            wide @ weights[3]
        return time.perf_counter() - started


def _varied_texts(count: int) -> list[str]:
    """Memory-like texts of 3 to 40 words."""
    rng = np.random.default_rng(11)
    words = [*EMBED_SENTENCE.lower().split(), "tea", "mountains", "violin", "birthday", "doctor", "garden", "winter"]
    return [" ".join(rng.choice(words, int(rng.integers(3, 41)))) for _ in range(count)]


def _first_memory_add_s(home: Path) -> tuple[float, float]:
    """Seconds from `aico-node run`'s ready line (on an initialised home) to the answer of a first text `memory.add`,
    and of a second."""
    from node.api.rpc import RpcClient

    with NodeProcess(home) as node, RpcClient.connect(home / "node.sock", timeout_s=60) as client:
        client.call("memory.add", text=EMBED_SENTENCE)
        first_s = time.perf_counter() - node.ready_at
        started = time.perf_counter()
        client.call("memory.add", text="I went hiking in the Alps")
        return first_s, time.perf_counter() - started


def bench_stores() -> list[Metric]:
    with tempfile.TemporaryDirectory(prefix="aico-bench-") as folder:
        root = Path(folder)

        async def run_all() -> list[Metric]:
            return [
                *await _bench_writes(root),
                *await _bench_import(root),
                *await _bench_search(root),
                *_bench_embed(root),
            ]

        return trio.run(run_all)
