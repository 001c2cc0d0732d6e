"""Memories: an add-wins set with LWW fields and deterministic near-duplicate collapse.

Near-duplicate memories collapse to a canonical memory by this rule, a pure function of the live set:

- Each live memory m has an order key: its earliest live add tag `(hlc, device, seq)`, then its id.
- Candidate neighbours are found with fixed-seed random-hyperplane LSH: `TABLES` = 36 tables of `BITS` = 17 sign
  bits each, hyperplanes drawn from `np.random.default_rng(LSH_SEED)` (a constant in this module, the same on every
  device). For dimension d the hyperplanes are `standard_normal((TABLES * BITS, d))`, row `t * BITS + b` giving
  bit b of table t; bit b is 1 when the quantized unit vector (below) has a positive dot product with the
  hyperplane rounded to a multiple of 2^-16, and the bucket of table t is the sum of bit b << b. Vectors of
  different dimension never match.
- Cosines are exact: an embedding v is quantized to q = round_half_even(2^11 * v / |v|), where |v|^2 is the
  left-to-right float64 sum of the squared components, and cosine(m, e) = (q_m . q_e) / 2^22.
- `pointer(m)` = among live memories e that come before m in order, share at least one bucket with m, and have
  cosine(m, e) >= `dedup_cosine_min`: the one with the highest cosine (ties: earlier order key); none -> m points
  to itself.
- `canonical(m)` = follow pointers to the root (chains strictly decrease in order, so they end).
- Memories without an embedding (None/empty/zero/non-finite) are their own canonical.
"""

import functools
from typing import Any

import numpy as np

from crdt.journal import ConflictJournal
from crdt.lww import Register, journal_sink, merge_register
from crdt.ops import Collection, Kind, Op, OpId

EDITABLE_FIELDS = frozenset({"text", "embedding", "metadata"})
Tag = tuple[int, str, int]  # the (hlc, device, seq) of the add that made a memory live
OrderKey = tuple[Tag, str]  # a live memory's earliest live add tag, then its id

LSH_SEED = 0x5EED_A1C0
TABLES = 36
BITS = 17
# Unit vectors are rounded to integers at this scale and kept as float32: any partial sum of a dot product of two
# of them is at most |q_m| |q_e| < 2^24, so float32 BLAS computes it exactly, whatever order it adds in.
UNIT_SCALE = 2**11
# Hyperplanes are rounded to integers at this scale: projections of unit vectors stay below 2^53 in float64, so
# their signs are exact too.
HYPERPLANE_SCALE = 2**16
# Memories embedded and hashed together in one vectorised step, bounding the temporary arrays of a bulk resolve.
_CHUNK = 1024
# Bucket entries walked in one neighbour lookup, bounding its temporary arrays (and the vectors gathered for its
# pairs) even when many memories share buckets, as exact copies of a memory do in every table.
_WALK_BUDGET = 1 << 16


def unit_vectors(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the quantized unit vectors of rows of float32 embeddings, and which rows have a direction."""
    vectors = embeddings.astype(np.float64)
    # A running sum adds left to right on every platform, unlike pairwise or BLAS sums, so every device gets the
    # same norm and rounds to the same unit vector.
    squared_norms = np.cumsum(vectors * vectors, axis=1)[:, -1]
    valid = np.isfinite(squared_norms) & (squared_norms > 0)
    norms = np.sqrt(np.where(valid, squared_norms, 1.0))
    units = np.rint(np.where(valid[:, None], vectors / norms[:, None], 0.0) * UNIT_SCALE)
    return units.astype(np.float32), valid


def unit_vector(embedding: bytes | None) -> np.ndarray | None:
    """Return the quantized unit vector of float32 embedding bytes, or None when it has no direction."""
    if not embedding:
        return None
    units, valid = unit_vectors(np.frombuffer(embedding, dtype="<f4")[None, :])
    return units[0] if valid[0] else None


@functools.cache
def _hyperplanes(dim: int) -> np.ndarray:
    """Return the rounded LSH hyperplanes of a dimension, one per column."""
    normals = np.random.default_rng(LSH_SEED).standard_normal((TABLES * BITS, dim))
    return np.ascontiguousarray(np.rint(normals * HYPERPLANE_SCALE).T)


def bucket_keys(units: np.ndarray) -> np.ndarray:
    """Return the bucket of each quantized unit vector (rows of `units`) in every LSH table, shape (n, TABLES)."""
    above = units.astype(np.float64) @ _hyperplanes(units.shape[1]) > 0
    return (above.reshape(len(units), TABLES, BITS) @ (1 << np.arange(BITS))).astype(np.int32)


def _best(targets: np.ndarray, candidates: np.ndarray, dots: np.ndarray, ranks: np.ndarray) -> tuple[np.ndarray, ...]:
    """Return, per distinct target, the candidate with the highest dot product (ties: lowest rank) and its dot."""
    by_preference = np.lexsort((ranks, -dots, targets))
    targets, candidates, dots = targets[by_preference], candidates[by_preference], dots[by_preference]
    first = np.ones(len(targets), bool)
    first[1:] = targets[1:] != targets[:-1]
    return targets[first], candidates[first], dots[first]


def _grown(array: np.ndarray, capacity: int) -> np.ndarray:
    """Return a copy of `array` with `capacity` rows, the new ones zero."""
    # np.zeros maps its pages lazily, so the spare half of a doubled array costs no memory until it is used.
    grown = np.zeros((capacity, *array.shape[1:]), array.dtype)
    grown[: len(array)] = array
    return grown


class _Space:
    """The indexed memories of one embedding dimension, by row: unit vectors, LSH buckets and pointers."""

    def __init__(self, dim: int) -> None:
        self.units = np.zeros((0, dim), np.float32)
        self.keys = np.zeros((0, TABLES), np.int32)
        # Each table hashes its bucket keys into slots, each a doubly linked list through its rows; the number of
        # slots grows with the rows up to one per key, so a small space stays small. Links hold row + 1 so that
        # 0 means none.
        self.head = np.zeros((TABLES, 1), np.int32)
        self.sizes = np.zeros((TABLES, 1), np.int32)  # how many rows each slot holds
        self.next = np.zeros((0, TABLES), np.int32)
        self.prev = np.zeros((0, TABLES), np.int32)
        self.pointer = np.zeros(0, np.int64)  # the row each row points to, plus one; 0 for itself
        self.pointer_dot = np.zeros(0, np.float64)
        self.pointed_by: dict[int, set[int]] = {}
        self.ids: list[str | None] = []
        self.orders: list[OrderKey | None] = []
        self.free: list[int] = []
        self.comparisons = 0

    def insert(self, ids: list[str], orders: list[OrderKey], units: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Index memories, each pointing to itself, and return their rows."""
        reused = [self.free.pop() for _ in range(min(len(ids), len(self.free)))]
        rows = np.array(reused + list(range(len(self.ids), len(self.ids) + len(ids) - len(reused))), np.int64)
        self.ids += [None] * (len(ids) - len(reused))
        self.orders += [None] * (len(ids) - len(reused))
        for row, memory_id, order in zip(rows.tolist(), ids, orders):
            self.ids[row], self.orders[row] = memory_id, order
        if len(self.ids) > len(self.units):
            capacity = 2 * len(self.ids)
            self.units, self.keys = _grown(self.units, capacity), _grown(self.keys, capacity)
            self.next, self.prev = _grown(self.next, capacity), _grown(self.prev, capacity)
            self.pointer, self.pointer_dot = _grown(self.pointer, capacity), _grown(self.pointer_dot, capacity)
            self.head = np.zeros((TABLES, min(1 << BITS, 1 << (capacity - 1).bit_length())), np.int32)
            self.sizes = np.zeros_like(self.head)
            rows_to_link = np.array([row for row, memory_id in enumerate(self.ids) if memory_id is not None])
        else:
            rows_to_link = rows
        self.units[rows], self.keys[rows] = units, keys
        self._link(rows_to_link)
        return rows

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        """Return the slots that bucket keys hash to."""
        return keys & (self.head.shape[1] - 1)

    def _link(self, rows: np.ndarray) -> None:
        """Push rows onto the front of their slots' lists, all tables and rows at once."""
        if not len(rows):
            return
        tables = np.tile(np.arange(TABLES), len(rows))
        slots = self._slots(self.keys[rows].ravel())
        rows = np.repeat(rows, TABLES)
        places = tables * self.head.shape[1] + slots
        by_place = np.argsort(places)
        places, tables, slots, rows = places[by_place], tables[by_place], slots[by_place], rows[by_place]
        # Rows entering the same slot are chained to each other, the last one to the slot's old front.
        same_as_next = places[1:] == places[:-1]
        starts, ends = np.r_[True, ~same_as_next], np.r_[~same_as_next, True]
        old_front = self.head[tables, slots]
        self.next[rows, tables] = np.where(ends, old_front, np.r_[rows[1:] + 1, 0])
        self.prev[rows, tables] = np.where(starts, 0, np.r_[0, rows[:-1] + 1])
        joined = ends & (old_front > 0)
        self.prev[old_front[joined] - 1, tables[joined]] = rows[joined] + 1
        self.head[tables[starts], slots[starts]] = rows[starts] + 1
        self.sizes[tables[starts], slots[starts]] += np.diff(np.flatnonzero(np.r_[starts, True]))

    def remove(self, row: int) -> list[str]:
        """Drop a row from the index; return the ids of the memories that pointed to it (now to themselves)."""
        self._point(row, -1, 0.0)
        orphans = self.pointed_by.pop(row, set())
        self.pointer[list(orphans)] = 0
        tables, after, before = np.arange(TABLES), self.next[row], self.prev[row]
        has_before, has_after = before > 0, after > 0
        self.next[before[has_before] - 1, tables[has_before]] = after[has_before]
        self.head[tables[~has_before], self._slots(self.keys[row][~has_before])] = after[~has_before]
        self.prev[after[has_after] - 1, tables[has_after]] = before[has_after]
        self.sizes[tables, self._slots(self.keys[row])] -= 1
        orphan_ids = [self.ids[orphan] for orphan in orphans]
        self.ids[row] = self.orders[row] = None
        self.free.append(row)
        return orphan_ids

    def _mates(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (row, mate) pairs, each once, for every other row sharing a bucket with one of `rows`."""
        owners = np.repeat(rows, TABLES)
        tables = np.tile(np.arange(TABLES), len(rows))
        keys = self.keys[rows].ravel()
        cursors = self.head[tables, self._slots(keys)]
        found_owners, found_mates = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        # Walk all the slots' lists in step, one link per round, keeping the rows of the owner's very bucket.
        while len(cursors):
            walking = cursors > 0
            owners, tables, keys, cursors = owners[walking], tables[walking], keys[walking], cursors[walking] - 1
            same_bucket = self.keys[cursors, tables] == keys
            found_owners.append(owners[same_bucket])
            found_mates.append(cursors[same_bucket])
            cursors = self.next[cursors, tables]
        pairs = np.concatenate(found_owners) * len(self.units) + np.concatenate(found_mates)
        owners, mates = np.divmod(np.unique(pairs), len(self.units))
        others = owners != mates
        return owners[others], mates[others]

    def _order_ranks(self, rows: np.ndarray) -> np.ndarray:
        """Return each of `rows`'s position in memory order among the distinct `rows`."""
        distinct, where = np.unique(rows, return_inverse=True)
        orders = [self.orders[row] for row in distinct.tolist()]
        ranks = np.empty(len(distinct), np.int64)
        ranks[sorted(range(len(distinct)), key=orders.__getitem__)] = np.arange(len(distinct))
        return ranks[where]

    def _point(self, row: int, target: int, dot: float) -> None:
        """Make `row` point to `target` (-1: to itself), keeping the reverse index."""
        old = int(self.pointer[row]) - 1
        if old >= 0:
            siblings = self.pointed_by[old]
            siblings.discard(row)
            if not siblings:
                del self.pointed_by[old]
        self.pointer[row], self.pointer_dot[row] = target + 1, dot
        if target >= 0:
            self.pointed_by.setdefault(target, set()).add(row)

    def _close_pairs(self, queries: np.ndarray, is_query: np.ndarray, dot_min: float) -> tuple[np.ndarray, ...]:
        """Return each pair of a query and another row that share a bucket and are close enough, once, with its dot."""
        found = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))]
        walk_lengths = self.sizes[np.arange(TABLES), self._slots(self.keys[queries])].sum(axis=1)
        for chunk in np.split(queries, np.flatnonzero(np.diff(np.cumsum(walk_lengths) // _WALK_BUDGET)) + 1):
            rows, mates = self._mates(chunk)
            once = ~is_query[mates] | (mates < rows)  # two queries meet twice: keep one meeting
            rows, mates = rows[once], mates[once]
            dots = np.einsum("ij,ij->i", self.units[rows], self.units[mates]).astype(np.float64)
            self.comparisons += len(dots)
            close = dots >= dot_min
            found.append((rows[close], mates[close], dots[close]))
        return tuple(np.concatenate(parts) for parts in zip(*found))

    def repoint(self, queries: np.ndarray, entering: np.ndarray, cosine_min: float) -> np.ndarray:
        """Compute the pointers of `queries` (pointing to themselves so far), let `entering` rows take over the
        later rows they now beat, and return the rows whose pointer was set."""
        is_query = np.zeros(len(self.units), bool)
        is_query[queries] = True
        is_entering = np.zeros(len(self.units), bool)
        is_entering[entering] = True
        rows, mates, dots = self._close_pairs(queries, is_query, cosine_min * UNIT_SCALE**2)
        holders = self.pointer[mates] - 1  # only non-queries hold a pointer
        holding = holders >= 0
        ranks = self._order_ranks(np.concatenate([rows, mates, holders[holding]]))
        row_ranks, mate_ranks = ranks[: len(rows)], ranks[len(rows) : 2 * len(rows)]
        holder_ranks = np.zeros(len(mates), np.int64)
        holder_ranks[holding] = ranks[2 * len(rows) :]
        mate_is_later = mate_ranks > row_ranks
        later, earlier = np.where(mate_is_later, mates, rows), np.where(mate_is_later, rows, mates)
        earlier_ranks = np.where(mate_is_later, row_ranks, mate_ranks)
        # A query takes its best earlier candidate. A row that is not a query keeps its pointer (still the best of
        # its unchanged candidates) unless a row entering before it beats it.
        wanted = is_query[later] | is_entering[earlier]
        contested = wanted & mate_is_later & holding
        targets, winners, winning_dots = _best(
            np.concatenate([later[wanted], mates[contested]]),
            np.concatenate([earlier[wanted], holders[contested]]),
            np.concatenate([dots[wanted], self.pointer_dot[mates[contested]]]),
            np.concatenate([earlier_ranks[wanted], holder_ranks[contested]]),
        )
        taken = winners != self.pointer[targets] - 1
        for target, winner, dot in zip(targets[taken].tolist(), winners[taken].tolist(), winning_dots[taken].tolist()):
            self._point(target, winner, dot)
        return np.union1d(queries, targets[taken])

    def refresh_canonical(self, moved: np.ndarray, canonical: dict[str, str]) -> None:
        """Recompute the canonical ids of the `moved` rows and of every row whose pointers lead through them."""
        stale = set(moved.tolist())
        frontier = list(stale)
        while frontier:
            for child in self.pointed_by.get(frontier.pop(), ()):
                if child not in stale:
                    stale.add(child)
                    frontier.append(child)
        # Pointers lead to earlier memories, so in memory order a row's target is already up to date.
        for row in sorted(stale, key=self.orders.__getitem__):
            target = int(self.pointer[row]) - 1
            memory_id = self.ids[row]
            canonical[memory_id] = memory_id if target < 0 else canonical[self.ids[target]]


class MemorySet:
    """Memories keyed by id, live while some add is not observed-removed (add-wins)."""

    collection = Collection.MEMORIES

    def __init__(self, dedup_cosine_min: float) -> None:
        self.dedup_cosine_min = dedup_cosine_min
        self.adds: dict[str, set[Tag]] = {}
        self.removed: dict[str, set[OpId]] = {}
        self.fields: dict[str, dict[str, Register]] = {}
        self._first_live: dict[str, Tag] = {}  # every live memory's earliest live add tag
        self._canonical: dict[str, str] = {}
        self._changed: set[str] = set()  # memories whose liveness, order key or embedding changed since resolved
        self._spaces: dict[int, _Space] = {}
        self._rows: dict[str, tuple[int, int]] = {}  # each indexed memory's dimension and row

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
        self._refresh_first_live(memory_id)
        return True

    def _remove(self, memory_id: str, observed: set[OpId]) -> bool:
        removed = self.removed.setdefault(memory_id, set())
        before = len(removed)
        removed |= observed
        if len(removed) == before:
            return False
        self._refresh_first_live(memory_id)
        return True

    def _refresh_first_live(self, memory_id: str) -> None:
        """Recompute a memory's earliest live add tag, marking the memory changed if it moved."""
        removed = self.removed.get(memory_id, set())
        first = min((tag for tag in self.adds.get(memory_id, ()) if (tag[1], tag[2]) not in removed), default=None)
        if first == self._first_live.get(memory_id):
            return
        if first is None:
            del self._first_live[memory_id]
        else:
            self._first_live[memory_id] = first
        self._changed.add(memory_id)

    def _edit(self, memory_id: str, field: str, incoming: Register, journal: ConflictJournal) -> bool:
        fields = self.fields.setdefault(memory_id, {})
        winner = merge_register(fields.get(field), incoming, journal_sink(journal, self.collection, memory_id, field))
        fields[field] = winner
        if winner is incoming and field == "embedding":
            self._changed.add(memory_id)
        return winner is incoming

    def redact(self, memory_id: str, neutral: dict[str, Any]) -> None:
        """Replace the values of a memory's fields with neutral ones, keeping their stamps."""
        fields = self.fields.get(memory_id, {})
        for field, register in fields.items():
            fields[field] = register._replace(value=neutral[field])
        self._changed.add(memory_id)

    def live_tags(self, memory_id: str) -> list[OpId]:
        """Return the adds of a memory that no remove has observed."""
        removed = self.removed.get(memory_id, set())
        return sorted((device, seq) for _, device, seq in self.adds.get(memory_id, ()) if (device, seq) not in removed)

    def is_live(self, memory_id: str) -> bool:
        return memory_id in self._first_live

    def get(self, memory_id: str) -> dict[str, Any] | None:
        """Return a live memory's fields and its canonical id, or None."""
        if not self.is_live(memory_id):
            return None
        memory = {field: register.value for field, register in self.fields.get(memory_id, {}).items()}
        memory["canonical"] = self.canonical_ids()[memory_id]
        return memory

    def live_ids(self) -> list[str]:
        return list(self._first_live)

    @property
    def comparisons(self) -> int:
        """Return how many cosines the dedup index has computed, a measure of its work."""
        return sum(space.comparisons for space in self._spaces.values())

    def canonical_ids(self) -> dict[str, str]:
        """Map every live memory to the canonical memory its near-duplicates collapse to."""
        if self._changed:
            self._resolve()
        return self._canonical

    def _resolve(self) -> None:
        """Bring pointers and canonical ids up to date with the memories changed since the last call."""
        changed, self._changed = self._changed, set()
        orphans: set[str] = set()  # memories whose pointer target left the index
        for memory_id in changed:
            self._canonical.pop(memory_id, None)
            place = self._rows.pop(memory_id, None)
            if place is not None:
                orphans.update(self._spaces[place[0]].remove(place[1]))
        entering: dict[int, list[str]] = {}
        for memory_id in changed:
            if memory_id in self._first_live:
                self._canonical[memory_id] = memory_id  # until the index says otherwise
                embedding = self.fields.get(memory_id, {}).get("embedding")
                if embedding is not None and embedding.value:
                    entering.setdefault(len(embedding.value) // 4, []).append(memory_id)
        stranded: dict[int, list[int]] = {}  # orphans that stay indexed where they are
        for memory_id in orphans - changed:
            dim, row = self._rows[memory_id]
            stranded.setdefault(dim, []).append(row)
        for dim in entering.keys() | stranded.keys():
            self._resolve_space(dim, entering.get(dim, []), stranded.get(dim, []))

    def _resolve_space(self, dim: int, entering: list[str], stranded: list[int]) -> None:
        """Index the memories entering one dimension's space and repoint what they and the stranded rows affect."""
        if dim not in self._spaces:
            self._spaces[dim] = _Space(dim)
        space = self._spaces[dim]
        indexed: list[str] = []
        units, keys = [np.zeros((0, dim), np.float32)], [np.zeros((0, TABLES), np.int32)]
        for start in range(0, len(entering), _CHUNK):
            chunk = entering[start : start + _CHUNK]
            embeddings = b"".join(self.fields[memory_id]["embedding"].value for memory_id in chunk)
            chunk_units, valid = unit_vectors(np.frombuffer(embeddings, dtype="<f4").reshape(len(chunk), dim))
            indexed += [memory_id for memory_id, has_direction in zip(chunk, valid.tolist()) if has_direction]
            units.append(chunk_units[valid])
            keys.append(bucket_keys(units[-1]))
        orders = [(self._first_live[memory_id], memory_id) for memory_id in indexed]
        rows = space.insert(indexed, orders, np.concatenate(units), np.concatenate(keys))
        self._rows.update((memory_id, (dim, row)) for memory_id, row in zip(indexed, rows.tolist()))
        moved = space.repoint(np.union1d(rows, np.array(stranded, np.int64)), rows, self.dedup_cosine_min)
        space.refresh_canonical(moved, self._canonical)

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
        return len(self._first_live)
