"""Ops: the unit of change every device makes, identified by (device_id, seq)."""

from enum import StrEnum
from typing import Any

import attrs

OpId = tuple[str, int]


class Collection(StrEnum):
    """A synced collection; each has one merge rule."""

    PREFERENCES = "preferences"
    SETTINGS = "settings"
    MESSAGES = "messages"
    MEMORIES = "memories"
    NOTES = "notes"
    COUNTERS = "counters"
    DEVICES = "devices"


class Kind(StrEnum):
    """What an op does to its key."""

    SET = "set"
    ADD = "add"
    EDIT = "edit"
    DELETE = "delete"
    REMOVE = "remove"
    UPDATE = "update"
    ENROL = "enrol"
    REVOKE = "revoke"


KINDS_BY_COLLECTION: dict[Collection, frozenset[Kind]] = {
    Collection.PREFERENCES: frozenset({Kind.SET}),
    Collection.SETTINGS: frozenset({Kind.SET}),
    Collection.MESSAGES: frozenset({Kind.ADD, Kind.EDIT, Kind.DELETE}),
    Collection.MEMORIES: frozenset({Kind.ADD, Kind.EDIT, Kind.REMOVE}),
    Collection.NOTES: frozenset({Kind.UPDATE}),
    Collection.COUNTERS: frozenset({Kind.ADD}),
    Collection.DEVICES: frozenset({Kind.ENROL, Kind.REVOKE}),
}


@attrs.frozen
class Op:
    """One change: who made it (device, seq), when (hlc), to what, and its payload."""

    device: str
    seq: int
    hlc: int
    collection: Collection
    key: str
    kind: Kind
    payload: Any
    prev: OpId | None = None  # the op whose value this write replaced on its device, if any

    @property
    def id(self) -> OpId:
        """Return the op's identity."""
        return (self.device, self.seq)

    @property
    def stamp(self) -> tuple[int, str]:
        """Return the total order used by last-writer-wins: HLC, then device id."""
        return (self.hlc, self.device)
