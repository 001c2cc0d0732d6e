"""Device pairing (`/aico/pair/1`), sans-I/O: a SPAKE2 run over a one-time code hands a new device the group key.

Neither session knows sockets or a clock: feed received bytes with the current time to `receive_data`,
send whatever `generate` returns until it returns None, and treat a raised `PairingError` or
`RemoteProtocolError` as the end of the run (after flushing `generate`, which then yields an ERROR frame).
The normative description is docs/spec/pairing.md.
"""

from __future__ import annotations

import hmac
import json
import secrets
import unicodedata
from collections.abc import Callable, Sequence
from enum import Enum, IntEnum, StrEnum
from typing import Any

import attrs
import msgpack
import nacl.exceptions
import nacl.hash
import nacl.pwhash
import nacl.secret
from nacl.encoding import RawEncoder
from spake2 import SPAKE2_A, SPAKE2_B, SPAKEError
from spake2.ed25519_basic import NotOnCurve

import framing
from framing import LocalProtocolError, ReasonedError, RemoteProtocolError
from node.errors import EndReason, NodeError
from node.trust.identity import GROUP_SECRET_BYTES, DeviceIdentity, GroupKey, device_id_of, verify

PROTOCOL_ID = "/aico/pair/1"
PROTOCOL_VERSION = 2  # 2: PAKE_REPLY says the attempts left, the joiner's card carries its name
PROTOCOL_VERSIONS = (1, 2)  # what an inviter answers
DEVICE_NAME_CHARS_MAX = 64
UNNAMED_DEVICE = "a new device"  # the name of a joiner that sent none (protocol 1)

# Crockford base32: digits and capitals without I, L, O, U, so nothing reads as anything else.
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_CHARS = 10
INVITE_ID_CHARS = 2  # the code's first characters, sent in clear to name the invite
CODE_INPUT_CHARS_MAX = 64
_LOOKALIKES = str.maketrans({"I": "1", "L": "1", "O": "0"})

INVITE_TTL_S = 600.0
INVITE_TTL_S_MAX = 3600.0
ATTEMPTS_MAX = 5
# Each attempt is one online guess at 2**-40: the cap keeps the attacker's odds negligible whatever is asked.
ATTEMPTS_LIMIT = 10
RUN_TTL_S = 120.0

FRAME_BYTES_MAX = 64 * 1024
SPAKE_MSG_BYTES = 33  # one side byte, then a 32-byte Ed25519 group element
MAC_BYTES = 32
VERIFY_KEY_BYTES = 32
DEVICE_ID_CHARS_MAX = 128
ADDRESSES_MAX = 32
ADDRESS_CHARS_MAX = 256
ENROLMENT_RECORD_BYTES_MAX = 16 * 1024
REASON_CHARS_MAX = 64
DETAIL_CHARS_MAX = 512


class FrameType(IntEnum):
    """The first field of every pairing frame; codes are append only."""

    PAKE_START = 0
    PAKE_REPLY = 1
    JOINER_HELLO = 2
    WELCOME = 3
    DONE = 4
    ERROR = 5


_JOINER_STATEMENT_TAG = "aico-pair/1 joiner device key"
_INVITE_ADVERT_SALT = b"aico-invite-adv1"  # 16 bytes, Argon2id's salt size
INVITE_ADVERT_OPSLIMIT = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
INVITE_ADVERT_MEMLIMIT = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE
_TRANSCRIPT_PERSON = b"aico-pair1-th"


class PairingReason(StrEnum):
    """Why a pairing run failed, as shown to the user and sent to the peer in an ERROR frame."""

    WRONG_CODE = "wrong_code"
    EXPIRED = "expired"
    WITHDRAWN = "withdrawn"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    INVITE_USED = "invite_used"
    UNKNOWN_INVITE = "unknown_invite"
    MALFORMED_CODE = "malformed_code"
    TIMED_OUT = "timed_out"
    ABORTED = "aborted"


class PairingError(NodeError, ReasonedError):
    """A pairing run ended without pairing, for a reason the user should be told."""

    reason: PairingReason


# -- codes and invites -----------------------------------------------------------------------------


def parse_code(text: str) -> str:
    """The canonical code in `text`, ignoring case, spaces and dashes, and reading I, L as 1 and O as 0."""
    if len(text) > CODE_INPUT_CHARS_MAX:
        raise PairingError(PairingReason.MALFORMED_CODE, f"a pairing code has {CODE_CHARS} characters")
    # NFKC folds full-width and other compatibility forms a phone keyboard may produce into ASCII.
    folded = unicodedata.normalize("NFKC", text)
    kept = "".join(c for c in folded if not (c.isspace() or unicodedata.category(c) == "Pd"))
    code = kept.upper().translate(_LOOKALIKES)
    for char in code:
        if char not in CODE_ALPHABET:
            raise PairingError(PairingReason.MALFORMED_CODE, f"{char!r} cannot appear in a pairing code")
    if len(code) != CODE_CHARS:
        raise PairingError(
            PairingReason.MALFORMED_CODE, f"a pairing code has {CODE_CHARS} characters, this one has {len(code)}"
        )
    return code


def invite_advert_secret(code: str) -> bytes:
    """The 32-byte secret an invite's LAN advert is tagged and sealed with (docs/spec/pairing.md, section 11), from
    its code: memory-hard, so an observer cannot search the code's 50 bits from the advert within the invite's life."""
    canonical = parse_code(code).encode()
    return nacl.pwhash.argon2id.kdf(
        32, canonical, _INVITE_ADVERT_SALT, opslimit=INVITE_ADVERT_OPSLIMIT, memlimit=INVITE_ADVERT_MEMLIMIT
    )


def display_code(code: str) -> str:
    """`code` in the form shown to the user: two groups of five characters ("7K3QX-M2V9T")."""
    half = CODE_CHARS // 2
    return f"{code[:half]}-{code[half:]}"


def invite_payload(code: str, addresses: Sequence[str]) -> str:
    """The text an invite's QR code carries: its code and the inviter's dialable addresses, as JSON."""
    dialable = [address for address in addresses if "/ip4/0.0.0.0/" not in address]
    return json.dumps({"code": code, "addresses": dialable[:ADDRESSES_MAX]})


def read_invite(text: str) -> tuple[str, list[str]]:
    """The canonical code and the addresses in what a joiner was given: a typed code, or an invite's QR text."""
    if not text.lstrip().startswith("{"):
        return parse_code(text), []
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    match payload:
        case {"code": str() as code, "addresses": list() as addresses} if len(addresses) <= ADDRESSES_MAX and all(
            type(a) is str and len(a) <= ADDRESS_CHARS_MAX for a in addresses
        ):
            return parse_code(code), addresses
    raise PairingError(PairingReason.MALFORMED_CODE, "this is not an invite: give its code, or its QR code's text")


def _check_code(_instance: Any, _attribute: Any, code: str) -> None:
    if type(code) is not str or len(code) != CODE_CHARS or any(c not in CODE_ALPHABET for c in code):
        raise LocalProtocolError("an invite code is a canonical code from parse_code")


@attrs.frozen
class Invite:
    """A one-time invitation: the code to show the user, when it expires, and how many runs it allows."""

    code: str = attrs.field(repr=False, validator=_check_code)
    expires_at_s: float
    attempts_max: int = ATTEMPTS_MAX

    @property
    def invite_id(self) -> str:
        """The public part of the code that names this invite on the wire."""
        return self.code[:INVITE_ID_CHARS]


def new_invite(now_s: float, ttl_s: float = INVITE_TTL_S, attempts_max: int = ATTEMPTS_MAX) -> Invite:
    """A new invite with a random code, valid for `ttl_s` seconds from `now_s`."""
    if not 0 < ttl_s <= INVITE_TTL_S_MAX:
        raise LocalProtocolError(f"an invite lives more than 0 and at most {INVITE_TTL_S_MAX} s, not {ttl_s}")
    if type(attempts_max) is not int or not 1 <= attempts_max <= ATTEMPTS_LIMIT:
        raise LocalProtocolError(f"an invite allows 1 to {ATTEMPTS_LIMIT} attempts, not {attempts_max!r}")
    code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_CHARS))
    return Invite(code, now_s + ttl_s, attempts_max)


class InviteGuard:
    """Counts the runs made against one invite across all its sessions and refuses runs it no longer allows."""

    def __init__(self, invite: Invite) -> None:
        self.invite = invite
        self.attempts = 0
        self.used = False
        self.withdrawn = False

    @property
    def attempts_left(self) -> int:
        """How many more runs this invite will answer."""
        return 0 if self.used else self.invite.attempts_max - self.attempts

    def _check_open(self, now_s: float) -> None:
        if self.used:
            raise PairingError(PairingReason.INVITE_USED, "this invite has already paired a device")
        if now_s >= self.invite.expires_at_s:
            raise PairingError(PairingReason.EXPIRED, "the invite has expired; make a new one")

    def _check_not_withdrawn(self) -> None:
        if self.withdrawn:
            raise PairingError(PairingReason.WITHDRAWN, "the invite was closed on the inviting device; make a new one")

    def check(self, now_s: float) -> None:
        """Refuse a new run if the invite is used, expired or out of attempts."""
        self._check_open(now_s)
        if self.attempts >= self.invite.attempts_max:
            raise PairingError(PairingReason.TOO_MANY_ATTEMPTS, "too many attempts; make a new invite")
        self._check_not_withdrawn()

    def admit(self, now_s: float) -> None:
        """Count one run, or refuse it as `check` does."""
        self.check(now_s)
        self.attempts += 1

    def withdraw(self) -> None:
        """Close the invite before it expires: later runs are refused as withdrawn."""
        self.withdrawn = True

    def consume(self, now_s: float) -> None:
        """Mark the invite used by a successful run, unless it is already used, expired or withdrawn."""
        self._check_open(now_s)
        self._check_not_withdrawn()
        self.used = True


NO_INVITE_OPEN = "no invite is open there: run `aico-node pair invite` on it"


def attempts_left_text(attempts_left: int) -> str:
    """How many more tries an invite allows, in words."""
    if attempts_left <= 0:
        return "the invite allows no more attempts: make a new one on the other device"
    return f"the invite allows {attempts_left} more attempt{'' if attempts_left == 1 else 's'}"


# -- frames ----------------------------------------------------------------------------------------


@attrs.frozen
class PakeStart:
    """Joiner to inviter: which invite, and the joiner's SPAKE2 message."""

    version: int
    invite_id: str
    spake_msg: bytes


@attrs.frozen
class PakeReply:
    """Inviter to joiner: the inviter's SPAKE2 message, its key confirmation, and (protocol 2) the attempts the invite
    allows after this one."""

    spake_msg: bytes
    confirm: bytes
    attempts_left: int | None = None


@attrs.frozen
class JoinerHello:
    """Joiner to inviter: the joiner's key confirmation and its sealed, signed device key."""

    confirm: bytes
    sealed: bytes


@attrs.frozen
class Welcome:
    """Inviter to joiner: the sealed group key, inviter key, addresses and enrolment record."""

    sealed: bytes


@attrs.frozen
class Done:
    """Joiner to inviter: proof that the WELCOME was opened."""

    confirm: bytes


@attrs.frozen
class Error:
    """Ends a run with a reason."""

    reason: str
    detail: str


Frame = PakeStart | PakeReply | JoinerHello | Welcome | Done | Error


def to_wire(frame: Frame) -> bytes:
    """Encode a frame with its length prefix."""
    match frame:
        case PakeStart():
            body: list[Any] = [FrameType.PAKE_START, frame.version, frame.invite_id, frame.spake_msg]
        case PakeReply():
            body = [FrameType.PAKE_REPLY, frame.spake_msg, frame.confirm]
            if frame.attempts_left is not None:
                body.append(frame.attempts_left)
        case JoinerHello():
            body = [FrameType.JOINER_HELLO, frame.confirm, frame.sealed]
        case Welcome():
            body = [FrameType.WELCOME, frame.sealed]
        case Done():
            body = [FrameType.DONE, frame.confirm]
        case Error():
            body = [FrameType.ERROR, frame.reason, frame.detail[:DETAIL_CHARS_MAX]]
    return framing.length_prefixed(msgpack.packb(body, use_bin_type=True))


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            max_bin_len=FRAME_BYTES_MAX,
            max_str_len=FRAME_BYTES_MAX,
            max_array_len=ADDRESSES_MAX,  # the address list is the longest array in any frame or sealed body
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as error:  # msgpack raises many exception types for bad input
        raise RemoteProtocolError(
            EndReason.MALFORMED_FRAME, f"{what} is not valid msgpack: {type(error).__name__}"
        ) from None


def from_wire(body: bytes) -> Frame:
    """Decode one frame body (without its prefix), raising RemoteProtocolError for anything malformed."""
    fields = _unpack(body, "frame")
    if type(fields) is not list or not fields or type(fields[0]) is not int:
        raise RemoteProtocolError(EndReason.MALFORMED_FRAME, "frame is not [type, ...]")
    match fields:
        case [FrameType.PAKE_START, int() as version, str() as invite_id, bytes() as spake_msg] if (
            len(invite_id) == INVITE_ID_CHARS and len(spake_msg) == SPAKE_MSG_BYTES
        ):
            return PakeStart(version, invite_id, spake_msg)
        case [FrameType.PAKE_REPLY, bytes() as spake_msg, bytes() as confirm] if (
            len(spake_msg) == SPAKE_MSG_BYTES and len(confirm) == MAC_BYTES
        ):
            return PakeReply(spake_msg, confirm)
        case [FrameType.PAKE_REPLY, bytes() as spake_msg, bytes() as confirm, int() as attempts_left] if (
            len(spake_msg) == SPAKE_MSG_BYTES and len(confirm) == MAC_BYTES and 0 <= attempts_left <= ATTEMPTS_LIMIT
        ):
            return PakeReply(spake_msg, confirm, attempts_left)
        case [FrameType.JOINER_HELLO, bytes() as confirm, bytes() as sealed] if len(confirm) == MAC_BYTES:
            return JoinerHello(confirm, sealed)
        case [FrameType.WELCOME, bytes() as sealed]:
            return Welcome(sealed)
        case [FrameType.DONE, bytes() as confirm] if len(confirm) == MAC_BYTES:
            return Done(confirm)
        case [FrameType.ERROR, str() as reason, str() as detail] if (
            len(reason) <= REASON_CHARS_MAX and len(detail) <= DETAIL_CHARS_MAX
        ):
            return Error(reason, detail)
    raise RemoteProtocolError(EndReason.MALFORMED_FRAME, f"frame of type {fields[0]} has a malformed body")


# -- keys and transcript ---------------------------------------------------------------------------


def _spake_ids(invite_id: str) -> tuple[bytes, bytes]:
    # The SPAKE2 key then depends on the protocol and the invite as well as the code.
    return f"{PROTOCOL_ID} joiner {invite_id}".encode(), f"{PROTOCOL_ID} inviter {invite_id}".encode()


def transcript_hash(invite_id: str, start_msg: bytes, reply_msg: bytes) -> bytes:
    """The 32-byte hash of the PAKE exchange that every later MAC, key and signature is bound to."""
    data = msgpack.packb([PROTOCOL_ID, invite_id, start_msg, reply_msg], use_bin_type=True)
    return nacl.hash.blake2b(data, digest_size=32, person=_TRANSCRIPT_PERSON, encoder=RawEncoder)


def _prf(key: bytes, label: bytes, *parts: bytes) -> bytes:
    return nacl.hash.blake2b(b"".join(parts), key=key, person=label, digest_size=32, encoder=RawEncoder)


@attrs.frozen
class _RunKeys:
    """The keys of one run, derived from the SPAKE2 key and the transcript hash."""

    pake_key: bytes = attrs.field(repr=False)
    transcript: bytes

    def mac(self, label: bytes, *parts: bytes) -> bytes:
        return _prf(self.pake_key, label, self.transcript, *parts)

    def box(self, label: bytes) -> nacl.secret.SecretBox:
        return nacl.secret.SecretBox(self.mac(label))


def joiner_statement(transcript: bytes, device_id: str, verify_key: bytes) -> bytes:
    """The bytes the joiner signs with its device key: a domain tag, the transcript hash and its identity."""
    return msgpack.packb([_JOINER_STATEMENT_TAG, transcript, device_id, verify_key], use_bin_type=True)


def _open(box: nacl.secret.SecretBox, sealed: bytes, what: str) -> Any:
    try:
        plain = box.decrypt(sealed)
    except nacl.exceptions.CryptoError:
        raise RemoteProtocolError(EndReason.UNSEAL_FAILED, f"{what} does not open under the run key") from None
    return _unpack(plain, what)


def _is_device_key(device_id: str, verify_key: bytes) -> bool:
    return (
        len(device_id) <= DEVICE_ID_CHARS_MAX
        and len(verify_key) == VERIFY_KEY_BYTES
        and device_id_of(verify_key) == device_id
    )


# -- events ----------------------------------------------------------------------------------------


@attrs.frozen
class Paired:
    """The run succeeded: the peer's device key, authenticated by the code."""

    peer_device_id: str
    peer_verify_key: bytes


@attrs.frozen
class InviterPaired(Paired):
    """The inviter's outcome: the joiner's key, its signature over `joiner_statement`, and the record made for it."""

    signature: bytes
    transcript: bytes
    enrolment_record: bytes
    name: str = UNNAMED_DEVICE  # the name the joiner gave itself


@attrs.frozen
class JoinerPaired(Paired):
    """The joiner's outcome: the group key, where to reach the inviter, and the joiner's enrolment record."""

    group_key: GroupKey
    inviter_addresses: tuple[str, ...]
    enrolment_record: bytes


Event = InviterPaired | JoinerPaired


def _finish(spake: SPAKE2_A | SPAKE2_B, peer_msg: bytes) -> bytes:
    try:
        return spake.finish(peer_msg)
    except (SPAKEError, NotOnCurve, ValueError) as error:
        # A point off the curve, of small order, or a reflected message: no key can come of it.
        raise RemoteProtocolError(
            EndReason.MALFORMED_FRAME, f"invalid SPAKE2 message: {type(error).__name__}"
        ) from None


def check_device_name(name: Any) -> str:
    """`name` if it can name a device (1 to 64 printable characters, trimmed), else LocalProtocolError."""
    if type(name) is not str or not 0 < len(name.strip()) <= DEVICE_NAME_CHARS_MAX or not name.isprintable():
        raise LocalProtocolError(f"a device name is 1 to {DEVICE_NAME_CHARS_MAX} printable characters, not {name!r:.80}")
    return name.strip()


def _read_card(fields: Any, keys: _RunKeys) -> tuple[str, bytes, bytes, str]:
    match fields:
        case [str() as device_id, bytes() as verify_key, bytes() as signature, *rest] if (
            _is_device_key(device_id, verify_key) and len(rest) <= 1
        ):
            try:
                name = check_device_name(rest[0]) if rest else UNNAMED_DEVICE
            except LocalProtocolError as error:
                raise RemoteProtocolError(EndReason.MALFORMED_FRAME, f"JOINER_HELLO: {error}") from None
            if verify(verify_key, joiner_statement(keys.transcript, device_id, verify_key), signature):
                return device_id, verify_key, signature, name
    raise RemoteProtocolError(EndReason.MALFORMED_FRAME, "JOINER_HELLO does not hold a device key that signed this run")


def _read_welcome(fields: Any) -> JoinerPaired:
    match fields:
        case [
            bytes() as secret,
            int() as epoch,
            str() as device_id,
            bytes() as verify_key,
            list() as addresses,
            bytes() as record,
        ] if (
            len(secret) == GROUP_SECRET_BYTES
            and type(epoch) is int
            and 0 <= epoch < 1 << 63
            and _is_device_key(device_id, verify_key)
            and all(type(a) is str and len(a) <= ADDRESS_CHARS_MAX for a in addresses)
            and len(record) <= ENROLMENT_RECORD_BYTES_MAX
        ):
            return JoinerPaired(device_id, verify_key, GroupKey(secret, epoch), tuple(addresses), record)
    raise RemoteProtocolError(EndReason.MALFORMED_FRAME, "WELCOME has a malformed body")


class PairingState(Enum):
    """Which frame a session waits for, or how its run ended."""

    EXPECT_START = "expect_start"
    EXPECT_REPLY = "expect_reply"
    EXPECT_HELLO = "expect_hello"
    EXPECT_WELCOME = "expect_welcome"
    EXPECT_DONE = "expect_done"
    PAIRED = "paired"
    FAILED = "failed"


_ENDED = (PairingState.PAIRED, PairingState.FAILED)
_WRONG_CODE_DETAIL = "the pairing code is wrong"


# -- sessions --------------------------------------------------------------------------------------


class _Side:
    """What both sides share: framing, the outbound queue, the run deadline and failure handling."""

    def __init__(self, state: PairingState, now_s: float, run_ttl_s: float) -> None:
        if not 0 < run_ttl_s <= INVITE_TTL_S_MAX:
            raise LocalProtocolError(f"a run lasts more than 0 and at most {INVITE_TTL_S_MAX} s, not {run_ttl_s}")
        self.state = state
        self._deadline_s = now_s + run_ttl_s
        self._inbound = framing.FrameBuffer(FRAME_BYTES_MAX, EndReason.FRAME_TOO_LARGE)
        self._outbound: list[Frame] = []

    def receive_data(self, data: bytes, now_s: float) -> list[Event]:
        """Take bytes from the peer at time `now_s` and return the events they complete."""
        if self.state in _ENDED:
            raise LocalProtocolError(f"receive_data on a run that is {self.state.value}")
        self._inbound.feed(data)
        events: list[Event] = []
        try:
            while self.state not in _ENDED and (body := self._inbound.next_body()) is not None:
                frame = from_wire(body)
                if isinstance(frame, Error):
                    self.state = PairingState.FAILED  # the peer has ended the run; nothing goes back
                    raise _peer_error(frame)
                if now_s > self._deadline_s:
                    raise PairingError(PairingReason.TIMED_OUT, "the pairing run took too long")
                events.extend(self._handle(frame, now_s))
        except (RemoteProtocolError, PairingError) as error:
            if self.state is not PairingState.FAILED:
                self.state = PairingState.FAILED
                self._outbound = [Error(str(error.reason), error.detail)]
            raise
        return events

    def _handle(self, frame: Frame, now_s: float) -> list[Event]:
        raise NotImplementedError

    def _unexpected(self, frame: Frame) -> RemoteProtocolError:
        return RemoteProtocolError(EndReason.UNEXPECTED_FRAME, f"{type(frame).__name__} while in {self.state.value}")

    def generate(self) -> bytes | None:
        """Return the next frame to send, or None when there is nothing to send now."""
        return to_wire(self._outbound.pop(0)) if self._outbound else None


def _peer_error(frame: Error) -> PairingError:
    try:
        return PairingError(PairingReason(frame.reason), frame.detail)
    except ValueError:
        # A protocol failure the peer saw (malformed_frame, protocol_mismatch, ...): this side just stops.
        return PairingError(PairingReason.ABORTED, f"the peer ended the run: {frame.reason}: {frame.detail}")


class InviterSession(_Side):
    """The inviting device's side of one pairing run; make one per incoming connection, all sharing one guard."""

    def __init__(
        self,
        guard: InviteGuard,
        identity: DeviceIdentity,
        group_key: GroupKey,
        enrolment_for: Callable[[str, bytes, str], bytes],
        now_s: float,
        addresses: Sequence[str] = (),
        run_ttl_s: float = RUN_TTL_S,
    ) -> None:
        if len(addresses) > ADDRESSES_MAX or any(type(a) is not str or len(a) > ADDRESS_CHARS_MAX for a in addresses):
            raise LocalProtocolError(f"at most {ADDRESSES_MAX} addresses of at most {ADDRESS_CHARS_MAX} characters")
        super().__init__(PairingState.EXPECT_START, now_s, run_ttl_s)
        self.guard = guard
        self._identity = identity
        self._group_key = group_key
        self._enrolment_for = enrolment_for
        self._addresses = list(addresses)
        self._keys: _RunKeys | None = None
        self._version = PROTOCOL_VERSION  # the joiner's, once it has said
        self._welcome_sealed = b""
        self._outcome: InviterPaired | None = None  # known once WELCOME is sent, reported once DONE confirms it

    def _handle(self, frame: Frame, now_s: float) -> list[Event]:
        match self.state, frame:
            case PairingState.EXPECT_START, PakeStart():
                self._on_start(frame, now_s)
                return []
            case PairingState.EXPECT_HELLO, JoinerHello():
                self._on_hello(frame, now_s)
                return []
            case PairingState.EXPECT_DONE, Done():
                return [self._on_done(frame)]
        raise self._unexpected(frame)

    def _on_start(self, start: PakeStart, now_s: float) -> None:
        if start.version not in PROTOCOL_VERSIONS:
            raise RemoteProtocolError(
                EndReason.PROTOCOL_MISMATCH,
                f"peer speaks pairing protocol {start.version}, this node speaks {PROTOCOL_VERSIONS}",
            )
        self._version = start.version
        invite = self.guard.invite
        if start.invite_id != invite.invite_id:
            try:
                self.guard.check(now_s)
            except PairingError:  # the last invite is closed: there is none this code could be for
                raise PairingError(PairingReason.UNKNOWN_INVITE, NO_INVITE_OPEN) from None
            raise PairingError(PairingReason.UNKNOWN_INVITE, "this code is not for the invite this device shows")
        # Refuse before spending SPAKE2 work on a run the invite would not allow.
        self.guard.check(now_s)
        spake = SPAKE2_B(invite.code.encode(), *_spake_ids(invite.invite_id))
        reply_msg = spake.start()
        pake_key = _finish(spake, start.spake_msg)
        # The reply lets the peer test one guess whether or not it answers, so it is counted now.
        self.guard.admit(now_s)
        self._keys = _RunKeys(pake_key, transcript_hash(invite.invite_id, start.spake_msg, reply_msg))
        attempts_left = self.guard.attempts_left if self._version >= 2 else None
        self._outbound.append(PakeReply(reply_msg, self._keys.mac(b"confirm-inviter"), attempts_left))
        self.state = PairingState.EXPECT_HELLO

    def _on_hello(self, hello: JoinerHello, now_s: float) -> None:
        keys = self._run_keys()
        if not hmac.compare_digest(hello.confirm, keys.mac(b"confirm-joiner")):
            raise PairingError(PairingReason.WRONG_CODE, _WRONG_CODE_DETAIL)
        card = _open(keys.box(b"seal-joiner"), hello.sealed, "JOINER_HELLO")
        device_id, verify_key, signature, name = _read_card(card, keys)
        self.guard.consume(now_s)
        record = self._enrolment_for(device_id, verify_key, name)
        if type(record) is not bytes or len(record) > ENROLMENT_RECORD_BYTES_MAX:
            raise LocalProtocolError(f"an enrolment record is bytes of at most {ENROLMENT_RECORD_BYTES_MAX}")
        content = [
            self._group_key.secret,
            self._group_key.epoch,
            self._identity.device_id,
            self._identity.verify_key_bytes,
            self._addresses,
            record,
        ]
        self._welcome_sealed = bytes(keys.box(b"seal-inviter").encrypt(msgpack.packb(content, use_bin_type=True)))
        self._outcome = InviterPaired(device_id, verify_key, signature, keys.transcript, record, name)
        self._outbound.append(Welcome(self._welcome_sealed))
        self.state = PairingState.EXPECT_DONE

    def _on_done(self, done: Done) -> InviterPaired:
        outcome = self._outcome
        assert outcome is not None  # set with the WELCOME, before EXPECT_DONE
        if not hmac.compare_digest(done.confirm, self._run_keys().mac(b"done", self._welcome_sealed)):
            raise RemoteProtocolError(EndReason.MALFORMED_FRAME, "DONE does not confirm the WELCOME sent")
        self.state = PairingState.PAIRED
        return outcome

    def _run_keys(self) -> _RunKeys:
        assert self._keys is not None  # derived on PAKE_START, before any later state
        return self._keys


class JoinerSession(_Side):
    """The joining device's side of one pairing run; its first frame is ready from `generate` at once."""

    def __init__(
        self, code: str, identity: DeviceIdentity, now_s: float, run_ttl_s: float = RUN_TTL_S, name: str = UNNAMED_DEVICE
    ) -> None:
        super().__init__(PairingState.EXPECT_REPLY, now_s, run_ttl_s)
        self._name = check_device_name(name)
        canonical = parse_code(code)
        self._invite_id = canonical[:INVITE_ID_CHARS]
        self._identity = identity
        self._spake = SPAKE2_A(canonical.encode(), *_spake_ids(self._invite_id))
        self._start_msg = self._spake.start()
        self._keys: _RunKeys | None = None
        self._outbound.append(PakeStart(PROTOCOL_VERSION, self._invite_id, self._start_msg))

    def _handle(self, frame: Frame, now_s: float) -> list[Event]:
        match self.state, frame:
            case PairingState.EXPECT_REPLY, PakeReply():
                self._on_reply(frame)
                return []
            case PairingState.EXPECT_WELCOME, Welcome():
                return [self._on_welcome(frame)]
        raise self._unexpected(frame)

    def _on_reply(self, reply: PakeReply) -> None:
        pake_key = _finish(self._spake, reply.spake_msg)
        keys = _RunKeys(pake_key, transcript_hash(self._invite_id, self._start_msg, reply.spake_msg))
        if not hmac.compare_digest(reply.confirm, keys.mac(b"confirm-inviter")):
            left = "" if reply.attempts_left is None else f"; {attempts_left_text(reply.attempts_left)}"
            raise PairingError(PairingReason.WRONG_CODE, _WRONG_CODE_DETAIL + left)
        identity = self._identity
        device_id, verify_key = identity.device_id, identity.verify_key_bytes
        signature = identity.sign(joiner_statement(keys.transcript, device_id, verify_key))
        card = msgpack.packb([device_id, verify_key, signature, self._name], use_bin_type=True)
        self._keys = keys
        sealed = bytes(keys.box(b"seal-joiner").encrypt(card))
        self._outbound.append(JoinerHello(keys.mac(b"confirm-joiner"), sealed))
        self.state = PairingState.EXPECT_WELCOME

    def _on_welcome(self, welcome: Welcome) -> JoinerPaired:
        keys = self._keys
        assert keys is not None  # derived on PAKE_REPLY, before EXPECT_WELCOME
        paired = _read_welcome(_open(keys.box(b"seal-inviter"), welcome.sealed, "WELCOME"))
        self._outbound.append(Done(keys.mac(b"done", welcome.sealed)))
        self.state = PairingState.PAIRED
        return paired
