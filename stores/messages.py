"""The messages' merged state kept in the primary store, not in memory: a replica's MessageSet reads it as needed."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from crdt.lww import Register
from crdt.messages import ROW_FIELDS, MessagesView, StoredMessages, canonical
from stores import primary
from stores.sql import SqlAdapter, open_sql

VIEW_PAGE_ROWS = 5000  # messages read per query while a digest reads them all


class SqlMessages:
    """The merge state of the primary store's messages; a MessageStore (crdt/messages.py).

    Loads run on the calling thread, on a connection of their own (WAL lets it read beside the writer).
    """

    def __init__(self, reader: SqlAdapter, open_reader: Callable[[], SqlAdapter]) -> None:
        self._reader = reader
        self._open_reader = open_reader  # opens a connection any thread may use, for snapshots

    @classmethod
    def open(cls, engine: str, path: Path, key: bytes) -> SqlMessages:
        """Open the messages of the primary store at `path` (its schema already current)."""
        return cls(open_sql(engine, path, key), functools.partial(open_sql, engine, path, key, any_thread=True))

    def close(self) -> None:
        self._reader.close()

    def load(self, message_ids: Sequence[str]) -> StoredMessages:
        return _stored(*primary.stored_messages(self._reader, message_ids))

    def page(self, after_id: str, ids_max: int) -> StoredMessages:
        ids = primary.message_ids_after(self._reader, after_id, ids_max)
        return _stored(*primary.stored_messages_between(self._reader, after_id, ids[-1])) if ids else _stored([], [], [])

    def count_ids(self, after_id: str) -> int:
        return primary.message_ids_count(self._reader, after_id)

    def count(self) -> int:
        row = self._reader.query_one("SELECT count(*) FROM messages")
        assert row is not None
        return row[0]

    def snapshot(self) -> tuple[MessagesView, list[str]]:
        reader = self._open_reader()
        try:
            # A read transaction keeps what this connection sees as it is now, whatever is written later (WAL).
            reader.execute("BEGIN")
            count = reader.query_one("SELECT count(*) FROM messages")
            deleted = [message_id for (message_id,) in reader.query("SELECT id FROM message_tombstones ORDER BY id")]
        except BaseException:
            reader.close()
            raise
        assert count is not None
        return _StoredMessagesView(reader, count[0]), deleted


def _stored(rows: Sequence[tuple], edit_rows: Sequence[tuple], tombstone_rows: Sequence[tuple]) -> StoredMessages:
    """Return the merge state read from the primary store's rows (primary.stored_messages)."""
    records = {row[0]: Register(row[7], row[8], row[9], dict(zip(ROW_FIELDS, row[1:7])), None) for row in rows}
    edits: dict[str, dict[str, Register]] = {}
    for message_id, field, hlc, device, seq, prev_device, prev_seq, value in edit_rows:
        prev = None if prev_device is None else (prev_device, prev_seq)
        edits.setdefault(message_id, {})[field] = Register(hlc, device, seq, primary.unpack(value), prev)
    tombstones = {message_id: (hlc, device) for message_id, hlc, device in tombstone_rows}
    return StoredMessages(records, edits, tombstones)


class _StoredMessagesView(MessagesView):
    """The live messages of the primary store as one read transaction sees them; read once, then closed."""

    def __init__(self, reader: SqlAdapter, count: int) -> None:
        self._reader = reader
        self._count = count

    def __len__(self) -> int:
        return self._count

    def canonical_items(self) -> Iterator[list]:
        try:
            after = ""
            while rows := primary.message_rows_after(self._reader, after, VIEW_PAGE_ROWS):
                after = rows[-1][0]
                for message_id, *fields in rows:
                    yield [message_id, canonical(*fields)]
        finally:
            self._reader.close()

    def __del__(self) -> None:
        self._reader.close()
