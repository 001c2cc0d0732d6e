"""Conversation messages: a grow-only set of immutable messages, LWW field edits, winning tombstones."""

import abc
import heapq
import itertools
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

from crdt.errors import CrdtError
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


def canonical(
    conversation: str, role: str, text: str, ts_ms: int, sentiment: float | None, response_time_ms: float | None
) -> list[list]:
    """Return a message's fields (ROW_FIELDS) as a digest packs them: [name, value] pairs by name, every row field, a
    number that may be fractional as a float.

    A store keeps a message as a table row (stores/primary.py): an absent field reads back as None and a whole
    sentiment as a float, so the same message must look the same whether held in memory or read from a store.
    """
    return [
        ["conversation", conversation],
        ["response_time_ms", None if response_time_ms is None else float(response_time_ms)],
        ["role", role],
        ["sentiment", None if sentiment is None else float(sentiment)],
        ["text", text],
        ["ts_ms", ts_ms],
    ]


class StoredMessages(NamedTuple):
    """The merged state of some messages as a store holds it: winning adds, winning edits and tombstones by id."""

    records: dict[str, Register]
    edits: dict[str, dict[str, Register]]
    tombstones: dict[str, Stamp]


class MessagesView(abc.ABC):
    """Every live message of a set at one moment, never changed after, read once in id order."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Return how many live messages there are."""

    @abc.abstractmethod
    def canonical_items(self) -> Iterator[list]:
        """Yield [id, its `canonical` fields] of every live message, ids ascending (as Python orders str, and SQLite
        orders UTF-8)."""


class MessageStore(Protocol):
    """Where a node keeps its messages' merged state durably; a set backed by one holds only some of it at a time."""

    def load(self, message_ids: Sequence[str]) -> StoredMessages:
        """Return the stored state of these messages (those the store has any of)."""

    def count(self) -> int:
        """Return how many live messages the store holds."""

    def snapshot(self) -> tuple[MessagesView, list[str]]:
        """Return the live messages and the sorted deleted ids as stored now, readable later from any thread."""

    def page(self, after_id: str, ids_max: int) -> StoredMessages:
        """Return the stored state of up to `ids_max` messages, live or deleted, of the lowest ids above `after_id`."""

    def count_ids(self, after_id: str) -> int:
        """Return about how many messages, live or deleted, have an id above `after_id` (for progress)."""


class _HeldMessagesView(MessagesView):
    """The live messages of a set that holds them all, at one moment."""

    def __init__(self, messages: "MessageSet") -> None:
        # Copies of the maps, not of the messages: a record and its fields are never changed, only replaced, so the
        # view stays as it was while the set changes (a node hashes it on a worker thread, off the write lock).
        self._records = dict(messages.records)
        self._edits = {message_id: dict(fields) for message_id, fields in messages.edits.items()}

    def __len__(self) -> int:
        return len(self._records)

    def canonical_items(self) -> Iterator[list]:
        records, edits = self._records, self._edits
        for message_id in sorted(records):
            fields = records[message_id].value
            if message_id in edits:
                fields = with_edits(fields, edits[message_id])
            yield [message_id, canonical(*map(fields.get, ROW_FIELDS))]


def _state_of(stored: StoredMessages) -> dict:
    """Return the merged state of messages as plain values, as a state snapshot holds it."""
    return {
        "records": {mid: list(r) for mid, r in stored.records.items()},
        "edits": {mid: {f: list(r) for f, r in fields.items()} for mid, fields in stored.edits.items()},
        "tombstones": {mid: list(stamp) for mid, stamp in stored.tombstones.items()},
    }


CACHED_MESSAGES_MAX = 20_000  # messages a store-backed set keeps once written (those not written yet are all kept)


class MessageSet:
    """Messages keyed by id; a delete tombstones the id for good and purges its content.

    With a store, the set holds only a cache of the merged state: each message it reads or changes is loaded first,
    changes stay until `written` says the store holds them, and past CACHED_MESSAGES_MAX the written ones are dropped.
    A million messages held took 750 bytes each.
    """

    collection = Collection.MESSAGES

    def __init__(self, store: MessageStore | None = None, *, rebuilding: bool = False) -> None:
        self.records: dict[str, Register] = {}
        self.edits: dict[str, dict[str, Register]] = {}
        self.tombstones: dict[str, Stamp] = {}
        self._store = store
        # A set recomputed from the log holds every message until that is written: the store's copy is stale.
        self._reads_store = store is not None and not rebuilding
        self._held: dict[str, None] = {}  # ids whose whole state is here (loaded or changed), oldest first
        # The ids changed under each seal not yet written; a catch-up changes a message per op, so no per-id bookkeeping.
        self._seal = 1
        self._changed: dict[str, None] = {}  # those of the current seal
        self._unwritten: dict[int, dict[str, None]] = {self._seal: self._changed}

    # -- the cache of a store-backed set ---------------------------------------------------------

    def prefetch(self, message_ids: Iterable[str]) -> None:
        """Load the stored state of these messages that the set does not hold, in one read of the store."""
        if not self._reads_store:
            return
        held = self._held
        wanted = list(message_ids)
        missing = [message_id for message_id in wanted if message_id not in held]
        if not missing:
            return
        assert self._store is not None
        missing = list(dict.fromkeys(missing))
        if self._written_held() + len(missing) > CACHED_MESSAGES_MAX:
            self._trim(spared=set(wanted))  # reads alone (a re-import finds every message stored) fill it too
        stored = self._store.load(missing)
        self.records.update(stored.records)
        self.edits.update(stored.edits)
        self.tombstones.update(stored.tombstones)
        held.update(dict.fromkeys(missing))

    def hold_new(self, message_ids: Iterable[str]) -> None:
        """Hold these messages as having no state anywhere yet, without reading the store: their ids were just made,
        from enough random bits that no device has written under them (a live write skips a read of the store)."""
        if self._reads_store:
            self._held.update(dict.fromkeys(message_ids))

    def seal(self) -> int:
        """Return a mark covering every change made so far, for `written` once the store holds them."""
        sealed = self._seal
        self._seal += 1
        self._changed = self._unwritten[self._seal] = {}
        return sealed

    def written(self, seal: int) -> None:
        """Note that the store now holds every change up to `seal`; drop written messages past the cache's bound."""
        if self._store is None:
            return
        for written in [mark for mark in self._unwritten if mark <= seal]:
            del self._unwritten[written]
        self._reads_store = True
        if self._written_held() > CACHED_MESSAGES_MAX:
            self._trim(spared=set())

    def _written_held(self) -> int:
        """Return about how many messages are held that the store holds as they are (unwritten ones may count twice)."""
        return len(self._held) - sum(map(len, self._unwritten.values()))

    def _trim(self, spared: set[str]) -> None:
        """Drop the oldest written messages but the `spared` ones, down to half the bound (so the cost of a trim is
        paid once per many reads or writes)."""
        kept = spared.union(*self._unwritten.values())
        excess = max(0, self._written_held() - CACHED_MESSAGES_MAX // 2)
        stale = list(itertools.islice((message_id for message_id in self._held if message_id not in kept), excess))
        for held_map in (self._held, self.records, self.edits, self.tombstones):
            if held_map:
                for message_id in stale:
                    held_map.pop(message_id, None)

    def _stored_whole(self) -> bool:
        """Whether the store alone holds the whole state: it is read through, and nothing is left to write."""
        if self._reads_store and any(self._unwritten.values()):
            raise CrdtError("the messages have changes the store does not hold yet: read them once written")
        return self._reads_store

    # -- merging ---------------------------------------------------------------------------------

    def apply(self, op: Op, journal: ConflictJournal) -> bool:
        if self._store is not None:  # loaded first if not held, and kept until written (a catch-up's hot path)
            if op.key not in self._held:
                self.prefetch((op.key,))
                self._held[op.key] = None
            self._changed[op.key] = None
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
        self.prefetch((message_id,))
        record = self.records.get(message_id)
        if record is None:
            return None
        return with_edits(record.value, self.edits.get(message_id, {}))

    def row(self, message_id: str) -> tuple | None:
        """Return (id, conversation, role, text, ts_ms, sentiment, response_time_ms, and its add's hlc, device and seq) of
        a message, edits applied, or None if absent or deleted."""
        record = self.records.get(message_id)
        if record is None:
            return None
        # On a catch-up's hot path: an unedited message is read in place, with no copy, and its fields in one C loop.
        edits = self.edits.get(message_id)
        message = record.value if edits is None else with_edits(record.value, edits)
        return (message_id, *map(message.get, ROW_FIELDS), record.hlc, record.device, record.seq)

    def edit_of(self, message_id: str, field: str) -> Register | None:
        """Return the winning edit of a message's field, or None if it has none."""
        self.prefetch((message_id,))
        return self.edits.get(message_id, {}).get(field)

    def seen(self, message_ids: Iterable[str]) -> set[str]:
        """Return which of these messages were ever added or deleted here."""
        message_ids = list(message_ids)
        self.prefetch(message_ids)
        return {message_id for message_id in message_ids if message_id in self.records or message_id in self.tombstones}

    def to_state(self) -> dict:
        if self._stored_whole():
            raise CrdtError("a node's messages are kept in its store: read their state a page at a time (state_page)")
        return _state_of(StoredMessages(self.records, self.edits, self.tombstones))

    def state_page(self, after_id: str, ids_max: int) -> tuple[dict, str]:
        """Return the merged state (as `to_state`) of up to `ids_max` messages, live or deleted, with the lowest ids
        above `after_id`, and the highest id among them ("" if none); from the store if it holds the state."""
        if self._reads_store:
            assert self._store is not None
            stored = self._store.page(after_id, ids_max)
        else:
            records, edits, tombstones = self.records, self.edits, self.tombstones
            ids = heapq.nsmallest(ids_max, {i for held in (records, edits, tombstones) for i in held if i > after_id})
            stored = StoredMessages(
                {i: records[i] for i in ids if i in records},
                {i: edits[i] for i in ids if i in edits},
                {i: tombstones[i] for i in ids if i in tombstones},
            )
        upto = max(itertools.chain(stored.records, stored.edits, stored.tombstones), default="")
        return _state_of(stored), upto

    def count_ids(self, after_id: str) -> int:
        """Return about how many messages, live or deleted, have an id above `after_id`."""
        if self._reads_store:
            assert self._store is not None
            return self._store.count_ids(after_id)
        return sum(i > after_id for held in (self.records, self.tombstones) for i in held)

    def join_state(self, state: dict, journal: ConflictJournal) -> None:
        changed = {**state["tombstones"], **state["records"], **state["edits"]}
        self.prefetch(changed)
        if self._store is not None:
            self._held.update(changed)
            self._changed.update(changed)
        for message_id, stamp in state["tombstones"].items():
            self._delete(message_id, (stamp[0], stamp[1]))
        for message_id, row in state["records"].items():
            self._add(message_id, Register.from_state(row))
        for message_id, fields in state["edits"].items():
            for field, row in fields.items():
                self._edit(message_id, field, Register.from_state(row), journal)

    def view(self) -> dict:
        if self._stored_whole():
            assert self._store is not None
            messages, deleted = self._store.snapshot()
            return {"messages": messages, "deleted": deleted}
        return {"messages": _HeldMessagesView(self), "deleted": sorted(self.tombstones)}

    def __len__(self) -> int:
        if self._stored_whole():
            assert self._store is not None
            return self._store.count()
        return len(self.records)
