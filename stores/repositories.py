"""Repositories and the unit of work: the only way modules read and change a device's data.

Writes are staged on the unit of work and turned into ops only at `commit`, under the write lock,
so a unit of work that fails or is abandoned changes nothing.
"""

import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import numpy as np

from crdt import Collection, CrdtError, Op, Replica
from stores import primary
from stores.datalayer import DataLayer
from stores.errors import DataError, StoreCorruptError, StoreError
from stores.where import check_where

Intent = Callable[[Replica], tuple[list[Op], list[tuple[Collection, str]]]]  # -> (ops made, keys forgotten)
SEARCH_OVERFETCH = 4  # near-duplicates collapse after the vector query, so ask for more than k


def new_id() -> str:
    """Return a unique 32-hex-digit id that sorts by creation time (a UUIDv7 layout: 48 bits of ms, 80 random)."""
    # Ids that grow with time land at the end of the primary-key B-tree: a catch-up of random ids cost a page
    # split or a cache miss per row.
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


@attrs.frozen
class Message:
    """A conversation message."""

    id: str
    conversation: str
    role: str
    text: str
    ts_ms: int
    sentiment: float | None
    response_time_ms: float | None


@attrs.frozen
class Memory:
    """A memory: text, metadata, and its distance to a search query if it came from one."""

    id: str
    text: str
    metadata: dict[str, Any]
    distance: float | None = None


def _one(op: Op) -> tuple[list[Op], list[tuple[Collection, str]]]:
    return [op], []


def embedding_bytes(embedding: Any, dims: int) -> bytes | None:
    """Return an embedding as little-endian float32 bytes, checking its size."""
    if embedding is None:
        return None
    vector = np.asarray(embedding, dtype="<f4").reshape(-1)
    if vector.shape != (dims,) or not np.all(np.isfinite(vector)):
        raise DataError(f"embedding must be {dims} finite numbers, got shape {vector.shape}")
    return vector.tobytes()


class _Repository:
    def __init__(self, uow: "UnitOfWork") -> None:
        self._uow = uow
        self._data = uow.data


class PreferenceRepository(_Repository):
    """User preferences and settings: last writer wins per key."""

    def set(self, key: str, value: Any, collection: Collection = Collection.PREFERENCES) -> None:
        self._uow.stage(lambda r: _one(r.set_preference(key, value, collection=collection)))

    async def get(self, key: str, collection: Collection = Collection.PREFERENCES) -> Any:
        row = await self._data.sql.query_one(
            "SELECT value FROM preferences WHERE collection = ? AND key = ?", (collection.value, key)
        )
        return None if row is None else primary.unpack(row[0])

    async def all(self, collection: Collection = Collection.PREFERENCES) -> dict[str, Any]:
        rows = await self._data.sql.query("SELECT key, value FROM preferences WHERE collection = ?", (collection.value,))
        return {key: primary.unpack(value) for key, value in rows}


class ConversationRepository(_Repository):
    """Conversations and their immutable messages."""

    def add_message(
        self,
        conversation: str,
        text: str,
        *,
        role: str = "user",
        ts_ms: int | None = None,
        sentiment: float | None = None,
        response_time_ms: float | None = None,
        message_id: str | None = None,
    ) -> str:
        """Stage a new message and return its id (a new one unless given)."""
        if message_id is None:
            message_id = new_id()
            self._uow.made_message_ids.append(message_id)
        fields = {
            "conversation": conversation,
            "role": role,
            "text": text,
            "ts_ms": ts_ms if ts_ms is not None else time.time_ns() // 1_000_000,
            "sentiment": sentiment,
            "response_time_ms": response_time_ms,
        }
        self._uow.stage(lambda r: _one(r.add_message(message_id, fields)), message_id)
        return message_id

    def edit_message(self, message_id: str, field: str, value: Any) -> None:
        self._uow.stage(lambda r: _one(r.edit_message(message_id, field, value)), message_id)

    def known(self, message_ids: Iterable[str]) -> set[str]:
        """Return which of these ids a message was ever added under (forgotten ones included)."""
        return self._data.replica.messages.seen(message_ids)

    def forget(self, message_id: str) -> None:
        """Stage deleting a message everywhere, its content purged from every store."""
        self._uow.stage(lambda r: _forget(r, Collection.MESSAGES, message_id), message_id)

    async def get(self, message_id: str) -> Message | None:
        row = await self._data.sql.query_one(
            "SELECT id, conversation, role, text, ts_ms, sentiment, response_time_ms FROM messages WHERE id = ?",
            (message_id,),
        )
        return None if row is None else Message(*row)

    async def messages(self, conversation: str, limit: int = 100) -> list[Message]:
        rows = await self._data.sql.query(
            "SELECT id, conversation, role, text, ts_ms, sentiment, response_time_ms FROM messages "
            "WHERE conversation = ? ORDER BY ts_ms DESC LIMIT ?",
            (conversation, limit),
        )
        return [Message(*row) for row in rows]

    async def conversations(self) -> list[tuple[str, int, int]]:
        """Return (id, message count, last message time) of every conversation, newest first."""
        return await self._data.sql.query("SELECT id, message_count, last_ts_ms FROM conversations ORDER BY last_ts_ms DESC")


def _forget(replica: Replica, collection: Collection, key: str) -> tuple[list[Op], list[tuple[Collection, str]]]:
    exists = replica.messages.get(key) if collection is Collection.MESSAGES else replica.memories.is_live(key)
    if not exists:
        raise DataError(f"no {collection.value[:-1]} with id {key}")
    return [replica.forget(collection, key)], [(collection, key)]


class MemoryRepository(_Repository):
    """Memories with embeddings; near-duplicates collapse to one canonical memory."""

    def save_memory(
        self, text: str, embedding: Any = None, metadata: Mapping[str, Any] | None = None, memory_id: str | None = None
    ) -> str:
        """Stage a new memory and return its id (a new one unless given)."""
        memory_id = memory_id or new_id()
        vector = embedding_bytes(embedding, self._data.config.embedding_dims)
        self._uow.stage(lambda r: _one(r.add_memory(memory_id, text, vector, dict(metadata or {}))))
        return memory_id

    def known(self, memory_ids: Iterable[str]) -> set[str]:
        """Return which of these ids a memory was ever added under (removed ones included)."""
        memories = self._data.replica.memories
        return {id_ for id_ in memory_ids if id_ in memories.adds or id_ in memories.removed}

    def forget(self, memory_id: str) -> None:
        """Stage removing a memory everywhere, its content purged from every store."""
        self._uow.stage(lambda r: _forget(r, Collection.MEMORIES, memory_id))

    async def get(self, memory_id: str) -> Memory | None:
        rows = await self._data.sql.run(primary.rows_by_id, "memories", "id, text, metadata", [memory_id])
        return Memory(rows[0][0], rows[0][1], primary.unpack(rows[0][2])) if rows else None

    async def get_memories_by_context(
        self, embedding: Any, limit: int = 10, where: Mapping[str, Any] | None = None
    ) -> list[Memory]:
        """Return the memories nearest an embedding, one per near-duplicate group, nearest first; `where` filters on
        metadata (stores/where.py), read from the primary store."""
        packed = embedding_bytes(embedding, self._data.config.embedding_dims)
        if packed is None:
            raise DataError("a memory search needs an embedding")
        vector = np.frombuffer(packed, dtype="<f4")
        among = None
        if where:
            check_where(where)
            among = await self._data.sql.run(primary.memory_ids_where, where)
        hits = await self._data.in_vectors(lambda index: index.query(vector, limit * SEARCH_OVERFETCH, among))
        canonical = self._data.replica.memories.canonical_ids()
        best: dict[str, float] = {}
        for hit in hits:
            group = canonical.get(hit.id)
            if group is not None and group not in best:
                best[group] = hit.distance
        chosen = list(best)[:limit]
        rows = {row[0]: row for row in await self._data.sql.run(primary.rows_by_id, "memories", "id, text, metadata", chosen)}
        return [Memory(i, rows[i][1], primary.unpack(rows[i][2]), best[i]) for i in chosen if i in rows]

    async def list(self, limit: int = 50) -> list[Memory]:
        """Return up to `limit` memories, newest first (ids sort by creation time)."""
        rows = await self._data.sql.query("SELECT id, text, metadata FROM memories ORDER BY id DESC LIMIT ?", (limit,))
        return [Memory(memory_id, text, primary.unpack(metadata)) for memory_id, text, metadata in rows]


class NoteRepository(_Repository):
    """Relationship notes and profile texts, merged character-wise."""

    def edit(self, name: str, text: str) -> None:
        self._uow.stage(lambda r: _one(r.edit_note(name, text)))

    async def get(self, name: str) -> str | None:
        row = await self._data.sql.query_one("SELECT text FROM notes WHERE name = ?", (name,))
        return None if row is None else row[0]

    async def names(self) -> list[str]:
        """Return the name of every note, in order."""
        return [name for (name,) in await self._data.sql.query("SELECT name FROM notes ORDER BY name")]


class CounterRepository(_Repository):
    """Interaction counters summed over every device."""

    def increment(self, name: str, delta: int = 1) -> None:
        self._uow.stage(lambda r: _one(r.increment(name, delta)))

    async def get(self, name: str) -> int:
        row = await self._data.sql.query_one("SELECT value FROM counters WHERE name = ?", (name,))
        return 0 if row is None else row[0]


class DeviceRepository(_Repository):
    """The registry of this user's devices."""

    def enrol(self, device: str, record: Mapping[str, Any]) -> None:
        self._uow.stage(lambda r: _one(r.enrol_device(device, record)))

    def revoke(self, device: str, record: Mapping[str, Any]) -> None:
        self._uow.stage(lambda r: _one(r.revoke_device(device, record)))

    async def list(self) -> list[dict[str, Any]]:
        rows = await self._data.sql.query("SELECT device, record, revoked FROM devices ORDER BY device")
        return [{"device": d, **primary.unpack(record), "revoked": bool(revoked)} for d, record, revoked in rows]


@attrs.frozen
class LostValue:
    """A value that lost a concurrent last-writer-wins merge, beside the one that won."""

    collection: str
    key: str
    field: str | None
    winner_device: str
    winner_seq: int
    winner_value: Any
    loser_device: str
    loser_seq: int
    loser_value: Any


class ConflictRepository(_Repository):
    """The conflict journal: values overwritten by a concurrent write, newest first."""

    async def recent(self, limit: int = 100) -> list[LostValue]:
        rows = await self._data.sql.query(
            "SELECT collection, key, field, winner_device, winner_seq, winner_value, loser_device, loser_seq, "
            "loser_value FROM conflicts ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        unpack = primary.unpack
        return [LostValue(c, k, f, wd, ws, unpack(wv), ld, ls, unpack(lv)) for c, k, f, wd, ws, wv, ld, ls, lv in rows]


@attrs.frozen
class PrimaryCounts:
    """How much the primary store holds, and how many keys wait for the projector."""

    messages: int
    memories: int
    projector_backlog: int


class TotalsRepository(_Repository):
    """Counts over the primary store, for status."""

    async def counts(self) -> PrimaryCounts:
        row = await self._data.sql.query_one("SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM memories)")
        assert row is not None  # an aggregate always returns a row
        messages, memories = row
        return PrimaryCounts(messages, memories, await self._data.sql.run(primary.projector_backlog))


SESSION_PREFIX = b"session:"


class SessionRepository(_Repository):
    """Session context: short-lived values in the sealed RocksDB cache, local to this device and written at once."""

    def set(self, key: str, value: Any, ttl_s: float | None = 3600.0) -> None:
        if ttl_s is not None and not 0 < ttl_s <= 30 * 86_400:
            raise DataError("ttl_s must be between 0 and 30 days")
        entry = SESSION_PREFIX + key.encode(), primary.pack(value)
        try:
            self._data.cache.put(*entry, ttl_s=ttl_s)
        except StoreCorruptError as error:
            self._data.mend_cache(error)
            self._data.cache.put(*entry, ttl_s=ttl_s)

    def get(self, key: str) -> Any:
        try:
            packed = self._data.cache.get(SESSION_PREFIX + key.encode())
        except StoreCorruptError as error:
            self._data.mend_cache(error)  # a damaged entry is lost with the rest of the cache: read as absent
            packed = None
        return None if packed is None else primary.unpack(packed)


class UnitOfWork:
    """Stages writes across repositories and commits them atomically: `async with uow: ...; await uow.commit()`."""

    def __init__(self, data: DataLayer, on_commit: Callable[[list[Op]], None] | None = None) -> None:
        self.data = data
        self._on_commit = on_commit
        self._intents: list[Intent] = []
        self._message_ids: list[str] = []  # of the messages the intents write: read from the store in one go
        self.made_message_ids: list[str] = []  # of them, those just made (new_id): nothing to read
        self.preferences = PreferenceRepository(self)
        self.conversations = ConversationRepository(self)
        self.memories = MemoryRepository(self)
        self.notes = NoteRepository(self)
        self.counters = CounterRepository(self)
        self.devices = DeviceRepository(self)
        self.session = SessionRepository(self)
        self.conflicts = ConflictRepository(self)
        self.totals = TotalsRepository(self)

    def stage(self, intent: Intent, message_id: str | None = None) -> None:
        """Stage a write (of the message `message_id`, if it writes one)."""
        self._intents.append(intent)
        if message_id is not None:
            self._message_ids.append(message_id)

    async def __aenter__(self) -> "UnitOfWork":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.rollback()  # anything not committed by now is dropped

    def rollback(self) -> None:
        """Drop every staged write."""
        self._intents.clear()
        self._message_ids.clear()
        self.made_message_ids.clear()

    async def commit(self) -> list[Op]:
        """Turn the staged writes into ops and store them in one transaction; return the ops."""
        intents, self._intents = self._intents, []
        message_ids, self._message_ids = self._message_ids, []
        new_ids, self.made_message_ids = self.made_message_ids, []
        if not intents:
            return []
        data = self.data
        async with data.write_lock:
            # Each message's stored state in one read, not a read per intent (100k staged adds took 4 s more).
            data.replica.messages.hold_new(new_ids)
            data.replica.messages.prefetch(message_ids)
            ops: list[Op] = []
            forgotten: list[tuple[Collection, str]] = []
            try:
                for intent in intents:
                    made, keys = intent(data.replica)
                    ops += made
                    forgotten += keys
            except (CrdtError, StoreError) as error:
                if ops:  # earlier intents of this unit already changed the replica
                    await data.reload_replica()
                raise error if isinstance(error, StoreError) else DataError(str(error)) from None
            await data.persist(ops, forgotten, new_ids)
        if self._on_commit is not None:
            self._on_commit(ops)
        return ops
