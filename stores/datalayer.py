"""The four stores of one device opened together, with the replica that merges into them."""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TypeVar

import attrs
import numpy as np
import trio

from crdt import (
    Collection,
    Conflict,
    ConflictJournal,
    CrdtError,
    HybridClock,
    Kind,
    Op,
    Replica,
    ReplicaConfig,
    StatePart,
    StateResume,
    state_keys,
)
from crdt.memories import MemorySet
from crdt.messages import MessageSet
from crdt.registry import DeviceRegistry
from stores import primary
from stores.analytics import MESSAGE_COLUMNS, AnalyticsMessage, AnalyticsStore
from stores.cache import CacheInUseError, SealedKv
from stores.errors import StoreError
from stores.messages import SqlMessages
from stores.oplog import SqlLog
from stores.primary import Changes, LogBatch, MergedMessages
from stores.sql import SQL_ENGINES, AsyncSql
from stores.vectors import VectorIndex

log = logging.getLogger(__name__)
PRIMARY_FILE = "primary.db"
CACHE_DIR = "cache"
LEGACY_VECTORS_DIR = "vectors"  # where older nodes kept a Chroma index on disk, with vectors and metadata in the clear
VECTOR_LOAD_ROWS = 5000  # memories read from the primary store per query when loading the vector index
ANALYTICS_LOAD_ROWS = 50_000  # messages loaded into the analytics store per slice
# A write of at most this many ops and rows runs on the trio thread while it is idle (AsyncSql.run_brief). No other
# process writes the store while a node or command has it open (node.home.HomeLock), so such a write never waits out
# SQLite's busy timeout there.
BRIEF_WRITE_ROWS_MAX = 32
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


def materialise(
    replica: Replica,
    keys: Mapping[Collection, Iterable[str]],
    rebuilt: bool = False,
    unstored_messages: AbstractSet[str] = frozenset(),
) -> Changes:
    """Return the table row each changed key (by collection) now has in the replica, or that it is gone (with every
    row of its merge state replaced if the replica was `rebuilt` from its log); `unstored_messages` have no row yet."""
    changes = Changes(unstored_messages=unstored_messages)
    for collection, collection_keys in keys.items():
        read = _row_reader(replica, collection)
        rows = changes.upserts[collection] = {}
        for key in collection_keys:
            if (row := read(key)) is not None:
                rows[key] = row
            else:
                changes.deletes.setdefault(collection, []).append(key)
    if Collection.MESSAGES in keys:
        merged = _merged_messages(replica.messages, keys[Collection.MESSAGES], rebuilt)
        changes = attrs.evolve(changes, merged_messages=merged)
    return changes


def _merged_state(
    replica: Replica, parts: Sequence[StatePart], resume: StateResume | None, keys: dict[Collection, dict[str, None]]
) -> dict[str, object]:
    """Add to `keys` those the merged parts of a state stream changed; return what the write keeps in meta for them."""
    meta: dict[str, object] = {}
    for part in parts:
        for collection, part_keys in state_keys(part.state).items():
            keys[collection].update(dict.fromkeys(part_keys))
    if any(part.number == 0 or part.final for part in parts):
        # The other collections' state is not in the log: a start joins it before replaying their ops. Kept at the
        # first part (the registry, so this device knows its group if it restarts) and the last (every memory).
        meta[primary.STATE_BASE] = replica.state(messages=False)
    if parts:
        meta[primary.STATE_RESUME] = None if resume is None else [resume.vector, resume.after_id]
        meta[primary.CLOCK_LAST] = replica.clock.last  # the state's stamps are in no logged run
    return meta


def _merged_messages(messages: MessageSet, keys: Iterable[str], rebuilt: bool) -> MergedMessages:
    """Return the edits and tombstones these changed messages now have (all they have, if the state was `rebuilt`)."""
    ids = list(keys)
    edits, tombstones = messages.edits, messages.tombstones
    return MergedMessages(
        ids if rebuilt else [key for key in ids if key in tombstones],
        [
            (key, field, edit.hlc, edit.device, edit.seq, *(edit.prev or (None, None)), primary.pack(edit.value))
            for key in ids
            if key in edits
            for field, edit in edits[key].items()
        ],
        [(key, *tombstones[key]) for key in ids if key in tombstones],
    )


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
    forgotten: Sequence[tuple[Collection, str]]  # keys whose logged ops lose their content
    messages: MessageSet  # the replica's when prepared, and its seal then: what it may drop once this is written
    messages_seal: int
    bases: Mapping[str, int] = attrs.field(factory=dict)  # log bases a state snapshot raised
    ops_skipped: int = 0  # ops whose effect the snapshot brought, not logged
    meta: Mapping[str, object] = attrs.field(factory=dict)
    last_part: StatePart | None = None  # of a state stream being received, and where the stream then stands
    resume: StateResume | None = None

    @property
    def ops(self) -> list[Op]:
        """Return the applied ops, in order."""
        return [op for logged in self.log for op in logged.ops]

    @property
    def brief(self) -> bool:
        """Whether the write is a few ops and rows (a message add), to be run as a brief store call."""
        if self.last_part is not None or self.forgotten:  # a snapshot's part, a redaction of the log: rows unknown
            return False
        rows = sum(len(logged.ops) for logged in self.log) + self.changes.row_count()
        return rows <= BRIEF_WRITE_ROWS_MAX


class DataLayer:
    """One device's stores: the primary SQL store (truth), and derived from it DuckDB analytics and the vector index
    (both in memory only) and the RocksDB cache (keys hashed, values sealed)."""

    def __init__(
        self,
        home: Path,
        config: StoreConfig,
        sql: AsyncSql,
        log: SqlLog,
        messages: SqlMessages,
        replica: Replica,
        analytics: AnalyticsStore,
        cache: SealedKv,
        open_cache: Callable[[], SealedKv],
        now_ms: Callable[[], int],
    ) -> None:
        self.home = home
        self.now_ms = now_ms
        self.config = config
        self.sql = sql
        self.log = log  # the replica's
        self.messages = messages  # the replica's message store
        self.replica = replica
        self.analytics = analytics
        self.cache = cache
        self._open_cache = open_cache  # opens the cache again, to mend it
        self.cache_refill_owed = False  # the cache was mended empty: the projector refills it from primary SQL
        self.write_lock = trio.Lock()
        self.vectors_limiter = trio.CapacityLimiter(1)  # the vector index is used from one thread at a time
        self.analytics_limiter = trio.CapacityLimiter(1)  # and so is a DuckDB connection
        self.vectors = VectorIndex(config.embedding_dims)
        self.vectors_changed = trio.Event()  # set when the vector index takes changes Chroma lacks
        self._vectors_lock = trio.Lock()
        self._vectors_loaded = False
        self._conflicts_seen = replica.journal.recorded
        self._rebuilds_seen = replica.rebuilds
        self._stamp_numbers: dict[str, int] = {}  # primary.persist's cache, used on the SQL worker thread only
        self.ops_stored = replica.vector.total()  # ops in the store's log; the replica runs ahead by the writes pending
        self.state_resume: StateResume | None = None  # a state stream received in part: the next session resumes it
        self.state_progress: tuple[int, int] | None = None  # (messages, of about how many) of the stream being received
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
        """Open (creating if needed) every store in `home`; derived stores found damaged are made anew, empty."""
        config = config or StoreConfig()
        now_ms = now_ms or _wall_clock_ms
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        sql = await AsyncSql.open(config.engine, home / PRIMARY_FILE, store_key("sql"), timeout_s=config.sql_timeout_s)
        log: SqlLog | None = None
        messages: SqlMessages | None = None
        try:
            await sql.run(primary.open_schema)
            log = SqlLog.open(config.engine, home / PRIMARY_FILE, store_key("sql"))
            messages = SqlMessages.open(config.engine, home / PRIMARY_FILE, store_key("sql"))
            replica = await _load_replica(sql, log, messages, device_id, now_ms)
            _remove_legacy_vectors(home / LEGACY_VECTORS_DIR)  # once the home has proved to be this device's
            analytics = AnalyticsStore()

            def open_cache() -> SealedKv:
                keys = store_key("cache"), store_key("cache-index")
                return SealedKv(home / CACHE_DIR, *keys, now=lambda: now_ms() / 1000)

            cache, mended = _mended_if_damaged(home / CACHE_DIR, open_cache)
        except BaseException:
            for reader in (log, messages):
                if reader is not None:
                    reader.close()
            await sql.close()
            raise
        data = cls(home, config, sql, log, messages, replica, analytics, cache, open_cache, now_ms)
        data.cache_refill_owed = mended
        if resume := await sql.run(primary.get_meta, primary.STATE_RESUME):
            data.state_resume = StateResume(*resume)
        return data

    def mend_cache(self, error: StoreError) -> None:
        """Replace a cache found damaged while open with an empty one, which the projector refills."""
        self.cache.close()
        self.cache, _ = _mended_if_damaged(self.cache.path, self._open_cache, error)
        self.cache_refill_owed = True

    async def reload_replica(self) -> None:
        """Rebuild the replica from primary SQL after a failed write left it ahead of the store.

        The replica object stays the same, so every session and service holding it sees the reloaded state.
        """
        self.replica.clear()
        await _resume(self.sql, self.replica)
        self._conflicts_seen = 0
        self._rebuilds_seen = self.replica.rebuilds
        self.ops_stored = self.replica.vector.total()

    async def analytics_ready(self) -> AnalyticsStore:
        """Return the analytics store, loading it from the primary store's messages on first use.

        A node starts serving before this load (it is the slowest part of a start with many
        messages); whatever needs analytics waits here instead. Use it through `in_analytics`.
        """
        async with self._analytics_lock:
            if not self._analytics_loaded:
                await self._load_analytics()
                self._analytics_loaded = True
        return self.analytics

    async def _load_analytics(self) -> int:
        """Fill the analytics store from the primary store's messages, a slice at a time; return how many there are.

        A million messages' columns at once held 350 MB beside the table. A message written during the load is
        projected once it is over (projections wait for the analytics lock).
        """
        after, loaded = 0, 0
        while rows := await self.sql.run(primary.message_columns_after, after, ", ".join(MESSAGE_COLUMNS), ANALYTICS_LOAD_ROWS):
            after = rows[-1][0]
            columns = {name: [row[i + 1] for row in rows] for i, name in enumerate(MESSAGE_COLUMNS)}
            loaded += await trio.to_thread.run_sync(self.analytics.load, columns, limiter=self.analytics_limiter)
        return loaded

    async def log_projections(self, ops_max: int) -> tuple[int, list[primary.OutboxEntry]]:
        """Return primary.log_projections of the logged batches the projector has not read: batches of messages alone
        owe nothing while the analytics store is unloaded, as its load reads primary SQL after them."""
        async with self._analytics_lock:  # so no load is under way, between its last read and its end
            return await self.sql.run(primary.log_projections, ops_max, self._analytics_loaded)

    async def reload_analytics(self) -> int:
        """Replace the analytics store's messages with those of primary SQL; return how many there are."""
        async with self._analytics_lock:
            await trio.to_thread.run_sync(self.analytics.clear, limiter=self.analytics_limiter)
            self._analytics_loaded = False  # a reload cut short leaves a store that loads again on next use
            loaded = await self._load_analytics()
            self._analytics_loaded = True
        return loaded

    async def in_analytics(self, work: Callable[[AnalyticsStore], T]) -> T:
        """Run `work` on the loaded analytics store on a worker thread, one at a time, and return its result.

        DuckDB holds the thread it runs on: on the event loop, a projection of 2000 messages stalled every session.
        """
        analytics = await self.analytics_ready()
        return await trio.to_thread.run_sync(work, analytics, limiter=self.analytics_limiter)

    async def project_analytics(self, upserts: Sequence[str], deletes: Sequence[str]) -> None:
        """Bring changed and deleted messages into the analytics store from primary SQL, if the store is loaded: its
        load reads primary SQL after them (so a command's import fills no store its exit throws away)."""
        async with self._analytics_lock:
            if not self._analytics_loaded:
                return
            columns = "id, conversation, role, ts_ms, sentiment, response_time_ms"
            rows = await self.sql.run(primary.rows_by_id, "messages", columns, upserts)
            gone = [*deletes, *without_rows(upserts, rows)]

            def apply(analytics: AnalyticsStore) -> None:
                if gone:
                    analytics.delete(gone)
                if rows:
                    analytics.upsert(AnalyticsMessage(*row) for row in rows)

            await trio.to_thread.run_sync(apply, self.analytics, limiter=self.analytics_limiter)

    async def vectors_ready(self) -> VectorIndex:
        """Return the vector index, loading every memory's vector from the primary store on first use."""
        async with self._vectors_lock:
            if not self._vectors_loaded:
                await self._load_vectors()
        return self.vectors

    async def _load_vectors(self) -> None:
        """Fill the vector index from the primary store, from empty (so a load cut short leaves nothing stale)."""
        self._vectors_loaded = False
        await trio.to_thread.run_sync(self.vectors.clear, limiter=self.vectors_limiter)
        after = 0
        while rows := await self.sql.run(primary.memory_vectors, after, VECTOR_LOAD_ROWS):
            after = rows[-1][0]
            await self._upsert_vectors([(memory_id, embedding) for _, memory_id, embedding in rows])
        self._vectors_loaded = True

    async def _upsert_vectors(self, rows: Sequence[tuple[str, bytes]]) -> None:
        dims = self.config.embedding_dims
        # Memories synced from a device with another embedding size have no place in this index.
        fitting = [(memory_id, embedding) for memory_id, embedding in rows if len(embedding) == 4 * dims]
        gone = [memory_id for memory_id, embedding in rows if len(embedding) != 4 * dims]
        ids = [memory_id for memory_id, _ in fitting]
        matrix = np.frombuffer(b"".join(embedding for _, embedding in fitting), dtype="<f4").reshape(-1, dims)

        def upsert(index: VectorIndex) -> None:
            index.delete(gone)
            index.upsert(ids, matrix)

        await trio.to_thread.run_sync(upsert, self.vectors, limiter=self.vectors_limiter)
        self.vectors_changed.set()

    async def in_vectors(self, work: Callable[[VectorIndex], T]) -> T:
        """Run `work` on the loaded vector index on a worker thread, one at a time, and return its result."""
        index = await self.vectors_ready()
        return await trio.to_thread.run_sync(work, index, limiter=self.vectors_limiter)

    async def project_vectors(self, upserts: Sequence[str], deletes: Sequence[str]) -> None:
        """Bring changed and deleted memories into the vector index from primary SQL, if the index is loaded: its load
        reads the primary store after them."""
        async with self._vectors_lock:
            if not self._vectors_loaded:
                return
            rows = await self.sql.run(primary.rows_by_id, "memories", "id, embedding", upserts)
            with_vectors = [row for row in rows if row[1]]
            if gone := [*deletes, *without_rows(upserts, with_vectors)]:
                await trio.to_thread.run_sync(self.vectors.delete, gone, limiter=self.vectors_limiter)
                self.vectors_changed.set()
            if with_vectors:
                await self._upsert_vectors(with_vectors)

    async def reload_vectors(self) -> int:
        """Replace the vector index's contents with the vectors of the primary store; return how many there are."""
        async with self._vectors_lock:
            await self._load_vectors()
        return self.vectors.count()

    async def persist(
        self, ops: Sequence[Op], forgotten: Sequence[tuple[Collection, str]] = (), made: Sequence[str] = ()
    ) -> None:
        """Write ops already applied to the replica, with their effects, in one transaction; the logged ops of the
        forgotten keys lose their content in it. `made` names messages whose ids were just made (no row to read).

        If the write fails the replica is rebuilt from the store, so memory never runs ahead of disk.
        """
        await self.write(self.prepare([LogBatch(ops)], forgotten, made=made))

    def prepare(
        self,
        log: Sequence[LogBatch],
        forgotten: Sequence[tuple[Collection, str]] = (),
        parts: Sequence[StatePart] = (),
        resume: StateResume | None = None,
        made: Sequence[str] = (),
    ) -> PendingWrite:
        """Take from the replica now the rows and conflicts that ops already applied to it wrote, and the parts of a
        state stream merged into it (after which the stream stands at `resume`), for `write`; `made` names messages
        whose ids were just made (the store holds no row of them).

        `log` holds the applied ops as the batches to log them in, with their encodings when at hand. Split from
        `write` so a caller can apply further ops while this write runs: their effects stay out of it.
        """
        keys = changed_keys(itertools.chain.from_iterable(logged.ops for logged in log))
        meta = _merged_state(self.replica, parts, resume, keys)
        rebuilt = self.replica.rebuilds != self._rebuilds_seen
        if rebuilt:
            # A revocation voided ops that had taken effect: any key they wrote may have changed.
            for collection, key in self.replica.logged_keys():
                keys[collection][key] = None
            self._rebuilds_seen = self.replica.rebuilds
        conflicts = self.replica.journal.since(self._conflicts_seen)
        self._conflicts_seen = self.replica.journal.recorded
        changes, messages = materialise(self.replica, keys, rebuilt, frozenset(made)), self.replica.messages
        bases, skipped = self.log.take_restarted()
        last_part = parts[-1] if parts else None
        seal = messages.seal()
        return PendingWrite(log, changes, conflicts, forgotten, messages, seal, bases, skipped, meta, last_part, resume)

    async def write(self, pending: PendingWrite) -> None:
        """Write what `prepare` took in one transaction; if that fails, rebuild the replica from the store."""
        try:
            p = pending
            run = self.sql.run_brief if p.brief else self.sql.run
            await run(primary.persist, p.log, p.changes, p.conflicts, p.forgotten, p.meta, p.bases, self._stamp_numbers)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.reload_replica()
            raise
        self.log.record_written(pending.ops, pending.forgotten)
        pending.messages.written(pending.messages_seal)
        self.ops_stored += sum(len(logged.ops) for logged in pending.log) + pending.ops_skipped
        if (part := pending.last_part) is not None:
            self.state_resume = pending.resume
            self.state_progress = None if pending.resume is None else (part.messages_done, part.messages_total)
        self.last_write_s = trio.current_time()

    async def close(self) -> None:
        """Close every store; idempotent."""
        self.vectors.close()
        self.cache.close()
        self.analytics.close()
        self.log.close()
        self.messages.close()
        await self.sql.close()


async def _load_replica(
    sql: AsyncSql, log: SqlLog, messages: SqlMessages, device_id: str, now_ms: Callable[[], int]
) -> Replica:
    """Return the replica of the primary store of `device_id` (refusing another device's store)."""
    stored_device = await sql.run(primary.get_meta, "device_id")
    if stored_device is None:
        await sql.run(primary.set_meta, "device_id", device_id)
    elif stored_device != device_id:
        raise StoreError(f"this store belongs to device {stored_device}, not {device_id}")
    if not await sql.run(primary.get_meta, primary.MESSAGES_MERGED):
        await _store_merged_messages(sql, Replica(device_id, HybridClock(now_ms), ReplicaConfig(), log))
        log.reset()
    replica = Replica(device_id, HybridClock(now_ms), ReplicaConfig(), log, messages)
    await _resume(sql, replica)
    return replica


async def _resume(sql: AsyncSql, replica: Replica) -> None:
    """Take up the primary store's state in an empty replica: the messages stay in the store, and only the logged ops
    of the other collections (a few hundred in a home of a million messages) are replayed."""
    vector = await sql.run(primary.logged_vector)
    clock_last = await sql.run(primary.logged_clock)
    base_state = await sql.run(primary.get_meta, primary.STATE_BASE)
    try:
        replica.resume(vector, clock_last, await sql.run(primary.logged_ops_besides_messages), base_state)
    except CrdtError as error:
        raise StoreError(f"cannot rebuild state from the op log: {error}") from None
    # Replaying re-detects old conflicts; those are already in the conflicts table.
    replica.journal = ConflictJournal(replica.config.journal_entries_max)


async def _store_merged_messages(sql: AsyncSql, scratch: Replica) -> None:
    """Once, in a home from before the store kept the messages' merge state: replay the whole log into a replica that
    holds its messages in memory (as every start did then), and write that state, so no start replays it again."""
    log.warning("storing the merge state of this home's messages, once: its whole op log is replayed")
    other_ops: dict[int, int] = {}
    after = 0
    try:
        while pages := await sql.run(primary.logged_pages, after, primary.LOG_PAGE_OPS):
            after = pages[-1][0]
            other_ops |= {batch: primary.other_ops(ops) for batch, ops in pages}
            ops = [op for _, batch in pages for op in batch]
            if any(op.kind is Kind.REVOKE for op in ops):
                # A revocation voids its device's later ops wherever they are logged, even before it: knowing every
                # revocation first takes the whole log at once (only a home with a revocation in it pays for this).
                pages = await sql.run(primary.logged_pages, 0, 1 << 62)
                other_ops |= {batch: primary.other_ops(ops) for batch, ops in pages}
                scratch.clear()
                scratch.replay([op for _, batch in pages for op in batch])
                break
            scratch.replay(ops)
    except CrdtError as error:
        raise StoreError(f"cannot rebuild state from the op log: {error}") from None
    messages = scratch.messages
    ids = [*messages.records, *messages.tombstones]
    stamps = [(record.hlc, record.device, record.seq, message_id) for message_id, record in messages.records.items()]
    merged = _merged_messages(messages, ids, rebuilt=False)
    await sql.run(primary.store_merged_messages, stamps, merged, other_ops, scratch.clock.last)


def without_rows(keys: Sequence[str], rows: Sequence[tuple]) -> list[str]:
    """Return the keys that have no row (keyed by its first column): gone from primary SQL since queued."""
    present = {row[0] for row in rows}
    return [key for key in keys if key not in present]


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _remove_legacy_vectors(folder: Path) -> None:
    """Delete the on-disk Chroma folder of an older node, unopened: it held vectors and metadata in the clear, and a
    damaged one crashed Chroma (the index is now rebuilt in memory from the primary store)."""
    if folder.is_dir():
        shutil.rmtree(folder)
        log.warning("removed %s: an older node's vector index, now kept in memory only", folder)


def _mended_if_damaged(
    path: Path, open_cache: Callable[[], SealedKv], damage: StoreError | None = None
) -> tuple[SealedKv, bool]:
    """Open the cache; if it is damaged (or `damage` was found in it), delete it and open an empty one. Return the
    cache and whether it was made anew. A cache in use by another process is never touched."""
    if damage is None:
        try:
            return open_cache(), False
        except CacheInUseError:
            raise
        except StoreError as error:
            damage = error
    log.warning("%s; made anew, refilled from the primary store", damage)
    try:
        shutil.rmtree(path)
    except OSError as error:
        raise StoreError(f"cannot remove the damaged cache {path}: {error.strerror}; remove it by hand") from error
    return open_cache(), True
