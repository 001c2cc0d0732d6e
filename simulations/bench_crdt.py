"""`bench crdt`: merge throughput, wire bytes per op, the 12 x 10k simulation and a 1000-seed sweep."""

import random
import statistics
import time

from crdt import HybridClock, Replica, decode_ops, encode_op, encode_ops
from simulations.metrics import Metric, metric
from simulations.workload import Workload
from simulations.world import FAULT_NAMES, SimConfig, simulate

_EPOCH_MS = 1_700_000_000_000


def _fixed_clock() -> HybridClock:
    return HybridClock(lambda: _EPOCH_MS)


def bench_apply_lww(ops_count: int = 100_000) -> Metric:
    """Apply throughput of decoded LWW deltas against a plain dict update of the same values."""
    source = Replica("bench-source", _fixed_clock())
    for i in range(ops_count):
        source.set_preference(f"key-{i % 5000}", i)
    ops = decode_ops(encode_ops(source.ops_since({}, ops_count)))
    target = Replica("bench-target", _fixed_clock())
    started = time.perf_counter()
    target.apply(ops)
    apply_s = time.perf_counter() - started
    plain: dict[str, object] = {}
    started = time.perf_counter()
    for op in ops:
        plain[op.key] = op.payload
    dict_s = time.perf_counter() - started
    rate = ops_count / apply_s
    return metric("apply_lww_ops_per_s", rate, "ops/s", ops_count / dict_s, ">= 100000 ops/s", rate >= 100_000)


def bench_wire_bytes(ops_count: int = 2000, batch_ops: int = 100) -> Metric:
    """Bytes per op in batches of `batch_ops` against the op encoded on its own, over a mixed workload."""
    replica = Replica("bench-device-5a8f0c2e91d34b7f", _fixed_clock())
    workload = Workload(random.Random(1))
    ops = [workload.write(replica) for _ in range(ops_count)]
    batch_bytes = sum(len(encode_ops(ops[i : i + batch_ops])) for i in range(0, ops_count, batch_ops))
    single = statistics.fmean(len(encode_op(op)) for op in ops)
    per_op = batch_bytes / ops_count
    return metric("wire_bytes_per_op", per_op, "bytes", single, "<= 1.3x baseline", per_op <= 1.3 * single)


def bench_simulation(nodes: int = 12, ops: int = 10_000, seed: int = 7) -> list[Metric]:
    """A faulty multi-node run against the same run without faults."""
    faults = frozenset({"partition", "drop", "dup", "reorder"})
    faulty = simulate(SimConfig(nodes=nodes, ops=ops, seed=seed, faults=faults))
    clean = simulate(SimConfig(nodes=nodes, ops=ops, seed=seed))
    rounds = faulty.rounds_after_heal if faulty.converged and faulty.rounds_after_heal is not None else float("inf")
    label = f"sim_{nodes}x{ops}"
    return [
        metric(f"{label}_rounds_after_heal", rounds, "rounds", clean.rounds_after_heal or 0, "<= 2 rounds", rounds <= 2),
        metric(f"{label}_wall_s", faulty.wall_s, "s", clean.wall_s, "converges", faulty.converged),
        metric(
            f"{label}_wire_bytes_per_op",
            faulty.wire_bytes_per_op,
            "bytes",
            clean.wire_bytes_per_op,
            "reported",
            True,
        ),
    ]


def bench_seed_sweep(seeds: int = 1000, nodes: int = 4, ops: int = 120) -> Metric:
    """The share of seeds, each with every fault, that converge after heal."""
    failed = []
    for seed in range(seeds):
        report = simulate(SimConfig(nodes=nodes, ops=ops, seed=seed, faults=frozenset(FAULT_NAMES)))
        if not report.converged:
            failed.append(seed)
    converged = seeds - len(failed)
    target = "100% converge" + (f" (failed seeds: {failed[:20]})" if failed else "")
    return metric("seed_sweep_converged", converged, "seeds", seeds, target, not failed)


def bench_crdt() -> list[Metric]:
    return [bench_apply_lww(), bench_wire_bytes(), *bench_simulation(), bench_seed_sweep()]
