"""A deterministic simulated network: every fault and delay comes from one seeded RNG."""

import heapq
import random
from collections.abc import Iterable
from typing import Any

import attrs

Link = tuple[str, str]


@attrs.frozen
class Faults:
    """Per-message fault probabilities and delays, in rounds."""

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0  # chance a message gets an extra delay, so later ones overtake it
    delay_rounds_max: int = 0
    reorder_rounds_max: int = 3


@attrs.frozen
class Envelope:
    """A message in flight between two hosts."""

    src: str
    dst: str
    payload: Any
    size: int


@attrs.define
class NetworkStats:
    """What crossed (or failed to cross) the network."""

    messages: int = 0
    bytes: int = 0
    dropped: int = 0
    duplicated: int = 0


class SimNetwork:
    """Hosts exchanging messages in rounds, with partitions, holds, loss, duplication, reordering and delay."""

    def __init__(self, rng: random.Random, faults: Faults | None = None) -> None:
        self.rng = rng
        self.faults = faults or Faults()
        self.hosts: list[str] = []
        self.round = 0
        self.stats = NetworkStats()
        self._blocked: set[Link] = set()
        self._held: set[Link] = set()
        self._parked: list[Envelope] = []
        self._in_flight: list[tuple[int, int, Envelope]] = []
        self._sent_count = 0  # tie-breaker that keeps equal delivery rounds in send order

    def add_host(self, name: str) -> None:
        if name in self.hosts:
            raise ValueError(f"host {name} already exists")
        self.hosts.append(name)

    # -- fault verbs -------------------------------------------------------------------------------

    def partition(self, side_a: Iterable[str], side_b: Iterable[str]) -> None:
        """Cut every link between the two sides, both ways."""
        side_b = list(side_b)
        for a in side_a:
            for b in side_b:
                self._blocked |= {(a, b), (b, a)}

    def partition_oneway(self, src: str, dst: str) -> None:
        """Lose every message from `src` to `dst`; the other direction still works."""
        self._blocked.add((src, dst))

    def repair(self) -> None:
        """Remove every partition (held links stay held)."""
        self._blocked.clear()

    def hold(self, src: str, dst: str) -> None:
        """Keep messages from `src` to `dst` back, undelivered, until `release`."""
        self._held.add((src, dst))

    def release(self, src: str, dst: str) -> None:
        """Deliver held messages of a link in the next delivery, in their original order."""
        self._held.discard((src, dst))
        parked, self._parked = self._parked, []
        for envelope in parked:
            if (envelope.src, envelope.dst) == (src, dst):
                self._enqueue(envelope, 0)
            else:
                self._parked.append(envelope)

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults

    def is_cut(self, src: str, dst: str) -> bool:
        return (src, dst) in self._blocked

    # -- traffic -----------------------------------------------------------------------------------

    def send(self, src: str, dst: str, payload: Any, size: int) -> None:
        """Put a message on the wire; faults decide whether, when and how often it arrives."""
        self.stats.messages += 1
        self.stats.bytes += size
        faults = self.faults
        if (src, dst) in self._blocked or (faults.drop and self.rng.random() < faults.drop):
            self.stats.dropped += 1
            return
        copies = 2 if faults.duplicate and self.rng.random() < faults.duplicate else 1
        self.stats.duplicated += copies - 1
        for _ in range(copies):
            delay = self.rng.randint(0, faults.delay_rounds_max) if faults.delay_rounds_max else 0
            if faults.reorder and self.rng.random() < faults.reorder:
                delay += self.rng.randint(1, faults.reorder_rounds_max)
            self._enqueue(Envelope(src, dst, payload, size), delay)

    def _enqueue(self, envelope: Envelope, delay_rounds: int) -> None:
        self._sent_count += 1
        heapq.heappush(self._in_flight, (self.round + delay_rounds, self._sent_count, envelope))

    def deliver(self) -> list[Envelope]:
        """Return the messages due this round (cut links lose theirs, held ones wait) and advance the round."""
        due: list[Envelope] = []
        while self._in_flight and self._in_flight[0][0] <= self.round:
            envelope = heapq.heappop(self._in_flight)[2]
            link = (envelope.src, envelope.dst)
            if link in self._blocked:
                self.stats.dropped += 1
            elif link in self._held:
                self._parked.append(envelope)
            else:
                due.append(envelope)
        self.round += 1
        return due

    def in_flight(self) -> int:
        return len(self._in_flight) + len(self._parked)
