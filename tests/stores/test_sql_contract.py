"""One contract for every primary SQL engine, run against the real engines."""

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from stores import (
    SQL_ENGINES,
    AsyncSql,
    SqlAdapter,
    StoreClosedError,
    StoreCorruptError,
    StoreError,
    StoreTimeoutError,
    WrongKeyError,
    migrate,
    open_sql,
)
from stores.sql import (
    BRIEF_BACKOFF_CALLS,
    BRIEF_OVERRUNS_MAX,
    IDLE_WAIT_S,
    VALUES_PER_STATEMENT_MAX,
    _Call,
    _statement_row_counts,
)

KEY = bytes(range(32))
WRONG_KEY = bytes(32)
SECRET = "zebra-plaintext-canary-4711"
PAGE_BYTES = 4096
# A recursive CTE that keeps the engine busy for about 0.4 s on this machine.
SLOW_QUERY = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) SELECT count(*) FROM c"

MIGRATIONS = [
    (1, "CREATE TABLE prefs (key TEXT PRIMARY KEY, value TEXT NOT NULL);"),
    (
        2,
        """
        CREATE TABLE audit (key TEXT, note TEXT);
        -- a trigger body holds semicolons; the script must still split into whole statements
        CREATE TRIGGER prefs_audit AFTER INSERT ON prefs BEGIN
            INSERT INTO audit VALUES (new.key, 'set; logged');
        END;
        """,
    ),
]


@pytest.fixture(params=SQL_ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "primary.db"


@pytest.fixture
def db(engine: str, db_path: Path) -> Iterator[SqlAdapter]:
    adapter = open_sql(engine, db_path, KEY)
    adapter.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, text TEXT, blob BLOB, real REAL)")
    yield adapter
    adapter.close()


def fill(adapter: SqlAdapter, rows: int = 50) -> None:
    adapter.executemany("INSERT INTO t (text) VALUES (?)", [(f"row {i} {SECRET}",) for i in range(rows)])


def test_insert_rows_writes_every_row_in_order_many_to_a_statement(db: SqlAdapter) -> None:
    # A full statement's worth, and 451 more (in statements of 256, 128, 64, 2 and 1 rows).
    rows = [(i, f"row {i}", bytes([i % 256]), i / 2) for i in range(1, VALUES_PER_STATEMENT_MAX // 4 + 452)]
    db.insert_rows("INSERT INTO t (id, text, blob, real) VALUES", rows)
    db.insert_rows("INSERT OR REPLACE INTO t (id, text) VALUES", [(7, "first"), (7, "second")])  # later rows win
    db.insert_rows("INSERT INTO t (id) VALUES", [])
    assert db.query("SELECT * FROM t WHERE id != 7 ORDER BY id") == [row for row in rows if row[0] != 7]
    assert db.query("SELECT text, blob FROM t WHERE id = 7") == [("second", None)]
    with pytest.raises(StoreError):
        db.insert_rows("INSERT INTO t (id) VALUES", [(1,)])  # a duplicate key fails the statement


@pytest.mark.parametrize("rows", [0, 1, 2047, 2048, 2049, 3 * 2048 + 2047, 100_000])
def test_rows_split_into_full_statements_then_powers_of_two(rows: int) -> None:
    counts = list(_statement_row_counts(rows, 2048))
    assert sum(counts) == rows
    assert counts == sorted(counts, reverse=True) and all(0 < count <= 2048 for count in counts)
    rest = counts[rows // 2048 :]
    assert all(count & (count - 1) == 0 for count in rest) and len(set(rest)) == len(rest)


def test_round_trips_every_value_type(db: SqlAdapter) -> None:
    db.execute("INSERT INTO t VALUES (?, ?, ?, ?)", (2**62, "héllo", b"\x00\xff", 1.5))
    db.executemany("INSERT INTO t (id, text) VALUES (?, ?)", [(1, None), (3, "three")])

    assert db.query("SELECT * FROM t ORDER BY id") == [
        (1, None, None, None),
        (3, "three", None, None),
        (2**62, "héllo", b"\x00\xff", 1.5),
    ]
    assert db.query_one("SELECT text FROM t WHERE id = ?", (3,)) == ("three",)
    assert db.query_one("SELECT text FROM t WHERE id = ?", (99,)) is None
    assert db.query("SELECT * FROM t WHERE id = ?", (99,)) == []


def test_open_sets_durable_journal(db: SqlAdapter) -> None:
    assert db.query("PRAGMA journal_mode") == [("wal",)]
    assert db.query("PRAGMA synchronous") == [(2,)]  # FULL


def test_sql_errors_are_store_errors(db: SqlAdapter) -> None:
    with pytest.raises(StoreError, match="no such table"):
        db.query("SELECT * FROM missing")


def test_transaction_commit_survives_reopen(engine: str, db_path: Path, db: SqlAdapter) -> None:
    with db.transaction():
        db.execute("INSERT INTO t (text) VALUES ('kept')")
    db.close()

    reopened = open_sql(engine, db_path, KEY)
    assert reopened.query("SELECT text FROM t") == [("kept",)]
    reopened.close()


def test_transaction_rolls_back_on_exception(db: SqlAdapter) -> None:
    with pytest.raises(RuntimeError), db.transaction():
        db.execute("INSERT INTO t (text) VALUES ('lost')")
        raise RuntimeError("boom")

    assert db.query("SELECT count(*) FROM t") == [(0,)]
    with db.transaction():  # the adapter is usable again
        db.execute("INSERT INTO t (text) VALUES ('kept')")
    assert db.query("SELECT text FROM t") == [("kept",)]


def test_nested_transaction_is_refused_and_outer_rolls_back(db: SqlAdapter) -> None:
    with pytest.raises(StoreError, match="do not nest"), db.transaction():
        db.execute("INSERT INTO t (text) VALUES ('lost')")
        with db.transaction():
            pass
    assert db.query("SELECT count(*) FROM t") == [(0,)]


def test_migrations_apply_once_in_order(db: SqlAdapter) -> None:
    assert migrate(db, MIGRATIONS) == 2
    db.execute("INSERT INTO prefs VALUES ('theme', 'dark')")
    assert db.query("SELECT * FROM audit") == [("theme", "set; logged")]

    assert migrate(db, MIGRATIONS) == 2  # re-run changes nothing
    assert db.query("SELECT version FROM schema_version ORDER BY version") == [(1,), (2,)]

    added = [*MIGRATIONS, (3, "ALTER TABLE prefs ADD COLUMN hlc INTEGER")]
    assert migrate(db, added) == 3
    assert db.query("SELECT * FROM prefs") == [("theme", "dark", None)]


def test_failed_migration_leaves_no_trace(db: SqlAdapter) -> None:
    broken = [*MIGRATIONS, (3, "CREATE TABLE half (x); INSERT INTO nowhere VALUES (1);")]
    with pytest.raises(StoreError, match="nowhere"):
        migrate(db, broken)
    assert migrate(db, MIGRATIONS) == 2
    assert db.query("SELECT name FROM sqlite_master WHERE name = 'half'") == []


def test_a_migration_may_be_a_function_and_runs_in_its_transaction(db: SqlAdapter) -> None:
    migrate(db, MIGRATIONS)
    db.execute("INSERT INTO prefs VALUES ('theme', 'dark')")

    def upper_keys(adapter: SqlAdapter) -> None:
        for (key,) in adapter.query("SELECT key FROM prefs"):
            adapter.execute("UPDATE prefs SET key = ? WHERE key = ?", (key.upper(), key))

    def half_done(adapter: SqlAdapter) -> None:
        upper_keys(adapter)
        raise StoreError("the row rewrite failed midway")

    with pytest.raises(StoreError, match="midway"):
        migrate(db, [*MIGRATIONS, (3, half_done)])
    assert db.query("SELECT key FROM prefs") == [("theme",)]  # rolled back with its version
    assert migrate(db, [*MIGRATIONS, (3, upper_keys)]) == 3
    assert db.query("SELECT key FROM prefs") == [("THEME",)]


def test_store_newer_than_code_is_refused(db: SqlAdapter) -> None:
    migrate(db, MIGRATIONS)
    with pytest.raises(StoreError, match="schema version 2, newer than version 1"):
        migrate(db, MIGRATIONS[:1])


def test_migrations_must_ascend(db: SqlAdapter) -> None:
    with pytest.raises(StoreError, match="ascending"):
        migrate(db, [(2, "SELECT 1"), (1, "SELECT 1")])


def test_wrong_key_is_refused_and_file_untouched(
    engine: str, db_path: Path, db: SqlAdapter, folder_bytes: Callable[[Path], bytes]
) -> None:
    fill(db)
    db.close()
    before = sorted(db_path.parent.iterdir()), folder_bytes(db_path.parent)

    with pytest.raises(WrongKeyError, match=str(db_path)):
        open_sql(engine, db_path, WRONG_KEY)

    assert (sorted(db_path.parent.iterdir()), folder_bytes(db_path.parent)) == before
    reopened = open_sql(engine, db_path, KEY)
    assert reopened.query("SELECT count(*) FROM t") == [(50,)]
    reopened.close()


def test_no_plaintext_on_disk(db_path: Path, db: SqlAdapter, folder_bytes: Callable[[Path], bytes]) -> None:
    fill(db)
    assert db.query("SELECT count(*) FROM t WHERE text LIKE ?", (f"%{SECRET}%",)) == [(50,)]
    assert SECRET.encode() not in folder_bytes(db_path.parent)  # open: main file, -wal and -shm
    db.close()
    assert SECRET.encode() not in folder_bytes(db_path.parent)


def test_close_is_idempotent_and_final(db: SqlAdapter) -> None:
    db.close()
    db.close()
    with pytest.raises(StoreClosedError):
        db.query("SELECT 1")
    with pytest.raises(StoreClosedError), db.transaction():
        pass


def test_open_rejects_unknown_engine_and_bad_key(db_path: Path) -> None:
    with pytest.raises(StoreError, match="valid engines: sqlcipher, libsql"):
        open_sql("postgres", db_path, KEY)
    with pytest.raises(StoreError, match="32 bytes"):
        open_sql("sqlcipher", db_path, b"short")


def flip_byte_in_second_page(db_path: Path) -> None:
    data = bytearray(db_path.read_bytes())
    assert len(data) >= 2 * PAGE_BYTES
    data[PAGE_BYTES + PAGE_BYTES // 2] ^= 0x01
    db_path.write_bytes(bytes(data))


def test_sqlcipher_detects_a_flipped_byte(db_path: Path) -> None:
    db = open_sql("sqlcipher", db_path, KEY)
    db.execute("CREATE TABLE t (text TEXT)")
    db.executemany("INSERT INTO t VALUES (?)", [(f"row {i}",) for i in range(50)])
    db.close()
    flip_byte_in_second_page(db_path)

    db = open_sql("sqlcipher", db_path, KEY)
    with pytest.raises(StoreCorruptError, match="malformed"):
        db.query("SELECT * FROM t")
    db.close()


def test_libsql_pages_are_not_authenticated(db_path: Path) -> None:
    """Measured limitation of libsql-experimental 0.0.55: a tampered page reads back without any error."""
    db = open_sql("libsql", db_path, KEY)
    db.execute("CREATE TABLE t (text TEXT)")
    db.executemany("INSERT INTO t VALUES (?)", [(f"row {i}",) for i in range(50)])
    db.close()
    flip_byte_in_second_page(db_path)

    db = open_sql("libsql", db_path, KEY)
    assert len(db.query("SELECT * FROM t")) == 50
    db.close()


@pytest.mark.trio
async def test_async_round_trip_on_one_worker_thread(engine: str, db_path: Path) -> None:
    db = await AsyncSql.open(engine, db_path, KEY)
    assert db.engine == engine
    await db.execute("CREATE TABLE t (text TEXT)")
    await db.executemany("INSERT INTO t VALUES (?)", [("a",), ("b",)])

    def insert_both(adapter: SqlAdapter, text: str) -> int:
        with adapter.transaction():
            adapter.execute("INSERT INTO t VALUES (?)", (text,))
            adapter.execute("INSERT INTO t VALUES (?)", (text,))
        return threading.get_ident()

    first_thread = await db.run(insert_both, "c")
    assert await db.run(lambda adapter: threading.get_ident()) == first_thread != threading.get_ident()
    assert await db.query("SELECT text FROM t ORDER BY text") == [("a",), ("b",), ("c",), ("c",)]
    assert await db.query_one("SELECT count(*) FROM t") == (4,)
    with pytest.raises(StoreError, match="no such table"):
        await db.query("SELECT * FROM missing")

    await db.close()
    await db.close()
    with pytest.raises(StoreClosedError):
        await db.query("SELECT 1")


@pytest.mark.trio
async def test_a_brief_call_runs_on_the_trio_thread_only_while_nothing_else_waits_and_it_keeps_within_budget(
    engine: str, db_path: Path
) -> None:
    db = await AsyncSql.open(engine, db_path, KEY)
    here = threading.get_ident()

    def insert(adapter: SqlAdapter, text: str) -> int:
        with adapter.transaction():
            adapter.execute("INSERT INTO t VALUES (?)", (text,))
        return threading.get_ident()

    def slow(adapter: SqlAdapter) -> int:
        time.sleep(2 * IDLE_WAIT_S)
        return threading.get_ident()

    try:
        await db.execute("CREATE TABLE t (text TEXT)")
        worker = await db.run(lambda adapter: threading.get_ident())
        assert worker != here
        assert await db.run_brief(insert, "idle") == here  # nothing else to run: no hand-over to the worker
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 0)  # a task ready to run must not wait for the call
            assert await db.run_brief(insert, "busy") == worker
        async with trio.open_nursery() as nursery:
            nursery.start_soon(db.query, SLOW_QUERY)
            await trio.sleep(0.05)  # the worker runs the slow query: a brief call waits its turn, never runs beside it
            assert await db.run_brief(insert, "after") == worker
        with pytest.raises(StoreError, match="no such table"):
            await db.run_brief(SqlAdapter.query, "SELECT * FROM missing")
        assert await db.query("SELECT text FROM t ORDER BY rowid") == [("idle",), ("busy",), ("after",)]

        # Calls that overrun the loop's budget time after time (a slow disk) go to the worker for a while.
        assert [await db.run_brief(slow) for _ in range(BRIEF_OVERRUNS_MAX)] == [here] * BRIEF_OVERRUNS_MAX
        backed_off = [await db.run_brief(insert, "backed off") for _ in range(BRIEF_BACKOFF_CALLS)]
        assert backed_off == [worker] * BRIEF_BACKOFF_CALLS
        assert await db.run_brief(insert, "again") == here
    finally:
        await db.close()
    with pytest.raises(StoreClosedError):
        await db.run_brief(insert, "closed")


def test_a_store_call_is_finished_once_whether_it_ends_before_or_while_its_caller_waits() -> None:
    """The trio thread may wait a moment for a call's outcome (AsyncSql._call): then it finishes the call, else a trio
    wake-up does; never both, or the worker would take calls two deep."""
    before = _Call(lambda: 1)
    assert before.run() is True  # no caller waits: wake it through trio
    assert before.wait_briefly(0.01) is False  # and the caller must not finish it too
    assert before.outcome() == 1

    during = _Call(lambda: 2)
    worker = threading.Timer(0.05, lambda: outcomes.append(during.run()))
    outcomes: list[bool] = []
    worker.start()
    assert during.wait_briefly(5.0) is True  # the caller waited: it finishes the call
    worker.join()
    assert outcomes == [False] and during.outcome() == 2

    late = _Call(lambda: 3)
    assert late.wait_briefly(0.001) is False  # gave up waiting before the function ran
    assert late.run() is True and late.outcome() == 3


@pytest.mark.trio
async def test_async_open_with_wrong_key(engine: str, db_path: Path) -> None:
    open_sql(engine, db_path, KEY).close()
    with pytest.raises(WrongKeyError):
        await AsyncSql.open(engine, db_path, WRONG_KEY)


async def longest_loop_stall_s(db: AsyncSql) -> tuple[float, float]:
    """Run the slow query while another task ticks; return the query's duration and the longest tick gap."""
    ticks: list[float] = []

    async def tick() -> None:
        while True:
            ticks.append(time.perf_counter())
            await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        await trio.sleep(0.02)
        started = time.perf_counter()
        await db.query(SLOW_QUERY)
        query_s = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    return query_s, max(later - earlier for earlier, later in zip(ticks, ticks[1:]))


@pytest.mark.trio
async def test_sqlcipher_slow_query_leaves_trio_loop_running(db_path: Path) -> None:
    db = await AsyncSql.open("sqlcipher", db_path, KEY)
    query_s, stall_s = await longest_loop_stall_s(db)
    await db.close()
    assert query_s > 0.1
    # The loop kept ticking through the query (libsql's stall, below, is most of it); relative, as a loaded machine
    # delays every tick.
    assert stall_s < query_s / 2


@pytest.mark.trio
async def test_libsql_slow_query_stalls_trio_loop(db_path: Path) -> None:
    """Measured limitation of libsql-experimental 0.0.55: it holds the GIL for the whole query."""
    db = await AsyncSql.open("libsql", db_path, KEY)
    query_s, stall_s = await longest_loop_stall_s(db)
    await db.close()
    assert query_s > 0.1
    assert stall_s > query_s / 2


@pytest.mark.trio
async def test_async_timeout_abandons_calls_that_had_not_started(engine: str, db_path: Path) -> None:
    setup = await AsyncSql.open(engine, db_path, KEY)  # a write's fsync may outlast 0.2 s on a slow disk
    await setup.execute("CREATE TABLE t (text TEXT)")
    await setup.close()
    db = await AsyncSql.open(engine, db_path, KEY, timeout_s=0.2)

    with pytest.raises(StoreTimeoutError, match="may still complete"):
        await db.run(lambda adapter: time.sleep(0.5))
    with pytest.raises(StoreTimeoutError, match="not started"):
        await db.execute("INSERT INTO t VALUES ('never')")

    await trio.sleep(0.3)  # the sleeping call has ended by now
    assert await db.query("SELECT count(*) FROM t") == [(0,)]
    await db.close()
