"""Memories: an add-wins set with LWW fields and deterministic near-duplicate collapse."""

from typing import Any

import numpy as np

from crdt.journal import ConflictJournal
from crdt.lww import Register, journal_sink, merge_register
from crdt.ops import Collection, Kind, Op, OpId

EDITABLE_FIELDS = frozenset({"text", "embedding", "metadata"})
Tag = tuple[int, str, int]  # the (hlc, device, seq) of the add that made a memory live


class MemorySet:
    """Memories keyed by id, live while some add is not observed-removed (add-wins)."""

    collection = Collection.MEMORIES

    def __init__(self, dedup_cosine_min: float) -> None:
        self.dedup_cosine_min = dedup_cosine_min
        self.adds: dict[str, set[Tag]] = {}
        self.removed: dict[str, set[OpId]] = {}
        self.fields: dict[str, dict[str, Register]] = {}
        self._canonical: dict[str, str] | None = None

    def apply(self, op: Op, journal: ConflictJournal) -> bool:
        if op.kind is Kind.ADD:
            tag = (op.hlc, op.device, op.seq)
            changed = self._add(op.key, tag)
            for field in sorted(EDITABLE_FIELDS):
                changed |= self._edit(op.key, field, Register.of(op, op.payload[field]), journal)
            return changed
        if op.kind is Kind.EDIT:
            field, value = op.payload
            return self._edit(op.key, field, Register.of(op, value), journal)
        return self._remove(op.key, {(device, seq) for device, seq in op.payload})

    def _add(self, memory_id: str, tag: Tag) -> bool:
        tags = self.adds.setdefault(memory_id, set())
        if tag in tags:
            return False
        tags.add(tag)
        self._canonical = None
        return True

    def _remove(self, memory_id: str, observed: set[OpId]) -> bool:
        removed = self.removed.setdefault(memory_id, set())
        before = len(removed)
        removed |= observed
        if len(removed) == before:
            return False
        self._canonical = None
        return True

    def _edit(self, memory_id: str, field: str, incoming: Register, journal: ConflictJournal) -> bool:
        fields = self.fields.setdefault(memory_id, {})
        winner = merge_register(fields.get(field), incoming, journal_sink(journal, self.collection, memory_id, field))
        fields[field] = winner
        if winner is incoming and field == "embedding":
            self._canonical = None
        return winner is incoming

    def live_tags(self, memory_id: str) -> list[OpId]:
        """Return the adds of a memory that no remove has observed."""
        removed = self.removed.get(memory_id, set())
        return sorted((device, seq) for _, device, seq in self.adds.get(memory_id, ()) if (device, seq) not in removed)

    def is_live(self, memory_id: str) -> bool:
        return bool(self.live_tags(memory_id))

    def get(self, memory_id: str) -> dict[str, Any] | None:
        """Return a live memory's fields and its canonical id, or None."""
        if not self.is_live(memory_id):
            return None
        memory = {field: register.value for field, register in self.fields.get(memory_id, {}).items()}
        memory["canonical"] = self.canonical_ids()[memory_id]
        return memory

    def live_ids(self) -> list[str]:
        return [memory_id for memory_id in self.adds if self.is_live(memory_id)]

    def canonical_ids(self) -> dict[str, str]:
        """Map every live memory to the canonical memory its near-duplicates collapse to."""
        if self._canonical is None:
            self._canonical = self._collapse_duplicates()
        return self._canonical

    def _collapse_duplicates(self) -> dict[str, str]:
        # A pure function of the live set: visit memories by their earliest live add, and let each one
        # join the most similar canonical memory seen before it (if close enough) or become canonical.
        # Any arrival order therefore yields the same mapping on every device.
        first_add: dict[str, Tag] = {}
        for memory_id, tags in self.adds.items():
            removed = self.removed.get(memory_id, set())
            live = [tag for tag in tags if (tag[1], tag[2]) not in removed]
            if live:
                first_add[memory_id] = min(live)
        canonical: dict[str, str] = {}
        kept_by_dim: dict[int, list[tuple[str, np.ndarray]]] = {}
        for memory_id in sorted(first_add, key=lambda mid: (first_add[mid], mid)):
            vector = self._unit_embedding(memory_id)
            canonical[memory_id] = memory_id
            if vector is None:
                continue
            same_dim = kept_by_dim.setdefault(len(vector), [])
            if same_dim:
                similarities = np.stack([v for _, v in same_dim]) @ vector
                best = int(np.argmax(similarities))
                if similarities[best] >= self.dedup_cosine_min:
                    canonical[memory_id] = same_dim[best][0]
                    continue
            same_dim.append((memory_id, vector))
        return canonical

    def _unit_embedding(self, memory_id: str) -> np.ndarray | None:
        register = self.fields.get(memory_id, {}).get("embedding")
        if register is None or not register.value:
            return None
        vector = np.frombuffer(register.value, dtype="<f4").astype(np.float64)
        norm = float(np.linalg.norm(vector))
        return None if norm == 0.0 or not np.isfinite(norm) else vector / norm

    def to_state(self) -> dict:
        return {
            "adds": {mid: sorted(list(tag) for tag in tags) for mid, tags in self.adds.items()},
            "removed": {mid: sorted(list(tag) for tag in tags) for mid, tags in self.removed.items()},
            "fields": {mid: {f: list(r) for f, r in fields.items()} for mid, fields in self.fields.items()},
        }

    def join_state(self, state: dict, journal: ConflictJournal) -> None:
        for memory_id, tags in state["adds"].items():
            for hlc, device, seq in tags:
                self._add(memory_id, (hlc, device, seq))
        for memory_id, tags in state["removed"].items():
            self._remove(memory_id, {(device, seq) for device, seq in tags})
        for memory_id, fields in state["fields"].items():
            for field, row in fields.items():
                self._edit(memory_id, field, Register.from_state(row), journal)

    def view(self) -> dict:
        return {memory_id: self.get(memory_id) for memory_id in self.live_ids()}

    def __len__(self) -> int:
        return len(self.live_ids())
