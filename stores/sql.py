"""Encrypted primary SQL store: one adapter interface over SQLCipher and libSQL, migrations, and a trio front."""

from __future__ import annotations

import functools
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import attrs
import libsql_experimental
import sqlcipher3
import trio

from stores.errors import (
    StoreClosedError,
    StoreCorruptError,
    StoreError,
    StoreTimeoutError,
    WrongKeyError,
)

SqlValue = int | float | str | bytes | None
# A row's columns are typed by its query, not here: the store hands them back as the engine read them.
Row = tuple[Any, ...]
T = TypeVar("T")

SQL_ENGINES = ("sqlcipher", "libsql")
"""Valid engine names; the first is the default."""

STORE_KEY_BYTES = 32
BUSY_TIMEOUT_MS = 5000
DEFAULT_CALL_TIMEOUT_S = 30.0
# Opening (journal mode) and closing (a WAL checkpoint) write and fsync, which on a slow disk takes longer than a
# short call timeout allows (a test's 0.2 s close failed on a 0.5 s fsync): they wait at least this long.
OPEN_CLOSE_TIMEOUT_S = 30.0
# While no other task can run, a store call blocks the trio thread for its outcome, this long at most: a call of a few
# hundred microseconds (a message's write) then skips trio's wake-up through its I/O loop, about 50 us of each call.
# I/O that comes in meanwhile waits as long; a longer call goes on as an ordinary trio wait.
IDLE_WAIT_S = 0.001
# A brief call (AsyncSql.run_brief: a write of a few rows) runs on the trio thread itself while no other task can run:
# handing it to the worker and back cost about 75 us of a message add's 750 (bench stores, uow_write_ms). Brief calls
# keep to the loop's budget above: one that overran it counts up, one within it counts down, and at
# BRIEF_OVERRUNS_MAX (a slow disk, not one checkpoint) the next BRIEF_BACKOFF_CALLS go to the worker, where the loop
# serves other tasks meanwhile.
BRIEF_OVERRUNS_MAX = 4
BRIEF_BACKOFF_CALLS = 64

# WAL with synchronous=FULL fsyncs every commit, so an acknowledged transaction survives kill -9 and power loss.
# busy_timeout lets a second process (the CLI opening the store directly) wait briefly for the write lock.
_OPEN_PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
)
_CORRUPTION_MARKERS = ("malformed", "not a database", "corrupt")


class _Cursor(Protocol):
    @property
    def lastrowid(self) -> int | None: ...

    def fetchall(self) -> list[Row] | None: ...

    def fetchone(self) -> Row | None: ...


class _Connection(Protocol):
    @property
    def in_transaction(self) -> bool: ...

    def execute(self, sql: str, parameters: Row = ..., /) -> _Cursor: ...

    def executemany(self, sql: str, parameters: list[Row], /) -> object: ...

    def close(self) -> None: ...


@attrs.frozen
class _EngineSpec:
    connect: Callable[[Path, bytes, bool], _Connection]  # path, key, and whether any thread may use it
    errors: tuple[type[Exception], ...]


def _connect_sqlcipher(path: Path, key: bytes, any_thread: bool) -> _Connection:
    # isolation_level=None: no implicit BEGIN, so transaction() alone decides transaction boundaries.
    connection = sqlcipher3.connect(str(path), isolation_level=None, check_same_thread=not any_thread)
    connection.execute("PRAGMA cipher_log_level = NONE")
    # A raw hex key skips SQLCipher's PBKDF2: the store key is already random, not a passphrase.
    connection.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
    return connection


def _connect_libsql(path: Path, key: bytes, any_thread: bool) -> _Connection:
    # A libsql connection may be used from any thread already.
    return libsql_experimental.connect(str(path), isolation_level=None, encryption_key=key.hex())


_ENGINES = {
    "sqlcipher": _EngineSpec(_connect_sqlcipher, (sqlcipher3.Error,)),
    # libsql reports every engine failure, SQL errors included, as a plain ValueError.
    "libsql": _EngineSpec(_connect_libsql, (ValueError,)),
}


def _store_error(error: Exception, engine: str, path: Path) -> StoreError:
    message = f"{engine} store {path}: {error}"
    if any(marker in str(error).lower() for marker in _CORRUPTION_MARKERS):
        return StoreCorruptError(message)
    return StoreError(message)


# Values bound per multi-row INSERT (SQLite allows 32766). Each statement shape stays in the connection's statement
# cache: one of 8192 values takes about 0.75 MiB there (4680 rows of 7 values took 3 MiB).
VALUES_PER_STATEMENT_MAX = 8192
INSERT_SHAPES_MAX = 64  # insert statements whose text is kept, not built again for every call (up to 40 KB each)


def _statement_row_counts(rows: int, per_statement: int) -> Iterator[int]:
    """Split `rows` into full statements, then the rest into powers of two, largest first.

    Few statements (each retakes the GIL), and few statement shapes: every shape stays cached, so a remainder of any
    size must not make a new one.
    """
    full, rest = divmod(rows, per_statement)
    yield from itertools.repeat(per_statement, full)
    while rest:
        largest = 1 << (rest.bit_length() - 1)
        yield largest
        rest -= largest


@functools.lru_cache(maxsize=INSERT_SHAPES_MAX)
def _insert_sql(insert: str, upsert: str, width: int, rows: int) -> str:
    """Return the statement that inserts `rows` rows of `width` values (see SqlAdapter.insert_rows)."""
    placeholders = f"({', '.join('?' * width)})"
    return f"{insert} {', '.join([placeholders] * rows)} {upsert}"


class _Live:
    """A SqlAdapter's open connection for one call, with engine errors turned into store errors.

    A class, not a generator context manager: that cost about 3 us of every statement.
    """

    __slots__ = ("_adapter",)

    def __init__(self, adapter: SqlAdapter) -> None:
        self._adapter = adapter

    def __enter__(self) -> _Connection:
        adapter = self._adapter
        if adapter._connection is None:
            raise StoreClosedError(f"{adapter._engine} store {adapter._path} is closed")
        return adapter._connection

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        adapter = self._adapter
        if isinstance(error, adapter._errors):
            raise _store_error(error, adapter._engine, adapter._path) from error


class SqlAdapter:
    """One open connection to an encrypted SQL store, with the same interface for every engine."""

    def __init__(self, engine: str, path: Path, connection: _Connection, errors: tuple[type[Exception], ...]) -> None:
        self._engine = engine
        self._path = path
        self._connection: _Connection | None = connection
        self._errors = errors
        self._in_transaction = False

    @property
    def engine(self) -> str:
        """The engine name, one of SQL_ENGINES."""
        return self._engine

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def _live(self) -> _Live:
        """Return a context giving the open connection and turning engine errors into store errors."""
        return _Live(self)

    def execute(self, sql: str, params: Sequence[SqlValue] = ()) -> None:
        """Run one statement with positional ? parameters."""
        with self._live() as connection:
            connection.execute(sql, tuple(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[SqlValue]]) -> None:
        """Run one statement once per row of positional parameters (none, not even prepared, for no rows)."""
        if parameters := [tuple(row) for row in rows]:
            with self._live() as connection:
                connection.executemany(sql, parameters)

    def insert_rows(self, insert: str, rows: Sequence[Sequence[SqlValue]], upsert: str = "") -> int | None:
        """Run `insert` (an INSERT ending in VALUES, then `upsert`, an ON CONFLICT clause, if given) for every row, many
        rows to a statement; return the rowid of the last row inserted (None for no rows).

        A statement per row (executemany) gives up and retakes the GIL around each row: with another thread busy in
        Python, every retake waits for the switch interval. Measured with one busy thread: 473 rows/s one per
        statement, 61,844 rows/s 500 to a statement.
        """
        if not rows:
            return None
        width = len(rows[0])
        start = 0
        with self._live() as connection:
            for count in _statement_row_counts(len(rows), max(1, VALUES_PER_STATEMENT_MAX // width)):
                values = tuple(itertools.chain.from_iterable(rows[start : start + count]))
                cursor = connection.execute(_insert_sql(insert, upsert, width, count), values)
                start += count
        return cursor.lastrowid

    def query(self, sql: str, params: Sequence[SqlValue] = ()) -> list[Row]:
        """Run one statement and return all its rows."""
        with self._live() as connection:
            # libsql returns None instead of [] for statements that produce no result set.
            return list(connection.execute(sql, tuple(params)).fetchall() or [])

    def query_one(self, sql: str, params: Sequence[SqlValue] = ()) -> Row | None:
        """Run one statement and return its first row, or None."""
        with self._live() as connection:
            return connection.execute(sql, tuple(params)).fetchone()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the with-block as one immediate transaction: commit on success, roll back on any exception."""
        if self._in_transaction:
            raise StoreError("transactions do not nest: this adapter is already inside one")
        self.execute("BEGIN IMMEDIATE")
        self._in_transaction = True
        try:
            yield
            self.execute("COMMIT")
        except BaseException:
            self._roll_back()
            raise
        finally:
            self._in_transaction = False

    def _roll_back(self) -> None:
        # A failed COMMIT may already have ended the transaction, and a closed adapter has nothing to undo.
        if self._connection is not None and self._connection.in_transaction:
            self.execute("ROLLBACK")

    def close(self) -> None:
        """Close the connection; idempotent, and every later call raises StoreClosedError."""
        if self._connection is not None:
            connection, self._connection = self._connection, None
            connection.close()


def open_sql(engine: str, path: Path, key: bytes, *, any_thread: bool = False) -> SqlAdapter:
    """Open, creating if absent, the encrypted SQL store at path (to be used from one thread at a time, any thread if
    `any_thread`, else the opening one); a wrong key raises WrongKeyError."""
    spec = _ENGINES.get(engine)
    if spec is None:
        raise StoreError(f"unknown SQL engine {engine!r}; valid engines: {', '.join(SQL_ENGINES)}")
    if len(key) != STORE_KEY_BYTES:
        raise StoreError(f"a store key is {STORE_KEY_BYTES} bytes, got {len(key)}")
    try:
        connection = spec.connect(path, key, any_thread)
    except spec.errors as error:
        raise StoreError(f"cannot open {engine} store {path}: {error}") from error
    try:
        # Both engines only decrypt on the first read, and they must fail before any pragma writes to the file.
        connection.execute("SELECT count(*) FROM sqlite_master").fetchall()
    except spec.errors as error:
        connection.close()
        if "not a database" in str(error):
            raise WrongKeyError(
                f"the store key does not open {path} ({engine}): wrong key, or not an encrypted store"
            ) from error
        raise _store_error(error, engine, path) from error
    adapter = SqlAdapter(engine, path, connection, spec.errors)
    try:
        for pragma in _OPEN_PRAGMAS:
            adapter.execute(pragma)
    except BaseException:
        adapter.close()
        raise
    return adapter


Migration = str | Callable[[SqlAdapter], None]  # a SQL script, or a function that rewrites rows SQL cannot


def migrate(adapter: SqlAdapter, migrations: Sequence[tuple[int, Migration]]) -> int:
    """Apply, in order and each in its own transaction, the migrations newer than the store; return its version."""
    versions = [version for version, _ in migrations]
    if versions != sorted(set(versions)) or any(version < 1 for version in versions):
        raise StoreError(f"migration versions must be positive, unique and ascending, got {versions}")
    adapter.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY)")
    newest_known = versions[-1] if versions else 0
    current = _schema_version(adapter)
    if current > newest_known:
        raise StoreError(
            f"store {adapter.path} has schema version {current}, newer than version {newest_known} "
            "that this code knows: upgrade aico-node"
        )
    for version, script in migrations:
        # Re-read inside the transaction so a concurrent migrator cannot make us apply a step twice.
        with adapter.transaction():
            if _schema_version(adapter) < version:
                if callable(script):
                    script(adapter)
                else:
                    for statement in _statements(script):
                        adapter.execute(statement)
                adapter.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    return _schema_version(adapter)


def _schema_version(adapter: SqlAdapter) -> int:
    row = adapter.query_one("SELECT coalesce(max(version), 0) FROM schema_version")
    assert row is not None and isinstance(row[0], int)
    return row[0]


def _statements(script: str) -> list[str]:
    """Split a SQL script into complete statements."""
    # executescript would COMMIT first and break the migration's transaction; sqlite's own completeness
    # check keeps semicolons inside strings, comments and trigger bodies.
    statements: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlcipher3.complete_statement(pending):
            if pending.strip(" \t\r\n;"):
                statements.append(pending.strip())
            pending = ""
    if pending.strip(" \t\r\n;"):
        raise StoreError(f"incomplete SQL statement in migration: {pending.strip()[:80]!r}")
    return statements


def _idle_wait_s() -> float:
    """Return how long a store call may block the trio thread for its outcome: only while no other task can run and
    no deadline falls due, and at most IDLE_WAIT_S."""
    statistics = trio.lowlevel.current_statistics()
    if statistics.tasks_runnable:
        return 0.0
    return max(0.0, min(IDLE_WAIT_S, statistics.seconds_to_next_deadline))


class _Call(Generic[T]):
    """One function handed to the worker thread, and its outcome."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._lock = threading.Lock()
        self._started = False
        self._abandoned = False
        self._ran = False
        self._waited = False  # the caller blocks its thread on `_ran_now` (wait_briefly), not in trio
        self._ran_now = threading.Lock()  # held until the function ran for a waiting caller: cheaper than an Event
        self._ran_now.acquire()
        self._result: T | None = None
        self._error: BaseException | None = None
        self.finished = trio.Event()

    def run(self) -> bool:
        """Run the function on the calling thread unless the caller already gave up; return whether the caller must
        be woken through trio (it is not blocked in wait_briefly)."""
        with self._lock:
            if self._abandoned:
                return True
            self._started = True
        try:
            self._result = self._fn()
        except BaseException as error:
            self._error = error
        with self._lock:
            self._ran = True
            if self._waited:
                self._ran_now.release()
            return not self._waited

    def wait_briefly(self, timeout_s: float) -> bool:
        """Block the calling thread until the function has run, at most `timeout_s`; return whether it ran meanwhile,
        and so the caller finishes the call, not a trio wake-up."""
        with self._lock:
            if timeout_s <= 0 or self._ran:
                return False  # a function that ran before the wait began wakes its caller through trio (see run)
            self._waited = True
        self._ran_now.acquire(timeout=timeout_s)
        with self._lock:
            self._waited = False
            return self._ran

    def abandon(self) -> bool:
        """Keep the function from starting if it has not; return whether it had started."""
        with self._lock:
            self._abandoned = True
            return self._started

    def outcome(self) -> T:
        """Return the result or raise the error of the finished function."""
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


class AsyncSql:
    """Trio front for one SqlAdapter whose calls all run, one at a time, on one dedicated worker thread.

    The worker opens the connection, for any thread: a brief call (run_brief) may run on the trio thread, never
    while another call runs.
    libsql holds the GIL while a query runs, which stalls the trio loop for that long; sqlcipher does not.
    While the loop has nothing else to run, a caller waits up to IDLE_WAIT_S on its thread for the outcome.
    Every call on the worker waits at most ``timeout_s`` seconds, queueing included, then raises StoreTimeoutError; a
    call that timed out before it started never runs, one that had started may still complete.
    """

    def __init__(self, engine: str, timeout_s: float) -> None:
        self._engine = engine
        self._timeout_s = timeout_s
        self._adapter: SqlAdapter | None = None
        self._stopped = False
        # One call in flight at a time keeps the worker's inbox at most one deep.
        self._idle = trio.Semaphore(1)
        self._brief_overruns = 0  # brief calls that overran IDLE_WAIT_S, less those within it (at least 0)
        self._brief_on_worker = 0  # brief calls left to run on the worker since they overran too often
        self._inbox: queue.SimpleQueue[tuple[_Call[Any], trio.lowlevel.TrioToken] | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._serve, name=f"aico-sql-{engine}", daemon=True)
        self._worker.start()

    @classmethod
    async def open(
        cls, engine: str, path: Path, key: bytes, *, timeout_s: float = DEFAULT_CALL_TIMEOUT_S
    ) -> AsyncSql:
        """Open the store on a new worker thread; timeout_s bounds every call (opening and closing at least
        OPEN_CLOSE_TIMEOUT_S)."""
        db = cls(engine, timeout_s)
        try:
            db._adapter = await db._call(
                functools.partial(open_sql, engine, path, key, any_thread=True), max(timeout_s, OPEN_CLOSE_TIMEOUT_S)
            )
        except BaseException:
            db._stop_worker()
            raise
        return db

    @property
    def engine(self) -> str:
        """The engine name, one of SQL_ENGINES."""
        return self._engine

    async def execute(self, sql: str, params: Sequence[SqlValue] = ()) -> None:
        """Run one statement on the worker thread."""
        await self.run(SqlAdapter.execute, sql, params)

    async def executemany(self, sql: str, rows: Iterable[Sequence[SqlValue]]) -> None:
        """Run one statement per row on the worker thread."""
        await self.run(SqlAdapter.executemany, sql, rows)

    async def query(self, sql: str, params: Sequence[SqlValue] = ()) -> list[Row]:
        """Return all rows of one statement run on the worker thread."""
        return await self.run(SqlAdapter.query, sql, params)

    async def query_one(self, sql: str, params: Sequence[SqlValue] = ()) -> Row | None:
        """Return the first row of one statement run on the worker thread."""
        return await self.run(SqlAdapter.query_one, sql, params)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Return fn(adapter, *args) run on the worker thread, e.g. a whole transaction body."""
        if self._adapter is None:
            raise StoreClosedError(f"{self._engine} store is closed")
        return await self._call(functools.partial(fn, self._adapter, *args))

    async def run_brief(self, fn: Callable[..., T], *args: Any) -> T:
        """Return fn(adapter, *args), a call of well under IDLE_WAIT_S, run on the trio thread while no other task can
        run and brief calls keep within that budget, else on the worker thread as `run`."""
        if not self._brief_here():
            return await self.run(fn, *args)
        await trio.lowlevel.checkpoint_if_cancelled()  # raises, or goes on without yielding: the turn is still free
        self._idle.acquire_nowait()
        started_s = time.perf_counter()
        try:
            result = fn(self._adapter, *args)
        finally:
            self._idle.release()
            self._count_brief(time.perf_counter() - started_s)
        await trio.lowlevel.cancel_shielded_checkpoint()  # what came in meanwhile runs before the caller goes on
        return result

    def _brief_here(self) -> bool:
        """Whether a brief call runs on the trio thread now: the store is open, no call is on the worker, the loop is
        idle, and brief calls are not backing off to the worker."""
        if self._brief_on_worker:
            self._brief_on_worker -= 1
            return False
        return self._adapter is not None and self._idle.value > 0 and _idle_wait_s() >= IDLE_WAIT_S

    def _count_brief(self, took_s: float) -> None:
        """Count a brief call run on the trio thread; send the next ones to the worker if they overrun too often."""
        if took_s <= IDLE_WAIT_S:
            self._brief_overruns = max(0, self._brief_overruns - 1)
        elif (overruns := self._brief_overruns + 1) < BRIEF_OVERRUNS_MAX:
            self._brief_overruns = overruns
        else:
            self._brief_overruns, self._brief_on_worker = 0, BRIEF_BACKOFF_CALLS

    async def close(self) -> None:
        """Close the store and end the worker thread; idempotent."""
        if self._adapter is None:
            return
        adapter, self._adapter = self._adapter, None
        try:
            await self._call(adapter.close, max(self._timeout_s, OPEN_CLOSE_TIMEOUT_S))
        finally:
            self._stop_worker()

    async def _call(self, fn: Callable[[], T], timeout_s: float | None = None) -> T:
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        deadline = trio.current_time() + timeout_s
        call = _Call(fn)
        token = trio.lowlevel.current_trio_token()
        # A cancelled caller queues nothing; a free worker is taken without yielding to the scheduler, as
        # Semaphore.acquire would (about 10 us of every call): the waits below yield.
        await trio.lowlevel.checkpoint_if_cancelled()
        queued = self._queue_now(call, token)
        if queued and call.wait_briefly(_idle_wait_s()):
            self._finished(call)
            await trio.lowlevel.cancel_shielded_checkpoint()  # what came in meanwhile runs before the caller goes on
            return call.outcome()
        with trio.move_on_at(deadline):
            try:
                if not queued:
                    await self._idle.acquire()
                    self._queue(call, token)
                await call.finished.wait()
            finally:
                started = call.abandon()
        if not call.finished.is_set():
            fate = "it may still complete" if started else "it was not started"
            raise StoreTimeoutError(f"{self._engine} store call did not finish within {timeout_s} s; {fate}")
        return call.outcome()

    def _queue_now(self, call: _Call[Any], token: trio.lowlevel.TrioToken) -> bool:
        """Hand `call` to the worker if it is free; return whether it was."""
        try:
            self._idle.acquire_nowait()
        except trio.WouldBlock:
            return False
        self._queue(call, token)
        return True

    def _queue(self, call: _Call[Any], token: trio.lowlevel.TrioToken) -> None:
        """Hand `call` to the worker, whose turn the caller holds."""
        if self._stopped:
            self._idle.release()
            raise StoreClosedError(f"{self._engine} store is closed")
        self._inbox.put((call, token))

    def _serve(self) -> None:
        while (item := self._inbox.get()) is not None:
            call, token = item
            if not call.run():
                continue  # the caller took the outcome itself (_Call.wait_briefly)
            try:
                token.run_sync_soon(self._finished, call)
            except trio.RunFinishedError:
                pass  # the trio run that was waiting has ended; nobody needs the outcome

    def _finished(self, call: _Call[Any]) -> None:
        self._idle.release()
        call.finished.set()

    def _stop_worker(self) -> None:
        self._stopped = True
        self._inbox.put(None)
