"""Sealing of sync batches and device messages: round trips, every refusal, fuzzing, overhead, and use in a session."""

import os

import nacl.public
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framing import LENGTH_PREFIX_BYTES, LocalProtocolError, RemoteProtocolError
from node.errors import EndReason, UnsealError
from node.sync.session import Plaintext, SessionConfig, SyncSession
from node.sync.wire import Deltas, from_wire
from node.trust.identity import DeviceIdentity, GroupKey
from node.trust.sealing import (
    BATCH_OVERHEAD_BYTES,
    DEVICE_OVERHEAD_BYTES,
    GroupSealer,
    UnsealReason,
    UnsealRefusedError,
    new_session_id,
    open_from_device,
    seal_for_device,
)
from tests.conftest import make_replica
from tests.test_session import converse

ALICE, BOB, CAROL = (DeviceIdentity(seed=os.urandom(32)) for _ in range(3))
GROUP_KEY = GroupKey(os.urandom(32), 1)
SECRET_TEXT = b"the quick brown fox keeps a very private diary"


def sealer(
    me: DeviceIdentity,
    peer: DeviceIdentity,
    *,
    inbound: bytes,
    outbound: bytes,
    group_key: GroupKey = GROUP_KEY,
    group_keys_by_epoch: dict[int, GroupKey] | None = None,
) -> GroupSealer:
    return GroupSealer(
        me,
        group_key,
        peer.device_id,
        peer.verify_key_bytes,
        inbound_session_id=inbound,
        outbound_session_id=outbound,
        group_keys_by_epoch=group_keys_by_epoch,
    )


def session_sealers(
    alice_key: GroupKey = GROUP_KEY,
    bob_key: GroupKey = GROUP_KEY,
    bob_keys: dict[int, GroupKey] | None = None,
    alice_inbound: bytes | None = None,
    bob_inbound: bytes | None = None,
) -> tuple[GroupSealer, GroupSealer]:
    """Alice's and Bob's sealers for one session; each side picks the id of the batches it receives."""
    alice_inbound = alice_inbound or new_session_id()
    bob_inbound = bob_inbound or new_session_id()
    alice = sealer(ALICE, BOB, inbound=alice_inbound, outbound=bob_inbound, group_key=alice_key)
    bob = sealer(
        BOB, ALICE, inbound=bob_inbound, outbound=alice_inbound, group_key=bob_key, group_keys_by_epoch=bob_keys
    )
    return alice, bob


def refusal(open_sealed, sealed: bytes) -> UnsealRefusedError:
    with pytest.raises(UnsealRefusedError) as raised:
        open_sealed(sealed)
    return raised.value


# -- group-sealed batches ------------------------------------------------------------------------------


def test_batches_round_trip_both_ways_in_order():
    alice, bob = session_sealers()
    bodies = [b"", SECRET_TEXT, os.urandom(70_000)]
    assert [bob.open(alice.seal(body)) for body in bodies] == bodies
    assert [alice.open(bob.seal(body)) for body in bodies] == bodies


def test_overhead_is_a_small_constant_per_batch():
    alice, _ = session_sealers()
    overheads = {len(alice.seal(bytes(size))) - size for size in (0, 1, 1000, 1 << 20)}
    # epoch 4 + nonce 24 + MAC 16 + three 4-byte hints + counter 8 + signature 64
    assert overheads == {BATCH_OVERHEAD_BYTES} and BATCH_OVERHEAD_BYTES <= 128


def test_sealed_bytes_show_no_plaintext_ids_or_session():
    bob_inbound = new_session_id()
    alice, _ = session_sealers(bob_inbound=bob_inbound)
    sealed = alice.seal(SECRET_TEXT * 3)
    for secret in (SECRET_TEXT[:8], b"quick brown", ALICE.device_id.encode(), BOB.device_id.encode()):
        assert secret not in sealed
    assert bob_inbound[:6] not in sealed


def test_every_tampered_byte_is_refused_and_the_genuine_batch_still_opens():
    alice, bob = session_sealers()
    sealed = alice.seal(SECRET_TEXT)
    for index in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[index] ^= 0x01
        expected = UnsealReason.BAD_EPOCH if index < 4 else UnsealReason.CANNOT_DECRYPT
        assert refusal(bob.open, bytes(tampered)).reason is expected, index
    assert bob.open(sealed) == SECRET_TEXT  # refusals left the receiver's counter alone


def test_truncated_or_extended_batches_are_refused():
    alice, bob = session_sealers()
    sealed = alice.seal(SECRET_TEXT)
    assert refusal(bob.open, sealed[: BATCH_OVERHEAD_BYTES - 1]).reason is UnsealReason.MALFORMED
    assert refusal(bob.open, sealed[:-1]).reason is UnsealReason.CANNOT_DECRYPT
    assert refusal(bob.open, sealed + b"\x00").reason is UnsealReason.CANNOT_DECRYPT


def test_a_batch_under_another_group_key_of_the_same_epoch_is_refused():
    alice, bob = session_sealers(alice_key=GroupKey(os.urandom(32), GROUP_KEY.epoch))
    assert refusal(bob.open, alice.seal(SECRET_TEXT)).reason is UnsealReason.CANNOT_DECRYPT


def test_a_batch_from_an_epoch_without_a_known_key_is_refused():
    alice, bob = session_sealers(alice_key=GroupKey(os.urandom(32), GROUP_KEY.epoch + 1))
    refused = refusal(bob.open, alice.seal(SECRET_TEXT))
    assert refused.reason is UnsealReason.BAD_EPOCH and "no key" in refused.detail


def test_a_genuine_batch_from_an_older_known_epoch_is_refused_after_authentication():
    old_key = GroupKey(os.urandom(32), GROUP_KEY.epoch - 1)
    alice, bob = session_sealers(alice_key=old_key, bob_keys={old_key.epoch: old_key})
    refused = refusal(bob.open, alice.seal(SECRET_TEXT))
    assert refused.reason is UnsealReason.BAD_EPOCH and ALICE.device_id in refused.detail


def test_an_epoch_prefix_rewritten_to_another_known_epoch_is_refused():
    old_key = GroupKey(os.urandom(32), GROUP_KEY.epoch - 1)
    alice, bob = session_sealers(bob_keys={old_key.epoch: old_key})
    sealed = alice.seal(SECRET_TEXT)
    rewritten = old_key.epoch.to_bytes(4, "big") + sealed[4:]
    assert refusal(bob.open, rewritten).reason is UnsealReason.CANNOT_DECRYPT
    assert bob.open(sealed) == SECRET_TEXT


def test_a_batch_from_another_group_member_is_refused():
    bob_inbound = new_session_id()
    _, bob = session_sealers(bob_inbound=bob_inbound)
    carol = sealer(CAROL, BOB, inbound=new_session_id(), outbound=bob_inbound)
    assert refusal(bob.open, carol.seal(SECRET_TEXT)).reason is UnsealReason.WRONG_SENDER


def test_a_batch_reflected_back_to_its_sender_is_refused():
    alice, _ = session_sealers()
    assert refusal(alice.open, alice.seal(SECRET_TEXT)).reason is UnsealReason.WRONG_SENDER


def test_a_batch_that_does_not_verify_with_the_expected_key_is_refused():
    alice_inbound, bob_inbound = new_session_id(), new_session_id()
    alice, _ = session_sealers(alice_inbound=alice_inbound, bob_inbound=bob_inbound)
    # Bob expects Alice's device id but holds Carol's key for it: Alice's real signature cannot verify.
    bob_misled = GroupSealer(
        BOB,
        GROUP_KEY,
        ALICE.device_id,
        CAROL.verify_key_bytes,
        inbound_session_id=bob_inbound,
        outbound_session_id=alice_inbound,
    )
    assert refusal(bob_misled.open, alice.seal(SECRET_TEXT)).reason is UnsealReason.BAD_SIGNATURE


def test_a_batch_addressed_to_another_device_is_refused():
    bob_inbound = new_session_id()
    _, bob = session_sealers(bob_inbound=bob_inbound)
    # Even with Bob's session id, a batch Alice addressed to Carol does not open at Bob.
    alice_to_carol = sealer(ALICE, CAROL, inbound=new_session_id(), outbound=bob_inbound)
    assert refusal(bob.open, alice_to_carol.seal(SECRET_TEXT)).reason is UnsealReason.WRONG_RECIPIENT


def test_a_batch_replayed_in_the_same_session_is_refused():
    alice, bob = session_sealers()
    sealed = alice.seal(SECRET_TEXT)
    assert bob.open(sealed) == SECRET_TEXT
    assert refusal(bob.open, sealed).reason is UnsealReason.REPLAYED


def test_counters_may_skip_but_never_go_back():
    alice, bob = session_sealers()
    first, second, third = (alice.seal(bytes([n])) for n in range(3))
    assert bob.open(first) == b"\x00" and bob.open(third) == b"\x02"  # a lost batch leaves a gap
    refused = refusal(bob.open, second)
    assert refused.reason is UnsealReason.REPLAYED and "counter 2" in refused.detail


def test_a_batch_replayed_into_a_new_session_is_refused():
    alice, bob = session_sealers()
    captured = alice.seal(SECRET_TEXT)
    assert bob.open(captured) == SECRET_TEXT
    new_alice, new_bob = session_sealers()
    assert refusal(new_bob.open, captured).reason is UnsealReason.WRONG_SESSION
    assert new_bob.open(new_alice.seal(SECRET_TEXT)) == SECRET_TEXT


@pytest.mark.parametrize(
    "change",
    [
        {"inbound_session_id": b"short"},
        {"peer_verify_key": bytes(31)},
        {"peer_device_id": ""},
        {"group_keys_by_epoch": {7: GroupKey(bytes(32), 8)}},
        {"group_keys_by_epoch": {GROUP_KEY.epoch: GroupKey(bytes(32), GROUP_KEY.epoch)}},
    ],
)
def test_a_misconfigured_sealer_is_refused_at_construction(change):
    arguments = {
        "identity": ALICE,
        "group_key": GROUP_KEY,
        "peer_device_id": BOB.device_id,
        "peer_verify_key": BOB.verify_key_bytes,
        "inbound_session_id": new_session_id(),
        "outbound_session_id": new_session_id(),
    }
    with pytest.raises(LocalProtocolError):
        GroupSealer(**(arguments | change))


MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=40), st.just(0)),
)


def mutate(sealed: bytes, mutation: tuple) -> bytes:
    kind, where, value = mutation
    if kind == "flip":
        index = where % len(sealed)
        return sealed[:index] + bytes([sealed[index] ^ value]) + sealed[index + 1 :]
    if kind == "truncate":
        return sealed[: where % len(sealed)]
    return sealed + where


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.binary(max_size=400))
def test_random_bytes_only_ever_raise_unseal_error(garbage):
    _, bob = session_sealers()
    with pytest.raises(UnsealError):
        bob.open(garbage)
    with pytest.raises(UnsealError):
        open_from_device(BOB, ALICE.verify_key_bytes, garbage)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200), mutation=MUTATIONS)
def test_mutated_sealed_bytes_only_ever_raise_unseal_error(body, mutation):
    alice, bob = session_sealers()
    with pytest.raises(UnsealError):
        bob.open(mutate(alice.seal(body), mutation))
    message = seal_for_device(ALICE, BOB.verify_key_bytes, body)
    with pytest.raises(UnsealError):
        open_from_device(BOB, ALICE.verify_key_bytes, mutate(message, mutation))


# -- messages sealed to one device ---------------------------------------------------------------------


def reseal(sealed: bytes, reader: DeviceIdentity, recipient: DeviceIdentity, change_body: bytes = b"") -> bytes:
    """What `reader` can do with a message it opened: seal its contents (maybe altered) to `recipient`."""
    reader_key = reader.signing_key.to_curve25519_private_key()
    inner = nacl.public.SealedBox(reader_key).decrypt(sealed) + change_body
    recipient_key = nacl.signing.VerifyKey(recipient.verify_key_bytes).to_curve25519_public_key()
    return nacl.public.SealedBox(recipient_key).encrypt(inner)


def test_a_device_message_round_trips_with_small_overhead_and_no_plaintext():
    sealed = seal_for_device(ALICE, BOB.verify_key_bytes, SECRET_TEXT)
    assert open_from_device(BOB, ALICE.verify_key_bytes, sealed) == SECRET_TEXT
    assert len(sealed) - len(SECRET_TEXT) == DEVICE_OVERHEAD_BYTES <= 120
    assert SECRET_TEXT[:8] not in sealed


def test_every_tampered_byte_of_a_device_message_is_refused():
    sealed = seal_for_device(ALICE, BOB.verify_key_bytes, SECRET_TEXT)
    for index in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[index] ^= 0x80
        refused = refusal(lambda data: open_from_device(BOB, ALICE.verify_key_bytes, data), bytes(tampered))
        assert refused.reason is UnsealReason.CANNOT_DECRYPT, index


def test_a_device_message_is_refused_from_the_wrong_sender_to_the_wrong_reader_or_forwarded():
    to_bob = seal_for_device(ALICE, BOB.verify_key_bytes, SECRET_TEXT)

    def opened_by(reader: DeviceIdentity, sender: DeviceIdentity, sealed: bytes) -> UnsealReason:
        return refusal(lambda data: open_from_device(reader, sender.verify_key_bytes, data), sealed).reason

    assert opened_by(BOB, CAROL, to_bob) is UnsealReason.WRONG_SENDER
    assert opened_by(CAROL, ALICE, to_bob) is UnsealReason.CANNOT_DECRYPT
    assert opened_by(CAROL, ALICE, reseal(to_bob, BOB, CAROL)) is UnsealReason.WRONG_RECIPIENT
    # Anyone can seal to Bob's public key, but not sign as Alice.
    assert opened_by(BOB, ALICE, reseal(to_bob, BOB, BOB, change_body=b"!")) is UnsealReason.BAD_SIGNATURE
    assert opened_by(BOB, ALICE, to_bob[: DEVICE_OVERHEAD_BYTES - 1]) is UnsealReason.MALFORMED


def test_sealing_to_something_that_is_not_a_public_key_is_refused():
    with pytest.raises(LocalProtocolError):
        seal_for_device(ALICE, bytes(32), SECRET_TEXT)
    with pytest.raises(LocalProtocolError):
        seal_for_device(ALICE, b"short", SECRET_TEXT)


# -- in a sync session ---------------------------------------------------------------------------------

SESSION_CONFIG = SessionConfig(epoch=GROUP_KEY.epoch, batch_ops_max=100)


def sealed_sessions(clock, ops_each: int) -> tuple[SyncSession, SyncSession]:
    alice_replica, bob_replica = make_replica(ALICE.device_id, clock), make_replica(BOB.device_id, clock)
    for i in range(ops_each):
        alice_replica.set_preference(f"k{i}", SECRET_TEXT.decode())
        bob_replica.add_message(f"m{i}", {"conversation": "c", "role": "user", "text": f"t{i}", "ts_ms": i})
    return sessions_over(alice_replica, bob_replica)


def sessions_over(alice_replica, bob_replica) -> tuple[SyncSession, SyncSession]:
    alice, bob = session_sealers()
    return SyncSession(alice_replica, SESSION_CONFIG, alice), SyncSession(bob_replica, SESSION_CONFIG, bob)


def test_sealed_sessions_converge(clock):
    sa, sb = sealed_sessions(clock, 300)
    converse(sa, sb)
    assert sa.replica.digest() == sb.replica.digest() and sa.replica.vector == sb.replica.vector


def test_a_sealed_session_sends_only_the_sealing_overhead_more_per_batch(clock):
    alice_replica = sealed_sessions(clock, 300)[0].replica

    def deltas_to_an_empty_peer(sealer) -> list[Deltas]:
        session = SyncSession(alice_replica, SESSION_CONFIG, sealer)
        session.receive_data(SyncSession(make_replica(BOB.device_id, clock), SESSION_CONFIG).generate())
        frames = (from_wire(data[LENGTH_PREFIX_BYTES:], 1 << 24) for data in iter(session.generate, None))
        return [frame for frame in frames if isinstance(frame, Deltas)]

    sealed, bare = deltas_to_an_empty_peer(session_sealers()[0]), deltas_to_an_empty_peer(Plaintext())
    assert len(sealed) == len(bare) == 3  # 100 ops each
    assert [len(s.sealed) - len(b.sealed) for s, b in zip(sealed, bare)] == [BATCH_OVERHEAD_BYTES] * 3
    assert all(SECRET_TEXT not in batch.sealed for batch in sealed)


def test_a_tampered_deltas_frame_ends_the_session_and_changes_nothing(clock):
    sa, sb = sealed_sessions(clock, 5)
    sb.receive_data(sa.generate())
    sa.receive_data(sb.generate())
    deltas = sb.generate()
    tampered = deltas[:-1] + bytes([deltas[-1] ^ 0x01])  # the last byte lies in the sealed batch
    digest = sa.replica.digest()
    with pytest.raises(RemoteProtocolError) as raised:
        sa.receive_data(tampered)
    assert raised.value.reason is EndReason.UNSEAL_FAILED and raised.value.detail.startswith("cannot decrypt")
    assert sa.replica.digest() == digest
    assert b"unseal_failed" in sa.generate()


@pytest.mark.parametrize("into_new_session, reason", [(False, "replayed"), (True, "wrong session")])
def test_a_replayed_deltas_frame_ends_the_session(clock, into_new_session, reason):
    sa, sb = sealed_sessions(clock, 5)
    sb.receive_data(sa.generate())
    sa.receive_data(sb.generate())
    captured = sb.generate()
    sa.receive_data(captured)
    if into_new_session:
        sa, sb = sessions_over(sa.replica, sb.replica)
        sa.receive_data(sb.generate())
    with pytest.raises(RemoteProtocolError) as raised:
        sa.receive_data(captured)
    assert raised.value.reason is EndReason.UNSEAL_FAILED and raised.value.detail.startswith(reason)


def test_mailbox_batches_open_only_for_the_group_the_mailbox_and_a_trusted_sender():
    from node.trust.identity import create_group_key
    from node.trust.sealing import open_from_mailbox, seal_for_mailbox

    sender, stranger = ALICE, CAROL
    group_key, other_key = create_group_key(), create_group_key()
    trusted = {sender.device_id: sender.verify_key_bytes}.get
    sealed = seal_for_mailbox(sender, group_key, b"box-1", b"ops")
    assert open_from_mailbox(group_key, b"box-1", sealed, trusted) == (sender.device_id, b"ops")
    refusals = {
        UnsealReason.CANNOT_DECRYPT: (other_key, b"box-1", sealed, trusted),
        UnsealReason.BAD_SIGNATURE: (group_key, b"box-2", sealed, trusted),  # moved to another mailbox
        UnsealReason.WRONG_SENDER: (group_key, b"box-1", seal_for_mailbox(stranger, group_key, b"box-1", b"x"), trusted),
        UnsealReason.MALFORMED: (group_key, b"box-1", sealed[:20], trusted),
    }
    for reason, arguments in refusals.items():
        with pytest.raises(UnsealRefusedError) as refused:
            open_from_mailbox(*arguments)
        assert refused.value.reason is reason
    for position in range(0, len(sealed), 7):
        flipped = sealed[:position] + bytes([sealed[position] ^ 1]) + sealed[position + 1 :]
        with pytest.raises(UnsealRefusedError):
            open_from_mailbox(group_key, b"box-1", flipped, trusted)
