"""Memories: an add-wins set with LWW fields and deterministic near-duplicate collapse.

Near-duplicate memories collapse to a canonical memory by this rule, a pure function of the live set:

- Each live memory m has an order key: its earliest live add tag `(hlc, device, seq)`, then its id.
- Candidate neighbours are found with fixed-seed random-hyperplane LSH: `TABLES` = 36 tables of `BITS` = 17 sign
  bits each, hyperplanes drawn from `np.random.default_rng(LSH_SEED)` (a constant in this module, the same on every
  device). For dimension d the hyperplanes are `standard_normal((TABLES * BITS, d))`, row `t * BITS + b` giving
  bit b of table t; bit b is 1 when the quantized unit vector (below) has a positive dot product with the
  hyperplane rounded to a multiple of 2^-16, and the bucket of table t is the sum of bit b << b. Vectors of
  different dimension never match.
- Cosines are exact: an embedding v (little-endian float32, widened to float64) is quantized to
  q = round_half_even(2^11 * v / |v|), where |v|^2 is the left-to-right float64 sum of the squared components, and
  cosine(m, e) = (q_m . q_e) / 2^22.
- `pointer(m)` = among live memories e that come before m in order, share at least one bucket with m, and have
  cosine(m, e) >= `dedup_cosine_min`: the one with the highest cosine (ties: earlier order key); none -> m points
  to itself.
- `canonical(m)` = follow pointers to the root (chains strictly decrease in order, so they end).
- Memories without an embedding (None/empty/zero/non-finite) are their own canonical.
"""

import functools
from collections.abc import Iterable
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
# Bucket entries looked at together when finding neighbours, bounding the temporary arrays (and the vectors gathered
# for the pairs) even when many memories share buckets, as exact copies of a memory do in every table.
_LOOKUP_BUDGET = 1 << 16
# Bucket entries of recently indexed rows kept in a small sorted run, so that indexing a row does not copy the large
# run; past this many they are merged into it.
_RECENT_MAX = 1 << 16
_NO_ENTRIES = (np.zeros(0, np.int64), np.zeros(0, np.int64))


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


def _merged(
    places: np.ndarray, rows: np.ndarray, new_places: np.ndarray, new_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return a run of bucket entries sorted by place with a run of new entries, also sorted, merged in."""
    at = np.searchsorted(places, new_places)
    return np.insert(places, at, new_places), np.insert(rows, at, new_rows)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Return the indices of the ranges [start, start + count), one range after the other."""
    return np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())


class _Space:
    """The indexed memories of one embedding dimension, by row: unit vectors, LSH buckets and pointers."""

    def __init__(self, dim: int) -> None:
        self.units = np.zeros((0, dim), np.float32)
        self.places = np.zeros((0, TABLES), np.int64)  # each row's bucket in every table, as table << BITS | bucket
        self.live = np.zeros(0, bool)
        self.pointer = np.zeros(0, np.int64)  # the row each row points to, plus one; 0 for itself
        self.pointer_dot = np.zeros(0, np.float64)
        self.pointed_by: dict[int, set[int]] = {}
        self.ids: list[str | None] = []
        self.orders: list[OrderKey | None] = []
        # The rows of each bucket, as (place, row) entries in two runs sorted by place: a large one and a small one
        # of recent rows. Removed rows stay listed, and are not reused, until the runs are compacted.
        self.runs = [_NO_ENTRIES, _NO_ENTRIES]
        self.retired: list[int] = []  # removed rows still listed
        self.free: list[int] = []  # removed rows no longer listed, to reuse
        self.comparisons = 0

    def insert(self, ids: list[str], orders: list[OrderKey], units: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Index memories, each pointing to itself, and return their rows."""
        reused = [self.free.pop() for _ in range(min(len(ids), len(self.free)))]
        rows = np.array(reused + list(range(len(self.ids), len(self.ids) + len(ids) - len(reused))), np.int64)
        self.ids += [None] * (len(ids) - len(reused))
        self.orders += [None] * (len(ids) - len(reused))
        if len(self.ids) > len(self.units):
            capacity = 2 * len(self.ids)
            self.units, self.places = _grown(self.units, capacity), _grown(self.places, capacity)
            self.live, self.pointer = _grown(self.live, capacity), _grown(self.pointer, capacity)
            self.pointer_dot = _grown(self.pointer_dot, capacity)
        for row, memory_id, order in zip(rows.tolist(), ids, orders):
            self.ids[row], self.orders[row] = memory_id, order
        self.units[rows] = units
        self.places[rows] = np.arange(TABLES) << BITS | keys
        self.live[rows] = True
        entries = self.places[rows].ravel()
        by_place = np.argsort(entries)
        self.runs[1] = _merged(*self.runs[1], entries[by_place], np.repeat(rows, TABLES)[by_place])
        self._tidy()
        return rows

    def remove(self, row: int) -> list[str]:
        """Drop a row from the index; return the ids of the memories that pointed to it (now to themselves)."""
        self._point(row, -1, 0.0)
        orphans = self.pointed_by.pop(row, set())
        self.pointer[list(orphans)] = 0
        orphan_ids = [memory_id for orphan in orphans if (memory_id := self.ids[orphan]) is not None]
        self.ids[row] = self.orders[row] = None
        self.live[row] = False
        self.retired.append(row)
        self._tidy()
        return orphan_ids

    def _tidy(self) -> None:
        """Merge the recent run into the large one, dropping removed rows, once either has grown too much."""
        if len(self.runs[1][0]) <= _RECENT_MAX and 4 * len(self.retired) <= len(self.ids):
            return
        (places, rows), (recent_places, recent_rows) = self.runs
        listed, recently_listed = self.live[rows], self.live[recent_rows]
        large = _merged(places[listed], rows[listed], recent_places[recently_listed], recent_rows[recently_listed])
        self.runs = [large, _NO_ENTRIES]
        self.free += self.retired
        self.retired = []

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
        places = self.places[queries].ravel()
        by_place = np.argsort(places)  # binary searches in sorted order stay in cache: several times faster
        spans = []
        for run, _ in self.runs:
            start, end = np.empty_like(places), np.empty_like(places)
            start[by_place] = np.searchsorted(run, places[by_place], "left")
            end[by_place] = np.searchsorted(run, places[by_place], "right")
            spans.append((start.reshape(-1, TABLES), end.reshape(-1, TABLES)))
        listed = sum((end - start).sum(axis=1) for start, end in spans)
        found = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))]
        boundaries = np.flatnonzero(np.diff(np.cumsum(listed) // _LOOKUP_BUDGET)) + 1
        for chunk in np.split(np.arange(len(queries)), boundaries):
            owners = np.repeat(queries[chunk], TABLES)
            listed_rows, listed_mates = [], []
            for (start, end), (_, run_rows) in zip(spans, self.runs):
                counts = (end[chunk] - start[chunk]).ravel()
                listed_rows.append(np.repeat(owners, counts))
                listed_mates.append(run_rows[_ranges(start[chunk].ravel(), counts)])
            # A pair is listed once per bucket it shares; two queries meet twice, keep one meeting.
            pairs = np.unique(np.concatenate(listed_rows) * len(self.units) + np.concatenate(listed_mates))
            rows, mates = np.divmod(pairs, len(self.units))
            kept = self.live[mates] & (mates != rows) & (~is_query[mates] | (mates < rows))
            rows, mates = rows[kept], mates[kept]
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
            target_id = memory_id if target < 0 else self.ids[target]
            assert memory_id is not None and target_id is not None  # stale rows and their targets are live
            canonical[memory_id] = memory_id if target < 0 else canonical[target_id]


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

    def to_state(self, memory_ids: Iterable[str] | None = None) -> dict:
        """Return the merge state as plain values: of every memory, or of these."""
        adds, removed, fields = self.adds, self.removed, self.fields
        if memory_ids is not None:
            chosen = list(memory_ids)
            adds = {mid: adds[mid] for mid in chosen if mid in adds}
            removed = {mid: removed[mid] for mid in chosen if mid in removed}
            fields = {mid: fields[mid] for mid in chosen if mid in fields}
        return {
            "adds": {mid: sorted(list(tag) for tag in tags) for mid, tags in adds.items()},
            "removed": {mid: sorted(list(tag) for tag in tags) for mid, tags in removed.items()},
            "fields": {mid: {f: list(r) for f, r in held.items()} for mid, held in fields.items()},
        }

    def ids(self) -> list[str]:
        """Return the id of every memory with any merge state, sorted."""
        return sorted({*self.adds, *self.removed, *self.fields})

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
