"""The mailbox protocol (`/aico/mailbox/1`) as sans-I/O state machines: bytes in, events and bytes out.

The server speaks first with a CHALLENGE (a fresh nonce and its bounds); the client then sends PUT and FETCH
requests, each signed with the mailbox key over the nonce and the request's number in the session, and the
server answers every request, in order, with PUT_OK, ITEMS or REFUSED. A refused request leaves the session
open; a malformed, oversized or unexpected frame ends it with ERROR. `docs/spec/relay.md` is the normative text.
"""

from collections import deque
from enum import Enum, IntEnum
from typing import Any

import attrs
import msgpack
import nacl.exceptions
import nacl.signing

import framing
from framing import LocalProtocolError, RemoteProtocolError
from relay.errors import MailboxReason
from relay.mailbox_keys import MAILBOX_ID_BYTES, SIGNATURE_BYTES, VERIFY_KEY_BYTES, MailboxKeys, mailbox_id_of

PROTOCOL_ID = "/aico/mailbox/1"
PROTOCOL_VERSION = 1
NONCE_BYTES = 32
BLOB_BYTES_MAX = 1 << 20
FETCH_ITEMS_MAX = 1000
FETCH_REPLY_BYTES_MAX = 4 << 20  # blob bytes in one ITEMS frame; a larger first blob is still sent alone
REQUESTS_IN_FLIGHT_MAX = 8
REQUESTS_PER_SESSION_MAX = 65_536
DETAIL_CHARS_MAX = 1024
_CURSOR_END = 1 << 63
# Everything in a frame but its blobs fits in this: type, ids, keys, signature, cursors, a detail text.
_FIXED_BYTES_MAX = 2048
_ITEM_OVERHEAD_BYTES = 16  # msgpack array header, uint64 cursor, bin32 header
REQUEST_FRAME_BYTES_MAX = BLOB_BYTES_MAX + _FIXED_BYTES_MAX
REPLY_FRAME_BYTES_MAX = (
    FETCH_REPLY_BYTES_MAX + BLOB_BYTES_MAX + FETCH_ITEMS_MAX * _ITEM_OVERHEAD_BYTES + _FIXED_BYTES_MAX
)
SIGN_DOMAIN = b"aico-mailbox-request-v1\x00"

# Frame type codes: append only.


class FrameType(IntEnum):
    """The first field of every mailbox frame; codes are append only."""

    CHALLENGE = 0
    PUT = 1
    FETCH = 2
    PUT_OK = 3
    ITEMS = 4
    REFUSED = 5
    ERROR = 6



# -- frames -----------------------------------------------------------------------------------------------


@attrs.frozen
class Challenge:
    """The server's greeting: its protocol version, a fresh nonce to sign, and its bounds."""

    version: int
    nonce: bytes
    blob_bytes_max: int
    requests_max: int


@attrs.frozen
class Put:
    """Store `blob` in a mailbox."""

    mailbox_id: bytes
    verify_key: bytes
    blob: bytes
    signature: bytes


@attrs.frozen
class Fetch:
    """Return up to `limit` blobs of a mailbox stored after `after_cursor`."""

    mailbox_id: bytes
    verify_key: bytes
    after_cursor: int
    limit: int
    signature: bytes


@attrs.frozen
class PutOk:
    """The blob is stored durably under `cursor`."""

    cursor: int


@attrs.frozen
class MailboxItem:
    """One stored blob and its cursor."""

    cursor: int
    blob: bytes


@attrs.frozen
class Items:
    """Blobs answering a FETCH, oldest first; `more` says whether the mailbox holds further ones."""

    items: tuple[MailboxItem, ...]
    more: bool


@attrs.frozen
class Refused:
    """One request was refused; the session goes on."""

    reason: MailboxReason
    detail: str


@attrs.frozen
class Error:
    """The session ends, for `reason`."""

    reason: MailboxReason
    detail: str


Frame = Challenge | Put | Fetch | PutOk | Items | Refused | Error
Request = Put | Fetch


def to_wire(frame: Frame) -> bytes:
    """Encode a frame with its length prefix."""
    match frame:
        case Challenge():
            body: list[Any] = [FrameType.CHALLENGE, frame.version, frame.nonce, frame.blob_bytes_max, frame.requests_max]
        case Put():
            body = [FrameType.PUT, frame.mailbox_id, frame.verify_key, frame.blob, frame.signature]
        case Fetch():
            body = [FrameType.FETCH, frame.mailbox_id, frame.verify_key, frame.after_cursor, frame.limit, frame.signature]
        case PutOk():
            body = [FrameType.PUT_OK, frame.cursor]
        case Items():
            body = [FrameType.ITEMS, [[item.cursor, item.blob] for item in frame.items], frame.more]
        case Refused():
            body = [FrameType.REFUSED, frame.reason.value, frame.detail[:DETAIL_CHARS_MAX]]
        case Error():
            body = [FrameType.ERROR, frame.reason.value, frame.detail[:DETAIL_CHARS_MAX]]
    return framing.length_prefixed(msgpack.packb(body, use_bin_type=True))


def _malformed(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(MailboxReason.MALFORMED_FRAME, detail)


def _is_cursor(value: Any) -> bool:
    return type(value) is int and 0 <= value < _CURSOR_END


def _is_bytes(value: Any, size: int) -> bool:
    return type(value) is bytes and len(value) == size


def _reason(value: Any) -> MailboxReason:
    try:
        return MailboxReason(value)
    except ValueError:
        raise _malformed(f"unknown reason {value!r}") from None


def _item(value: Any) -> MailboxItem:
    match value:
        case [cursor, bytes() as blob] if _is_cursor(cursor):
            return MailboxItem(cursor, blob)
    raise _malformed("an item is not [cursor, blob]")


def from_wire(body: bytes) -> Frame:
    """Decode one frame body (without its prefix), raising RemoteProtocolError for anything malformed."""
    try:
        # The frame bound was checked on the prefix; these bounds keep a small frame from claiming huge fields.
        fields = msgpack.unpackb(
            body, raw=False, strict_map_key=True, max_bin_len=len(body), max_str_len=DETAIL_CHARS_MAX,
            max_array_len=FETCH_ITEMS_MAX + 1, max_map_len=0, max_ext_len=0,
        )
    except Exception as error:  # msgpack raises many exception types for bad input
        raise _malformed(f"frame is not valid msgpack: {type(error).__name__}") from None
    if type(fields) is not list or not fields or type(fields[0]) is not int:
        raise _malformed("frame is not [type, ...]")
    kind, rest = fields[0], fields[1:]
    match kind, rest:
        case (FrameType.CHALLENGE, [int() as version, bytes() as nonce, int() as blob_bytes_max, int() as requests_max]):
            if len(nonce) == NONCE_BYTES and 0 < blob_bytes_max <= BLOB_BYTES_MAX and requests_max > 0:
                return Challenge(version, nonce, blob_bytes_max, requests_max)
        case (FrameType.PUT, [mailbox_id, verify_key, bytes() as blob, signature]):
            if _is_bytes(mailbox_id, MAILBOX_ID_BYTES) and _is_bytes(verify_key, VERIFY_KEY_BYTES):
                if _is_bytes(signature, SIGNATURE_BYTES):
                    return Put(mailbox_id, verify_key, blob, signature)
        case (FrameType.FETCH, [mailbox_id, verify_key, after_cursor, int() as limit, signature]):
            if _is_bytes(mailbox_id, MAILBOX_ID_BYTES) and _is_bytes(verify_key, VERIFY_KEY_BYTES):
                if _is_cursor(after_cursor) and 0 < limit <= FETCH_ITEMS_MAX and _is_bytes(signature, SIGNATURE_BYTES):
                    return Fetch(mailbox_id, verify_key, after_cursor, limit, signature)
        case (FrameType.PUT_OK, [cursor]) if _is_cursor(cursor):
            return PutOk(cursor)
        case (FrameType.ITEMS, [list() as items, bool() as more]):
            return Items(tuple(_item(item) for item in items), more)
        case (FrameType.REFUSED, [str() as reason, str() as detail]):
            return Refused(_reason(reason), detail)
        case (FrameType.ERROR, [str() as reason, str() as detail]):
            return Error(_reason(reason), detail)
    raise _malformed(f"frame of type {kind} has a malformed body")


def signed_message(nonce: bytes, request_no: int, request: Request) -> bytes:
    """The bytes a request's signature covers: domain, session nonce, request number, type, mailbox id, fields."""
    head = SIGN_DOMAIN + nonce + request_no.to_bytes(8, "big")
    match request:
        case Put():
            return head + bytes([FrameType.PUT]) + request.mailbox_id + request.blob
        case Fetch():
            fields = request.after_cursor.to_bytes(8, "big") + request.limit.to_bytes(4, "big")
            return head + bytes([FrameType.FETCH]) + request.mailbox_id + fields


def _is_authorised(nonce: bytes, request_no: int, request: Request) -> bool:
    if mailbox_id_of(request.verify_key) != request.mailbox_id:
        return False
    try:
        nacl.signing.VerifyKey(request.verify_key).verify(signed_message(nonce, request_no, request), request.signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        # A malformed key is as untrustworthy as a bad signature.
        return False
    return True


class ProtocolState(Enum):
    """Where one side of a mailbox session is."""

    GREETING = "greeting"  # the client waits for the CHALLENGE
    SERVING = "serving"
    CLOSED = "closed"


# -- server -----------------------------------------------------------------------------------------------


@attrs.frozen
class PutRequested:
    """An authorised client asks to store `blob` in `mailbox_id`; answer with `accept_put` or `refuse`."""

    mailbox_id: bytes
    blob: bytes


@attrs.frozen
class FetchRequested:
    """An authorised client asks for blobs of `mailbox_id` after `after_cursor`; answer with `send_items`/`refuse`."""

    mailbox_id: bytes
    after_cursor: int
    limit: int


@attrs.frozen
class RequestRefused:
    """A request was refused (the reply is queued already, or it came from the server)."""

    reason: MailboxReason
    detail: str


ServerEvent = PutRequested | FetchRequested | RequestRefused


@attrs.define
class _Slot:
    """One received request and, once known, its reply; replies leave in request order."""

    kind: type[Request]
    reply: Frame | None = None


class MailboxServerProtocol:
    """The relay's side of one mailbox session."""

    def __init__(
        self, nonce: bytes, *, blob_bytes_max: int = BLOB_BYTES_MAX, requests_max: int = REQUESTS_PER_SESSION_MAX
    ) -> None:
        if len(nonce) != NONCE_BYTES or not 0 < blob_bytes_max <= BLOB_BYTES_MAX or requests_max <= 0:
            raise LocalProtocolError("a server needs a 32-byte nonce and positive bounds within the protocol's")
        self.state = ProtocolState.SERVING
        self.requests_received = 0
        self._nonce = nonce
        self._blob_bytes_max = blob_bytes_max
        self._requests_max = requests_max
        self._inbound = framing.FrameBuffer(REQUEST_FRAME_BYTES_MAX, MailboxReason.FRAME_TOO_LARGE)
        self._greeting: Frame | None = Challenge(PROTOCOL_VERSION, nonce, blob_bytes_max, requests_max)
        self._slots: deque[_Slot] = deque()
        self._final: Error | None = None

    def receive_data(self, data: bytes) -> list[ServerEvent]:
        """Take bytes from the client and return the requests they complete."""
        if self.state is ProtocolState.CLOSED:
            raise LocalProtocolError("receive_data on a closed session")
        self._inbound.feed(data)
        events: list[ServerEvent] = []
        try:
            while (body := self._inbound.next_body()) is not None:
                events.append(self._on_request(from_wire(body)))
        except RemoteProtocolError as error:
            self.close(MailboxReason(error.reason), error.detail)
            raise
        return events

    def _on_request(self, frame: Frame) -> ServerEvent:
        if not isinstance(frame, Put | Fetch):
            raise RemoteProtocolError(MailboxReason.UNEXPECTED_FRAME, f"a client does not send {type(frame).__name__}")
        if len(self._slots) >= REQUESTS_IN_FLIGHT_MAX:
            raise RemoteProtocolError(
                MailboxReason.TOO_MANY_REQUESTS, f"more than {REQUESTS_IN_FLIGHT_MAX} requests in flight"
            )
        if self.requests_received >= self._requests_max:
            raise RemoteProtocolError(
                MailboxReason.TOO_MANY_REQUESTS, f"more than {self._requests_max} requests in one session"
            )
        request_no = self.requests_received
        self.requests_received += 1
        slot = _Slot(type(frame))
        self._slots.append(slot)
        if not _is_authorised(self._nonce, request_no, frame):
            return self._refuse_slot(slot, MailboxReason.UNAUTHORISED, "mailbox id, key or signature does not match")
        if isinstance(frame, Put):
            if len(frame.blob) > self._blob_bytes_max:
                detail = f"blob of {len(frame.blob)} bytes exceeds {self._blob_bytes_max}"
                return self._refuse_slot(slot, MailboxReason.BLOB_TOO_LARGE, detail)
            return PutRequested(frame.mailbox_id, frame.blob)
        return FetchRequested(frame.mailbox_id, frame.after_cursor, frame.limit)

    def _refuse_slot(self, slot: _Slot, reason: MailboxReason, detail: str) -> RequestRefused:
        slot.reply = Refused(reason, detail)
        return RequestRefused(reason, detail)

    def _unanswered(self, kind: type[Request]) -> _Slot:
        slot = next((slot for slot in self._slots if slot.reply is None), None)
        if slot is None or slot.kind is not kind:
            raise LocalProtocolError(f"no {kind.__name__} request is the next one awaiting an answer")
        return slot

    def accept_put(self, cursor: int) -> None:
        """Answer the oldest unanswered PUT: stored under `cursor`."""
        if not _is_cursor(cursor):
            raise LocalProtocolError(f"a cursor is an unsigned 63-bit integer, got {cursor!r}")
        self._unanswered(Put).reply = PutOk(cursor)

    def send_items(self, items: list[MailboxItem], more: bool) -> None:
        """Answer the oldest unanswered FETCH with `items`, oldest first."""
        self._unanswered(Fetch).reply = Items(tuple(items), more)

    def refuse(self, reason: MailboxReason, detail: str) -> None:
        """Answer the oldest unanswered request with a refusal (over quota, store full, ...)."""
        slot = next((slot for slot in self._slots if slot.reply is None), None)
        if slot is None:
            raise LocalProtocolError("no request awaits an answer")
        slot.reply = Refused(reason, detail)

    def close(self, reason: MailboxReason = MailboxReason.CLOSED, detail: str = "closing") -> None:
        """End the session; `generate` then yields the answers already known and a final ERROR frame."""
        if self.state is not ProtocolState.CLOSED:
            self.state = ProtocolState.CLOSED
            self._final = Error(reason, detail)

    def generate(self) -> bytes | None:
        """Return the next frame to send, or None when there is nothing to send now."""
        if self._greeting is not None:
            frame, self._greeting = self._greeting, None
            return to_wire(frame)
        if self._slots and (reply := self._slots[0].reply) is not None:
            self._slots.popleft()
            return to_wire(reply)
        if self._final is not None:
            frame, self._final = self._final, None
            self._slots.clear()  # unanswered requests stay unanswered: the session is over
            return to_wire(frame)
        return None


# -- client -----------------------------------------------------------------------------------------------


@attrs.frozen
class Ready:
    """The server's CHALLENGE arrived: requests may be sent."""

    blob_bytes_max: int
    requests_max: int


@attrs.frozen
class PutAccepted:
    """The oldest outstanding PUT is stored under `cursor`."""

    cursor: int


@attrs.frozen
class ItemsFetched:
    """The answer to the oldest outstanding FETCH."""

    items: tuple[MailboxItem, ...]
    more: bool


@attrs.frozen
class SessionEnded:
    """The server ended the session."""

    reason: MailboxReason
    detail: str


ClientEvent = Ready | PutAccepted | ItemsFetched | RequestRefused | SessionEnded


class MailboxClientProtocol:
    """A device's side of one mailbox session with a relay."""

    def __init__(self) -> None:
        self.state = ProtocolState.GREETING
        self.challenge: Challenge | None = None
        self._inbound = framing.FrameBuffer(REPLY_FRAME_BYTES_MAX, MailboxReason.FRAME_TOO_LARGE)
        self._outbound: list[Request] = []
        self._outstanding: deque[Request] = deque()
        self._requests_sent = 0

    @property
    def requests_left(self) -> int:
        """How many more requests this session may carry."""
        if self.challenge is None:
            return 0
        return self.challenge.requests_max - self._requests_sent

    @property
    def in_flight(self) -> int:
        """Requests sent or queued that have no answer yet."""
        return len(self._outstanding)

    def put(self, keys: MailboxKeys, blob: bytes) -> None:
        """Queue a request to store `blob` in the mailbox of `keys`."""
        self._check_can_request()
        assert self.challenge is not None
        if type(blob) is not bytes or len(blob) > self.challenge.blob_bytes_max:
            raise LocalProtocolError(f"a blob is bytes of at most {self.challenge.blob_bytes_max}")
        self._queue(Put(keys.mailbox_id, keys.verify_key, blob, b""), keys)

    def fetch(self, keys: MailboxKeys, after_cursor: int, limit: int = FETCH_ITEMS_MAX) -> None:
        """Queue a request for up to `limit` blobs of the mailbox of `keys` stored after `after_cursor`."""
        self._check_can_request()
        if not _is_cursor(after_cursor) or type(limit) is not int or not 0 < limit <= FETCH_ITEMS_MAX:
            raise LocalProtocolError(f"a cursor is an unsigned 63-bit integer and 0 < limit <= {FETCH_ITEMS_MAX}")
        self._queue(Fetch(keys.mailbox_id, keys.verify_key, after_cursor, limit, b""), keys)

    def _check_can_request(self) -> None:
        if self.state is not ProtocolState.SERVING:
            raise LocalProtocolError(f"cannot send a request while the session is {self.state.value}")
        if self.in_flight >= REQUESTS_IN_FLIGHT_MAX:
            raise LocalProtocolError(f"already {REQUESTS_IN_FLIGHT_MAX} requests in flight")
        if self.requests_left <= 0:
            raise LocalProtocolError("this session has carried all the requests the server allows; open another")

    def _queue(self, unsigned: Request, keys: MailboxKeys) -> None:
        assert self.challenge is not None
        signature = keys.sign(signed_message(self.challenge.nonce, self._requests_sent, unsigned))
        request = attrs.evolve(unsigned, signature=signature)
        self._requests_sent += 1
        self._outbound.append(request)
        self._outstanding.append(request)

    def generate(self) -> bytes | None:
        """Return the next frame to send, or None when there is nothing to send now."""
        return to_wire(self._outbound.pop(0)) if self._outbound else None

    def receive_data(self, data: bytes) -> list[ClientEvent]:
        """Take bytes from the server and return the events they complete."""
        if self.state is ProtocolState.CLOSED:
            raise LocalProtocolError("receive_data on a closed session")
        self._inbound.feed(data)
        events: list[ClientEvent] = []
        try:
            while not self.closed and (body := self._inbound.next_body()) is not None:
                events.append(self._on_reply(from_wire(body)))
        except RemoteProtocolError:
            self._close()
            raise
        return events

    @property
    def closed(self) -> bool:
        """Whether the session is over."""
        return self.state is ProtocolState.CLOSED

    def _close(self) -> None:
        self.state = ProtocolState.CLOSED
        self._outbound.clear()
        self._outstanding.clear()

    def _on_reply(self, frame: Frame) -> ClientEvent:
        if isinstance(frame, Error):
            self._close()
            return SessionEnded(frame.reason, frame.detail)
        if self.state is ProtocolState.GREETING:
            if not isinstance(frame, Challenge):
                raise RemoteProtocolError(MailboxReason.UNEXPECTED_FRAME, f"{type(frame).__name__} before CHALLENGE")
            if frame.version != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    MailboxReason.PROTOCOL_MISMATCH,
                    f"relay speaks mailbox protocol {frame.version}, this device {PROTOCOL_VERSION}",
                )
            self.state = ProtocolState.SERVING
            self.challenge = frame
            return Ready(frame.blob_bytes_max, frame.requests_max)
        if not self._outstanding or isinstance(frame, Challenge | Put | Fetch):
            raise RemoteProtocolError(MailboxReason.UNEXPECTED_FRAME, f"{type(frame).__name__} answers no request")
        request = self._outstanding.popleft()
        match frame, request:
            case Refused(), _:
                return RequestRefused(frame.reason, frame.detail)
            case PutOk(), Put():
                return PutAccepted(frame.cursor)
            case Items(), Fetch():
                self._check_items(frame, request)
                return ItemsFetched(frame.items, frame.more)
        raise RemoteProtocolError(
            MailboxReason.UNEXPECTED_FRAME, f"{type(frame).__name__} does not answer {type(request).__name__}"
        )

    def _check_items(self, frame: Items, request: Fetch) -> None:
        assert self.challenge is not None
        cursors = [item.cursor for item in frame.items]
        ascending = all(later > earlier for earlier, later in zip([request.after_cursor, *cursors], cursors))
        if len(cursors) > request.limit or not ascending:
            raise _malformed("ITEMS are not at most `limit` items with ascending cursors after the one asked for")
        if any(len(item.blob) > self.challenge.blob_bytes_max for item in frame.items):
            raise _malformed("an item is larger than the relay's own blob bound")
