import attrs
import pytest

from crdt import ClockDriftError, HybridClock, Replica, hlc_pack, hlc_wall_ms
from crdt.hlc import COUNTER_MASK


def test_stamps_strictly_increase_even_when_the_wall_clock_stalls_or_goes_back(clock):
    hlc = HybridClock(clock)
    first = hlc.now()
    second = hlc.now()
    clock.now -= 5_000
    third = hlc.now()
    assert first < second < third
    assert hlc_wall_ms(third) == hlc_wall_ms(first)


def test_a_new_wall_time_resets_the_counter(clock):
    hlc = HybridClock(clock)
    hlc.now()
    hlc.now()
    clock.now += 1
    assert hlc.now() == hlc_pack(clock.now, 0)


def test_observing_a_later_stamp_moves_the_clock_past_it(clock):
    hlc = HybridClock(clock, drift_ms_max=1_000)
    remote = hlc_pack(clock.now + 500, 7)
    hlc.observe(remote)
    assert hlc.now() > remote


def test_a_stamp_beyond_the_drift_bound_is_refused_not_adopted(clock):
    hlc = HybridClock(clock, drift_ms_max=1_000)
    before = hlc.now()
    with pytest.raises(ClockDriftError, match="ahead"):
        hlc.observe(hlc_pack(clock.now + 1_001))
    assert hlc.last == before


def test_the_horizon_is_the_newest_stamp_observe_accepts(clock):
    hlc = HybridClock(clock, drift_ms_max=1_000)
    horizon = hlc.horizon()
    assert horizon == hlc_pack(clock.now + 1_000, COUNTER_MASK)
    hlc.observe(horizon)
    with pytest.raises(ClockDriftError):
        hlc.observe(horizon + 1)


def test_a_replica_refuses_remote_ops_beyond_the_horizon_and_applies_the_rest(clock):
    sender = Replica("a", HybridClock(clock))
    ops = [sender.set_preference("k", i) for i in range(3)]
    receiver = Replica("b", HybridClock(clock, drift_ms_max=1_000))
    result = receiver.apply(ops[:2] + [attrs.evolve(ops[2], hlc=hlc_pack(clock.now + 1_001))])
    assert [op.seq for op in result.applied] == [1, 2]
    assert [op.seq for op, why in result.refused if "ahead" in why] == [3]
    assert receiver.seq_of("a") == 2 and receiver.clock.last == ops[1].hlc


def test_counter_overflow_keeps_order(clock):
    hlc = HybridClock(clock)
    stamps = [hlc.now() for _ in range(70_000)]
    assert stamps == sorted(set(stamps))
