"""Version vectors: device id -> highest contiguous seq applied."""

from collections.abc import Iterator, Mapping


class VersionVector(Mapping[str, int]):
    """An immutable version vector; missing devices read as 0."""

    __slots__ = ("_seqs",)

    def __init__(self, seqs: Mapping[str, int] | None = None) -> None:
        self._seqs = {device: seq for device, seq in (seqs or {}).items() if seq > 0}

    def __getitem__(self, device: str) -> int:
        return self._seqs[device]

    def __iter__(self) -> Iterator[str]:
        return iter(self._seqs)

    def __len__(self) -> int:
        return len(self._seqs)

    def __repr__(self) -> str:
        return f"VersionVector({dict(sorted(self._seqs.items()))})"

    def __hash__(self) -> int:
        return hash(frozenset(self._seqs.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._seqs == {d: s for d, s in other.items() if s > 0}
        return NotImplemented

    def covers(self, other: Mapping[str, int]) -> bool:
        """Return whether this vector has seen everything `other` has."""
        return all(self._seqs.get(device, 0) >= seq for device, seq in other.items())

    def merge(self, other: Mapping[str, int]) -> "VersionVector":
        """Return the pointwise maximum of both vectors."""
        merged = dict(self._seqs)
        for device, seq in other.items():
            if seq > merged.get(device, 0):
                merged[device] = seq
        return VersionVector(merged)

    def total(self) -> int:
        """Return the number of ops this vector covers."""
        return sum(self._seqs.values())
