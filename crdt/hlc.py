"""Hybrid logical clock: wall milliseconds and a counter packed into one ordered int."""

from collections.abc import Callable

from crdt.errors import ClockDriftError

COUNTER_BITS = 16
COUNTER_MASK = (1 << COUNTER_BITS) - 1
HLC_MAX = (1 << 63) - 1


def hlc_pack(wall_ms: int, counter: int = 0) -> int:
    """Pack a wall time in milliseconds and a counter into one stamp."""
    return (wall_ms << COUNTER_BITS) | counter


def hlc_wall_ms(stamp: int) -> int:
    """Return the wall-clock milliseconds part of a stamp."""
    return stamp >> COUNTER_BITS


class HybridClock:
    """Issues strictly increasing stamps that never run behind any stamp observed."""

    def __init__(self, now_ms: Callable[[], int], *, drift_ms_max: int = 60_000, last: int = 0) -> None:
        self._now_ms = now_ms
        self.drift_ms_max = drift_ms_max
        self.last = last

    def now(self) -> int:
        """Return a new stamp for a local event."""
        # Packed stamps order like (wall, counter) pairs, so "wall or last + 1" is the HLC rule;
        # a counter overflow simply carries into the wall part, which keeps the order strict.
        self.last = max(hlc_pack(self._now_ms()), self.last + 1)
        return self.last

    def horizon(self) -> int:
        """Return the newest remote stamp `observe` accepts now."""
        return hlc_pack(self._now_ms() + self.drift_ms_max + 1) - 1

    def observe(self, stamp: int) -> None:
        """Adopt a remote stamp, refusing one too far ahead of the local wall clock."""
        if stamp <= self.last:
            return
        ahead_ms = hlc_wall_ms(stamp) - self._now_ms()
        if ahead_ms > self.drift_ms_max:
            raise ClockDriftError(
                f"remote clock stamp is {ahead_ms} ms ahead of this device's clock "
                f"(at most {self.drift_ms_max} ms allowed); check the sender's system time"
            )
        self.last = stamp
