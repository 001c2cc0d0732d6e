"""The outbox projector: brings DuckDB, Chroma and the RocksDB cache up to date with primary SQL."""

import logging
from collections import defaultdict

import numpy as np
import trio

from stores import primary
from stores.analytics import AnalyticsMessage, AnalyticsStore
from stores.datalayer import DataLayer, _reload_analytics

log = logging.getLogger(__name__)
PREFERENCE_CACHE_PREFIX = b"pref:"
WRITER_POLL_S = 0.05
WRITER_QUIET_S = 0.2  # how long the store must go unwritten before the projector starts


class Projector:
    """Applies outbox entries to the derived stores idempotently and marks them done; resumes after a crash."""

    def __init__(self, data: DataLayer, *, batch_keys_max: int = 2000, idle_s: float = 5.0) -> None:
        self.data = data
        self.batch_keys_max = batch_keys_max
        self.idle_s = idle_s
        self.applied = 0
        self._wake = trio.Event()
        self._draining = trio.Lock()  # the run loop and callers that need fresh derived stores both drain

    def wake(self) -> None:
        """Tell the projector new outbox entries are waiting."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drain the outbox now and whenever woken (or every `idle_s`), until cancelled."""
        task_status.started()
        await self.data.analytics_ready()  # outbox entries apply on top of the initial load
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
        """Apply every waiting outbox entry (or, yielding, stop when a writer takes the store); return how many key
        projections they held."""
        done = 0
        async with self._draining:
            # A catch-up releases the store between its writes: yielding stops at the next batch, not when it is over.
            while not (yield_to_writers and self.data.write_lock.locked()) and (
                batch := await self.data.sql.run(primary.outbox_batch, self.batch_keys_max)
            ):
                await self._apply(batch)
                await self.data.sql.run(primary.outbox_done, batch[-1].id)
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
        rows = await self.data.sql.run(
            primary.rows_by_id, "messages", "id, conversation, role, ts_ms, sentiment, response_time_ms", upserts
        )
        gone = deletes + _without_rows(upserts, rows)

        def apply(analytics: AnalyticsStore) -> None:
            analytics.delete(gone)
            analytics.upsert(AnalyticsMessage(*row) for row in rows)

        await self.data.in_analytics(apply)

    async def _project_vectors(self, upserts: list[str], deletes: list[str]) -> None:
        rows = await self.data.sql.run(primary.rows_by_id, "memories", "id, embedding, metadata", upserts)
        with_vectors = [row for row in rows if row[1]]
        gone = deletes + _without_rows(upserts, with_vectors)
        index = self.data.vectors()

        def apply() -> None:
            if gone:
                index.delete(gone)
            if with_vectors:
                embeddings = np.stack([np.frombuffer(row[1], dtype="<f4") for row in with_vectors])
                metadatas = [_scalar_metadata(primary.unpack(row[2])) for row in with_vectors]
                index.upsert([row[0] for row in with_vectors], embeddings, metadatas)

        await trio.to_thread.run_sync(apply, limiter=self.data.vectors_limiter)

    async def _project_cache(self, upserts: list[str], deletes: list[str]) -> None:
        rows = await self.data.sql.run(primary.preference_rows, upserts)
        self.data.cache.put_many((PREFERENCE_CACHE_PREFIX + key.encode(), value) for key, value in rows)
        self.data.cache.delete_many(PREFERENCE_CACHE_PREFIX + key.encode() for key in deletes)

    async def rebuild(self) -> dict[str, int]:
        """Regenerate every derived store from primary SQL; return how many items each now holds."""
        data = self.data
        await data.sql.run(primary.outbox_clear)
        messages = await _reload_analytics(data)
        memory_ids = [row[0] for row in await data.sql.query("SELECT id FROM memories")]
        index = data.vectors()
        await trio.to_thread.run_sync(index.clear, limiter=data.vectors_limiter)
        await self._project_vectors(memory_ids, [])
        stale = [key for key, _ in data.cache.scan_prefix(PREFERENCE_CACHE_PREFIX)]
        data.cache.delete_many(stale)
        keys = [row[0] for row in await data.sql.query("SELECT key FROM preferences WHERE collection = 'preferences'")]
        await self._project_cache(keys, [])
        vectors = await trio.to_thread.run_sync(index.count, limiter=data.vectors_limiter)
        return {"analytics": messages, "vectors": vectors, "cache": len(keys)}


def _without_rows(keys: list[str], rows: list[tuple]) -> list[str]:
    """Return the keys that have no row (keyed by its first column): gone from primary SQL since queued."""
    present = {row[0] for row in rows}
    return [key for key in keys if key not in present]


def _scalar_metadata(metadata: dict) -> dict | None:
    """Keep only short scalar metadata for the vector index (filters); texts stay in primary SQL."""
    kept = {
        key: value
        for key, value in metadata.items()
        if isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 64)
    }
    return kept or None
