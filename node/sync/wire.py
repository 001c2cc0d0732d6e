"""Wire types of the sync protocol (`/aico/sync/1`): length-prefixed msgpack frames."""

from enum import IntEnum
from typing import Any

import attrs
import msgpack

import framing
from crdt import FORMAT_VERSION, DecodeError, StateResume
from node.errors import EndReason

PROTOCOL_VERSION = 2  # 2: DELTAS and STATE bodies are deflated before sealing
SCHEMA_VERSION = FORMAT_VERSION


class FrameType(IntEnum):
    """The first field of every frame; codes are append only."""

    HELLO = 0
    DELTAS = 1
    ACK = 2
    STATE = 3
    ERROR = 4


@attrs.frozen
class Hello:
    """Opens a session: who speaks, which versions, which group epoch, and what it has."""

    protocol: int
    schema: int
    device_id: str
    epoch: int
    vector: dict[str, int]
    greeted: bool = False  # whether the sender has the receiver's HELLO; if not, the receiver sends it again
    resume: StateResume | None = None  # a state stream the sender did not finish, to go on with


@attrs.frozen
class Deltas:
    """A numbered, sealed batch of ops the receiver lacks."""

    batch_no: int
    sealed: bytes


@attrs.frozen
class StateSnapshot:
    """A numbered, sealed state snapshot, sent when the ops a peer lacks were compacted."""

    batch_no: int
    sealed: bytes


@attrs.frozen
class Ack:
    """What the sender has applied after batch `batch_no` (None: rewind to this, unconditionally)."""

    batch_no: int | None
    vector: dict[str, int]


@attrs.frozen
class Error:
    """Ends a session with a reason."""

    reason: EndReason
    detail: str


Frame = Hello | Deltas | StateSnapshot | Ack | Error


def to_wire(frame: Frame) -> bytes:
    """Encode a frame with its length prefix."""
    match frame:
        case Hello():
            body = [
                FrameType.HELLO,
                frame.protocol,
                frame.schema,
                frame.device_id,
                frame.epoch,
                frame.vector,
                frame.greeted,
            ]
            if frame.resume is not None:
                body.append([frame.resume.vector, frame.resume.after_id])
        case Deltas():
            body = [FrameType.DELTAS, frame.batch_no, frame.sealed]
        case StateSnapshot():
            body = [FrameType.STATE, frame.batch_no, frame.sealed]
        case Ack():
            body = [FrameType.ACK, frame.batch_no, frame.vector]
        case Error():
            body = [FrameType.ERROR, frame.reason.value, frame.detail]
    return framing.length_prefixed(msgpack.packb(body, use_bin_type=True))


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 63


def _vector(value: Any) -> dict[str, int]:
    if not (isinstance(value, dict) and all(type(d) is str and _is_count(s) for d, s in value.items())):
        raise DecodeError("vector is not a device -> seq map")
    return value


def _resume(value: Any) -> StateResume:
    match value:
        case [vector, str() as after_id] if len(after_id) <= 1 << 10:
            return StateResume(_vector(vector), after_id)
    raise DecodeError("HELLO's resume is not [vector, message id]")


def from_wire(body: bytes, bytes_max: int) -> Frame:
    """Decode one frame body (without its prefix), raising DecodeError for anything malformed."""
    try:
        fields = msgpack.unpackb(
            body, raw=False, strict_map_key=True, max_bin_len=bytes_max, max_str_len=1 << 16, max_ext_len=0
        )
    except Exception as error:  # msgpack raises many exception types for bad input
        raise DecodeError(f"frame is not valid msgpack: {type(error).__name__}") from None
    if type(fields) is not list or not fields or type(fields[0]) is not int:
        raise DecodeError("frame is not [type, ...]")
    kind, rest = fields[0], fields[1:]
    match kind, rest:
        case (
            FrameType.HELLO,
            [int() as protocol, int() as schema, str() as device_id, int() as epoch, vector, bool() as greeted, *more],
        ) if len(more) <= 1:
            if device_id:
                resume = _resume(more[0]) if more else None
                return Hello(protocol, schema, device_id, epoch, _vector(vector), greeted, resume)
        case (FrameType.DELTAS, [int() as batch_no, bytes() as sealed]):
            return Deltas(batch_no, sealed)
        case (FrameType.STATE, [int() as batch_no, bytes() as sealed]):
            return StateSnapshot(batch_no, sealed)
        case (FrameType.ACK, [batch_no, vector]) if batch_no is None or _is_count(batch_no):
            return Ack(batch_no, _vector(vector))
        case (FrameType.ERROR, [str() as reason, str() as detail]):
            try:
                return Error(EndReason(reason), detail)
            except ValueError:
                return Error(EndReason.CLOSED, f"{reason}: {detail}")
    raise DecodeError(f"frame of type {kind} has a malformed body")
