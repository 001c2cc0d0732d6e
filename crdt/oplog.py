"""Where a replica keeps the ops it applied: the interface, and a log held in memory."""

from collections.abc import Iterator, Mapping
from typing import Protocol

import attrs

from crdt.ops import Collection, Op
from crdt.schema import redacted_payload


class OpLog(Protocol):
    """The ops a replica applied, each device's in seq order from just above its base."""

    def append(self, op: Op) -> None:
        """Log an op applied after every op of its device the log holds; one already held is not held twice."""

    def base(self, device: str) -> int:
        """Return the seq just below the first op of a device the log can give (ops up to it were compacted)."""

    def tail(self, device: str, after_seq: int) -> Iterator[Op]:
        """Yield a device's logged ops with a seq above `after_seq` (not below its base), in seq order."""

    def ops(self) -> Iterator[Op]:
        """Yield every logged op, each device's in seq order."""

    def redact(self, collection: Collection, key: str) -> None:
        """Strip the content from the payload of every logged op of one key (a forgotten message or memory)."""

    def restart(self, device: str, seq: int) -> None:
        """Drop a device's ops up to `seq` and give none below it: a state snapshot brought their effect."""

    def reset(self) -> None:
        """Forget every op the log does not keep durably, as the replica is rebuilt from what was kept."""

    def durable(self) -> dict[str, int]:
        """Return the vector of the ops whose effect is kept durably: a state snapshot holds at least theirs."""


def redacted_op(op: Op) -> Op:
    """Return an op with every piece of user content in its payload replaced by a neutral value."""
    return attrs.evolve(op, payload=redacted_payload(op.collection, op.kind, op.payload))


def _tail(log: list[Op], start: int) -> Iterator[Op]:
    """Yield the ops of a list from index `start` on, without copying it."""
    for index in range(start, len(log)):
        yield log[index]


@attrs.define
class MemoryLog:
    """An op log held in memory, for replicas without a store (simulations, tests, saved replicas)."""

    _ops: dict[str, list[Op]] = attrs.field(factory=dict)
    _base: dict[str, int] = attrs.field(factory=dict)  # seq just below the first op still held

    def append(self, op: Op) -> None:
        self._ops.setdefault(op.device, []).append(op)

    def base(self, device: str) -> int:
        return self._base.get(device, 0)

    def tail(self, device: str, after_seq: int) -> Iterator[Op]:
        return _tail(self._ops.get(device, []), after_seq - self.base(device))

    def ops(self) -> Iterator[Op]:
        for log in self._ops.values():
            yield from log

    def redact(self, collection: Collection, key: str) -> None:
        for log in self._ops.values():
            for index, logged in enumerate(log):
                if logged.collection is collection and logged.key == key:
                    log[index] = redacted_op(logged)

    def restart(self, device: str, seq: int) -> None:
        self._ops[device] = []
        self._base[device] = seq

    def reset(self) -> None:
        self._ops.clear()
        self._base.clear()

    def durable(self) -> dict[str, int]:
        # A replica without a store holds its whole state in memory, with every op it logged.
        held = {device: self.base(device) + len(log) for device, log in self._ops.items()}
        return {device: seq for device, seq in held.items() if seq}

    def compact(self, applied_everywhere: Mapping[str, int]) -> int:
        """Drop logged ops every trusted device has applied; return how many were dropped."""
        dropped = 0
        for device, log in self._ops.items():
            base = self.base(device)
            upto = min(applied_everywhere.get(device, 0), base + len(log))
            if upto > base:
                del log[: upto - base]
                self._base[device] = upto
                dropped += upto - base
        return dropped
