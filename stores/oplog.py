"""A replica's op log kept in the primary store, not in memory: a peer's catch-up reads its ops back from SQL."""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from crdt import Collection, Op, StoredBatchReader, redacted_op
from stores import primary
from stores.errors import StoreError
from stores.sql import AsyncSql, SqlAdapter, open_sql

RUNS_PAGE = 16  # logged runs (and at most as many batch bodies) read per query while serving a tail
DECODED_BATCHES_MAX = 8  # decoded batches kept: a catch-up batch holds the ops of several devices, read one by one
COMPACT_STEP_BATCHES = 256  # logged batches considered per compaction transaction
DECODE_STEP_OPS = 1000  # ops of a batch decoded at a time: a read decodes as far as it needs, not the whole batch


class _DecodedBatch:
    """A logged batch decoded as far as its readers needed, its ops by device in seq order."""

    def __init__(self, reader: StoredBatchReader) -> None:
        self._reader = reader
        self._by_device: dict[str, list[Op]] = {}

    def through(self, device: str, seq: int) -> list[Op]:
        """Return the device's ops decoded so far, decoding on until its op `seq` is among them or the batch ends."""
        by_device = self._by_device
        ops = by_device.setdefault(device, [])
        while (not ops or ops[-1].seq < seq) and self._reader.ops_left:
            for op in self._reader.read(DECODE_STEP_OPS):
                by_device.setdefault(op.device, []).append(op)
        return ops


class SqlLog:
    """The ops of the primary store's log, plus those applied and not written yet; an OpLog (crdt/oplog.py).

    Held in memory were 190 bytes per op (a third of a node's memory at 1M messages). Reads run on the calling thread,
    on a connection of their own (WAL lets it read beside the writer), a bounded page at a time.
    """

    def __init__(self, reader: SqlAdapter) -> None:
        self._reader = reader
        self._written: dict[str, int] = {}  # per device, the highest seq the store holds (or holds the effect of)
        self._bases: dict[str, int] = {}  # per device, the seq up to which its ops are not logged
        self._restarted: dict[str, int] = {}  # bases a state snapshot raised, not written yet
        self._skipped = 0  # ops the snapshot brought the effect of, above what the store held
        self._pending: dict[str, list[Op]] = {}  # per device, applied ops above it, in seq order
        self._owed: set[tuple[Collection, str]] = set()  # forgotten keys whose stored ops are not redacted yet
        self._decoded: collections.OrderedDict[int, _DecodedBatch] = collections.OrderedDict()
        self.reset()

    @classmethod
    def open(cls, engine: str, path: Path, key: bytes) -> SqlLog:
        """Open a log reading the primary store at `path` (its schema already current)."""
        reader = open_sql(engine, path, key)
        try:
            return cls(reader)
        except BaseException:
            reader.close()
            raise

    def close(self) -> None:
        self._reader.close()

    # -- OpLog -----------------------------------------------------------------------------------

    def append(self, op: Op) -> None:
        # Replaying the store at start appends what it already holds.
        if op.seq > self._written.get(op.device, 0):
            self._pending.setdefault(op.device, []).append(op)

    def base(self, device: str) -> int:
        return self._bases.get(device, 0)

    def tail(self, device: str, after_seq: int) -> Iterator[Op]:
        last = after_seq
        written = self._written.get(device, 0)
        while last < written:
            runs = primary.logged_runs(self._reader, device, last, RUNS_PAGE)
            if not runs or runs[0][0] > last + 1:
                raise self._damaged(device, last)
            bodies = primary.logged_bodies(self._reader, [batch for *_, batch in runs if batch not in self._decoded])
            for seq_first, seq_last, batch in runs:
                # The run's ops are the batch's ops of this device, seq_first..seq_last in order (primary._log_batches).
                decoded, upto = self._batch(batch, bodies), min(seq_last, written)
                while last < upto:
                    ops = decoded.through(device, last + 1)[last + 1 - seq_first : upto + 1 - seq_first]
                    if not ops:
                        raise self._damaged(device, last)
                    for op in ops:
                        yield self._as_stored(op)
                    last = ops[-1].seq
        for op in self._pending.get(device, ()):
            if op.seq > last:
                yield op

    def ops(self) -> Iterator[Op]:
        after = 0
        while pages := primary.logged_pages(self._reader, after, primary.LOG_PAGE_OPS):
            after = pages[-1][0]
            yield from (self._as_stored(op) for _, ops in pages for op in ops)
        for ops in self._pending.values():
            yield from ops

    def redact(self, collection: Collection, key: str) -> None:
        # Stored ops are rewritten by the write that carries the forget (primary.persist); until then they are
        # redacted as read, so no peer is sent the content meanwhile.
        self._owed.add((collection, key))
        for ops in self._pending.values():
            for index, op in enumerate(ops):
                if op.collection is collection and op.key == key:
                    ops[index] = redacted_op(op)

    def restart(self, device: str, seq: int) -> None:
        # Written with the snapshot's part that brought it (take_restarted); till then a peer is not sent these ops.
        self.raise_bases({device: seq})
        self._restarted[device] = max(seq, self._restarted.get(device, 0))
        if seq > self._written.get(device, 0):
            self._skipped += seq - self._written.get(device, 0)
            self._written[device] = seq
        self._pending[device] = [op for op in self._pending.get(device, ()) if op.seq > seq]

    def reset(self) -> None:
        self._written = primary.logged_vector(self._reader)
        self._bases = primary.log_bases(self._reader)
        self._restarted.clear()
        self._skipped = 0
        self._pending.clear()
        self._owed.clear()
        self._decoded.clear()

    # -- the store's side ------------------------------------------------------------------------

    def durable(self) -> dict[str, int]:
        """Return the vector of the ops whose effect the store holds (applied ops not written yet are not in it)."""
        return dict(self._written)

    async def compact(self, sql: AsyncSql, safe: Mapping[str, int], batches_max: int = COMPACT_STEP_BATCHES) -> int:
        """Delete, through the store's writer `sql`, the logged batches of messages whose every op is at or below its
        device's seq in `safe` (what every trusted device has), a transaction of up to `batches_max` at a time; return
        how many went. Their effect stays in the tables; a device that lacks them catches up from a state snapshot."""
        deleted, after = 0, 0
        upto, cursors = await sql.run(primary.compaction_scope)
        while True:
            plan = await sql.run(primary.plan_compaction, safe, cursors, after, upto, batches_max)
            if plan.next_after == after:
                return deleted
            after, cursors = plan.next_after, plan.cursors
            if plan.batches:
                # Raised first: from now on no reader is sent to a run being deleted (see primary.plan_compaction).
                self.raise_bases(plan.bases)
                await sql.run(primary.compact_log, plan)
                for batch in plan.batches:
                    self._decoded.pop(batch, None)
                deleted += len(plan.batches)

    def raise_bases(self, bases: Mapping[str, int]) -> None:
        """Give no op at or below these seqs any more: they are about to be compacted away, or were skipped."""
        for device, seq in bases.items():
            if seq > self._bases.get(device, 0):
                self._bases[device] = seq

    def take_restarted(self) -> tuple[dict[str, int], int]:
        """Return the bases state snapshots raised since last asked, for the write that persists their effect, and how
        many ops they skipped that the store did not hold."""
        restarted, skipped, self._restarted, self._skipped = self._restarted, self._skipped, {}, 0
        return restarted, skipped

    def record_written(self, ops: Iterable[Op], forgotten: Iterable[tuple[Collection, str]]) -> None:
        """Note that a write committed these ops and redacted the stored ops of these keys."""
        written, pending = self._written, self._pending
        for op in ops:
            if op.seq > written.get(op.device, 0):
                written[op.device] = op.seq
        for device, ops_held in pending.items():
            top = written.get(device, 0)
            if ops_held and ops_held[0].seq <= top:
                pending[device] = [op for op in ops_held if op.seq > top]
        redacted = set(forgotten)
        if redacted:
            self._owed -= redacted
            self._decoded.clear()  # batches decoded before the rewrite

    def _batch(self, batch: int, bodies: dict[int, bytes]) -> _DecodedBatch:
        """Return a logged batch, decoded as far as earlier reads needed if they were lately."""
        decoded = self._decoded.get(batch)
        if decoded is not None:
            self._decoded.move_to_end(batch)
            return decoded
        # A body not read with its page was decoded then, and dropped since by another device's tail.
        body = bodies[batch] if batch in bodies else primary.logged_bodies(self._reader, [batch])[batch]
        decoded = self._decoded[batch] = _DecodedBatch(StoredBatchReader(body, held=False))
        if len(self._decoded) > DECODED_BATCHES_MAX:
            self._decoded.popitem(last=False)
        return decoded

    @staticmethod
    def _damaged(device: str, seq: int) -> StoreError:
        return StoreError(f"the op log lacks ops of {device} after seq {seq}: the primary store is damaged")

    def _as_stored(self, op: Op) -> Op:
        return redacted_op(op) if self._owed and (op.collection, op.key) in self._owed else op
