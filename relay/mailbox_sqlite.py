"""The relay's default mailbox store, in one SQLite file in its data folder (relay/mailbox_store.py says what a store
does).

It holds only what the relay needs: mailbox ids (random-looking), blobs, their sizes and when they were stored.
Puts that arrive together are committed in one transaction (group commit); every commit is fsynced (WAL with
synchronous=FULL), so a put acknowledged to a client survives kill -9 and power loss.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import attrs
import trio

from relay.errors import MailboxReason, MailboxRefused, MailboxStoreError
from relay.mailbox_protocol import MailboxItem
from relay.mailbox_store import StoreLimits, put_digest

T = TypeVar("T")
STORE_FILE = "mailbox.sqlite3"
PUT_BATCH_MAX = 256  # puts committed in one transaction
PURGE_BATCH_MAX = 10_000  # expired items deleted per transaction, so a sweep never holds the writer long
PURGE_BATCHES_MAX = 1000  # bound on one sweep; the next sweep carries on

_SCHEMA = (
    # AUTOINCREMENT: a cursor is never reused, even after the newest item was purged, so no client skips a blob.
    "CREATE TABLE IF NOT EXISTS items (cursor INTEGER PRIMARY KEY AUTOINCREMENT, mailbox_id BLOB NOT NULL,"
    " stored_at REAL NOT NULL, size INTEGER NOT NULL, blob BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS items_by_mailbox ON items (mailbox_id, cursor)",
    "CREATE INDEX IF NOT EXISTS items_by_age ON items (stored_at)",
    # Kept in step with items in the same transactions, so a quota check reads one row instead of summing.
    "CREATE TABLE IF NOT EXISTS usage (mailbox_id BLOB PRIMARY KEY, items INTEGER NOT NULL, bytes INTEGER NOT NULL)"
    " WITHOUT ROWID",
    # The puts of the duplicate window (relay/mailbox_store.py), so a retried put returns the first one's cursor.
    "CREATE TABLE IF NOT EXISTS recent_puts (digest BLOB PRIMARY KEY, cursor INTEGER NOT NULL, stored_at REAL NOT NULL)"
    " WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS recent_puts_by_age ON recent_puts (stored_at)",
)


@attrs.define
class _PendingPut:
    mailbox_id: bytes
    blob: bytes
    outcome: int | MailboxRefused | None = None


class SqliteMailboxStore:
    """A mailbox store in one SQLite file; its calls run one at a time on a worker thread."""

    def __init__(self, connection: sqlite3.Connection, path: Path, limits: StoreLimits, clock: Callable[[], float]):
        self.path = path
        self.limits = limits
        self._clock = clock
        self._connection: sqlite3.Connection | None = connection
        # The stdlib sqlite3 module allows a connection on any thread (check_same_thread=False) as long as calls
        # never overlap; this limiter serialises them, so no dedicated thread is needed.
        self._limiter = trio.CapacityLimiter(1)
        self._write_lock = trio.Lock()
        self._pending: list[_PendingPut] = []
        self._total_bytes = 0

    @classmethod
    async def open(
        cls, directory: Path, limits: StoreLimits | None = None, clock: Callable[[], float] = time.time
    ) -> SqliteMailboxStore:
        """Open, creating if absent, the store in `directory`; `clock` gives seconds since the Unix epoch."""
        path = Path(directory) / STORE_FILE
        connection = await trio.to_thread.run_sync(_connect, path)
        store = cls(connection, path, limits or StoreLimits(), clock)
        store._total_bytes = await store._run(_total_bytes)
        return store

    async def close(self) -> None:
        """Close the store; idempotent, and later calls raise MailboxStoreError."""
        async with self._write_lock:
            connection, self._connection = self._connection, None
            if connection is not None:
                await trio.to_thread.run_sync(connection.close, limiter=self._limiter)

    @property
    def total_bytes(self) -> int:
        """Blob bytes held, expired ones not yet purged included."""
        return self._total_bytes

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._connection is None:
            raise MailboxStoreError(f"mailbox store {self.path} is closed")
        connection = self._connection
        try:
            return await trio.to_thread.run_sync(fn, connection, limiter=self._limiter)
        except sqlite3.Error as error:
            raise MailboxStoreError(f"mailbox store {self.path}: {error}") from error

    async def put(self, mailbox_id: bytes, blob: bytes) -> int:
        """Store `blob` durably in `mailbox_id` and return its cursor; raise MailboxRefused when over a bound."""
        pending = _PendingPut(mailbox_id, blob)
        self._pending.append(pending)
        async with self._write_lock:
            # Whoever holds the lock commits every put that queued up meanwhile, so waiting puts share one fsync.
            if pending.outcome is None:
                batch, self._pending = self._pending[:PUT_BATCH_MAX], self._pending[PUT_BATCH_MAX:]
                try:
                    self._total_bytes = await self._run(
                        lambda connection: self._commit_puts(connection, batch, self._total_bytes, self._clock())
                    )
                except BaseException:
                    # Not committed: their callers, still waiting for the lock, must try again, not report success.
                    self._pending[:0] = [item for item in batch if item is not pending]
                    raise
        if isinstance(pending.outcome, MailboxRefused):
            raise pending.outcome
        assert pending.outcome is not None
        return pending.outcome

    def _commit_puts(self, connection: sqlite3.Connection, batch: list[_PendingPut], total: int, now_s: float) -> int:
        """Insert `batch` in one transaction, recording each put's cursor or refusal; return the new total bytes."""
        limits = self.limits
        outcomes: list[int | MailboxRefused] = []
        remembered_since = now_s - limits.duplicate_window_s
        with _transaction(connection):
            for item in batch:
                digest = put_digest(item.mailbox_id, item.blob)
                row = connection.execute(
                    "SELECT cursor FROM recent_puts WHERE digest = ? AND stored_at >= ?", (digest, remembered_since)
                ).fetchone()
                if row is not None:
                    outcomes.append(row[0])  # a retried put: stored already
                    continue
                size = len(item.blob)
                row = connection.execute("SELECT items, bytes FROM usage WHERE mailbox_id = ?", (item.mailbox_id,))
                items, used = row.fetchone() or (0, 0)
                refusal = None
                if size > limits.blob_bytes_max:
                    refusal = (MailboxReason.BLOB_TOO_LARGE, f"blob of {size} bytes exceeds {limits.blob_bytes_max}")
                elif items + 1 > limits.mailbox_items_max or used + size > limits.mailbox_bytes_max:
                    refusal = (
                        MailboxReason.QUOTA_EXCEEDED,
                        f"mailbox holds {items} items, {used} bytes; quota {limits.mailbox_items_max} items,"
                        f" {limits.mailbox_bytes_max} bytes",
                    )
                elif total + size > limits.total_bytes_max:
                    refusal = (MailboxReason.STORE_FULL, "the relay's store is full")
                if refusal is not None:
                    outcomes.append(MailboxRefused(*refusal))
                    continue
                cursor = connection.execute(
                    "INSERT INTO items (mailbox_id, stored_at, size, blob) VALUES (?, ?, ?, ?)",
                    (item.mailbox_id, now_s, size, item.blob),
                ).lastrowid
                connection.execute(
                    "INSERT INTO usage (mailbox_id, items, bytes) VALUES (?, 1, ?) ON CONFLICT (mailbox_id)"
                    " DO UPDATE SET items = items + 1, bytes = bytes + excluded.bytes",
                    (item.mailbox_id, size),
                )
                connection.execute(
                    "INSERT OR REPLACE INTO recent_puts (digest, cursor, stored_at) VALUES (?, ?, ?)",
                    (digest, cursor, now_s),
                )
                total += size
                assert cursor is not None  # an INSERT sets lastrowid
                outcomes.append(cursor)
        # Published only after the commit: no client hears a cursor or refusal from a rolled-back batch.
        for item, outcome in zip(batch, outcomes):
            item.outcome = outcome
        return total

    async def fetch(
        self, mailbox_id: bytes, after_cursor: int, limit: int, bytes_max: int
    ) -> tuple[list[MailboxItem], bool]:
        """Up to `limit` unexpired blobs of `mailbox_id` after `after_cursor`, oldest first, within `bytes_max`
        (the first one always), and whether more follow."""
        fresh_since = self._clock() - self.limits.expire_s

        def select(connection: sqlite3.Connection) -> tuple[list[MailboxItem], bool]:
            rows = connection.execute(
                "SELECT cursor, blob FROM items WHERE mailbox_id = ? AND cursor > ? AND stored_at >= ?"
                " ORDER BY cursor LIMIT ?",
                (mailbox_id, after_cursor, fresh_since, limit + 1),
            )
            items: list[MailboxItem] = []
            used = 0
            for cursor, blob in rows:
                if len(items) == limit or (items and used + len(blob) > bytes_max):
                    return items, True
                items.append(MailboxItem(cursor, blob))
                used += len(blob)
            return items, False

        return await self._run(select)

    async def purge_expired(self) -> int:
        """Delete items older than the expiry (and puts older than the duplicate window) and return how many went."""
        async with self._write_lock:
            now_s = self._clock()
            forgotten_before = now_s - self.limits.duplicate_window_s
            await self._run(lambda connection: _forget_puts(connection, forgotten_before))
            expired_before = now_s - self.limits.expire_s
            purged = 0
            for _ in range(PURGE_BATCHES_MAX):
                count, size = await self._run(lambda connection: _purge_batch(connection, expired_before))
                purged += count
                self._total_bytes -= size
                if count < PURGE_BATCH_MAX:
                    break
            return purged


def _connect(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit BEGIN, so _transaction alone decides transaction boundaries.
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            # WAL with synchronous=FULL fsyncs every commit: an acknowledged put survives kill -9 and power loss.
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = FULL")
            with _transaction(connection):
                for statement in _SCHEMA:
                    connection.execute(statement)
        except BaseException:
            connection.close()
            raise
    except (sqlite3.Error, OSError) as error:
        raise MailboxStoreError(f"cannot open mailbox store {path}: {error}") from error
    return connection


class _transaction:
    """Runs a with-block as one immediate transaction: commit on success, roll back on any exception."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __enter__(self) -> None:
        self._connection.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        if kind is None:
            self._connection.execute("COMMIT")
        elif self._connection.in_transaction:
            self._connection.execute("ROLLBACK")


def _total_bytes(connection: sqlite3.Connection) -> int:
    return connection.execute("SELECT coalesce(sum(bytes), 0) FROM usage").fetchone()[0]


def _forget_puts(connection: sqlite3.Connection, before: float) -> None:
    with _transaction(connection):
        connection.execute("DELETE FROM recent_puts WHERE stored_at < ?", (before,))


def _purge_batch(connection: sqlite3.Connection, expired_before: float) -> tuple[int, int]:
    """Delete up to PURGE_BATCH_MAX expired items in one transaction; return how many and their bytes."""
    with _transaction(connection):
        deleted = connection.execute(
            "DELETE FROM items WHERE cursor IN"
            " (SELECT cursor FROM items WHERE stored_at < ? ORDER BY stored_at LIMIT ?) RETURNING mailbox_id, size",
            (expired_before, PURGE_BATCH_MAX),
        ).fetchall()
        freed: dict[bytes, tuple[int, int]] = {}
        for mailbox_id, size in deleted:
            items, size_sum = freed.get(mailbox_id, (0, 0))
            freed[mailbox_id] = (items + 1, size_sum + size)
        for mailbox_id, (items, size_sum) in freed.items():
            connection.execute(
                "UPDATE usage SET items = items - ?, bytes = bytes - ? WHERE mailbox_id = ?",
                (items, size_sum, mailbox_id),
            )
        connection.execute("DELETE FROM usage WHERE items <= 0")
    return len(deleted), sum(size for _, size in deleted)
