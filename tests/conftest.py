"""Shared fixtures: replicas on a controllable clock."""

import pytest

from crdt import HybridClock, Replica

EPOCH_MS = 1_700_000_000_000


class ManualClock:
    """A wall clock the test moves by hand."""

    def __init__(self, now_ms: int = EPOCH_MS) -> None:
        self.now = now_ms

    def __call__(self) -> int:
        return self.now


def make_replica(device_id: str, clock: ManualClock | None = None) -> Replica:
    """Return an empty replica whose clock reads `clock` (a fixed time by default)."""
    return Replica(device_id, HybridClock(clock or ManualClock()))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory):
    """A 3-server JetStream cluster on loopback shared by the tests that do not stop its servers."""
    from simulations.nats_cluster import NatsCluster

    cluster = NatsCluster(tmp_path_factory.mktemp("nats")).start()
    yield cluster
    cluster.stop()
