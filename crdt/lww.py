"""Last-writer-wins registers ordered by (HLC, device id), and a map of them."""

from collections.abc import Callable
from typing import Any, NamedTuple

from crdt.errors import DecodeError
from crdt.journal import Conflict, ConflictJournal
from crdt.ops import Op, OpId


class Register(NamedTuple):
    """A value with the stamp and identity of the op that wrote it."""

    hlc: int
    device: str
    seq: int
    value: Any
    prev: OpId | None

    @property
    def op_id(self) -> OpId:
        return (self.device, self.seq)

    @classmethod
    def of(cls, op: Op, value: Any) -> "Register":
        """Return the register an op writes."""
        # tuple.__new__ skips the generated __new__, a Python call: a catch-up makes a register per op.
        return tuple.__new__(cls, (op.hlc, op.device, op.seq, value, op.prev))

    @classmethod
    def from_state(cls, row: list) -> "Register":
        """Return a register from its snapshot form."""
        hlc, device, seq, value, prev = row
        well_typed = type(hlc) is int and type(device) is str and type(seq) is int
        if not well_typed or not (prev is None or (len(prev) == 2 and type(prev[0]) is str and type(prev[1]) is int)):
            raise DecodeError(f"malformed register in state: {row!r:.200}")
        return cls(hlc, device, seq, value, None if prev is None else (prev[0], prev[1]))


ConflictSink = Callable[[Register, Register], None]


def merge_register(current: Register | None, incoming: Register, on_conflict: ConflictSink) -> Register:
    """Return the winner of two writes, reporting a loser its winner had not replaced."""
    if current is None or current[:3] == incoming[:3]:
        return incoming if current is None else current
    if (incoming.hlc, incoming.device) > (current.hlc, current.device):
        winner, loser = incoming, current
    else:
        winner, loser = current, incoming
    # A write that names the loser as the value it replaced is a plain sequential overwrite.
    if winner.prev != loser.op_id:
        on_conflict(winner, loser)
    return winner


def journal_sink(journal: ConflictJournal, collection: str, key: str, field: str | None) -> ConflictSink:
    """Return a conflict sink that records into a journal under one key and field."""

    def record(winner: Register, loser: Register) -> None:
        journal.record(
            Conflict(collection, key, field, winner.op_id, winner.hlc, winner.value, loser.op_id, loser.hlc, loser.value)
        )

    return record


class LwwMap:
    """A map of last-writer-wins registers (preferences, settings)."""

    def __init__(self, collection: str) -> None:
        self.collection = collection
        self.registers: dict[str, Register] = {}

    def apply(self, op: Op, journal: ConflictJournal) -> bool:
        return self._merge(op.key, Register.of(op, op.payload), journal)

    def _merge(self, key: str, incoming: Register, journal: ConflictJournal) -> bool:
        current = self.registers.get(key)
        if current is None:  # the fast path: most keys are written once between syncs
            self.registers[key] = incoming
            return True
        winner = merge_register(current, incoming, journal_sink(journal, self.collection, key, None))
        self.registers[key] = winner
        return winner is incoming

    def get(self, key: str, default: Any = None) -> Any:
        register = self.registers.get(key)
        return default if register is None else register.value

    def to_state(self) -> dict:
        return {key: list(register) for key, register in self.registers.items()}

    def join_state(self, state: dict, journal: ConflictJournal) -> None:
        for key, row in state.items():
            self._merge(key, Register.from_state(row), journal)

    def view(self) -> dict:
        return {key: register.value for key, register in self.registers.items()}

    def __len__(self) -> int:
        return len(self.registers)
