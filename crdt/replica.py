"""A device's replica: version vector, op log, held ops and every collection's merged state."""

import hashlib
import heapq
from collections.abc import Callable, Iterable, Iterator, Mapping
from operator import attrgetter
from typing import Any

import attrs
import msgpack

from crdt.counters import CounterSet
from crdt.errors import ClockDriftError, CrdtError, InvalidOpError, SnapshotRequired
from crdt.hlc import HybridClock
from crdt.journal import ConflictJournal
from crdt.lww import LwwMap
from crdt.memories import MemorySet
from crdt.messages import MessageSet, MessageStore, MessagesView
from crdt.notes import NoteSet
from crdt.oplog import MemoryLog, OpLog
from crdt.ops import Collection, Kind, Op
from crdt.registry import DeviceRegistry
from crdt.revocation import Settlement, settle
from crdt.schema import redacted_payload
from crdt.vector import VersionVector
from crdt.writes import LocalWrites

_by_hlc = attrgetter("hlc")
_kind_of = attrgetter("kind")


@attrs.frozen
class ReplicaConfig:
    """Tunable bounds and thresholds of a replica."""

    dedup_cosine_min: float = 0.95
    held_ops_max: int = 100_000
    journal_entries_max: int = 10_000
    value_bytes_max: int = 1 << 20


@attrs.frozen
class ApplyResult:
    """What applying a batch of remote ops did."""

    applied: tuple[Op, ...]
    held: int
    refused: tuple[tuple[Op, str], ...] = ()


@attrs.frozen
class Digest:
    """A hash and counts of the synced state; equal exactly when the synced state is equal."""

    sha256: str
    counts: dict[str, int]


@attrs.frozen
class StateViews:
    """Every collection's view of the synced state, taken at one moment, and its counts then."""

    views: dict[str, Any]
    counts: dict[str, int]

    def digest(self) -> Digest:
        """Return the digest of the state these views were taken from; safe on another thread than its replica's."""
        sha256 = hashlib.sha256()
        _hash_canonical(self.views, sha256.update, _STREAMED_LEVELS)
        return Digest(sha256.hexdigest(), self.counts)


_SCALARS = frozenset({str, int, float, bool, bytes, type(None)})


def _canonical(value: Any) -> Any:
    """Return a value with every mapping turned into key-sorted pairs, so it packs the same everywhere."""
    if type(value) in _SCALARS:  # most values: no slow isinstance check against the Mapping ABC
        return value
    if isinstance(value, Mapping):
        return [[key, _canonical(item)] for key, item in sorted(value.items())]
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    return value


# Levels of the views hashed piece by piece (collections, a view's parts, their entries); below, an entry is packed
# whole. Packing a million messages' views as one value took 10-18 s and 1.3 GB beside the replica.
_STREAMED_LEVELS = 3
_header = msgpack.Packer(use_bin_type=True).pack_array_header


def _hash_canonical(value: Any, update: Callable[[bytes], None], levels: int) -> None:
    """Feed `update` the bytes of msgpack.packb(_canonical(value)), streaming the outer `levels` levels."""
    if isinstance(value, MessagesView):
        # Its messages come in canonical form already: a million went through _canonical in 7.8 s.
        update(_header(len(value)))
        pack = msgpack.Packer(use_bin_type=True).pack
        for entry in value.canonical_items():
            update(pack(entry))
    elif levels > 0 and isinstance(value, Mapping):
        update(_header(len(value)))
        for key in sorted(value):
            update(_header(2))
            update(msgpack.packb(key, use_bin_type=True))
            _hash_canonical(value[key], update, levels - 1)
    elif levels > 0 and isinstance(value, list | tuple):
        update(_header(len(value)))
        for item in value:
            _hash_canonical(item, update, levels - 1)
    else:
        update(msgpack.packb(_canonical(value), use_bin_type=True))


class Replica(LocalWrites):
    """One device's merged state of every synced collection, fed by local writes and remote ops."""

    def __init__(
        self,
        device_id: str,
        clock: HybridClock,
        config: ReplicaConfig | None = None,
        log: OpLog | None = None,
        message_store: MessageStore | None = None,
    ) -> None:
        self.device_id = device_id
        self.clock = clock
        self.config = config or ReplicaConfig()
        self.log: OpLog = MemoryLog() if log is None else log
        self._message_store = message_store  # with one, the messages' merged state is kept there, not here
        self.rebuilds = 0  # how many times revocations made the state be recomputed from the log
        self.clear()
        # Set by the node: returns why a remote registry op must be refused (e.g. its record has a bad signature), or
        # None. A refused op is not counted, so it is offered again and may pass once what it depends on arrived.
        self.admit_registry_op: Callable[[Op, DeviceRegistry], str | None] | None = None

    def clear(self) -> None:
        """Forget all merged state and every op the log does not keep durably (the clock, the config and the hooks
        stay), as a new replica."""
        self.journal = ConflictJournal(self.config.journal_entries_max)
        self._fresh_rules()
        self._vector: dict[str, int] = {}
        self.log.reset()
        self._held: dict[str, dict[int, Op]] = {}
        self._held_count = 0
        self._revocations: list[Op] = []  # every logged revocation op, and any a snapshot brought
        self._settlement = Settlement()

    def _fresh_rules(self, rebuilding: bool = False) -> None:
        """Give every collection an empty merge state (the messages' read through their store, unless `rebuilding`)."""
        self.preferences = LwwMap(Collection.PREFERENCES)
        self.settings = LwwMap(Collection.SETTINGS)
        self.messages = MessageSet(self._message_store, rebuilding=rebuilding)
        self.memories = MemorySet(self.config.dedup_cosine_min)
        self.notes = NoteSet(self.device_id)
        self.counters = CounterSet()
        self.devices = DeviceRegistry()
        self._rules: dict[Collection, Any] = {
            Collection.PREFERENCES: self.preferences,
            Collection.SETTINGS: self.settings,
            Collection.MESSAGES: self.messages,
            Collection.MEMORIES: self.memories,
            Collection.NOTES: self.notes,
            Collection.COUNTERS: self.counters,
            Collection.DEVICES: self.devices,
        }

    # -- reading ---------------------------------------------------------------------------------

    @property
    def vector(self) -> VersionVector:
        """Return the version vector of the ops applied here."""
        return VersionVector(self._vector)

    def seq_of(self, device: str) -> int:
        """Return the highest contiguous seq applied from a device."""
        return self._vector.get(device, 0)

    @property
    def held_count(self) -> int:
        """Return how many remote ops wait for an earlier op of their device."""
        return self._held_count

    def ops_since(self, vector: Mapping[str, int], ops_max: int) -> list[Op]:
        """Return up to `ops_max` ops the holder of `vector` lacks, oldest HLC first."""
        runs: list[Iterator[Op]] = []
        for device, have in self._vector.items():
            known = vector.get(device, 0)
            if known >= have:
                continue
            base = self.log.base(device)
            if known < base:
                raise SnapshotRequired(f"ops of {device} up to seq {base} were compacted; send a state snapshot")
            runs.append(self.log.tail(device, known))
        if not runs:
            return []
        merged = runs[0] if len(runs) == 1 else heapq.merge(*runs, key=_by_hlc)
        return [op for op, _ in zip(merged, range(ops_max))]

    def logged_keys(self) -> set[tuple[Collection, str]]:
        """Return every (collection, key) an op in the log wrote."""
        return {(op.collection, op.key) for op in self.log.ops()}

    def digest(self) -> Digest:
        """Return the sha256 and counts of the synced state (no journal, no log, nothing local)."""
        return self.views().digest()

    def views(self) -> StateViews:
        """Return the views of the synced state as it is now: later changes to the replica leave them as they are."""
        return StateViews(
            {collection.value: rule.view() for collection, rule in self._rules.items()},
            {collection.value: len(rule) for collection, rule in self._rules.items()},
        )

    def forget(self, collection: Collection, key: str) -> Op:
        """Delete a message or remove a memory, strip its content from the log and state, and return the deleting op.

        Redacted ops still merge: a peer that lacks them gets them without content.
        """
        if collection is Collection.MESSAGES:
            op = self.delete_message(key)
        elif collection is Collection.MEMORIES:
            op = self.remove_memory(key)
            self.memories.redact(key, redacted_payload(Collection.MEMORIES, Kind.ADD, None))
        else:
            raise InvalidOpError(f"only messages and memories can be forgotten, not {collection}")
        self.log.redact(collection, key)
        return op

    def replay(self, ops: Iterable[Op]) -> None:
        """Re-apply this device's own stored ops at start, in their stored order, without drift checks."""
        # The start of a node with a large log is spent here, so the loop avoids per-op method calls.
        ops = list(ops)
        # Ops of revoked devices past their cut-off are logged but never applied, not even for a moment: a voided
        # note update may reuse Loro op ids of another.
        if Kind.REVOKE in map(_kind_of, ops):
            self._revocations += [op for op in ops if op.kind is Kind.REVOKE]
            self._settlement = settle(self._revocations)
        voids = self._settlement.voids
        vector, append, rules, journal = self._vector, self.log.append, self._rules, self.journal
        if self._message_store is not None:
            self.messages.prefetch([op.key for op in ops if op.collection is Collection.MESSAGES])
        last = self.clock.last
        for op in ops:
            device = op.device
            if op.seq != vector.get(device, 0) + 1:
                raise CrdtError(f"stored op {device}:{op.seq} is out of order; the op log is damaged")
            if not voids(op):
                rules[op.collection].apply(op, journal)
            append(op)
            vector[device] = op.seq
            if op.hlc > last:
                last = op.hlc
        self.clock.last = last

    def resume(
        self, vector: Mapping[str, int], clock_last: int, ops: Iterable[Op], base_state: Mapping[str, Any] | None = None
    ) -> None:
        """Take up, in an empty replica, what a store kept: the vector and clock of its log, the state of every
        collection but messages that a snapshot brought (`base_state`), and its logged ops of those collections (the
        messages' merged state is the message store's), to re-apply in their stored order."""
        if self._message_store is None:
            raise CrdtError("only a replica whose messages are kept in a store can resume without its messages' ops")
        ops = list(ops)
        if base_state:
            self.join_state({}, base_state)  # first: its revocations void logged ops as theirs do
        self._revocations += [op for op in ops if op.kind is Kind.REVOKE]
        self._settlement = settle(self._revocations)
        voids, rules, journal = self._settlement.voids, self._rules, self.journal
        for op in ops:
            if op.collection is Collection.MESSAGES:
                raise CrdtError(f"op {op.device}:{op.seq} is a message's: their state is the message store's")
            if not voids(op):
                rules[op.collection].apply(op, journal)
        self._vector.update(vector)
        self.clock.last = max(self.clock.last, clock_last, *(op.hlc for op in ops))

    # -- remote ops ------------------------------------------------------------------------------

    def apply(self, ops: Iterable[Op]) -> ApplyResult:
        """Apply remote ops in any order: duplicates are skipped, ops after a gap are held."""
        applied: list[Op] = []
        refused: list[tuple[Op, str]] = []
        ops = ops if isinstance(ops, list | tuple) else list(ops)
        if self._message_store is not None:  # the stored state of every message the ops touch, in one read
            self.messages.prefetch([op.key for op in ops if op.collection is Collection.MESSAGES])
        # A catch-up's hot loop: the wall clock is read once per call, not per op.
        horizon = self.clock.horizon()
        vector, held = self._vector, self._held
        for op in ops:
            have = vector.get(op.device, 0)
            if op.seq != have + 1:
                if op.seq > have:
                    self._hold(op)
                continue
            ok = self._apply_in_order(op, horizon, applied, refused)
            waiting = held.get(op.device) if held else None
            while ok and waiting and have + 2 in waiting:
                have += 1
                self._held_count -= 1
                ok = self._apply_in_order(waiting.pop(have + 1), horizon, applied, refused)
        return ApplyResult(tuple(applied), self._held_count, tuple(refused))

    def _hold(self, op: Op) -> None:
        held = self._held.setdefault(op.device, {})
        # Past the bound an op is dropped rather than held: the vector does not cover it, so it is resent.
        if op.seq not in held and self._held_count < self.config.held_ops_max:
            held[op.seq] = op
            self._held_count += 1

    def _apply_in_order(self, op: Op, horizon: int, applied: list[Op], refused: list[tuple[Op, str]]) -> bool:
        if op.collection is Collection.DEVICES and self.admit_registry_op is not None:
            why = self.admit_registry_op(op, self.devices)
            if why is not None:
                refused.append((op, why))
                return False
        try:
            if op.hlc > horizon:
                self.clock.observe(op.hlc)  # refuses the stamp, unless the wall clock moved on since the horizon
            self._commit(op)
        except (ClockDriftError, InvalidOpError) as error:
            refused.append((op, str(error)))
            return False
        if op.hlc > self.clock.last:
            self.clock.last = op.hlc
        applied.append(op)
        return True

    def _commit(self, op: Op) -> None:
        # An op of a revoked device past its cut-off is logged and counted, so it is never resent, but has no effect.
        if not self._settlement.voids(op):
            self._rules[op.collection].apply(op, self.journal)
        self.log.append(op)
        self._vector[op.device] = op.seq
        if op.kind is Kind.REVOKE:
            self._settle_again(self._revocations + [op])

    def _settle_again(self, revocations: list[Op]) -> None:
        """Settle the revocations anew; if that changes whether any logged op has effect, recompute the state."""
        before, after = self._settlement, settle(revocations)
        self._revocations, self._settlement = revocations, after
        revoked = {*before.cutoff_seq, *before.cutoff_hlc, *after.cutoff_seq, *after.cutoff_hlc}
        logged = (op for device in revoked for op in self.log.tail(device, self.log.base(device)))
        if any(before.voids(op) != after.voids(op) for op in logged):
            self._rebuild_state()

    def _rebuild_state(self) -> None:
        """Recompute every collection from the log, leaving out the ops the settled revocations void.

        Needed when a revocation arrives after ops it voids were applied, or voids a revocation that had counted.
        """
        if any(self.log.base(device) for device in self._vector):
            # A compacted log cannot be replayed; the voided ops keep their effect (docs/spec/sync.md).
            return
        logged = sorted(self.log.ops(), key=_by_hlc)
        self._fresh_rules(rebuilding=True)
        self.rebuilds += 1
        scratch = ConflictJournal(self.config.journal_entries_max)  # conflicts were journalled when first seen
        voids = self._settlement.voids
        for op in logged:
            if not voids(op):
                self._rules[op.collection].apply(op, scratch)

    # -- snapshots -------------------------------------------------------------------------------

    def state(self, messages: bool = True) -> dict:
        """Return the merged state of every collection (but messages, whose state may be a store's) as plain values."""
        return {c.value: rule.to_state() for c, rule in self._rules.items() if messages or c is not Collection.MESSAGES}

    def join_state(self, vector: Mapping[str, int], state: Mapping[str, Any]) -> None:
        """Merge a peer's state snapshot, or a part of one holding some collections (already validated), and skip past
        the ops `vector` covers."""
        for collection, rule in self._rules.items():
            if collection.value in state:
                rule.join_state(state[collection.value], self.journal)
        # The snapshot's revocations void later ops of their devices as logged ones do.
        known = {op.id for op in self._revocations}
        brought = [
            Op(register.device, register.seq, register.hlc, Collection.DEVICES, device, Kind.REVOKE, register.value)
            for device, register in self.devices.revocations.items()
            if register.op_id not in known
        ]
        if brought:
            self._revocations += brought
            self._settlement = settle(self._revocations)
        for device, seq in vector.items():
            if seq > self._vector.get(device, 0):
                # The snapshot holds these ops' effects but not the ops, so the log restarts after them.
                self.log.restart(device, seq)
                self._vector[device] = seq
        for device in list(self._held):
            held = self._held.pop(device)
            self._held_count -= len(held)
            self.apply(held[seq] for seq in sorted(held) if seq > self._vector.get(device, 0))

    def restore_log(self, log_base: Mapping[str, int], log: Mapping[str, list[Op]]) -> None:
        """Install a saved log into an empty replica whose state was restored from the same save."""
        if self._vector:
            raise CrdtError("a log can only be restored into an empty replica")
        # A device whose logged ops were all compacted away has a base and no op.
        for device in {**log_base, **log}:
            ops, base = log.get(device, []), log_base.get(device, 0)
            if any(op.seq != base + i + 1 or op.device != device for i, op in enumerate(ops)):
                raise CrdtError(f"saved log of {device} is not contiguous from seq {base + 1}")
            self.log.restart(device, base)
            for op in ops:
                self.log.append(op)
            if base + len(ops):
                self._vector[device] = base + len(ops)
        # The restored state was settled when saved; what voids later ops is settled here again.
        logged = [op for ops in log.values() for op in ops if op.kind is Kind.REVOKE]
        ids = {op.id for op in logged}
        self._revocations = logged + [op for op in self._revocations if op.id not in ids]
        self._settlement = settle(self._revocations)
