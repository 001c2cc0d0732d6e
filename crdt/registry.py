"""Device registry: enrolment is add-wins, revocation is remove-wins and permanent."""

from typing import Any

from crdt.journal import ConflictJournal
from crdt.lww import Register, journal_sink, merge_register
from crdt.ops import Collection, Kind, Op


class DeviceRegistry:
    """Enrolled devices and permanent revocations; signatures are checked by the node layer."""

    collection = Collection.DEVICES

    def __init__(self) -> None:
        self.enrolments: dict[str, Register] = {}
        self.revocations: dict[str, Register] = {}

    def apply(self, op: Op, journal: ConflictJournal) -> bool:
        register = Register.of(op, op.payload)
        if op.kind is Kind.ENROL:
            return self._enrol(op.key, register, journal)
        return self._revoke(op.key, register)

    def _enrol(self, device: str, incoming: Register, journal: ConflictJournal) -> bool:
        winner = merge_register(
            self.enrolments.get(device), incoming, journal_sink(journal, self.collection, device, "enrolment")
        )
        self.enrolments[device] = winner
        return winner is incoming

    def _revoke(self, device: str, incoming: Register) -> bool:
        current = self.revocations.get(device)
        # The earliest revocation is the one every device keeps, so its stamp is the same everywhere.
        if current is None or (incoming.hlc, incoming.device) < (current.hlc, current.device):
            self.revocations[device] = incoming
            return current is None
        return False

    def is_trusted(self, device: str) -> bool:
        """Return whether a device is enrolled and not revoked."""
        return device in self.enrolments and device not in self.revocations

    def revoked_at(self, device: str) -> int | None:
        """Return the HLC stamp of a device's revocation, or None."""
        register = self.revocations.get(device)
        return None if register is None else register.hlc

    def get(self, device: str) -> dict[str, Any] | None:
        register = self.enrolments.get(device)
        if register is None:
            return None
        return {**register.value, "revoked": device in self.revocations}

    def name(self, device: str) -> str | None:
        """The name a device's enrolment gives it, or None for a device not (yet) enrolled."""
        register = self.enrolments.get(device)
        name = register.value.get("name") if register is not None else None
        return name if isinstance(name, str) else None

    def to_state(self) -> dict:
        return {
            "enrolments": {d: list(r) for d, r in self.enrolments.items()},
            "revocations": {d: list(r) for d, r in self.revocations.items()},
        }

    def join_state(self, state: dict, journal: ConflictJournal) -> None:
        for device, row in state["enrolments"].items():
            self._enrol(device, Register.from_state(row), journal)
        for device, row in state["revocations"].items():
            self._revoke(device, Register.from_state(row))

    def view(self) -> dict:
        return {
            "enrolled": {d: self.get(d) for d in self.enrolments},
            "revoked": {d: r.hlc for d, r in self.revocations.items()},
        }

    def __len__(self) -> int:
        return len(self.enrolments)
