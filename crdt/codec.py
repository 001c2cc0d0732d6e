"""Versioned msgpack wire format for op batches, state snapshots and saved replicas, decoded strictly."""

import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import msgpack

from crdt.errors import CrdtError, DecodeError
from crdt.hlc import HLC_MAX, HybridClock
from crdt.messages import share_names
from crdt.ops import KINDS_BY_COLLECTION, Collection, Kind, Op
from crdt.replica import Replica, ReplicaConfig
from crdt.schema import PAYLOAD_RULES as _PAYLOAD_RULES
from crdt.schema import SEQ_MAX, is_int, is_str_map, payload_is_valid
from crdt.stream import StatePart

FORMAT_VERSION = 1
# Wire codes are positions in these tuples: append only, never reorder.
COLLECTION_CODES: tuple[Collection, ...] = (
    Collection.PREFERENCES, Collection.SETTINGS, Collection.MESSAGES, Collection.MEMORIES,
    Collection.NOTES, Collection.COUNTERS, Collection.DEVICES,
)  # fmt: skip
KIND_CODES: tuple[Kind, ...] = (
    Kind.SET, Kind.ADD, Kind.EDIT, Kind.DELETE, Kind.REMOVE, Kind.UPDATE, Kind.ENROL, Kind.REVOKE,
)  # fmt: skip
_COLLECTION_CODE = {c: i for i, c in enumerate(COLLECTION_CODES)}
_KIND_CODE = {k: i for i, k in enumerate(KIND_CODES)}
_MESSAGES_CODE, _ADD_CODE = _COLLECTION_CODE[Collection.MESSAGES], _KIND_CODE[Kind.ADD]
# (collection code, kind code) -> (collection, kind, payload check), for each pair an op may have.
_RULES_BY_CODES = {
    (_COLLECTION_CODE[collection], _KIND_CODE[kind]): (collection, kind, check)
    for (collection, kind), check in _PAYLOAD_RULES.items()
}


@attrs.frozen
class DecodeLimits:
    """Size bounds that decoding enforces before and while it reads untrusted bytes."""

    bytes_max: int = 16 << 20
    ops_max: int = 100_000
    devices_max: int = 4096
    key_chars_max: int = 512
    value_bytes_max: int = 1 << 20


DEFAULT_LIMITS = DecodeLimits()


def _unpack(data: bytes, limits: DecodeLimits) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > limits.bytes_max:
        raise DecodeError(f"{len(data)} bytes exceeds the {limits.bytes_max}-byte limit")
    container_max = max(limits.ops_max, limits.devices_max, 1024)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.value_bytes_max,
            max_bin_len=limits.value_bytes_max,
            max_array_len=container_max,
            max_map_len=container_max,
            max_ext_len=0,
        )
    except Exception as error:  # msgpack raises a zoo of types (ValueError, StackError, ExtraData, ...)
        raise DecodeError(f"not valid msgpack: {type(error).__name__}: {error}") from None


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise DecodeError(message)


# -- deflating -------------------------------------------------------------------------------------

# Level 1 is the fastest; on a benchmark catch-up's batches level 6 was 8% smaller and took 2.3x as long.
DEFLATE_LEVEL = 1


def deflate(plain: bytes) -> bytes:
    """Return `plain` deflated as a zlib stream (RFC 1950), as batches travel and are logged."""
    return zlib.compress(plain, DEFLATE_LEVEL)


def inflate(deflated: bytes, bytes_max: int) -> bytes:
    """Return a zlib stream's content, raising DecodeError if it is malformed, trailed or over `bytes_max` bytes."""
    inflater = zlib.decompressobj()
    try:
        plain = inflater.decompress(deflated, bytes_max)
    except zlib.error as error:
        raise DecodeError(f"not a valid zlib stream: {error}") from None
    if inflater.unconsumed_tail:
        raise DecodeError(f"inflates beyond the {bytes_max}-byte limit")
    if not inflater.eof or inflater.unused_data:
        raise DecodeError("the zlib stream is truncated or followed by other bytes")
    return plain


# -- op batches ------------------------------------------------------------------------------------


def encode_ops(ops: Sequence[Op]) -> bytes:
    """Encode ops as one batch; device ids are written once in a table and referred to by index."""
    devices: dict[str, int] = {}
    rows = []
    for op in ops:
        device_index = devices.setdefault(op.device, len(devices))
        prev = None if op.prev is None else [devices.setdefault(op.prev[0], len(devices)), op.prev[1]]
        rows.append(
            [device_index, op.seq, op.hlc, _COLLECTION_CODE[op.collection], op.key, _KIND_CODE[op.kind], op.payload, prev]
        )
    return msgpack.packb([FORMAT_VERSION, list(devices), rows], use_bin_type=True)


def encode_op(op: Op) -> bytes:
    """Encode one op on its own, naming devices in full: the baseline a batch is measured against."""
    prev = None if op.prev is None else list(op.prev)
    row = [op.device, op.seq, op.hlc, _COLLECTION_CODE[op.collection], op.key, _KIND_CODE[op.kind], op.payload, prev]
    return msgpack.packb(row, use_bin_type=True)


# A logged batch this small is stored as encoded: deflating a message add's (about 250 bytes) took about 25 us of its
# write and saved about 60 bytes until compaction folds it. A stored body tells which it is by its first byte: a batch
# (an array of three) encodes as 0x93, a zlib stream starts with compression method 8 in its low bits (RFC 1950).
STORED_PLAIN_BYTES_MAX = 512
_PLAIN_BATCH_START = b"\x93"


def stored_batch_body(ops: Sequence[Op]) -> bytes:
    """Return ops as one batch for this device's log: encoded, and deflated unless that is small."""
    plain = encode_ops(ops)
    return plain if len(plain) <= STORED_PLAIN_BYTES_MAX else deflate(plain)


def stored_batch_plain(body: bytes) -> bytes:
    """Return the batch encoding of a body this device's log stored (see stored_batch_body)."""
    return body if body[:1] == _PLAIN_BATCH_START else zlib.decompress(body)


def decode_ops(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> list[Op]:
    """Decode a batch, raising DecodeError for anything malformed, oversized or of another version."""
    batch = _unpack(data, limits)
    _expect(type(batch) is list and len(batch) == 3, "batch is not [version, devices, ops]")
    version, devices, rows = batch
    _expect(version == FORMAT_VERSION, f"batch format {version!r} is not the supported {FORMAT_VERSION}")
    _expect(type(devices) is list and len(devices) <= limits.devices_max, "batch device table malformed or too long")
    _expect(all(type(d) is str and 0 < len(d) <= limits.key_chars_max for d in devices), "bad device id in batch")
    _expect(type(rows) is list and len(rows) <= limits.ops_max, f"batch holds more than {limits.ops_max} ops")
    ops = [_decode_row(row, devices, limits) for row in rows]
    _share_message_names(rows)  # the rows are well-formed now
    return ops


def _share_message_names(rows: list) -> None:
    """Share the conversation and role names of the added messages among these well-formed op rows.

    At decoding, not when applied: a start decodes the whole log before applying it, and the copies freed by one batch
    make room for the next batch's.
    """
    for row in rows:
        if row[3] == _MESSAGES_CODE and row[5] == _ADD_CODE:
            share_names(row[6])


def decode_op(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Op:
    """Decode one op encoded by `encode_op`, raising DecodeError for anything malformed."""
    row = _unpack(data, limits)
    _expect(type(row) is list and len(row) == 8 and type(row[0]) is str, "op is not [device, seq, ...]")
    devices, prev = [row[0]], row[7]
    if type(prev) is list and len(prev) == 2 and type(prev[0]) is str:
        devices.append(prev[0])
        prev = [1, prev[1]]
    return _decode_row([0, *row[1:7], prev], devices, limits)


class StoredBatchReader:
    """Decodes a batch that this device's own authenticated store logged (stored_batch_body), a few ops at a time,
    skipping payload checks: a peer's catch-up needs 2000 ops of a batch that may hold 100k (0.5 s to decode whole).

    Only structure is checked: the store's encryption authenticates its pages, and every op was checked when it was
    first written or received. Anything malformed raises DecodeError. Ops to be `held` (their payloads kept in a
    replica's state) share their messages' names; ops only sent on skip that (7% of reading back a 100k-op batch).
    """

    def __init__(self, body: bytes, held: bool = True) -> None:
        self._held = held
        try:
            plain = stored_batch_plain(body)
            self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(plain), 1))
            self._unpacker.feed(plain)
            _expect(self._unpacker.read_array_header() == 3, "stored batch is not [version, devices, ops]")
            version = self._unpacker.unpack()
            _expect(version == FORMAT_VERSION, f"stored batch format {version!r} is not {FORMAT_VERSION}")
            self._devices: list[str] = self._unpacker.unpack()
            self.ops_left: int = self._unpacker.read_array_header()
        except Exception as error:  # any shape error in a stored batch means the store is damaged
            raise _malformed_stored_batch(error) from None

    def read(self, ops_max: int) -> list[Op]:
        """Return the batch's next ops, at most `ops_max` of them (none once it is read through)."""
        count = min(ops_max, self.ops_left)
        collections, kinds, devices, unpack = COLLECTION_CODES, KIND_CODES, self._devices, self._unpacker.unpack
        try:
            rows = [unpack() for _ in range(count)]
            if self._held:
                _share_message_names(rows)
            ops = [
                Op(
                    devices[device], seq, hlc, collections[collection], key, kinds[kind], payload,
                    None if prev is None else (devices[prev[0]], prev[1]),
                )  # fmt: skip
                for device, seq, hlc, collection, key, kind, payload, prev in rows
            ]
        except Exception as error:
            raise _malformed_stored_batch(error) from None
        self.ops_left -= count
        return ops

    def read_keys(self) -> list[tuple[Collection, str]]:
        """Return the (collection, key) of each op left in the batch: less than half the work of `read`."""
        collections, unpack = COLLECTION_CODES, self._unpacker.unpack
        try:
            rows = [unpack() for _ in range(self.ops_left)]
            keys = [(collections[row[3]], row[4]) for row in rows]
        except Exception as error:
            raise _malformed_stored_batch(error) from None
        self.ops_left = 0
        return keys


def _malformed_stored_batch(error: Exception) -> DecodeError:
    """Return the error for a batch this device's own store logged that does not decode."""
    return DecodeError(f"stored op batch is malformed: {type(error).__name__}: {error}")


def decode_stored_batch(body: bytes, held: bool = True) -> list[Op]:
    """Decode a whole batch that this device's own store logged (see StoredBatchReader)."""
    reader = StoredBatchReader(body, held)
    return reader.read(reader.ops_left)


def stored_batch_keys(body: bytes) -> list[tuple[Collection, str]]:
    """Return the (collection, key) each op of a batch that this device's own store logged wrote, in order."""
    return StoredBatchReader(body, held=False).read_keys()


def _decode_row(row: Any, devices: list[str], limits: DecodeLimits) -> Op:
    # The hot path of a catch-up: every check of a well-formed op in one expression, and an error message built only
    # for a malformed one.
    if type(row) is list and len(row) == 8:
        device_index, seq, hlc, collection_code, key, kind_code, payload, prev = row
        if (
            type(device_index) is int
            and 0 <= device_index < len(devices)
            and type(seq) is int
            and 1 <= seq <= SEQ_MAX
            and type(hlc) is int
            and 0 <= hlc <= HLC_MAX
            and type(collection_code) is int
            and type(kind_code) is int
            and (rule := _RULES_BY_CODES.get((collection_code, kind_code))) is not None
            and type(key) is str
            and 0 < len(key) <= limits.key_chars_max
            and rule[2](payload)
            and (prev is None or _valid_prev(prev, devices))
        ):
            prev = prev and (devices[prev[0]], prev[1])
            return Op(devices[device_index], seq, hlc, rule[0], key, rule[1], payload, prev)
    raise DecodeError(_why_malformed(row, devices, limits))


def _valid_prev(prev: Any, devices: list[str]) -> bool:
    return type(prev) is list and len(prev) == 2 and is_int(prev[0], 0, len(devices) - 1) and is_int(prev[1], 1)


def _why_malformed(row: Any, devices: list[str], limits: DecodeLimits) -> str:
    """Say what is wrong with an op row that `_decode_row` refused."""
    if type(row) is not list or len(row) != 8:
        return "op is not an 8-element array"
    device_index, seq, hlc, collection_code, key, kind_code, payload, prev = row
    if not is_int(device_index, 0, len(devices) - 1):
        return "op names a device outside the batch table"
    if not (is_int(seq, 1) and is_int(hlc, 0, HLC_MAX)):
        return "op seq or hlc out of range"
    if not is_int(collection_code, 0, len(COLLECTION_CODES) - 1):
        return f"unknown collection code {collection_code!r}"
    if not is_int(kind_code, 0, len(KIND_CODES) - 1):
        return f"unknown kind code {kind_code!r}"
    if not (type(key) is str and 0 < len(key) <= limits.key_chars_max):
        return "op key missing or too long"
    collection, kind = COLLECTION_CODES[collection_code], KIND_CODES[kind_code]
    if kind not in KINDS_BY_COLLECTION[collection]:
        return f"{kind} is not an op of {collection}"
    if not payload_is_valid(collection, kind, payload):
        return f"malformed {collection} {kind} payload"
    return "op prev is not [device, seq] of the batch"


# -- state snapshots and saved replicas --------------------------------------------------------------


def _decode_vector(value: Any, limits: DecodeLimits) -> dict[str, int]:
    _expect(is_str_map(value) and len(value) <= limits.devices_max, "vector is not a device -> seq map")
    _expect(all(is_int(seq) for seq in value.values()), "vector seq out of range")
    return value


def encode_state(replica: Replica) -> bytes:
    """Encode a replica's vector and merged state, which catch up a peer past compacted ops."""
    return msgpack.packb([FORMAT_VERSION, dict(replica.vector), replica.state()], use_bin_type=True)


def merge_state(replica: Replica, data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
    """Merge an encoded state snapshot into a replica; malformed input raises DecodeError and changes nothing."""
    decoded = _unpack(data, limits)
    _expect(type(decoded) is list and len(decoded) == 3, "snapshot is not [version, vector, state]")
    version, vector, state = decoded
    _expect(version == FORMAT_VERSION, f"snapshot format {version!r} is not the supported {FORMAT_VERSION}")
    vector = _decode_vector(vector, limits)
    # Joining into a scratch replica first proves the state well formed without touching the real one.
    scratch = Replica(replica.device_id, HybridClock(lambda: 0), replica.config)
    _join_untrusted(scratch, state)
    replica.join_state(vector, scratch.state())


def encode_state_part(part: StatePart) -> bytes:
    """Encode one part of a state stream."""
    return msgpack.packb(
        [
            FORMAT_VERSION,
            part.vector,
            part.number,
            part.upto,
            part.final,
            part.messages_done,
            part.messages_total,
            part.clock,
            part.state,
        ],
        use_bin_type=True,
    )


def decode_state_part(data: bytes, replica: Replica, limits: DecodeLimits = DEFAULT_LIMITS) -> StatePart:
    """Decode a part of a state stream for `replica`, its state proved well formed; raise DecodeError if malformed."""
    decoded = _unpack(data, limits)
    _expect(type(decoded) is list and len(decoded) == 9, "state part is not [version, vector, number, upto, ...]")
    version, vector, number, upto, final, done, total, clock, state = decoded
    _expect(version == FORMAT_VERSION, f"state part format {version!r} is not the supported {FORMAT_VERSION}")
    vector = _decode_vector(vector, limits)
    _expect(type(upto) is str and len(upto) <= limits.key_chars_max, "state part's last message id is malformed")
    _expect(is_int(number) and type(final) is bool and is_int(done) and is_int(total), "state part's place malformed")
    _expect(is_int(clock, 0, HLC_MAX), "state part's clock is malformed")
    _expect(is_str_map(state) and state.keys() <= set(_COLLECTION_NAMES), "state part names an unknown collection")
    # Joining into a scratch replica first proves the state well formed without touching the real one.
    scratch = Replica(replica.device_id, HybridClock(lambda: 0), replica.config)
    _join_untrusted(scratch, state, state.keys())
    whole = scratch.state()
    return StatePart(vector, number, upto, final, done, total, clock, {name: whole[name] for name in state})


_COLLECTION_NAMES = tuple(collection.value for collection in Collection)


def _join_untrusted(replica: Replica, state: Any, collections: Iterable[str] = _COLLECTION_NAMES) -> None:
    _expect(is_str_map(state) and state.keys() == set(collections), "snapshot state lacks collections")
    try:
        replica.join_state({}, state)
    except CrdtError as error:
        raise DecodeError(f"malformed snapshot state: {error}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as error:
        raise DecodeError(f"malformed snapshot state: {type(error).__name__}: {error}") from None


def save_replica(replica: Replica) -> bytes:
    """Encode everything a device needs to resume: state, log, clock and identity."""
    log_base = {device: replica.log.base(device) for device in replica.vector}
    log = {device: list(replica.log.tail(device, base)) for device, base in log_base.items()}
    ops = [op for device_ops in log.values() for op in device_ops]
    return msgpack.packb(
        [FORMAT_VERSION, replica.device_id, replica.clock.last, log_base, encode_ops(ops), replica.state()],
        use_bin_type=True,
    )


def load_replica(data: bytes, now_ms: Callable[[], int], config: ReplicaConfig | None = None) -> Replica:
    """Rebuild a replica saved by `save_replica`; malformed input raises DecodeError."""
    size = max(len(data), 1)
    limits = attrs.evolve(DEFAULT_LIMITS, bytes_max=size, ops_max=1 << 30, value_bytes_max=size)
    decoded = _unpack(data, limits)
    _expect(type(decoded) is list and len(decoded) == 6, "saved replica is not a 6-element array")
    version, device_id, clock_last, log_base, log_bytes, state = decoded
    _expect(version == FORMAT_VERSION, f"saved replica format {version!r} is not the supported {FORMAT_VERSION}")
    _expect(type(device_id) is str and is_int(clock_last, 0, HLC_MAX), "saved identity or clock malformed")
    log_base = _decode_vector(log_base, limits)
    _expect(type(log_bytes) is bytes, "saved log is not bytes")
    log: dict[str, list[Op]] = {}
    for op in decode_ops(log_bytes, limits):
        log.setdefault(op.device, []).append(op)
    replica = Replica(device_id, HybridClock(now_ms, last=clock_last), config)
    _join_untrusted(replica, state)
    try:
        replica.restore_log(log_base, log)
    except CrdtError as error:
        raise DecodeError(str(error)) from None
    return replica
