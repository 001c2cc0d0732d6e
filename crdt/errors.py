"""Errors raised by the CRDT core; every one derives from `CrdtError`."""


class CrdtError(Exception):
    """Root of every error the CRDT core raises."""


class ClockDriftError(CrdtError):
    """A remote clock stamp lies further ahead of the local clock than allowed."""


class DecodeError(CrdtError):
    """Bytes or values that are not a valid encoding of an op, batch or snapshot."""


class SnapshotRequired(CrdtError):
    """The ops a peer lacks were compacted away; only a state snapshot can catch it up."""


class InvalidOpError(CrdtError):
    """An op that is well formed on the wire but breaks a merge rule's invariants."""


class ValueTooLargeError(InvalidOpError):
    """A local write whose value exceeds the configured size bound."""
