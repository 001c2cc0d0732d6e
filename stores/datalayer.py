"""The four stores of one device opened together, with the replica that merges into them."""

from __future__ import annotations

import collections
import functools
import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import attrs
import trio

from crdt import Collection, Conflict, ConflictJournal, CrdtError, HybridClock, Op, Replica, ReplicaConfig
from crdt.memories import MemorySet
from crdt.messages import with_edits
from crdt.registry import DeviceRegistry
from stores import primary
from stores.analytics import MESSAGE_COLUMNS, AnalyticsStore
from stores.cache import SealedKv
from stores.errors import StoreError
from stores.primary import Changes, LogBatch
from stores.sql import SQL_ENGINES, AsyncSql

if TYPE_CHECKING:
    from stores.vectors import VectorIndex

PRIMARY_FILE = "primary.db"
VECTORS_DIR = "vectors"
CACHE_DIR = "cache"
MEMORY_COLLECTION = "memories"
T = TypeVar("T")


@attrs.frozen
class StoreConfig:
    """Which SQL engine, which embedding size, and how long a store call may take."""

    engine: str = SQL_ENGINES[0]
    embedding_dims: int = 384
    sql_timeout_s: float = 120.0

    def __attrs_post_init__(self) -> None:
        if self.engine not in SQL_ENGINES:
            raise StoreError(f"unknown SQL engine {self.engine!r}; choose one of {', '.join(SQL_ENGINES)}")


def changed_keys(ops: Iterable[Op]) -> dict[Collection, dict[str, None]]:
    """Return the keys these ops wrote, by collection, each once and in order."""
    keys: dict[Collection, dict[str, None]] = collections.defaultdict(dict)
    for op in ops:
        keys[op.collection][op.key] = None
    return keys


def materialise(replica: Replica, keys: Mapping[Collection, Iterable[str]]) -> Changes:
    """Return the table row each changed key (by collection) now has in the replica, or that it is gone."""
    changes = Changes()
    for collection, collection_keys in keys.items():
        read = _row_reader(replica, collection)
        rows = changes.upserts[collection] = {}
        for key in collection_keys:
            if (row := read(key)) is not None:
                rows[key] = row
            else:
                changes.deletes.setdefault(collection, []).append(key)
    return changes


def _row_reader(replica: Replica, collection: Collection) -> Callable[[str], tuple | None]:
    """Return what reads a key's table row (None: no row) from the replica: a catch-up calls it once per op."""
    if collection is Collection.MESSAGES:
        return replica.messages.row
    if collection in (Collection.PREFERENCES, Collection.SETTINGS):
        rule = replica.preferences if collection is Collection.PREFERENCES else replica.settings
        return lambda key: (collection.value, key, primary.pack(rule.get(key)))
    if collection is Collection.MEMORIES:
        return functools.partial(_memory_row, replica.memories)
    if collection is Collection.NOTES:
        return lambda key: (key, replica.notes.text(key) or "")
    if collection is Collection.COUNTERS:
        return lambda key: (key, replica.counters.value(key))
    return functools.partial(_device_row, replica.devices)


def _memory_row(memories: MemorySet, key: str) -> tuple | None:
    if not memories.is_live(key):
        return None
    fields = {field: register.value for field, register in memories.fields[key].items()}
    return (key, fields["text"], fields["embedding"], primary.pack(fields["metadata"]))


def _device_row(devices: DeviceRegistry, key: str) -> tuple:
    record = devices.get(key)
    assert record is not None  # only enrolled devices have registry ops
    revoked = record.pop("revoked")
    return (key, primary.pack(record), int(revoked))


@attrs.frozen
class PendingWrite:
    """Applied ops and what they changed, as the replica held them when prepared, waiting to be written."""

    log: Sequence[LogBatch]  # the applied ops, as the batches to log them in
    changes: Changes
    conflicts: Sequence[Conflict]
    redacted: Sequence[Op]

    @property
    def ops(self) -> list[Op]:
        """Return the applied ops, in order."""
        return [op for logged in self.log for op in logged.ops]


class DataLayer:
    """One device's stores: the primary SQL store (truth), DuckDB analytics, Chroma vectors, RocksDB cache."""

    def __init__(
        self,
        home: Path,
        config: StoreConfig,
        sql: AsyncSql,
        replica: Replica,
        analytics: AnalyticsStore,
        cache: SealedKv,
        now_ms: Callable[[], int],
    ) -> None:
        self.home = home
        self.now_ms = now_ms
        self.config = config
        self.sql = sql
        self.replica = replica
        self.analytics = analytics
        self.cache = cache
        self.write_lock = trio.Lock()
        self.vectors_limiter = trio.CapacityLimiter(1)  # Chroma's client is used from one thread at a time
        self.analytics_limiter = trio.CapacityLimiter(1)  # and so is a DuckDB connection
        self._vectors: VectorIndex | None = None
        self._conflicts_seen = replica.journal.recorded
        self._rebuilds_seen = replica.rebuilds
        self.ops_stored = replica.vector.total()  # ops in the store's log; the replica runs ahead by the writes pending
        self.last_write_s = -math.inf  # trio time of the last write
        self._analytics_lock = trio.Lock()
        self._analytics_loaded = False

    @classmethod
    async def open(
        cls,
        home: Path,
        device_id: str,
        store_key: Callable[[str], bytes],
        config: StoreConfig | None = None,
        now_ms: Callable[[], int] | None = None,
    ) -> DataLayer:
        """Open (creating if needed) every store in `home` and rebuild the in-memory ones from primary SQL."""
        config = config or StoreConfig()
        now_ms = now_ms or _wall_clock_ms
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        sql = await AsyncSql.open(config.engine, home / PRIMARY_FILE, store_key("sql"), timeout_s=config.sql_timeout_s)
        try:
            await sql.run(primary.open_schema)
            replica = await cls._load_replica(sql, device_id, now_ms)
            analytics = AnalyticsStore()
            cache = SealedKv(home / CACHE_DIR, store_key("cache"), now=lambda: now_ms() / 1000)
        except BaseException:
            await sql.close()
            raise
        return cls(home, config, sql, replica, analytics, cache, now_ms)

    @staticmethod
    async def _load_replica(sql: AsyncSql, device_id: str, now_ms: Callable[[], int]) -> Replica:
        stored_device = await sql.run(primary.get_meta, "device_id")
        if stored_device is None:
            await sql.run(primary.set_meta, "device_id", device_id)
        elif stored_device != device_id:
            raise StoreError(f"this store belongs to device {stored_device}, not {device_id}")
        replica = Replica(device_id, HybridClock(now_ms), ReplicaConfig())
        await _replay_log(sql, replica)
        return replica

    async def reload_replica(self) -> None:
        """Rebuild the replica from primary SQL after a failed write left it ahead of the store.

        The replica object stays the same, so every session and service holding it sees the reloaded state.
        """
        self.replica.clear()
        await _replay_log(self.sql, self.replica)
        self._conflicts_seen = 0
        self._rebuilds_seen = self.replica.rebuilds
        self.ops_stored = self.replica.vector.total()

    async def analytics_ready(self) -> AnalyticsStore:
        """Return the analytics store, loading it from the replica's messages on first use.

        A node starts serving before this load (it is the slowest part of a start with many
        messages); whatever needs analytics waits here instead. Use it through `in_analytics`.
        """
        async with self._analytics_lock:
            if not self._analytics_loaded:
                columns = _message_columns(self.replica)
                if columns["id"]:
                    await trio.to_thread.run_sync(self.analytics.load, columns, limiter=self.analytics_limiter)
                self._analytics_loaded = True
        return self.analytics

    async def in_analytics(self, work: Callable[[AnalyticsStore], T]) -> T:
        """Run `work` on the loaded analytics store on a worker thread, one at a time, and return its result.

        DuckDB holds the thread it runs on: on the event loop, a projection of 2000 messages stalled every session.
        """
        analytics = await self.analytics_ready()
        return await trio.to_thread.run_sync(work, analytics, limiter=self.analytics_limiter)

    def vectors(self) -> VectorIndex:
        """Return the Chroma index, opening it on first use (chromadb is slow to import)."""
        if self._vectors is None:
            from stores.vectors import VectorIndex

            self._vectors = VectorIndex(self.home / VECTORS_DIR, MEMORY_COLLECTION, self.config.embedding_dims)
        return self._vectors

    async def persist(self, ops: Sequence[Op], redacted: Sequence[Op] = ()) -> None:
        """Write ops already applied to the replica, with their effects, in one transaction.

        If the write fails the replica is rebuilt from the store, so memory never runs ahead of disk.
        """
        await self.write(self.prepare([LogBatch(ops)], redacted))

    def prepare(self, log: Sequence[LogBatch], redacted: Sequence[Op] = ()) -> PendingWrite:
        """Take from the replica now the rows and conflicts that ops already applied to it wrote, for `write`.

        `log` holds the applied ops as the batches to log them in, with their encodings when at hand. Split from
        `write` so a caller can apply further ops while this write runs: their effects stay out of it.
        """
        keys = changed_keys(itertools.chain.from_iterable(logged.ops for logged in log))
        if self.replica.rebuilds != self._rebuilds_seen:
            # A revocation voided ops that had taken effect: any key they wrote may have changed.
            for collection, key in self.replica.logged_keys():
                keys[collection][key] = None
            self._rebuilds_seen = self.replica.rebuilds
        conflicts = self.replica.journal.since(self._conflicts_seen)
        self._conflicts_seen = self.replica.journal.recorded
        return PendingWrite(log, materialise(self.replica, keys), conflicts, redacted)

    async def write(self, pending: PendingWrite) -> None:
        """Write what `prepare` took in one transaction; if that fails, rebuild the replica from the store."""
        try:
            await self.sql.run(primary.persist, pending.log, pending.changes, pending.conflicts, pending.redacted)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.reload_replica()
            raise
        self.ops_stored += sum(len(logged.ops) for logged in pending.log)
        self.last_write_s = trio.current_time()

    async def close(self) -> None:
        """Close every store; idempotent."""
        if self._vectors is not None:
            self._vectors.close()
            self._vectors = None
        self.cache.close()
        self.analytics.close()
        await self.sql.close()


async def _replay_log(sql: AsyncSql, replica: Replica) -> None:
    """Replay the op log of the primary store into an empty replica."""
    ops = await sql.run(primary.load_ops)
    try:
        replica.replay(ops)
    except CrdtError as error:
        raise StoreError(f"cannot rebuild state from the op log: {error}") from None
    # Replaying re-detects old conflicts; those are already in the conflicts table.
    replica.journal = ConflictJournal(replica.config.journal_entries_max)


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _message_columns(replica: Replica) -> dict[str, list]:
    """Return every message's analytics facts, column-wise, as the replica holds them."""
    # Runs on the event loop as a node starts: unedited messages are read in place, and each column is one C loop.
    messages = replica.messages
    edits = messages.edits
    fields = [
        record.value if key not in edits else with_edits(record.value, edits[key])
        for key, record in messages.records.items()
    ]
    columns = {name: list(map(dict.get, fields, itertools.repeat(name))) for name in MESSAGE_COLUMNS[1:]}
    return {"id": list(messages.records), **columns}


async def _reload_analytics(data: DataLayer) -> int:
    """Replace the analytics store's messages with those of primary SQL; return how many there are."""
    rows = await data.sql.query(f"SELECT {', '.join(MESSAGE_COLUMNS)} FROM messages")
    columns = {name: [row[i] for row in rows] for i, name in enumerate(MESSAGE_COLUMNS)}

    def reload(analytics: AnalyticsStore) -> int:
        analytics.clear()
        return analytics.load(columns) if rows else 0

    return await data.in_analytics(reload)
