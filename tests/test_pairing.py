"""Pairing (`/aico/pair/1`): a right code hands over the group key, anything else fails without leaking it."""

import math
import os
from collections.abc import Callable

import attrs
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framing import LocalProtocolError, RemoteProtocolError
from node.errors import EndReason
from node.trust.identity import DeviceIdentity, GroupKey, verify
from node.trust.pairing import (
    CODE_ALPHABET,
    CODE_CHARS,
    FRAME_BYTES_MAX,
    INVITE_ID_CHARS,
    FrameType,
    Invite,
    InviteGuard,
    InviterPaired,
    InviterSession,
    JoinerHello,
    JoinerPaired,
    JoinerSession,
    PairingError,
    PairingReason,
    PairingState,
    PakeStart,
    Welcome,
    device_id_of,
    display_code,
    joiner_statement,
    new_invite,
    parse_code,
    to_wire,
)

INVITER = DeviceIdentity(seed=os.urandom(32))
JOINER = DeviceIdentity(seed=os.urandom(32))
GROUP = GroupKey(os.urandom(32), 3)
ADDRESSES = ("/ip4/192.0.2.7/tcp/4001", "/dns4/relay.example/tcp/443/wss")
ENDED = (PairingState.PAIRED, PairingState.FAILED)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def enrolment_for(device_id: str, verify_key: bytes) -> bytes:
    """What the node layer would return: a registry record signed by the inviter."""
    record = msgpack.packb(["enrol", device_id, verify_key])
    return record + INVITER.sign(record)


def make_inviter(
    guard: InviteGuard, now_s: float = 0.0, calls: list[tuple[str, bytes]] | None = None
) -> InviterSession:
    def enrol(device_id: str, verify_key: bytes, name: str) -> bytes:
        if calls is not None:
            calls.append((device_id, verify_key))
        return enrolment_for(device_id, verify_key)

    return InviterSession(guard, INVITER, GROUP, enrol, now_s, ADDRESSES)


def wrong(code: str) -> str:
    """The same invite id with one secret character changed."""
    changed = "0" if code[INVITE_ID_CHARS] != "0" else "1"
    return code[:INVITE_ID_CHARS] + changed + code[INVITE_ID_CHARS + 1 :]


def next_frame(session: InviterSession | JoinerSession) -> bytes:
    """The frame `session` has to send, which the test expects there to be."""
    data = session.generate()
    assert data is not None
    return data


def frame_type(data: bytes) -> int:
    return msgpack.unpackb(data[4:])[0]


def flip_last_byte(data: bytes) -> bytes:
    return flip_byte(data, -1)


def flip_byte(data: bytes, index: int) -> bytes:
    flipped = bytearray(data)
    flipped[index] ^= 0x01
    return bytes(flipped)


@attrs.define
class Side:
    """What one side sent, the events it raised, and the error that ended it, if any."""

    sent: list[bytes] = attrs.Factory(list)
    events: list = attrs.Factory(list)
    error: PairingError | RemoteProtocolError | None = None


def converse(
    inviter: InviterSession,
    joiner: JoinerSession,
    now_s: float = 1.0,
    tamper: Callable[[int, bytes], bytes] = lambda _index, data: data,
) -> tuple[Side, Side]:
    """Pump frames both ways until both sessions are quiet; `tamper` may alter the n-th frame in flight."""
    inviter_side, joiner_side = Side(), Side()
    index = 0
    for _ in range(10):
        moved = False
        for sender, receiver, out, into in (
            (joiner, inviter, joiner_side, inviter_side),
            (inviter, joiner, inviter_side, joiner_side),
        ):
            while (data := sender.generate()) is not None:
                moved = True
                out.sent.append(data)
                data, index = tamper(index, data), index + 1
                if receiver.state in ENDED:
                    continue  # a receiver that has stopped reads nothing more, like a closed stream
                try:
                    into.events += receiver.receive_data(data, now_s)
                except (PairingError, RemoteProtocolError) as error:
                    into.error = error
        if not moved:
            return inviter_side, joiner_side
    raise AssertionError("sessions never went quiet")


def reason(side: Side) -> str:
    assert side.error is not None
    return side.error.reason


# -- success ---------------------------------------------------------------------------------------


def test_right_code_pairs_and_hands_over_the_group_key() -> None:
    invite = new_invite(now_s=0.0)
    guard = InviteGuard(invite)
    calls: list[tuple[str, bytes]] = []
    inviter = make_inviter(guard, calls=calls)
    joiner = JoinerSession(display_code(invite.code), JOINER, now_s=0.0)
    inviter_side, joiner_side = converse(inviter, joiner)

    assert inviter.state is joiner.state is PairingState.PAIRED
    assert inviter_side.error is None and joiner_side.error is None
    [joined] = joiner_side.events
    assert isinstance(joined, JoinerPaired)
    assert joined.group_key == GROUP and joined.group_key.secret == GROUP.secret
    assert joined.enrolment_record == enrolment_for(JOINER.device_id, JOINER.verify_key_bytes)
    assert joined.inviter_addresses == ADDRESSES
    assert (joined.peer_device_id, joined.peer_verify_key) == (INVITER.device_id, INVITER.verify_key_bytes)

    [welcomed] = inviter_side.events
    assert isinstance(welcomed, InviterPaired)
    assert calls == [(JOINER.device_id, JOINER.verify_key_bytes)]
    assert (welcomed.peer_device_id, welcomed.peer_verify_key) == (JOINER.device_id, JOINER.verify_key_bytes)
    assert welcomed.enrolment_record == joined.enrolment_record
    statement = joiner_statement(welcomed.transcript, JOINER.device_id, JOINER.verify_key_bytes)
    assert verify(JOINER.verify_key_bytes, statement, welcomed.signature)
    assert not verify(INVITER.verify_key_bytes, statement, welcomed.signature)

    assert guard.used and guard.attempts == 1 and guard.attempts_left == 0
    assert [frame_type(f) for f in joiner_side.sent] == [FrameType.PAKE_START, FrameType.JOINER_HELLO, FrameType.DONE]
    assert [frame_type(f) for f in inviter_side.sent] == [FrameType.PAKE_REPLY, FrameType.WELCOME]
    # Only the invite id travels in clear; the secret part of the code never goes on the wire.
    secret_part = invite.code[INVITE_ID_CHARS:].encode()
    assert not any(secret_part in frame for frame in inviter_side.sent + joiner_side.sent)
    assert not any(GROUP.secret in frame for frame in inviter_side.sent)


def test_bytes_may_arrive_one_at_a_time() -> None:
    invite = new_invite(now_s=0.0)
    inviter, joiner = make_inviter(InviteGuard(invite)), JoinerSession(invite.code, JOINER, now_s=0.0)
    events: list = []
    for _ in range(3):
        for sender, receiver in ((joiner, inviter), (inviter, joiner)):
            while (data := sender.generate()) is not None:
                for i in range(len(data)):
                    events += receiver.receive_data(data[i : i + 1], 1.0)
    assert {type(e) for e in events} == {InviterPaired, JoinerPaired}
    assert inviter.state is joiner.state is PairingState.PAIRED


def test_device_id_of_matches_the_identity() -> None:
    assert device_id_of(JOINER.verify_key_bytes) == JOINER.device_id
    assert device_id_of(INVITER.verify_key_bytes) == INVITER.device_id


# -- wrong codes, attempts, expiry -----------------------------------------------------------------


def test_wrong_code_fails_on_both_sides_and_no_welcome_is_sent() -> None:
    invite = new_invite(now_s=0.0)
    guard = InviteGuard(invite)
    calls: list[tuple[str, bytes]] = []
    inviter = make_inviter(guard, calls=calls)
    inviter_side, joiner_side = converse(inviter, JoinerSession(wrong(invite.code), JOINER, now_s=0.0))

    assert reason(joiner_side) == reason(inviter_side) == PairingReason.WRONG_CODE
    assert isinstance(joiner_side.error, PairingError) and isinstance(inviter_side.error, PairingError)
    assert inviter_side.events == joiner_side.events == []
    # The inviter said nothing but its PAKE reply: no ciphertext a wrong-code key could open, and no enrolment.
    assert [frame_type(f) for f in inviter_side.sent] == [FrameType.PAKE_REPLY]
    assert [frame_type(f) for f in joiner_side.sent] == [FrameType.PAKE_START, FrameType.ERROR]
    assert not any(GROUP.secret in frame for frame in inviter_side.sent)
    assert calls == [] and guard.attempts == 1 and not guard.used


def test_a_joiner_that_ignores_the_confirmation_still_gets_no_welcome() -> None:
    invite = new_invite(now_s=0.0)
    guard = InviteGuard(invite)
    inviter = make_inviter(guard)
    reckless = JoinerSession(wrong(invite.code), JOINER, now_s=0.0)
    inviter.receive_data(next_frame(reckless), 1.0)
    assert frame_type(next_frame(inviter)) == FrameType.PAKE_REPLY
    # Without the code a joiner cannot compute the inviter's expected confirmation; it can only guess one.
    forged = JoinerHello(os.urandom(32), os.urandom(200))
    with pytest.raises(PairingError) as raised:
        inviter.receive_data(to_wire(forged), 1.0)
    assert raised.value.reason == PairingReason.WRONG_CODE
    assert frame_type(next_frame(inviter)) == FrameType.ERROR and inviter.generate() is None
    assert guard.attempts == 1 and not guard.used


def test_attempts_are_limited_across_sessions_and_then_the_right_code_is_refused() -> None:
    invite = new_invite(now_s=0.0, attempts_max=3)
    guard = InviteGuard(invite)
    for attempt in range(1, 4):
        inviter_side, _ = converse(make_inviter(guard), JoinerSession(wrong(invite.code), JOINER, now_s=0.0))
        assert reason(inviter_side) == PairingReason.WRONG_CODE and guard.attempts == attempt
    assert guard.attempts_left == 0

    inviter = make_inviter(guard)
    inviter_side, joiner_side = converse(inviter, JoinerSession(invite.code, JOINER, now_s=0.0))
    assert reason(inviter_side) == reason(joiner_side) == PairingReason.TOO_MANY_ATTEMPTS
    assert [frame_type(f) for f in inviter_side.sent] == [FrameType.ERROR]  # not even a PAKE reply
    assert guard.attempts == 3 and not guard.used


def test_the_right_code_works_on_the_last_attempt() -> None:
    invite = new_invite(now_s=0.0, attempts_max=3)
    guard = InviteGuard(invite)
    for _ in range(2):
        converse(make_inviter(guard), JoinerSession(wrong(invite.code), JOINER, now_s=0.0))
    inviter = make_inviter(guard)
    converse(inviter, JoinerSession(invite.code, JOINER, now_s=0.0))
    assert inviter.state is PairingState.PAIRED and guard.attempts == 3


def test_an_abandoned_run_still_counts_as_an_attempt() -> None:
    invite = new_invite(now_s=0.0, attempts_max=1)
    guard = InviteGuard(invite)
    # The peer may check its guess against the reply and walk away; that guess is spent.
    make_inviter(guard).receive_data(next_frame(JoinerSession(wrong(invite.code), JOINER, now_s=0.0)), 1.0)
    inviter_side, _ = converse(make_inviter(guard), JoinerSession(invite.code, JOINER, now_s=0.0))
    assert reason(inviter_side) == PairingReason.TOO_MANY_ATTEMPTS


def test_an_expired_invite_is_refused() -> None:
    invite = new_invite(now_s=0.0, ttl_s=60)
    guard = InviteGuard(invite)
    inviter = make_inviter(guard, now_s=59.0)
    inviter_side, joiner_side = converse(inviter, JoinerSession(invite.code, JOINER, now_s=59.0), now_s=60.0)
    assert reason(inviter_side) == reason(joiner_side) == PairingReason.EXPIRED
    assert [frame_type(f) for f in inviter_side.sent] == [FrameType.ERROR] and guard.attempts == 0
    # The refusal comes before any SPAKE2 work, so even a START carrying no valid point is told "expired".
    with pytest.raises(PairingError) as raised:
        make_inviter(guard).receive_data(to_wire(PakeStart(1, invite.invite_id, bytes(33))), 61.0)
    assert raised.value.reason == PairingReason.EXPIRED


def test_an_invite_expiring_mid_run_sends_no_welcome() -> None:
    invite = new_invite(now_s=0.0, ttl_s=60)
    guard = InviteGuard(invite)
    inviter, joiner = make_inviter(guard, now_s=50.0), JoinerSession(invite.code, JOINER, now_s=50.0)
    inviter.receive_data(next_frame(joiner), 59.0)
    joiner.receive_data(next_frame(inviter), 59.5)
    with pytest.raises(PairingError) as raised:
        inviter.receive_data(next_frame(joiner), 60.5)
    assert raised.value.reason == PairingReason.EXPIRED
    assert frame_type(next_frame(inviter)) == FrameType.ERROR and inviter.generate() is None and not guard.used


def test_an_invite_pairs_only_once() -> None:
    invite = new_invite(now_s=0.0)
    guard = InviteGuard(invite)
    converse(make_inviter(guard), JoinerSession(invite.code, JOINER, now_s=0.0))
    other = DeviceIdentity(seed=os.urandom(32))
    inviter_side, joiner_side = converse(make_inviter(guard), JoinerSession(invite.code, other, now_s=0.0))
    assert reason(inviter_side) == reason(joiner_side) == PairingReason.INVITE_USED


def test_a_code_for_another_invite_is_refused_without_spending_an_attempt() -> None:
    invite = new_invite(now_s=0.0)
    guard = InviteGuard(invite)
    other_id = "00" if invite.invite_id != "00" else "11"
    inviter_side, joiner_side = converse(
        make_inviter(guard), JoinerSession(other_id + invite.code[INVITE_ID_CHARS:], JOINER, now_s=0.0)
    )
    assert reason(inviter_side) == reason(joiner_side) == PairingReason.UNKNOWN_INVITE
    assert guard.attempts == 0


def test_a_run_that_takes_too_long_times_out() -> None:
    invite = new_invite(now_s=0.0)
    joiner = JoinerSession(invite.code, JOINER, now_s=0.0)
    inviter = make_inviter(InviteGuard(invite))
    inviter.receive_data(next_frame(joiner), 1.0)
    with pytest.raises(PairingError) as raised:
        joiner.receive_data(next_frame(inviter), 500.0)
    assert raised.value.reason == PairingReason.TIMED_OUT


# -- tampering and malformed input -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, {PairingReason.WRONG_CODE, EndReason.MALFORMED_FRAME}),  # START: another SPAKE2 point, or none
        (1, {PairingReason.WRONG_CODE}),  # REPLY: its confirmation MAC
        (2, {EndReason.UNSEAL_FAILED}),  # HELLO: its sealed device key
        (3, {EndReason.UNSEAL_FAILED}),  # WELCOME: its sealed group key
        (4, {EndReason.MALFORMED_FRAME}),  # DONE: its confirmation MAC
    ],
)
def test_a_tampered_frame_at_each_step_is_refused(step: int, expected: set) -> None:
    invite = new_invite(now_s=0.0)
    guard = InviteGuard(invite)
    inviter, joiner = make_inviter(guard), JoinerSession(invite.code, JOINER, now_s=0.0)
    # A REPLY ends in the attempts left, a hint the joiner only shows; its confirmation MAC comes just before.
    last_signed_byte = -2 if step == 1 else -1
    inviter_side, joiner_side = converse(
        inviter, joiner, tamper=lambda index, data: flip_byte(data, last_signed_byte) if index == step else data
    )
    reasons = {side.error.reason for side in (inviter_side, joiner_side) if side.error is not None}
    # The side that detects the tampering names it; the other side only learns the run was aborted.
    assert reasons - {PairingReason.ABORTED} and reasons <= expected | {PairingReason.ABORTED}
    # Whoever received the tampered frame did not pair on it.
    receiver = inviter if step % 2 == 0 else joiner
    assert receiver.state is PairingState.FAILED
    if step < 3:
        assert inviter_side.events == joiner_side.events == []
        assert FrameType.WELCOME not in [frame_type(f) for f in inviter_side.sent] and not guard.used


def test_an_oversized_frame_is_refused_from_its_length_prefix() -> None:
    inviter = make_inviter(InviteGuard(new_invite(now_s=0.0)))
    with pytest.raises(RemoteProtocolError) as raised:
        inviter.receive_data((FRAME_BYTES_MAX + 1).to_bytes(4, "big"), 1.0)
    assert raised.value.reason == EndReason.FRAME_TOO_LARGE
    assert msgpack.unpackb(next_frame(inviter)[4:]) == [FrameType.ERROR, "frame_too_large", raised.value.detail]


def test_a_frame_out_of_order_is_refused() -> None:
    invite = new_invite(now_s=0.0)
    joiner = JoinerSession(invite.code, JOINER, now_s=0.0)
    with pytest.raises(RemoteProtocolError) as raised:
        joiner.receive_data(next_frame(joiner), 1.0)  # its own START reflected back
    assert raised.value.reason == EndReason.UNEXPECTED_FRAME


def test_another_protocol_version_is_refused() -> None:
    invite = new_invite(now_s=0.0)
    genuine = msgpack.unpackb(next_frame(JoinerSession(invite.code, JOINER, now_s=0.0))[4:])
    start = PakeStart(3, *genuine[2:])
    with pytest.raises(RemoteProtocolError) as raised:
        make_inviter(InviteGuard(invite)).receive_data(to_wire(start), 1.0)
    assert raised.value.reason == EndReason.PROTOCOL_MISMATCH


def test_misuse_is_a_local_protocol_error() -> None:
    invite = new_invite(now_s=0.0)
    joiner = JoinerSession(invite.code, JOINER, now_s=0.0)
    inviter = make_inviter(InviteGuard(invite))
    converse(inviter, joiner)
    with pytest.raises(LocalProtocolError):
        joiner.receive_data(b"", 2.0)  # the run is over
    with pytest.raises(LocalProtocolError):
        new_invite(now_s=0.0, ttl_s=0)
    with pytest.raises(LocalProtocolError):
        new_invite(now_s=0.0, attempts_max=11)
    with pytest.raises(LocalProtocolError):
        Invite("abcde-fghjk", expires_at_s=1.0)  # not canonical
    with pytest.raises(LocalProtocolError):
        InviterSession(InviteGuard(invite), INVITER, GROUP, enrolment_for, 0.0, ["x"] * 33)


# -- codes -----------------------------------------------------------------------------------------


def test_codes_are_normalised() -> None:
    code = "7K3QXM2V9T"
    assert display_code(code) == "7K3QX-M2V9T"
    for typed in ["7K3QX-M2V9T", "7k3qx-m2v9t", " 7k3qx m2v9t\n", "7K3-QX-M2V-9T", "7K3QX\u2013M2V9T"]:
        assert parse_code(typed) == code
    full_width = "".join(chr(ord(c) + 0xFEE0) for c in "7K3QX-M2V9T")  # as some phone keyboards type
    assert parse_code(full_width) == code
    assert parse_code("oil00-11111") == "0110011111"  # O reads as 0, I and L as 1
    invite = new_invite(now_s=0.0)
    assert parse_code(display_code(invite.code).lower()) == invite.code


@pytest.mark.parametrize("typed", ["7K3QX-M2V9", "7K3QX-M2V9TT", "7K3QX-M2V9U", "7K3QX-M2V9!", "", "7" * 65])
def test_malformed_codes_are_refused_clearly(typed: str) -> None:
    with pytest.raises(PairingError) as raised:
        parse_code(typed)
    assert raised.value.reason == PairingReason.MALFORMED_CODE and raised.value.detail
    with pytest.raises(PairingError):
        JoinerSession(typed, JOINER, now_s=0.0)


def test_the_secret_part_of_a_code_has_at_least_40_bits() -> None:
    assert len(set(CODE_ALPHABET)) == len(CODE_ALPHABET) == 32
    assert not set("ILOU") & set(CODE_ALPHABET)
    secret_bits = (CODE_CHARS - INVITE_ID_CHARS) * math.log2(len(CODE_ALPHABET))
    assert secret_bits >= 40
    codes = {new_invite(now_s=0.0).code for _ in range(200)}
    assert len(codes) == 200 and all(len(c) == CODE_CHARS and set(c) <= set(CODE_ALPHABET) for c in codes)
    # Every symbol turns up: the generator draws from the whole alphabet.
    assert set("".join(codes)) == set(CODE_ALPHABET)


def test_secrets_stay_out_of_reprs() -> None:
    invite = new_invite(now_s=0.0)
    assert invite.code not in repr(invite) and invite.code not in str(invite)
    _, joiner_side = converse(make_inviter(InviteGuard(invite)), JoinerSession(invite.code, JOINER, now_s=0.0))
    [joined] = joiner_side.events
    assert repr(GROUP.secret) not in repr(joined) and GROUP.secret.hex() not in repr(joined)


# -- fuzzing ---------------------------------------------------------------------------------------


FUZZ_INVITE = new_invite(now_s=0.0)


def recorded_frames() -> list[bytes]:
    inviter, joiner = make_inviter(InviteGuard(FUZZ_INVITE)), JoinerSession(FUZZ_INVITE.code, JOINER, 0.0)
    inviter_side, joiner_side = converse(inviter, joiner)
    return joiner_side.sent + inviter_side.sent


# One invite for the recording and the fuzzed inviters, so mutated STARTs reach the SPAKE2 code.
RECORDED = recorded_frames()


@st.composite
def mutated_frame(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.sampled_from(RECORDED)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(frame) - 1))
        match draw(st.sampled_from(["flip", "cut", "insert"])):
            case "flip":
                frame[position] ^= 1 << draw(st.integers(0, 7))
            case "cut":
                del frame[position:]
                if not frame:
                    break
            case "insert":
                frame[position:position] = draw(st.binary(min_size=1, max_size=8))
    return bytes(frame)


msgpack_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=8),
    max_leaves=12,
)


def framed(body: list) -> bytes:
    encoded = msgpack.packb(body)
    return len(encoded).to_bytes(4, "big") + encoded


structured_frame = st.lists(msgpack_value, max_size=8).map(framed)
any_frame = st.one_of(st.binary(max_size=200), mutated_frame(), structured_frame, st.sampled_from(RECORDED))


def feed(session: InviterSession | JoinerSession, chunks: list[bytes]) -> None:
    for chunk in chunks:
        if session.state in ENDED:
            return
        try:
            session.receive_data(chunk, 1.0)
        except (RemoteProtocolError, PairingError):
            assert session.state is PairingState.FAILED
            return


@FUZZ
@given(st.lists(any_frame, max_size=4))
def test_fuzzed_input_to_the_inviter_raises_only_protocol_or_pairing_errors(chunks: list[bytes]) -> None:
    feed(make_inviter(InviteGuard(FUZZ_INVITE)), chunks)


@FUZZ
@given(st.booleans(), st.lists(any_frame, max_size=4))
def test_fuzzed_input_to_the_joiner_raises_only_protocol_or_pairing_errors(replied: bool, chunks: list[bytes]) -> None:
    joiner = JoinerSession(FUZZ_INVITE.code, JOINER, now_s=0.0)
    if replied:  # reach the WELCOME decoder with a genuine reply first
        inviter = make_inviter(InviteGuard(FUZZ_INVITE))
        inviter.receive_data(next_frame(joiner), 1.0)
        joiner.receive_data(next_frame(inviter), 1.0)
    feed(joiner, chunks)


def forge(body_for: Callable[[bytes], object]) -> tuple[InviterSession, bytes, JoinerSession, bytes]:
    """A live run's inviter and joiner, each with a frame sealing `body_for(transcript)` under that run's key."""
    invite = new_invite(now_s=0.0)
    inviter, joiner = make_inviter(InviteGuard(invite)), JoinerSession(invite.code, JOINER, now_s=0.0)
    inviter.receive_data(next_frame(joiner), 1.0)
    joiner.receive_data(next_frame(inviter), 1.0)
    confirm = msgpack.unpackb(next_frame(joiner)[4:])[1]
    # The sealed bodies are reachable only under the run key, so the test borrows the sessions' keys.
    inviter_keys, joiner_keys = inviter._keys, joiner._keys
    assert inviter_keys is not None and joiner_keys is not None
    plain = msgpack.packb(body_for(joiner_keys.transcript))
    hello = JoinerHello(confirm, bytes(joiner_keys.box(b"seal-joiner").encrypt(plain)))
    welcome = Welcome(bytes(inviter_keys.box(b"seal-inviter").encrypt(plain)))
    return inviter, to_wire(hello), joiner, to_wire(welcome)


def assert_malformed(session: InviterSession | JoinerSession, data: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as raised:
        session.receive_data(data, 1.0)
    assert raised.value.reason == EndReason.MALFORMED_FRAME


@FUZZ
@given(msgpack_value)
def test_fuzzed_sealed_bodies_raise_only_protocol_errors(body: object) -> None:
    inviter, hello, joiner, welcome = forge(lambda _transcript: body)
    assert_malformed(inviter, hello)
    assert_malformed(joiner, welcome)


GOOD_WELCOME = [GROUP.secret, GROUP.epoch, INVITER.device_id, INVITER.verify_key_bytes, list(ADDRESSES), b"record"]


def test_a_welcome_within_its_bounds_is_accepted() -> None:
    _, _, joiner, welcome = forge(lambda _transcript: GOOD_WELCOME)
    [joined] = joiner.receive_data(welcome, 1.0)
    assert isinstance(joined, JoinerPaired) and joined.group_key == GROUP


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (0, GROUP.secret[:31]),
        (1, -1),
        (1, True),
        (2, JOINER.device_id),  # not the id of the key beside it
        (3, JOINER.verify_key_bytes),
        (4, ["/ip4/192.0.2.7/tcp/4001"] * 33),
        (4, ["x" * 257]),
        (5, b"r" * (16 * 1024 + 1)),
    ],
)
def test_a_welcome_just_outside_its_bounds_is_refused(index: int, value: object) -> None:
    body = list(GOOD_WELCOME)
    body[index] = value
    _, _, joiner, welcome = forge(lambda _transcript: body)
    assert_malformed(joiner, welcome)


def card(device: DeviceIdentity, signer: DeviceIdentity, transcript: bytes) -> list:
    """A JOINER_HELLO body naming `device` with `signer`'s signature over the statement for `transcript`."""
    statement = joiner_statement(transcript, device.device_id, device.verify_key_bytes)
    return [device.device_id, device.verify_key_bytes, signer.sign(statement)]


def test_a_joiner_hello_signed_for_this_run_is_accepted() -> None:
    inviter, hello, _, _ = forge(lambda transcript: card(JOINER, JOINER, transcript))
    assert inviter.receive_data(hello, 1.0) == [] and frame_type(next_frame(inviter)) == FrameType.WELCOME


def test_a_joiner_hello_whose_key_did_not_sign_this_run_is_refused() -> None:
    other = DeviceIdentity(seed=os.urandom(32))
    for body_for in (
        lambda transcript: card(JOINER, other, transcript),  # someone else's signature
        lambda _transcript: card(JOINER, JOINER, os.urandom(32)),  # replayed from another run
        lambda transcript: [other.device_id, *card(JOINER, JOINER, transcript)[1:]],  # an id not of this key
    ):
        inviter, hello, _, _ = forge(body_for)
        assert_malformed(inviter, hello)


def test_invalid_spake2_messages_are_malformed_frames() -> None:
    invite = new_invite(now_s=0.0)
    genuine = msgpack.unpackb(next_frame(JoinerSession(invite.code, JOINER, now_s=0.0))[4:])[3]
    identity_point = (1).to_bytes(32, "little")
    candidates = [b"B" + genuine[1:], b"A" + identity_point] + [b"A" + os.urandom(32) for _ in range(16)]
    malformed = 0
    for spake_msg in candidates:
        inviter = make_inviter(InviteGuard(invite))
        try:
            inviter.receive_data(to_wire(PakeStart(1, invite.invite_id, spake_msg)), 1.0)
        except RemoteProtocolError as error:
            assert error.reason == EndReason.MALFORMED_FRAME
            malformed += 1
    # The first two always fail; about 15 in 16 random strings are not points of the right group.
    assert malformed >= 3


# -- protocol 2: the joiner's name, the attempts left ----------------------------------------------------------


def test_the_joiner_names_itself_and_the_inviter_records_the_name() -> None:
    invite = new_invite(now_s=0.0)
    names: list[str] = []

    def enrol(device_id: str, verify_key: bytes, name: str) -> bytes:
        names.append(name)
        return enrolment_for(device_id, verify_key)

    inviter = InviterSession(InviteGuard(invite), INVITER, GROUP, enrol, 0.0, ADDRESSES)
    inviter_side, _ = converse(inviter, JoinerSession(invite.code, JOINER, now_s=0.0, name="  Kim's laptop "))
    [welcomed] = inviter_side.events
    assert isinstance(welcomed, InviterPaired)
    assert welcomed.name == names[0] == "Kim's laptop"


@pytest.mark.parametrize("name", ["", "   ", "x" * 65, "tab\there", 7])
def test_a_name_that_cannot_name_a_device_is_refused_before_anything_is_sent(name: object) -> None:
    with pytest.raises(LocalProtocolError):
        JoinerSession(new_invite(now_s=0.0).code, JOINER, now_s=0.0, name=name)  # type: ignore[arg-type]


def test_a_wrong_code_says_how_many_attempts_the_invite_still_allows() -> None:
    invite = new_invite(now_s=0.0, attempts_max=3)
    _, joiner_side = converse(make_inviter(InviteGuard(invite)), JoinerSession(wrong(invite.code), JOINER, now_s=0.0))
    assert joiner_side.error is not None and joiner_side.error.reason == PairingReason.WRONG_CODE
    assert "2 more attempts" in joiner_side.error.detail


def test_a_protocol_1_joiner_still_pairs_unnamed_and_gets_a_protocol_1_reply() -> None:
    invite = new_invite(now_s=0.0)
    inviter = make_inviter(InviteGuard(invite))
    genuine = msgpack.unpackb(next_frame(JoinerSession(invite.code, JOINER, now_s=0.0))[4:])
    inviter.receive_data(to_wire(PakeStart(1, *genuine[2:])), 1.0)
    assert len(msgpack.unpackb(next_frame(inviter)[4:])) == 3  # [type, spake_msg, confirm]: no attempts left
