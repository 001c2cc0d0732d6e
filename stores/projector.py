"""The projector: brings DuckDB, the vector index and the RocksDB cache up to date with primary SQL, following its op
log and its outbox."""

import functools
import logging
from collections import defaultdict

import trio

from stores import primary
from stores.datalayer import DataLayer, without_rows
from stores.errors import StoreCorruptError, StoreError
from stores.vectors import INDEX_STEP_ITEMS_MAX, VectorIndex

log = logging.getLogger(__name__)
PREFERENCE_CACHE_PREFIX = b"pref:"
WRITER_POLL_S = 0.05
WRITER_QUIET_S = 0.2  # how long the store must go unwritten before the projector starts
# Chroma holds the GIL while it adds: a step of the index build stalls the event loop for its whole length. Steps are
# sized to take about this long, and the builder then rests as long, so it takes at most half of the loop's time.
# An add's cost grows with the index (HNSW, measured on random 384-dim vectors: 0.4 ms per item into 2.5k, ~8 ms into
# 100k), so steps shrink as the index grows, to a single item. 20 ms, so a live sync push waits at most about that long
# (bench sync's live p50 target is 20 ms) while the index builds; the build's share of the loop stays a half.
INDEX_STEP_TARGET_S = 0.02
INDEX_STEP_ITEMS_FIRST = 32
INDEX_STEP_ITEMS_MIN = 1


class Projector:
    """Applies logged ops and outbox entries to the derived stores idempotently and marks them done; resumes after a
    crash."""

    def __init__(self, data: DataLayer, *, batch_keys_max: int = 2000, idle_s: float = 5.0) -> None:
        self.data = data
        self.batch_keys_max = batch_keys_max
        self.idle_s = idle_s
        self.applied = 0
        self._wake = trio.Event()
        self._draining = trio.Lock()  # the run loop and callers that need fresh derived stores both drain

    def wake(self) -> None:
        """Tell the projector new changes are waiting."""
        self._wake.set()

    async def run(self, *, load_analytics: bool = True, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drain the outbox now and whenever woken (or every `idle_s`), and build the vector index in the
        background, until cancelled; load the analytics store first if `load_analytics`, else on first use."""
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.index_vectors)
            if load_analytics:
                await self.data.analytics_ready()
            await self._drain_forever()

    async def _drain_forever(self) -> None:
        while True:
            while self.data.write_lock.locked() or trio.current_time() - self.data.last_write_s < WRITER_QUIET_S:
                # A writer (a sync catch-up) holds the store, or let it go only between two writes: projecting now
                # would compete with it for the one store thread and the CPU (measured: a quarter of the receiver's
                # main thread during a catch-up). Derived stores may lag; callers that need them fresh drain themselves.
                await trio.sleep(WRITER_POLL_S)
            await self.drain(yield_to_writers=True)
            with trio.move_on_after(self.idle_s):
                await self._wake.wait()
            self._wake = trio.Event()

    async def drain(self, *, yield_to_writers: bool = False) -> int:
        """Apply every waiting outbox entry and logged batch not yet projected (or, yielding, stop when a writer takes
        the store); return how many key projections they held."""
        done = 0
        sql = self.data.sql
        async with self._draining:
            if self.data.cache_refill_owed:
                await self._refill_cache()
            # A catch-up releases the store between its writes: yielding stops at the next batch, not when it is over.
            while not (yield_to_writers and self.data.write_lock.locked()) and (
                batch := await sql.run(primary.outbox_batch, self.batch_keys_max)
            ):
                await self._apply(batch)
                await sql.run(primary.outbox_done, batch[-1].id)
                done += sum(len(entry.keys) for entry in batch)
            while not (yield_to_writers and self.data.write_lock.locked()):
                upto, batch = await self.data.log_projections(self.batch_keys_max)
                if not upto:
                    break
                await self._apply(batch)
                await sql.run(primary.projected, upto)
                done += sum(len(entry.keys) for entry in batch)
        self.applied += done
        return done

    async def _apply(self, batch: list[primary.OutboxEntry]) -> None:
        # Only the last entry per key matters, and the current row is read from primary SQL,
        # so applying a batch twice (after a crash) gives the same result.
        last: dict[tuple[str, str], str] = {}
        for entry in batch:
            for key in entry.keys:
                last[(entry.target, key)] = entry.action
        by_target: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for (target, key), action in last.items():
            by_target[target][action].append(key)
        for target, actions in by_target.items():
            await getattr(self, f"_project_{target}")(actions[primary.UPSERT], actions[primary.DELETE])

    async def _project_analytics(self, upserts: list[str], deletes: list[str]) -> None:
        await self.data.project_analytics(upserts, deletes)

    async def _project_vectors(self, upserts: list[str], deletes: list[str]) -> None:
        await self.data.project_vectors(upserts, deletes)

    async def _project_cache(self, upserts: list[str], deletes: list[str]) -> None:
        rows = await self.data.sql.run(primary.preference_rows, upserts)
        puts = [(PREFERENCE_CACHE_PREFIX + key.encode(), value) for key, value in rows]
        gone = [*deletes, *without_rows(upserts, rows)]  # a key projected from the log may be gone
        try:
            self.data.cache.write(puts, [PREFERENCE_CACHE_PREFIX + key.encode() for key in gone])
        except StoreCorruptError as error:
            self.data.mend_cache(error)
            await self._refill_cache()

    async def _refill_cache(self) -> int:
        """Write every preference into the cache (a mended, empty one: a failure now is not damage to mend again);
        return how many."""
        self.data.cache_refill_owed = False
        keys = await self.data.sql.run(primary.preference_keys)
        rows = await self.data.sql.run(primary.preference_rows, keys)
        self.data.cache.put_many((PREFERENCE_CACHE_PREFIX + key.encode(), value) for key, value in rows)
        return len(rows)

    async def _rebuild_cache(self) -> int:
        """Rewrite the cache's preferences from primary SQL, keeping session context unless the cache is damaged;
        return how many preferences it holds."""
        cache = self.data.cache
        try:
            cache.delete_many([key for key, _ in cache.scan_prefix(PREFERENCE_CACHE_PREFIX)])
        except StoreCorruptError as error:  # a scan reads every entry
            self.data.mend_cache(error)
        preferences = await self._refill_cache()
        try:
            self.data.cache.compact()  # drops what was deleted and rewritten, so rebuilds keep the cache's size
        except StoreCorruptError as error:  # compaction reads every file
            self.data.mend_cache(error)
            preferences = await self._refill_cache()
        return preferences

    async def index_vectors(self) -> None:
        """Load the vector index, then keep giving Chroma the changes it lacks, in short steps each followed by a rest
        as long, until cancelled."""
        data = self.data
        await data.vectors_ready()
        items = INDEX_STEP_ITEMS_FIRST
        while True:
            if not data.vectors.unindexed:
                with trio.move_on_after(self.idle_s):
                    await data.vectors_changed.wait()
                data.vectors_changed = trio.Event()
                continue
            started = trio.current_time()
            try:
                await data.in_vectors(functools.partial(VectorIndex.index_step, items_max=items))
            except StoreError as error:
                # Search answers exactly while Chroma lacks changes, so it stays right, only slower.
                log.warning("vector index: building stopped (%s); searches stay exact", error)
                return
            took_s = trio.current_time() - started
            scaled = int(items * INDEX_STEP_TARGET_S / max(took_s, 1e-3))
            items = max(INDEX_STEP_ITEMS_MIN, min(INDEX_STEP_ITEMS_MAX, scaled))
            await trio.sleep(took_s)

    async def rebuild(self) -> dict[str, int]:
        """Regenerate every derived store from primary SQL; return how many items each now holds."""
        data = self.data
        async with self._draining:
            await data.sql.run(primary.projections_clear)
            messages = await data.reload_analytics()
            vectors = await data.reload_vectors()
            preferences = await self._rebuild_cache()
        return {"analytics": messages, "vectors": vectors, "cache": preferences}
