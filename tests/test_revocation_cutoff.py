"""Revocation cannot be backdated: ops of a revoked device past the cut-off its revocation fixes have no effect,
whatever their stamps, on every device and for every seed (docs/spec/sync.md, section 2)."""

import os

import attrs
import pytest

from crdt import Collection, DecodeError, Kind, Op, decode_ops, encode_ops, load_replica, save_replica
from crdt.revocation import CUTOFF_FIELD, settle
from simulations import FAULT_NAMES, SimConfig, seed_from_env
from simulations.revocation import RevocationSimulation
from tests.conftest import make_replica
from tests.test_merge_rules import exchange

SEEDS = [seed_from_env(0)] if "SIM_SEED" in os.environ else list(range(40))


def backdated(op: Op, before: Op) -> Op:
    """The op as a device would forge it: stamped a second before `before`."""
    return attrs.evolve(op, hlc=before.hlc - (1000 << 16))


def revoke(revoker, device: str, **record):
    return revoker.revoke_device(device, {"signer": revoker.device_id, CUTOFF_FIELD: revoker.seq_of(device), **record})


@pytest.mark.parametrize("revocation_first", [True, False])
def test_backdated_writes_past_the_cutoff_have_no_effect_whichever_arrives_first(clock, revocation_first):
    admin, revoked, observer = make_replica("a", clock), make_replica("c", clock), make_replica("o", clock)
    before = revoked.set_preference("theme", "dark")
    exchange(admin, revoked)
    clock.now += 10
    revocation = revoke(admin, "c")
    assert revocation.payload[CUTOFF_FIELD] == 1
    clock.now += 10
    # c has not heard of it and writes on, stamping its ops before the revocation.
    writes = (revoked.set_preference("theme", "stolen"), revoked.increment("v", 5))
    forged = [backdated(op, revocation) for op in writes]
    assert all(op.hlc < revocation.hlc for op in forged)
    deliveries = [[before, revocation], forged] if revocation_first else [[before, *forged], [revocation]]
    for ops in deliveries:
        observer.apply(ops)
    assert observer.preferences.get("theme") == "dark" and observer.counters.value("v") == 0
    assert observer.seq_of("c") == 3  # counted, so never resent
    admin.apply(forged)
    assert admin.digest() == observer.digest()


def test_a_revocation_without_a_cutoff_still_voids_by_stamp(clock):
    admin, revoked, observer = make_replica("a", clock), make_replica("c", clock), make_replica("o", clock)
    clock.now += 10
    revocation = admin.revoke_device("c", {"signer": "a"})  # a record as older nodes write it
    clock.now += 10
    after = revoked.set_preference("theme", "stolen")
    observer.apply([revocation, after])
    assert observer.preferences.get("theme") is None and observer.seq_of("c") == 1


def test_a_revoked_device_cannot_backdate_a_revocation_of_its_revoker(clock):
    admin, revoked, observer = make_replica("a", clock), make_replica("c", clock), make_replica("o", clock)
    exchange(admin, revoked, observer)
    revocation = revoke(admin, "c")
    revoked.apply([revocation])
    # c now knows, and forges a revocation of a stamped before a's, claiming truthfully what it had of a.
    record = {"signer": "c", CUTOFF_FIELD: revoked.seq_of("a")}
    counter = backdated(Op("c", 1, 0, Collection.DEVICES, "a", Kind.REVOKE, record), revocation)
    for order in ([counter, revocation], [revocation, counter]):
        fresh = make_replica("o2", clock)
        fresh.apply(order)
        assert fresh.devices.revoked_at("a") is None and fresh.devices.revoked_at("c") is not None
    clock.now += 10
    admin.set_preference("theme", "still a's")
    observer.apply([counter, *admin.ops_since({}, 100)])
    assert observer.preferences.get("theme") == "still a's"


def test_two_devices_revoking_each_other_unseen_are_both_revoked_and_neither_writes(clock):
    a, c = make_replica("a", clock), make_replica("c", clock)
    a.set_preference("x", "a's")
    c.set_preference("y", "c's")
    exchange(a, c)
    revoke(a, "c"), revoke(c, "a")  # neither has seen the other's
    clock.now += 10
    a.set_preference("x", "a later")
    c.set_preference("y", "c later")
    digests = set()
    for first, second in ((a, c), (c, a)):
        observer = make_replica("o", clock)
        observer.apply([*first.ops_since({}, 100), *second.ops_since({}, 100)])
        assert observer.devices.revoked_at("a") is not None and observer.devices.revoked_at("c") is not None
        assert observer.preferences.get("x") == "a's" and observer.preferences.get("y") == "c's"
        digests.add(observer.digest().sha256)
    assert len(digests) == 1


def test_the_lowest_cutoff_of_several_revocations_counts_in_any_order(clock):
    a, b, c = make_replica("a", clock), make_replica("b", clock), make_replica("c", clock)
    writes = [c.set_preference("k", i) for i in range(3)]
    a.apply(writes[:1])
    b.apply(writes[:2])
    revocations = [revoke(a, "c"), revoke(b, "c")]
    for order in (revocations, revocations[::-1]):
        fresh = make_replica("o", clock)
        fresh.apply([*writes, *order])
        assert fresh.preferences.get("k") == 0
    assert settle(revocations).cutoff_seq == {"c": 1}


def test_a_malformed_cutoff_is_refused_and_the_rule_survives_a_restart(clock):
    admin, revoked = make_replica("a", clock), make_replica("c", clock)
    bad = Op("a", 1, admin.clock.now(), Collection.DEVICES, "c", Kind.REVOKE, {"signer": "a", CUTOFF_FIELD: "9"})
    with pytest.raises(DecodeError):
        decode_ops(encode_ops([bad]))
    revocation = revoke(admin, "c")
    forged = backdated(revoked.set_preference("theme", "stolen"), revocation)
    restarted = load_replica(save_replica(admin), clock)
    restarted.apply([forged])
    assert restarted.preferences.get("theme") is None and restarted.digest() == admin.digest()


# These check that every node undoes the voided ops it applied, which a log compacted before the revocation arrived
# cannot do (docs/spec/sync.md, section 2).
REVOCATION_FAULTS = frozenset(FAULT_NAMES) - {"compact"}


@pytest.mark.parametrize("seed", SEEDS)
def test_a_revoked_node_writing_backdated_ops_changes_nothing_on_any_node(seed):
    run = RevocationSimulation(SimConfig(nodes=5, ops=150, seed=seed, faults=REVOCATION_FAULTS))
    report = run.run_revocation()
    assert report.sim.converged, f"seed {seed} did not converge; replay with SIM_SEED={seed}"
    assert report.forged and all(op.hlc < report.revocation.hlc for op in report.forged)
    cutoff = report.revocation.payload[CUTOFF_FIELD]
    assert all(op.seq > cutoff for op in report.forged)
    assert list(report.sim.digests) == list(report.digests_without_forged), f"replay with SIM_SEED={seed}"


def test_the_sweep_forges_every_kind_of_write_and_makes_nodes_undo_applied_ones():
    reports = [
        RevocationSimulation(SimConfig(nodes=5, ops=150, seed=seed, faults=REVOCATION_FAULTS)).run_revocation()
        for seed in range(10)
    ]
    kinds = {(op.collection, op.kind) for report in reports for op in report.forged}
    assert (Collection.DEVICES, Kind.REVOKE) in kinds and (Collection.MESSAGES, Kind.DELETE) in kinds
    assert len(kinds) == 7
    assert sum(report.rebuilds for report in reports) > 0
