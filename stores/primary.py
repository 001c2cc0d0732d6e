"""The primary store's schema and the functions that write and read it; the source of truth.

Every function here takes a SqlAdapter and runs on the store's worker thread (via AsyncSql.run).
Local writes and remote ops land in one transaction each: the ops, the materialised rows they
change, new conflict-journal entries and the outbox entries that tell the projector what to redo
in the derived stores.
"""

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import msgpack

from crdt import Collection, Conflict, Op, decode_stored_ops, encode_op
from stores.sql import SqlAdapter, migrate

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
        CREATE TABLE ops (
            device TEXT NOT NULL, seq INTEGER NOT NULL, collection TEXT NOT NULL, key TEXT NOT NULL,
            body BLOB NOT NULL, PRIMARY KEY (device, seq));
        CREATE INDEX ops_by_key ON ops (collection, key);
        CREATE TABLE preferences (
            collection TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY (collection, key));
        CREATE TABLE conversations (id TEXT PRIMARY KEY, message_count INTEGER NOT NULL, last_ts_ms INTEGER NOT NULL);
        CREATE TABLE messages (
            id TEXT PRIMARY KEY, conversation TEXT NOT NULL, role TEXT NOT NULL, text TEXT NOT NULL,
            ts_ms INTEGER NOT NULL, sentiment REAL, response_time_ms REAL);
        CREATE INDEX messages_by_conversation ON messages (conversation, ts_ms);
        CREATE TABLE memories (id TEXT PRIMARY KEY, text TEXT NOT NULL, embedding BLOB, metadata BLOB NOT NULL);
        CREATE TABLE notes (name TEXT PRIMARY KEY, text TEXT NOT NULL);
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
        CREATE TABLE devices (device TEXT PRIMARY KEY, record BLOB NOT NULL, revoked INTEGER NOT NULL);
        CREATE TABLE conflicts (
            id INTEGER PRIMARY KEY AUTOINCREMENT, collection TEXT NOT NULL, key TEXT NOT NULL, field TEXT,
            winner_device TEXT NOT NULL, winner_seq INTEGER NOT NULL, winner_value BLOB,
            loser_device TEXT NOT NULL, loser_seq INTEGER NOT NULL, loser_value BLOB);
        CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, target TEXT NOT NULL, action TEXT NOT NULL,
            key TEXT NOT NULL);
        """,
    ),
    # Nothing reads the op log by key, and the index cost a random B-tree insert per op (a third of a catch-up's
    # writes to the ops table).
    (2, "DROP INDEX ops_by_key;"),
]

# Derived stores the projector keeps current.
ANALYTICS, VECTORS, CACHE = "analytics", "vectors", "cache"
UPSERT, DELETE = "upsert", "delete"


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


@attrs.frozen
class Change:
    """The materialised form of one key after a write: a row to upsert, or None to delete."""

    collection: Collection
    key: str
    row: tuple | None


@attrs.frozen
class OutboxEntry:
    """A derived-store update the projector still owes."""

    id: int
    target: str
    action: str
    key: str


def open_schema(adapter: SqlAdapter) -> int:
    """Bring the schema up to date and return its version."""
    return migrate(adapter, MIGRATIONS)


def get_meta(adapter: SqlAdapter, name: str) -> Any:
    row = adapter.query_one("SELECT value FROM meta WHERE name = ?", (name,))
    return None if row is None else unpack(row[0])


def set_meta(adapter: SqlAdapter, name: str, value: Any) -> None:
    adapter.execute(
        "INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (name, pack(value)),
    )


def load_ops(adapter: SqlAdapter) -> list[Op]:
    """Return every logged op in the order it was applied (each device's in seq order)."""
    return decode_stored_ops([body for (body,) in adapter.query("SELECT body FROM ops ORDER BY rowid")])


_UPSERT_SQL = {
    Collection.PREFERENCES: "INSERT OR REPLACE INTO preferences (collection, key, value) VALUES (?, ?, ?)",
    Collection.MESSAGES: "INSERT OR REPLACE INTO messages "
    "(id, conversation, role, text, ts_ms, sentiment, response_time_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
    Collection.MEMORIES: "INSERT OR REPLACE INTO memories (id, text, embedding, metadata) VALUES (?, ?, ?, ?)",
    Collection.NOTES: "INSERT OR REPLACE INTO notes (name, text) VALUES (?, ?)",
    Collection.COUNTERS: "INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)",
    Collection.DEVICES: "INSERT OR REPLACE INTO devices (device, record, revoked) VALUES (?, ?, ?)",
}
_DELETE_SQL = {
    Collection.MESSAGES: "DELETE FROM messages WHERE id = ?",
    Collection.MEMORIES: "DELETE FROM memories WHERE id = ?",
}
# Which derived stores follow which table.
_PROJECTED_TO = {Collection.MESSAGES: ANALYTICS, Collection.MEMORIES: VECTORS, Collection.PREFERENCES: CACHE}


def _table_of(collection: Collection) -> Collection:
    return Collection.PREFERENCES if collection is Collection.SETTINGS else collection


def persist(
    adapter: SqlAdapter,
    ops: Sequence[Op],
    changes: Sequence[Change],
    conflicts: Sequence[Conflict],
    redacted: Sequence[Op] = (),
    meta: dict[str, Any] | None = None,
) -> None:
    """Write applied ops, the rows they changed, new conflicts and outbox entries in one transaction."""
    with adapter.transaction():
        adapter.executemany(
            "INSERT INTO ops (device, seq, collection, key, body) VALUES (?, ?, ?, ?, ?)",
            [(op.device, op.seq, op.collection.value, op.key, encode_op(op)) for op in ops],
        )
        adapter.executemany(
            "UPDATE ops SET body = ? WHERE device = ? AND seq = ?", [(encode_op(op), op.device, op.seq) for op in redacted]
        )
        # Conversations whose counts change: those messages join, and those deleted messages leave (read before the
        # write). A message never moves to another conversation, so only deletions need the read.
        conversations = {c.row[1] for c in changes if c.collection is Collection.MESSAGES and c.row is not None}
        deleted_ids = [c.key for c in changes if c.collection is Collection.MESSAGES and c.row is None]
        conversations |= {row[0] for row in rows_by_id(adapter, "messages", "conversation", deleted_ids)}
        outbox: list[tuple[str, str, str]] = []
        upserts: dict[Collection, list[tuple]] = {}
        deletes: dict[Collection, list[tuple]] = {}
        for change in changes:
            table = _table_of(change.collection)
            if change.row is None:
                deletes.setdefault(table, []).append((change.key,))
            else:
                upserts.setdefault(table, []).append(change.row)
            if table in _PROJECTED_TO:
                outbox.append((_PROJECTED_TO[table], UPSERT if change.row is not None else DELETE, change.key))
        for table, rows in deletes.items():
            adapter.executemany(_DELETE_SQL[table], rows)
        for table, rows in upserts.items():
            adapter.executemany(_UPSERT_SQL[table], rows)
        for conversation in sorted(conversations):
            _refresh_conversation(adapter, conversation)
        adapter.executemany("INSERT INTO outbox (target, action, key) VALUES (?, ?, ?)", outbox)
        adapter.executemany(
            "INSERT INTO conflicts (collection, key, field, winner_device, winner_seq, winner_value, "
            "loser_device, loser_seq, loser_value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (str(c.collection), c.key, c.field, *c.winner, pack(c.winner_value), *c.loser, pack(c.loser_value))
                for c in conflicts
            ],
        )
        for name, value in (meta or {}).items():
            set_meta(adapter, name, value)


def _refresh_conversation(adapter: SqlAdapter, conversation: str) -> None:
    row = adapter.query_one("SELECT count(*), max(ts_ms) FROM messages WHERE conversation = ?", (conversation,))
    if row[0]:
        adapter.execute(
            "INSERT OR REPLACE INTO conversations (id, message_count, last_ts_ms) VALUES (?, ?, ?)",
            (conversation, row[0], row[1]),
        )
    else:
        adapter.execute("DELETE FROM conversations WHERE id = ?", (conversation,))


def outbox_batch(adapter: SqlAdapter, limit: int) -> list[OutboxEntry]:
    """Return up to `limit` outbox entries, oldest first."""
    rows = adapter.query("SELECT id, target, action, key FROM outbox ORDER BY id LIMIT ?", (limit,))
    return [OutboxEntry(*row) for row in rows]


def outbox_done(adapter: SqlAdapter, up_to_id: int) -> None:
    adapter.execute("DELETE FROM outbox WHERE id <= ?", (up_to_id,))


def outbox_clear(adapter: SqlAdapter) -> None:
    adapter.execute("DELETE FROM outbox")


def outbox_size(adapter: SqlAdapter) -> int:
    return adapter.query_one("SELECT count(*) FROM outbox")[0]


def rows_by_id(adapter: SqlAdapter, table: str, columns: str, ids: Iterable[str]) -> list[tuple]:
    """Return rows of a materialised table (keyed by `id`) for the given ids."""
    return _rows_where_in(adapter, f"SELECT {columns} FROM {table} WHERE id IN", (), ids)


def preference_rows(adapter: SqlAdapter, keys: Iterable[str]) -> list[tuple]:
    """Return (key, packed value) of the given preferences."""
    return _rows_where_in(adapter, "SELECT key, value FROM preferences WHERE collection = ? AND key IN", ("preferences",), keys)


def _rows_where_in(adapter: SqlAdapter, select: str, params: tuple, values: Iterable[str]) -> list[tuple]:
    # Chunked so no statement exceeds SQLite's limit on bound variables.
    values = list(values)
    rows: list[tuple] = []
    for start in range(0, len(values), 500):
        chunk = values[start : start + 500]
        rows += adapter.query(f"{select} ({','.join('?' * len(chunk))})", (*params, *chunk))
    return rows
