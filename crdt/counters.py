"""Interaction counters: per-device increment and decrement totals, summed (PN-counter)."""

from crdt.journal import ConflictJournal
from crdt.ops import Op


class CounterSet:
    """Counters keyed by name; each device's (increments, decrements) only grows."""

    def __init__(self) -> None:
        self.totals: dict[str, dict[str, tuple[int, int]]] = {}

    def apply(self, op: Op, journal: ConflictJournal) -> bool:
        up, down = op.payload
        return self._merge(op.key, op.device, (up, down))

    def _merge(self, name: str, device: str, incoming: tuple[int, int]) -> bool:
        per_device = self.totals.setdefault(name, {})
        current = per_device.get(device, (0, 0))
        merged = (max(current[0], incoming[0]), max(current[1], incoming[1]))
        per_device[device] = merged
        return merged != current

    def next_totals(self, name: str, device: str, delta: int) -> tuple[int, int]:
        """Return a device's totals for a counter after adding `delta`."""
        up, down = self.totals.get(name, {}).get(device, (0, 0))
        return (up + delta, down) if delta >= 0 else (up, down - delta)

    def value(self, name: str) -> int:
        return sum(up - down for up, down in self.totals.get(name, {}).values())

    def to_state(self) -> dict:
        return {name: {d: list(t) for d, t in per_device.items()} for name, per_device in self.totals.items()}

    def join_state(self, state: dict, journal: ConflictJournal) -> None:
        for name, per_device in state.items():
            for device, (up, down) in per_device.items():
                self._merge(name, device, (up, down))

    def view(self) -> dict:
        return {name: self.value(name) for name in self.totals}

    def __len__(self) -> int:
        return len(self.totals)
