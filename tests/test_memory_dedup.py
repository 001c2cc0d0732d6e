"""Near-duplicate memories: the incremental index matches the rule written plainly, in any order and at scale."""

import math
import time
from collections.abc import Callable

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdt import Op, Replica
from crdt.memories import UNIT_SCALE, MemorySet, bucket_keys, unit_vector, unit_vectors
from tests.conftest import ManualClock, make_replica

Draw = Callable
DEVICES = ("dev-a", "dev-b", "dev-c")
DIMS = (8, 16)
STEP_RADIANS = 0.25  # neighbours on a path have cosine 0.969, two steps apart 0.878: chains form


def _path(dim: int, seed: int, points: int) -> list[np.ndarray]:
    """Return unit vectors along a great circle, STEP_RADIANS apart."""
    basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, 2)))
    return [math.cos(i * STEP_RADIANS) * basis[:, 0] + math.sin(i * STEP_RADIANS) * basis[:, 1] for i in range(points)]


BASES = {dim: _path(dim, seed=dim, points=5) + _path(dim, seed=dim + 1, points=2) for dim in DIMS}


def embedding(vector: np.ndarray | list[float]) -> bytes:
    """Return a vector as float32 embedding bytes."""
    return np.asarray(vector, dtype="<f4").tobytes()


def reference_canonical(memories: MemorySet) -> dict[str, str]:
    """Return the canonical ids by the module's rule, plainly: every pair of live memories, exact integer cosines."""
    order = {}
    for memory_id, tags in memories.adds.items():
        live = [tag for tag in tags if (tag[1], tag[2]) not in memories.removed.get(memory_id, set())]
        if live:
            order[memory_id] = (min(live), memory_id)
    units, buckets = {}, {}
    for memory_id in order:
        register = memories.fields.get(memory_id, {}).get("embedding")
        unit = unit_vector(register.value if register else None)
        if unit is not None:
            units[memory_id] = unit.astype(np.int64)
            buckets[memory_id] = set(enumerate(bucket_keys(unit[None, :])[0].tolist()))
    dot_min = memories.dedup_cosine_min * UNIT_SCALE**2
    pointer = {}
    for m in order:
        pointer[m] = m
        if m not in units:
            continue
        best_key = None
        for e in units:
            if len(units[e]) != len(units[m]) or order[e] >= order[m] or not buckets[e] & buckets[m]:
                continue
            dot = int(units[m] @ units[e])
            if dot >= dot_min and (best_key is None or (-dot, order[e]) < best_key):
                best_key, pointer[m] = (-dot, order[e]), e
    canonical = {}
    for m in order:
        root = m
        while pointer[root] != root:
            root = pointer[root]
        canonical[m] = root
    return canonical


# -- histories ---------------------------------------------------------------------------------------------------


def draw_embedding(draw: Draw) -> bytes | None:
    """Draw a base vector plus a little noise, at a random scale, or now and then no direction at all."""
    kind = draw(st.sampled_from(["base"] * 6 + ["none", "empty", "zero"]))
    dim = draw(st.sampled_from(DIMS))
    if kind == "none":
        return None
    if kind == "empty":
        return b""
    if kind == "zero":
        return embedding(np.zeros(dim))
    base = BASES[dim][draw(st.integers(0, len(BASES[dim]) - 1))]
    noise = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(dim) / math.sqrt(dim)
    level = draw(st.sampled_from([0.0, 0.0, 0.02, 0.1, 0.2]))
    return embedding((base + level * noise) * draw(st.sampled_from([1.0, 0.01, 7.5])))


def write_memory(replica: Replica, draw: Draw) -> None:
    action = draw(st.sampled_from(["add", "add", "add", "readd", "edit", "remove"]))
    known = sorted(replica.memories.adds)
    live = sorted(replica.memories.live_ids())
    if action == "add" or not known:
        replica.add_memory(f"{replica.device_id}-{replica.seq_of(replica.device_id)}", "m", draw_embedding(draw), {})
    elif action == "readd":  # possibly of a removed memory: it comes back with a later order key
        replica.add_memory(draw(st.sampled_from(known)), "again", draw_embedding(draw), {})
    elif action == "edit" and live:
        replica.edit_memory(draw(st.sampled_from(live)), "embedding", draw_embedding(draw))
    elif live:
        replica.remove_memory(draw(st.sampled_from(live)))


def run_history(draw: Draw) -> tuple[list[Replica], list[Op]]:
    """Let three devices write memories, partly sync, let time pass and look at their mapping, as drawn."""
    clock = ManualClock()
    replicas = [make_replica(device, clock) for device in DEVICES]
    for _ in range(draw(st.integers(1, 40))):
        step = draw(st.sampled_from(["write", "write", "write", "sync", "tick", "look"]))
        replica = replicas[draw(st.integers(0, 2))]
        if step == "write":
            write_memory(replica, draw)
        elif step == "sync":
            sender = replicas[draw(st.integers(0, 2))]
            replica.apply(sender.ops_since(replica.vector, draw(st.integers(1, 20))))
        elif step == "tick":
            clock.now += draw(st.integers(0, 2))
        else:  # resolves the index now, so that later changes update it incrementally
            replica.memories.canonical_ids()
    by_id = {op.id: op for replica in replicas for op in replica.ops_since({}, 10_000)}
    return replicas, [by_id[key] for key in sorted(by_id)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_mapping_is_the_plain_rule_whatever_the_order_and_resolve_points(data):
    replicas, ops = run_history(data.draw)
    mappings = []
    for _ in range(2):
        observer = make_replica("observer")
        for op in data.draw(st.permutations(ops)):
            observer.apply([op])
            if data.draw(st.booleans()):
                observer.memories.canonical_ids()
        assert observer.held_count == 0
        assert observer.memories.canonical_ids() == reference_canonical(observer.memories)
        mappings.append(observer.memories.canonical_ids())
    for replica in replicas:  # the writers, whose index has followed every change
        replica.apply(ops)
        mappings.append(replica.memories.canonical_ids())
    assert all(mapping == mappings[0] for mapping in mappings)
    assert sorted(mappings[0]) == sorted(observer.memories.live_ids()) and len(observer.memories) == len(mappings[0])


# -- examples ----------------------------------------------------------------------------------------------------


def test_a_chain_of_near_duplicates_collapses_to_its_first_memory_and_splits_when_its_middle_goes(clock):
    first, middle, last = (embedding(vector) for vector in BASES[8][:3])
    replica = make_replica("dev-a", clock)
    for memory_id, vector in (("k-1", first), ("k-2", middle), ("k-3", last)):
        replica.add_memory(memory_id, "m", vector, {})
        clock.now += 1
    assert replica.memories.canonical_ids() == {"k-1": "k-1", "k-2": "k-1", "k-3": "k-1"}
    replica.remove_memory("k-2")
    assert replica.memories.canonical_ids() == {"k-1": "k-1", "k-3": "k-3"}
    replica.add_memory("k-2", "back", middle, {})  # now after k-3: it points to the closer-or-earlier of both
    assert replica.memories.canonical_ids() == reference_canonical(replica.memories)
    assert replica.memories.canonical_ids()["k-3"] == "k-3"


def test_equally_close_earlier_memories_resolve_to_the_earliest_in_order_not_by_id(clock):
    replica = make_replica("dev-a", clock)
    # Mirror images quantize to mirror images, so "middle" is exactly as close to both (cosine 0.958), while they
    # are not near-duplicates of each other (cosine 0.835).
    replica.add_memory("k-z", "m", embedding([1, 0.3, 0, 0, 0, 0, 0, 0]), {})
    clock.now += 1
    replica.add_memory("k-a", "m", embedding([1, -0.3, 0, 0, 0, 0, 0, 0]), {})
    clock.now += 1
    replica.add_memory("middle", "m", embedding([1, 0, 0, 0, 0, 0, 0, 0]), {})
    assert replica.memories.canonical_ids() == {"k-z": "k-z", "k-a": "k-a", "middle": "k-z"}


def test_an_earlier_memory_arriving_late_takes_over_only_what_it_is_closest_to(clock):
    def at(radians: float) -> bytes:
        return embedding([math.cos(radians), math.sin(radians), 0, 0, 0, 0, 0, 0])

    early, late = make_replica("dev-a", clock), make_replica("dev-b", clock)
    early.add_memory("x", "m", at(0.0), {})
    clock.now += 1
    late.add_memory("p", "m", at(0.45), {})  # too far from x (cosine 0.90)
    late.add_memory("e", "m", at(0.30), {})  # close to x (0.955), closer to p (0.989)
    observer = make_replica("dev-o", clock)
    observer.apply(late.ops_since({}, 10))
    assert observer.memories.canonical_ids() == {"p": "p", "e": "p"}
    observer.apply(early.ops_since({}, 10))  # x comes first in order, but e stays with the closer p
    assert observer.memories.canonical_ids() == {"x": "x", "p": "p", "e": "p"}


def test_near_duplicates_that_share_no_bucket_stay_apart(clock):
    rng = np.random.default_rng(11)
    first = rng.standard_normal((5000, 16))
    second = first + 0.3 * rng.standard_normal((5000, 16))
    (units_a, _), (units_b, _) = unit_vectors(first.astype("<f4")), unit_vectors(second.astype("<f4"))
    close = np.sum(units_a * units_b, axis=1) >= 0.95 * UNIT_SCALE**2
    missed = close & ~np.any(bucket_keys(units_a) == bucket_keys(units_b), axis=1)
    index = int(np.flatnonzero(missed)[0])  # the rule is about buckets: LSH misses are part of it
    replica = make_replica("dev-a", clock)
    replica.add_memory("k-1", "m", embedding(first[index]), {})
    replica.add_memory("k-2", "m", embedding(second[index]), {})
    assert replica.memories.canonical_ids() == {"k-1": "k-1", "k-2": "k-2"}


def test_other_dimensions_and_memories_without_a_direction_stay_their_own_canonical(clock):
    replica = make_replica("dev-a", clock)
    vector = BASES[8][0]
    replica.add_memory("eight", "m", embedding(vector), {})
    replica.add_memory("sixteen", "m", embedding(np.r_[vector, np.zeros(8)]), {})  # cosine 1 if dims were ignored
    replica.add_memory("none", "m", None, {})
    replica.add_memory("empty", "m", b"", {})
    replica.add_memory("zero", "m", embedding(np.zeros(8)), {})
    replica.add_memory("nan", "m", embedding(np.full(8, np.nan)), {})
    replica.add_memory("inf", "m", embedding(np.r_[np.inf, np.zeros(7)]), {})
    replica.add_memory("copy", "m", embedding(vector * 3), {})
    expected = {memory_id: memory_id for memory_id in replica.memories.live_ids()} | {"copy": "eight"}
    assert replica.memories.canonical_ids() == expected


def test_an_embedding_edit_moves_a_memory_and_its_followers(clock):
    replica = make_replica("dev-a", clock)
    for memory_id, vector in (("k-1", BASES[8][0]), ("k-2", BASES[8][1]), ("k-3", BASES[8][1])):
        replica.add_memory(memory_id, "m", embedding(vector), {})
        clock.now += 1
    assert replica.memories.canonical_ids() == {"k-1": "k-1", "k-2": "k-1", "k-3": "k-1"}
    replica.edit_memory("k-1", "embedding", embedding(BASES[8][5]))  # far from the others now
    assert replica.memories.canonical_ids() == {"k-1": "k-1", "k-2": "k-2", "k-3": "k-2"}


# -- LSH and scale -----------------------------------------------------------------------------------------------


def test_lsh_buckets_catch_at_least_995_in_1000_pairs_at_the_cosine_threshold():
    rng = np.random.default_rng(2024)
    pairs, cosine = 10_000, 0.95
    first = rng.standard_normal((pairs, 384))
    first /= np.linalg.norm(first, axis=1, keepdims=True)
    across = rng.standard_normal((pairs, 384))
    across -= np.sum(across * first, axis=1, keepdims=True) * first
    across /= np.linalg.norm(across, axis=1, keepdims=True)
    second = cosine * first + math.sqrt(1 - cosine**2) * across
    (units_a, _), (units_b, _) = unit_vectors(first.astype("<f4")), unit_vectors(second.astype("<f4"))
    caught = float(np.mean(np.any(bucket_keys(units_a) == bucket_keys(units_b), axis=1)))
    print(f"\nLSH: {caught:.2%} of {pairs} pairs at cosine {cosine} share a bucket")
    assert caught >= 0.995


def test_work_per_memory_stays_small_at_20k_random_memories(clock):
    count, dim = 20_000, 384
    vectors = np.random.default_rng(5).standard_normal((count + 1, dim)).astype("<f4")
    units, _ = unit_vectors(vectors[:count])
    bucket_sizes = [np.unique(table, return_counts=True)[1].astype(np.int64) for table in bucket_keys(units).T]
    # Counting a candidate once per table it shares: an upper bound on the distinct candidates.
    candidates_per_memory = sum(int(np.sum(sizes * (sizes - 1))) for sizes in bucket_sizes) / count
    assert candidates_per_memory < 200
    replica = make_replica("dev-a", clock)
    started = time.perf_counter()
    for index in range(count):
        replica.add_memory(f"k-{index}", "m", vectors[index].tobytes(), {})
    replica.memories.canonical_ids()
    bulk_s = time.perf_counter() - started
    bulk_comparisons = replica.memories.comparisons
    assert bulk_comparisons / count < 200
    replica.add_memory("one-more", "m", vectors[count].tobytes(), {})
    replica.remove_memory("k-7")
    replica.edit_memory("k-8", "embedding", vectors[9].tobytes())
    replica.add_memory("k-7", "back", vectors[7].tobytes(), {})
    canonical = replica.memories.canonical_ids()
    assert canonical["k-8"] == "k-8" and canonical["k-9"] == "k-8"  # k-8 is now k-9's near-duplicate, and earlier
    assert replica.memories.comparisons - bulk_comparisons < 4 * 200
    per_memory = f"{candidates_per_memory:.1f} candidates, {bulk_comparisons / count:.1f} cosines computed per memory"
    print(f"\n{count} random memories: {per_memory}; {bulk_s:.1f} s to add them all and resolve")
