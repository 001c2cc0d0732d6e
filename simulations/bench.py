"""Benchmarks by name: every figure is reported beside a baseline measured in the same run."""

from collections.abc import Callable

import attrs

from simulations.metrics import Metric


def _bench_crdt() -> list[Metric]:
    from simulations.bench_crdt import bench_crdt

    return bench_crdt()


def _bench_stores() -> list[Metric]:
    from simulations.bench_stores import bench_stores

    return bench_stores()


def _bench_sync() -> list[Metric]:
    from simulations.bench_sync import bench_sync

    return bench_sync()


def _bench_relay() -> list[Metric]:
    from simulations.bench_relay import bench_relay

    return bench_relay()


def _bench_scale() -> list[Metric]:
    from simulations.bench_scale import bench_scale

    return bench_scale()


BENCHES: dict[str, Callable[[], list[Metric]]] = {
    "crdt": _bench_crdt,
    "stores": _bench_stores,
    "sync": _bench_sync,
    "relay": _bench_relay,
    "scale": _bench_scale,
}


def run_bench(name: str) -> dict:
    """Run a named benchmark and return its JSON report."""
    if name not in BENCHES:
        raise KeyError(f"unknown benchmark {name!r}; choose from {', '.join(sorted(BENCHES))}")
    return {"bench": name, "metrics": [attrs.asdict(m) for m in BENCHES[name]()]}
