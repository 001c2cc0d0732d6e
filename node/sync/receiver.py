"""Persistence of received ops: what sessions and the mailbox applied is written to the stores, in groups, before the
ACK that claims it goes out; and the notice that tells sessions there are new ops to send."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import trio

from crdt import Op
from node.sync.session import Event, OpsApplied, SessionState, StateMerged, SyncSession
from stores.datalayer import DataLayer, PendingWrite
from stores.primary import LogBatch

log = logging.getLogger(__name__)
# Applied ops that wait for the persist in flight: one fsync for ~25 full batches. At 20k the pump stalled behind slow
# fsyncs (0.1-0.5 s on the disk measured); the bound is memory: about 300 bytes of rows per op waiting.
GROUP_OPS_MAX = 50_000


class Notifier:
    """Wakes every session waiting on it when there are new ops to send; call `notify` from the trio thread."""

    def __init__(self) -> None:
        self.version = 0
        self._changed = trio.Event()

    def notify(self) -> None:
        """Tell waiting sessions that there are new ops to send."""
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, seen: int) -> int:
        """Wait until notified after version `seen` (at once if already so), and return the current version."""
        # A version, not a bare event, so a notify that lands while the waiter is busy sending is not lost.
        if self.version == seen:
            await self._changed.wait()
        return self.version


class OpsReceiver:
    """Writes ops that arrived from other devices to the stores, then tells the node and the sessions."""

    def __init__(self, data: DataLayer, outgoing: Notifier, on_applied: Callable[[list[Op]], None]) -> None:
        self.data = data
        self.outgoing = outgoing  # sessions and the mailbox wait on it for ops to send
        self._on_applied = on_applied

    @property
    def write_lock(self) -> trio.Lock:
        """Held while ops are applied and until they are persisted, so no other writer interleaves."""
        return self.data.write_lock

    def stage(self, log_batches: Sequence[LogBatch], merged: Sequence[StateMerged] = ()) -> PendingWrite | None:
        """Take now, from the replica, what these applied batches and merged state parts changed (None if nothing)."""
        if not (log_batches or merged):
            return None
        parts = [event.part for event in merged]
        return self.data.prepare(log_batches, parts=parts, resume=merged[-1].resume if merged else None)

    async def store(self, pending: PendingWrite) -> None:
        """Write what `stage` took, in one transaction, then publish the ops and wake the sessions."""
        await self.data.write(pending)
        self._on_applied(pending.ops)
        self.outgoing.notify()  # other peers may lack these ops

    async def apply_remote(self, ops: list[Op]) -> list[Op]:
        """Apply and persist ops that came another way than a session (the mailbox); return those applied."""
        async with self.data.write_lock:
            result = self.data.replica.apply(ops)
            applied = list(result.applied)
            if applied:
                await self.data.persist(applied)
        for op, why in result.refused:
            log.warning("refused op %s:%s from the mailbox: %s", op.device, op.seq, why)
        if applied:
            self._on_applied(applied)
            self.outgoing.notify()  # peers in session may lack these ops
        return applied


class AppliedOpsWriter:
    """Persists what one session applied in the background, one group of chunks per transaction, while its pump applies
    the next chunks; releases each group's ACK only once the group is persisted.

    A catch-up is bound by the primary store: this overlaps its worker thread with decoding and applying, and one
    transaction (one fsync) covers every chunk applied while the previous one ran. At most GROUP_OPS_MAX applied ops
    wait beside the group in flight. The write lock is held from the first chunk applied until everything applied is
    persisted. A finished write calls `on_persisted`, so the pump never waits on a write while the peer's data keeps
    coming. Methods that finish writes return the ACK frames now due, for the pump to send.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        session: SyncSession,
        on_events: Callable[[list[Event]], Awaitable[None]],
        on_persisted: Callable[[], Awaitable[None]],
        lock: trio.Lock,
    ) -> None:
        self._nursery = nursery
        self._session = session
        self._on_events = on_events
        self._on_persisted = on_persisted
        self._lock = lock
        self._holding_lock = False
        self._pending: list[Event] = []
        self._pending_ops = 0
        self._pending_ack: bytes | None = None
        self._in_flight: trio.Event | None = None
        self._in_flight_ack: bytes | None = None
        self._failure: Exception | None = None

    @property
    def idle(self) -> bool:
        """Whether everything applied is persisted and acknowledged."""
        return self._in_flight is None and not self._pending

    @property
    def others_waiting(self) -> bool:
        """Whether another writer waits for the write lock this session holds."""
        return self._holding_lock and self._lock.statistics().tasks_waiting > 0

    async def hold_lock(self) -> None:
        """Take the write lock before the session applies received bytes (a no-op while held)."""
        if not self._holding_lock:
            await self._lock.acquire()
            self._holding_lock = True

    def release_lock(self) -> None:
        """Give the write lock back; call only when idle (or when the session is over)."""
        if self._holding_lock:
            self._lock.release()
            self._holding_lock = False

    async def add(self, events: list[Event], ack: bytes | None) -> list[bytes]:
        """Queue what one chunk applied (and the ACK that claims it) behind the group in flight, or start it."""
        self._pending += events
        self._pending_ops += sum(
            len(event.ops) if isinstance(event, OpsApplied) else len(event.part.state["messages"]["records"])
            for event in events
            if isinstance(event, OpsApplied | StateMerged)
        )
        self._pending_ack = ack or self._pending_ack
        due = []
        if self._in_flight is not None and self._pending_ops >= GROUP_OPS_MAX:
            due += await self._finish()  # the bound: wait for the write in flight
        return due + await self.settle()

    async def settle(self) -> list[bytes]:
        """Release the ACK of a group whose write finished, and start writing what waits if no write runs."""
        due = []
        if self._in_flight is not None and self._in_flight.is_set():
            due = await self._finish()
        if self._in_flight is None and self._pending:
            self._start()
        return due

    async def drain(self) -> list[bytes]:
        """Persist everything applied so far and return its ACKs."""
        due = []
        while not self.idle:
            if self._in_flight is not None:
                due += await self._finish()
            if self._pending:
                self._start()
        return due

    def _start(self) -> None:
        # on_events checks the events and takes the changed rows now, before the pump applies more.
        write = self._on_events(self._pending)
        done = trio.Event()
        self._in_flight, self._in_flight_ack = done, self._pending_ack
        self._pending, self._pending_ops, self._pending_ack = [], 0, None
        self._nursery.start_soon(self._run, write, done)

    async def _run(self, write: Awaitable[None], done: trio.Event) -> None:
        try:
            await write
        except Exception as error:
            self._failure = error  # raised in the pump by _finish, not in the nursery (no ExceptionGroup)
        finally:
            done.set()
        await self._on_persisted()

    def take_persisted_ack(self) -> list[bytes]:
        """Return the ACK of the write that finished but was not yet settled, for a session ending now."""
        if self._in_flight is None or not self._in_flight.is_set() or self._failure is not None:
            return []
        ack, self._in_flight_ack = self._in_flight_ack, None
        return self._due(ack)

    async def _finish(self) -> list[bytes]:
        assert self._in_flight is not None
        await self._in_flight.wait()
        ack, self._in_flight, self._in_flight_ack = self._in_flight_ack, None, None
        if self._failure is not None:
            raise self._failure
        return self._due(ack)

    def _due(self, ack: bytes | None) -> list[bytes]:
        return [ack] if ack is not None and self._session.state is SessionState.SYNCING else []
