import pytest

from crdt import ClockDriftError, HybridClock, hlc_pack, hlc_wall_ms


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


def test_counter_overflow_keeps_order(clock):
    hlc = HybridClock(clock)
    stamps = [hlc.now() for _ in range(70_000)]
    assert stamps == sorted(set(stamps))
