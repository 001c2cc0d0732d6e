"""The sync session (`/aico/sync/1`) as a sans-I/O state machine: bytes in, events and bytes out.

It knows no sockets and no clock. Feed received bytes to `receive_data`, send whatever `generate`
returns until it returns None, and call `refresh` from a timer to re-check what the peer lacks.
"""

import operator
from enum import Enum
from typing import Protocol

import attrs

from crdt import (
    DEFAULT_LIMITS,
    DecodeError,
    DecodeLimits,
    Op,
    Replica,
    SnapshotRequired,
    StatePart,
    StateResume,
    StateStream,
    decode_ops,
    decode_state_part,
    deflate,
    encode_ops,
    encode_state_part,
    inflate,
)
from framing import FrameBuffer, LocalProtocolError, RemoteProtocolError
from node.errors import EndReason, UnsealError
from node.sync.wire import (
    PROTOCOL_VERSION,
    SCHEMA_VERSION,
    Ack,
    Deltas,
    Error,
    Frame,
    Hello,
    StateSnapshot,
    from_wire,
    to_wire,
)


class BatchSealer(Protocol):
    """Seals outgoing batches and opens incoming ones (raising UnsealError); encryption lives here."""

    def seal(self, plain: bytes) -> bytes: ...

    def open(self, sealed: bytes) -> bytes: ...


class Plaintext:
    """A sealer that leaves batches as they are, for simulations and tests of the protocol alone."""

    def seal(self, plain: bytes) -> bytes:
        return plain

    def open(self, sealed: bytes) -> bytes:
        return sealed


@attrs.frozen
class SessionConfig:
    """Versions and bounds one side of a session uses."""

    epoch: int = 0
    protocol: int = PROTOCOL_VERSION
    schema: int = SCHEMA_VERSION
    frame_bytes_max: int = 16 << 20
    batch_ops_max: int = 2000
    batch_bytes_max: int = 1 << 20
    part_messages_max: int = 2000  # messages in one part of a state stream
    decode_limits: DecodeLimits = DEFAULT_LIMITS


class SessionState(Enum):
    """Where a session is: waiting for the peer's HELLO, syncing, or over."""

    GREETING = "greeting"
    SYNCING = "syncing"
    CLOSED = "closed"


@attrs.frozen
class PeerHello:
    """The peer introduced itself; the node checks the device id against the transport's."""

    device_id: str
    epoch: int
    vector: dict[str, int]


@attrs.frozen
class OpsApplied:
    """Ops from the peer were applied (some may be held for a gap or refused)."""

    ops: tuple[Op, ...]
    held: int
    refused: tuple[tuple[Op, str], ...]
    deflated: bytes | None = None  # the batch as received (deflated), when `ops` are all of its ops: to log as it is


@attrs.frozen
class StateMerged:
    """A part of a state snapshot from the peer was merged (on the final part, the replica took the stream's vector)."""

    vector: dict[str, int]
    part: StatePart
    resume: StateResume | None  # where the stream stands for a resume after this part: None once it ended or broke


@attrs.frozen
class PeerAcked:
    """The peer reported what it has applied."""

    vector: dict[str, int]


@attrs.frozen
class PeerClosed:
    """The peer ended the session."""

    reason: EndReason
    detail: str


Event = PeerHello | OpsApplied | StateMerged | PeerAcked | PeerClosed
_REWIND = -1  # marks an ACK owed by `refresh`, which the peer treats as authoritative


def _raise_max(vector: dict[str, int], device: str, seq: int) -> None:
    if seq > vector.get(device, 0):
        vector[device] = seq


class SyncSession:
    """One side of a sync session with one peer over a reliable, ordered byte stream."""

    def __init__(
        self,
        replica: Replica,
        config: SessionConfig | None = None,
        sealer: BatchSealer | None = None,
        resume: StateResume | None = None,
    ):
        self.replica = replica
        self.config = config or SessionConfig()
        self.sealer = sealer or Plaintext()
        self.resume = resume  # a state stream this side did not finish receiving, named in HELLO
        self.state = SessionState.GREETING
        self.peer_device: str | None = None
        self.peer_vector: dict[str, int] = {}  # what the peer last said it has applied
        self._inbound = FrameBuffer(self.config.frame_bytes_max, EndReason.FRAME_TOO_LARGE)
        self._outbound: list[Frame] = [self._hello()]
        self._sent: dict[str, int] = {}  # what the peer has, or will have once our batches land
        self._peer_has: dict[str, int] = {}  # seqs the peer proved it has by sending them
        self._batches_sent = 0
        self._last_batch_received: int | None = None
        self._ack_owed: int | None = None
        self._stream: StateStream | None = None  # the state being sent, while the peer lacks compacted ops
        self._stream_received: tuple[dict[str, int], int] | None = None  # (vector, parts) of one received in order
        self._stream_moved = False  # a part of it arrived since the last refresh
        self._peer_resume: StateResume | None = None
        self._early: list[tuple[Frame, int]] = []
        self._early_bytes = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def closed(self) -> bool:
        """Whether the session is over."""
        return self.state is SessionState.CLOSED

    # -- input -------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Take bytes from the peer and return the events they complete."""
        if self.state is SessionState.CLOSED:
            raise LocalProtocolError("receive_data on a closed session")
        self.bytes_received += len(data)
        self._inbound.feed(data)
        events: list[Event] = []
        try:
            while (body := self._inbound.next_body()) is not None:
                events.extend(self._handle(self._decode(body), len(body)))
                if self.closed:
                    break
        except RemoteProtocolError as error:
            self._fail(EndReason(error.reason), error.detail)
            raise
        return events

    def _decode(self, body: bytes) -> Frame:
        try:
            return from_wire(body, self.config.frame_bytes_max)
        except DecodeError as error:
            raise RemoteProtocolError(EndReason.MALFORMED_FRAME, str(error)) from None

    def _handle(self, frame: Frame, size: int) -> list[Event]:
        if isinstance(frame, Error):
            self.state = SessionState.CLOSED
            self._outbound.clear()
            return [PeerClosed(frame.reason, frame.detail)]
        if isinstance(frame, Hello):
            return self._on_hello(frame)
        if self.state is SessionState.GREETING:
            # Over a stream HELLO comes first; over a datagram path (mailbox, simulation) it may not.
            # Such frames wait, within a bound, for the HELLO that says whether they can be read.
            self._early_bytes += size
            if self._early_bytes > self.config.frame_bytes_max:
                raise RemoteProtocolError(EndReason.UNEXPECTED_FRAME, "too much data before HELLO")
            self._early.append((frame, size))
            return []
        match frame:
            case Deltas():
                return [self._on_deltas(frame)]
            case StateSnapshot():
                return [self._on_state(frame)]
            case Ack():
                return [self._on_ack(frame)]
        raise RemoteProtocolError(EndReason.UNEXPECTED_FRAME, f"{type(frame).__name__} after HELLO")

    def _on_hello(self, hello: Hello) -> list[Event]:
        if hello.protocol != self.config.protocol:
            raise RemoteProtocolError(
                EndReason.PROTOCOL_MISMATCH,
                f"peer speaks sync protocol {hello.protocol}, this node speaks {self.config.protocol}",
            )
        if hello.schema != self.config.schema:
            raise RemoteProtocolError(
                EndReason.SCHEMA_MISMATCH,
                f"peer's data schema is version {hello.schema}, this node reads version {self.config.schema}; "
                "update the older device",
            )
        if hello.epoch != self.config.epoch:
            raise RemoteProtocolError(
                EndReason.EPOCH_MISMATCH, f"peer is at group epoch {hello.epoch}, this node at {self.config.epoch}"
            )
        if hello.device_id == self.replica.device_id:
            raise RemoteProtocolError(EndReason.SELF_CONNECTION, "peer has this node's own device id")
        if self.peer_device not in (None, hello.device_id):
            raise RemoteProtocolError(EndReason.UNEXPECTED_FRAME, "HELLO from a second device in one session")
        repeated = self.peer_device is not None
        self.state = SessionState.SYNCING
        self.peer_device = hello.device_id
        self.peer_vector = dict(hello.vector)
        self._peer_resume = hello.resume
        if repeated and hello.greeted:
            # A duplicated HELLO may be older than batches already in flight: no rewind.
            for device, seq in hello.vector.items():
                _raise_max(self._sent, device, seq)
        else:
            # A first HELLO, or a repeated one from a peer that never got ours and so has read
            # nothing we sent: its vector is exactly what it has.
            self._sent = dict(hello.vector)
            for device, seq in self._peer_has.items():
                _raise_max(self._sent, device, seq)
            if repeated and not any(isinstance(frame, Hello) for frame in self._outbound):
                self._outbound.append(self._hello())
        early, self._early = self._early, []
        events: list[Event] = [PeerHello(hello.device_id, hello.epoch, dict(hello.vector))]
        self._early_bytes = 0
        for frame, size in early:
            events.extend(self._handle(frame, size))
        return events

    def _open(self, sealed: bytes) -> bytes:
        try:
            return self.sealer.open(sealed)
        except UnsealError as error:
            raise RemoteProtocolError(EndReason.UNSEAL_FAILED, str(error)) from None

    def _seal(self, plain: bytes) -> bytes:
        return self.sealer.seal(deflate(plain))

    def _on_deltas(self, deltas: Deltas) -> OpsApplied:
        deflated = self._open(deltas.sealed)
        try:
            ops = decode_ops(inflate(deflated, self.config.decode_limits.bytes_max), self.config.decode_limits)
        except DecodeError as error:
            raise RemoteProtocolError(EndReason.MALFORMED_FRAME, f"batch {deltas.batch_no}: {error}") from None
        newest: dict[str, int] = {}
        for op in ops:
            if op.seq > newest.get(op.device, 0):
                newest[op.device] = op.seq
        for device, seq in newest.items():
            _raise_max(self._peer_has, device, seq)
            _raise_max(self._sent, device, seq)
        result = self.replica.apply(ops)
        self._owe_ack(deltas.batch_no)
        whole = len(result.applied) == len(ops) and all(map(operator.is_, result.applied, ops))
        return OpsApplied(result.applied, result.held, result.refused, deflated if whole else None)

    def _on_state(self, snapshot: StateSnapshot) -> StateMerged:
        limits = attrs.evolve(self.config.decode_limits, bytes_max=self.config.frame_bytes_max)
        try:
            part = decode_state_part(inflate(self._open(snapshot.sealed), limits.bytes_max), self.replica, limits)
        except DecodeError as error:
            raise RemoteProtocolError(EndReason.MALFORMED_FRAME, f"state {snapshot.batch_no}: {error}") from None
        # Until the final part the vector stays: the state brought so far holds the effect of no whole op. Parts lost or
        # out of order (a datagram path) leave it too: the sender then sees the vector still short, and streams again.
        received = self._stream_received
        in_order = part.number == 0 or received == (part.vector, part.number)
        going_on = in_order and not part.final
        self._stream_received = (part.vector, part.number + 1) if going_on else None
        self._stream_moved = True
        whole = in_order and part.final
        self.replica.join_state(part.vector if whole else {}, part.state)
        # Local writes stamp above what the state brought, as after applying its ops; a clock past the drift bound
        # moves this one only as far as the bound.
        clock = self.replica.clock
        clock.last = max(clock.last, min(part.clock, clock.horizon()))
        if whole:
            for device, seq in self.replica.vector.items():
                _raise_max(self._peer_has, device, seq)
        self._owe_ack(snapshot.batch_no)
        return StateMerged(dict(self.replica.vector), part, StateResume(part.vector, part.upto) if going_on else None)

    def _owe_ack(self, batch_no: int) -> None:
        if self._last_batch_received is None or batch_no > self._last_batch_received:
            self._last_batch_received = batch_no
        if self._ack_owed != _REWIND:
            self._ack_owed = self._last_batch_received

    def _on_ack(self, ack: Ack) -> PeerAcked:
        self.peer_vector = dict(ack.vector)
        # Only an ACK that answers our latest batch (or a refresh) tells the whole truth: then ops we
        # sent that the peer still lacks were lost or are held behind a gap, and are sent again.
        if ack.batch_no is None or ack.batch_no == self._batches_sent:
            self._sent = dict(ack.vector)
            for device, seq in self._peer_has.items():
                _raise_max(self._sent, device, seq)
        return PeerAcked(dict(ack.vector))

    # -- output ------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Restate what this side has (HELLO again until the peer's arrives), so the peer resends what is lacking."""
        if self.state is SessionState.GREETING and not self._outbound:
            self._outbound.append(self._hello())
        elif self.state is SessionState.SYNCING:
            if self._stream_received is not None and self._stream_moved:
                # A state stream is coming in order: restating a vector that lacks what it brings would make the
                # peer stream it all again. One that stopped moving (its last part lost) is restated, and restarts.
                self._stream_moved = False
                return
            self._ack_owed = _REWIND

    def _hello(self) -> Hello:
        config, vector, greeted = self.config, dict(self.replica.vector), self.peer_device is not None
        return Hello(config.protocol, config.schema, self.replica.device_id, config.epoch, vector, greeted, self.resume)

    def close(self, detail: str = "closing") -> None:
        """End the session; `generate` then yields a final ERROR frame for the peer."""
        if self.state is not SessionState.CLOSED:
            self._fail(EndReason.CLOSED, detail)

    def _fail(self, reason: EndReason, detail: str) -> None:
        self.state = SessionState.CLOSED
        self._outbound = [Error(reason, detail)]

    def generate(self) -> bytes | None:
        """Return the next frame to send, or None when there is nothing to send now."""
        frame = self._next_frame()
        return None if frame is None else self._encode(frame)

    def take_ack(self) -> bytes | None:
        """Return the ACK owed now, if any, and owe it no more: for a caller that sends it later, once the ops it
        claims are persisted, while it applies further batches (whose ops this ACK does not claim)."""
        if self.state is not SessionState.SYNCING or self._ack_owed is None:
            return None
        return self._encode(self._take_ack())

    def _encode(self, frame: Frame) -> bytes:
        data = to_wire(frame)
        self.bytes_sent += len(data)
        return data

    def _next_frame(self) -> Frame | None:
        if self._outbound:
            return self._outbound.pop(0)
        if self.state is not SessionState.SYNCING:
            return None
        if self._ack_owed is not None:
            return self._take_ack()
        return self._next_batch()

    def _take_ack(self) -> Ack:
        batch_no = None if self._ack_owed == _REWIND else self._ack_owed
        self._ack_owed = None
        return Ack(batch_no, dict(self.replica.vector))

    def _next_batch(self) -> Deltas | StateSnapshot | None:
        if self._stream is None:
            try:
                ops = self.replica.ops_since(self._sent, self.config.batch_ops_max)
            except SnapshotRequired:
                # One use: a resume the peer named is no good once another stream went to it.
                self._stream, self._peer_resume = StateStream(self.replica, self._peer_resume), None
            else:
                return self._deltas(ops) if ops else None
        return self._next_part(self._stream)

    def _deltas(self, ops: list[Op]) -> Deltas:
        batch = encode_ops(ops)
        while len(batch) > self.config.batch_bytes_max and len(ops) > 1:
            ops = ops[: len(ops) // 2]
            batch = encode_ops(ops)
        for op in ops:
            _raise_max(self._sent, op.device, op.seq)
        self._batches_sent += 1
        return Deltas(self._batches_sent, self._seal(batch))

    def _next_part(self, stream: StateStream) -> StateSnapshot:
        messages_max = self.config.part_messages_max
        part = stream.peek(messages_max)
        data = encode_state_part(part)
        while len(data) > self.config.batch_bytes_max and messages_max > 1:
            messages_max //= 2
            part = stream.peek(messages_max)
            data = encode_state_part(part)
        stream.advance(part)
        if part.final:
            # The peer now has what the stream's vector covers; the ops after it follow as deltas.
            self._stream, self._sent = None, dict(part.vector)
            for device, seq in self._peer_has.items():
                _raise_max(self._sent, device, seq)
        self._batches_sent += 1
        return StateSnapshot(self._batches_sent, self._seal(data))
