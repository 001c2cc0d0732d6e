"""Conflict journal: concurrent values a merge overwrote, kept for the user to read."""

from collections import deque
from collections.abc import Iterator
from typing import Any

import attrs

from crdt.ops import OpId


@attrs.frozen
class Conflict:
    """A value that lost a last-writer-wins merge against a concurrent write."""

    collection: str
    key: str
    field: str | None
    winner: OpId
    winner_hlc: int
    winner_value: Any
    loser: OpId
    loser_hlc: int
    loser_value: Any


class ConflictJournal:
    """A bounded journal of conflicts, oldest dropped first."""

    def __init__(self, entries_max: int = 10_000) -> None:
        self._entries: deque[Conflict] = deque(maxlen=entries_max)
        self.dropped = 0
        self.recorded = 0  # all conflicts ever recorded, so a reader can tell which ones are new

    def record(self, conflict: Conflict) -> None:
        """Append a conflict, dropping the oldest when full."""
        if len(self._entries) == self._entries.maxlen:
            self.dropped += 1
        self._entries.append(conflict)
        self.recorded += 1

    def since(self, recorded: int) -> list[Conflict]:
        """Return the conflicts recorded after the first `recorded` ones (as many as are still kept)."""
        new = min(self.recorded - recorded, len(self._entries))
        return list(self._entries)[len(self._entries) - new :] if new > 0 else []

    def __iter__(self) -> Iterator[Conflict]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
