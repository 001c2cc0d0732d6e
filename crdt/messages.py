"""Conversation messages: a grow-only set of immutable messages, LWW field edits, winning tombstones."""

import sys
from collections.abc import Iterator, Mapping
from typing import Any

from crdt.journal import ConflictJournal
from crdt.lww import Register, journal_sink, merge_register
from crdt.ops import Collection, Kind, Op

EDITABLE_FIELDS = frozenset({"text", "role", "sentiment", "response_time_ms"})
ROW_FIELDS = ("conversation", "role", "text", "ts_ms", "sentiment", "response_time_ms")  # a row's after its id
Stamp = tuple[int, str]


def with_edits(fields: dict[str, Any], edits: dict[str, Register]) -> dict[str, Any]:
    """Return a copy of a message's fields with the winning value of each edited field."""
    message = dict(fields)
    for field, register in edits.items():
        message[field] = register.value
    return message


def share_names(fields: dict[str, Any]) -> None:
    """Point a well-formed message's conversation and role at the one copy of each name, not at a copy per message: a
    decoded message brings its own, and they cost about 120 bytes of every message held (12% of a 1M-message node)."""
    fields["conversation"] = sys.intern(fields["conversation"])
    fields["role"] = sys.intern(fields["role"])


class _MessagesView(Mapping[str, dict[str, Any]]):
    """Every live message by id at one moment, each built when read: a digest reads a million one at a time."""

    def __init__(self, messages: "MessageSet") -> None:
        # Copies of the maps, not of the messages: a record and its fields are never changed, only replaced, so the
        # view stays as it was while the set changes (a node hashes it on a worker thread, off the write lock).
        self._records = dict(messages.records)
        self._edits = {message_id: dict(fields) for message_id, fields in messages.edits.items()}

    def __getitem__(self, message_id: str) -> dict[str, Any]:
        # An unedited message is its record's own fields, not a copy: the view is read, never written.
        record = self._records[message_id]
        edits = self._edits.get(message_id)
        return record.value if edits is None else with_edits(record.value, edits)

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)


class MessageSet:
    """Messages keyed by id; a delete tombstones the id for good and purges its content."""

    collection = Collection.MESSAGES

    def __init__(self) -> None:
        self.records: dict[str, Register] = {}
        self.edits: dict[str, dict[str, Register]] = {}
        self.tombstones: dict[str, Stamp] = {}

    def apply(self, op: Op, journal: ConflictJournal) -> bool:
        if op.kind is Kind.ADD:
            return self._add(op.key, Register.of(op, op.payload))
        if op.kind is Kind.EDIT:
            field, value = op.payload
            return self._edit(op.key, field, Register.of(op, value), journal)
        return self._delete(op.key, (op.hlc, op.device))

    def _add(self, message_id: str, incoming: Register) -> bool:
        if message_id in self.tombstones:
            return False
        current = self.records.get(message_id)
        # Ids are unique per add; should two adds ever share one, the earliest stamp wins everywhere.
        if current is None or (incoming.hlc, incoming.device) < (current.hlc, current.device):
            self.records[message_id] = incoming
            return True
        return False

    def _edit(self, message_id: str, field: str, incoming: Register, journal: ConflictJournal) -> bool:
        if message_id in self.tombstones:
            return False
        fields = self.edits.setdefault(message_id, {})
        winner = merge_register(fields.get(field), incoming, journal_sink(journal, self.collection, message_id, field))
        fields[field] = winner
        return winner is incoming

    def _delete(self, message_id: str, stamp: Stamp) -> bool:
        known = self.tombstones.get(message_id)
        self.tombstones[message_id] = stamp if known is None else min(known, stamp)
        self.records.pop(message_id, None)
        self.edits.pop(message_id, None)
        return known is None

    def get(self, message_id: str) -> dict[str, Any] | None:
        """Return a message with its edits applied, or None if absent or deleted."""
        record = self.records.get(message_id)
        if record is None:
            return None
        return with_edits(record.value, self.edits.get(message_id, {}))

    def row(self, message_id: str) -> tuple | None:
        """Return (id, conversation, role, text, ts_ms, sentiment, response_time_ms) of a message, edits applied, or None
        if absent or deleted."""
        record = self.records.get(message_id)
        if record is None:
            return None
        # On a catch-up's hot path: an unedited message is read in place, with no copy, and its fields in one C loop.
        edits = self.edits.get(message_id)
        message = record.value if edits is None else with_edits(record.value, edits)
        return (message_id, *map(message.get, ROW_FIELDS))

    def to_state(self) -> dict:
        return {
            "records": {mid: list(r) for mid, r in self.records.items()},
            "edits": {mid: {f: list(r) for f, r in fields.items()} for mid, fields in self.edits.items()},
            "tombstones": {mid: list(stamp) for mid, stamp in self.tombstones.items()},
        }

    def join_state(self, state: dict, journal: ConflictJournal) -> None:
        for message_id, stamp in state["tombstones"].items():
            self._delete(message_id, (stamp[0], stamp[1]))
        for message_id, row in state["records"].items():
            self._add(message_id, Register.from_state(row))
        for message_id, fields in state["edits"].items():
            for field, row in fields.items():
                self._edit(message_id, field, Register.from_state(row), journal)

    def view(self) -> dict:
        return {"messages": _MessagesView(self), "deleted": sorted(self.tombstones)}

    def __len__(self) -> int:
        return len(self.records)
