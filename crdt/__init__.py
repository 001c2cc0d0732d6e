"""Pure CRDT core: ops, clocks, version vectors, merge rules, replicas and their wire format.

Nothing here does I/O or reads a clock or randomness of its own; callers pass them in.
"""

from crdt.codec import (
    DEFAULT_LIMITS,
    FORMAT_VERSION,
    DecodeLimits,
    StoredBatchReader,
    decode_op,
    decode_ops,
    decode_state_part,
    decode_stored_batch,
    deflate,
    encode_op,
    encode_ops,
    encode_state,
    encode_state_part,
    inflate,
    load_replica,
    merge_state,
    save_replica,
    stored_batch_body,
    stored_batch_keys,
    stored_batch_plain,
)
from crdt.errors import (
    ClockDriftError,
    CrdtError,
    DecodeError,
    InvalidOpError,
    SnapshotRequired,
    ValueTooLargeError,
)
from crdt.hlc import HybridClock, hlc_pack, hlc_wall_ms
from crdt.journal import Conflict, ConflictJournal
from crdt.oplog import MemoryLog, OpLog, redacted_op
from crdt.ops import Collection, Kind, Op, OpId
from crdt.replica import ApplyResult, Digest, Replica, ReplicaConfig
from crdt.stream import StatePart, StateResume, StateStream, state_keys
from crdt.vector import VersionVector

__all__ = [
    "DEFAULT_LIMITS",
    "FORMAT_VERSION",
    "ApplyResult",
    "ClockDriftError",
    "Collection",
    "Conflict",
    "ConflictJournal",
    "CrdtError",
    "DecodeError",
    "DecodeLimits",
    "Digest",
    "HybridClock",
    "InvalidOpError",
    "Kind",
    "Op",
    "OpId",
    "MemoryLog",
    "OpLog",
    "Replica",
    "ReplicaConfig",
    "SnapshotRequired",
    "StatePart",
    "StateResume",
    "StateStream",
    "StoredBatchReader",
    "ValueTooLargeError",
    "VersionVector",
    "decode_op",
    "decode_ops",
    "decode_state_part",
    "decode_stored_batch",
    "deflate",
    "encode_op",
    "encode_ops",
    "encode_state",
    "encode_state_part",
    "inflate",
    "hlc_pack",
    "hlc_wall_ms",
    "load_replica",
    "merge_state",
    "redacted_op",
    "save_replica",
    "state_keys",
    "stored_batch_body",
    "stored_batch_keys",
    "stored_batch_plain",
]
