"""The sans-I/O sync session: convergence, live push, catch-up, and refusal of bad input."""

import random
import zlib

import pytest

from crdt import DecodeLimits, HybridClock, MemoryLog, Replica, decode_stored_batch
from framing import LocalProtocolError, RemoteProtocolError
from node.errors import EndReason, UnsealError
from node.sync.session import (
    OpsApplied,
    PeerClosed,
    PeerHello,
    SessionConfig,
    SessionState,
    StateMerged,
    SyncSession,
)
from node.sync.wire import Ack, Deltas, from_wire, to_wire
from tests.conftest import make_replica


def pump(sender: SyncSession, receiver: SyncSession) -> tuple[int, list]:
    """Move everything `sender` has to say into `receiver`; return frames moved and events raised."""
    frames, events = 0, []
    while (data := sender.generate()) is not None:
        frames += 1
        events += receiver.receive_data(data)
    return frames, events


def converse(a: SyncSession, b: SyncSession, turns_max: int = 50) -> int:
    """Let two sessions talk until both are quiet; return how many one-way turns carried data."""
    for turn in range(turns_max):
        moved = pump(a, b)[0] if turn % 2 == 0 else pump(b, a)[0]
        if not moved and not (pump(b, a)[0] if turn % 2 == 0 else pump(a, b)[0]):
            return turn
    raise AssertionError("sessions never went quiet")


def seeded_pair(clock, ops_each: int = 300):
    a, b = make_replica("dev-a", clock), make_replica("dev-b", clock)
    for i in range(ops_each):
        a.set_preference(f"k{i % 50}", i)
        b.add_message(f"m{i}", {"conversation": "c", "role": "user", "text": f"t{i}", "ts_ms": i})
    return a, b


def test_two_peers_converge_in_one_round_trip(clock):
    a, b = seeded_pair(clock)
    sa, sb = SyncSession(a), SyncSession(b)
    # Both HELLOs cross, then both sides' deltas cross: after that each holds everything.
    hello_a, hello_b = sa.generate(), sb.generate()
    sb.receive_data(hello_a)
    sa.receive_data(hello_b)
    pump(sa, sb)
    pump(sb, sa)
    assert a.digest() == b.digest() and a.vector == b.vector


def test_live_changes_are_pushed_as_they_happen(clock):
    a, b = seeded_pair(clock, ops_each=5)
    sa, sb = SyncSession(a), SyncSession(b)
    converse(sa, sb)
    a.set_preference("live", "yes")
    frames, events = pump(sa, sb)
    assert frames == 1 and b.preferences.get("live") == "yes"
    assert [type(e) for e in events] == [OpsApplied] and events[0].ops[0].key == "live"
    assert sa.generate() is None  # nothing else to say until the peer answers


def test_a_batch_applied_whole_comes_with_its_encoding_to_log_as_is(clock):
    a, b = seeded_pair(clock, ops_each=5)
    sa, sb = SyncSession(a), SyncSession(b)
    converse(sa, sb)
    a.set_preference("live", 1)
    a.set_preference("live", 2)
    (applied,) = pump(sa, sb)[1]
    assert [op.payload for op in applied.ops] == [1, 2]
    assert applied.deflated is not None and decode_stored_batch(applied.deflated) == list(applied.ops)
    # An op the receiver already has is skipped: the batch is then not the ops applied, and is not offered.
    a.set_preference("live", 3)
    a.set_preference("live", 4)
    b.apply(a.ops_since(b.vector, 1))  # the first arrives another way
    (applied,) = pump(sa, sb)[1]
    assert [op.payload for op in applied.ops] == [4] and applied.deflated is None


def test_ops_travel_through_an_intermediary(clock):
    a, b, c = (make_replica(d, clock) for d in ("dev-a", "dev-b", "dev-c"))
    a.set_preference("x", 1)
    ab, ba, bc, cb = SyncSession(a), SyncSession(b), SyncSession(b), SyncSession(c)
    converse(ab, ba)
    converse(bc, cb)
    assert c.preferences.get("x") == 1 and c.digest() == a.digest()


def test_bytes_may_arrive_in_any_chunking(clock):
    a, b = seeded_pair(clock, ops_each=20)
    sa, sb = SyncSession(a), SyncSession(b)
    sa.receive_data(sb.generate())
    stream = b"".join(iter(sa.generate, None))
    for i in range(len(stream)):
        sb.receive_data(stream[i : i + 1])
    assert b.preferences.get("k19") == 19


def test_a_peer_behind_compacted_ops_catches_up_from_a_state_snapshot(clock):
    a, b = seeded_pair(clock, ops_each=50)
    assert isinstance(a.log, MemoryLog)
    a.log.compact(a.vector)
    sa, sb = SyncSession(a), SyncSession(b)
    events = []
    for _ in range(4):
        events += pump(sa, sb)[1] + pump(sb, sa)[1]
    assert any(isinstance(e, StateMerged) for e in events)
    assert a.digest() == b.digest() and a.vector == b.vector


def test_a_state_stream_comes_in_parts_and_one_lost_part_leaves_the_vector_until_a_new_stream_is_whole(clock):
    a, b = seeded_pair(clock, ops_each=50)
    a.apply(b.ops_since({}, 1000))
    a.log.compact(a.vector)  # b's messages too: a third device lacking them gets the state
    c = make_replica("dev-c", clock)
    config = SessionConfig(part_messages_max=8)
    sa, sc = SyncSession(a, config), SyncSession(c, config)
    sc.receive_data(sa.generate())
    sa.receive_data(sc.generate())
    parts = []
    while (frame := sa.generate()) is not None:
        if len(parts) == 2:
            parts.append(None)  # lost on a datagram path
            continue
        parts += [event.part for event in sc.receive_data(frame) if isinstance(event, StateMerged)]
    assert len(parts) == 50 // 8 + 1 and parts[-1].final and len(c.messages) == 50 - 8
    assert [part.number for part in parts if part] == [0, 1, 3, 4, 5, 6]
    assert c.vector == {}  # the stream came with a hole: no op counts as held
    converse(sa, sc)
    assert c.digest() == a.digest() and c.vector == a.vector


def test_a_refresh_during_a_state_stream_restates_nothing_unless_the_stream_stopped_moving(clock):
    a, _ = seeded_pair(clock, ops_each=50)
    for number in range(50):
        a.add_message(f"m{number}", {"conversation": "c", "role": "user", "text": "t", "ts_ms": number})
    a.log.compact(a.vector)
    c = make_replica("dev-c", clock)
    config = SessionConfig(part_messages_max=8)
    sa, sc = SyncSession(a, config), SyncSession(c, config)
    sc.receive_data(sa.generate())
    sa.receive_data(sc.generate())

    def acks_after_refresh() -> list:
        sc.refresh()
        return [frame for data in iter(sc.generate, None) if isinstance(frame := from_wire(data[4:], 1 << 20), Ack)]

    sc.receive_data(sa.generate())
    # A rewind now (the vector it restates lacks the stream's ops) would make the sender stream it all again.
    assert [ack.batch_no for ack in acks_after_refresh()] == [1]
    frames = list(iter(sa.generate, None))
    for data in frames[:-1]:  # the final part is lost (a datagram path)
        sc.receive_data(data)
    assert acks_after_refresh() == [Ack(6, {})]  # parts came since the last refresh: nothing restated
    rewind = acks_after_refresh()
    assert rewind == [Ack(None, {})]  # none since: the stream stopped, and c restates what it lacks
    sa.receive_data(to_wire(rewind[0]))
    parts = [event.part for data in iter(sa.generate, None) for event in sc.receive_data(data) if isinstance(event, StateMerged)]
    assert parts[0].number == 0 and parts[-1].final and c.vector == a.vector and c.digest() == a.digest()


def test_a_write_after_a_state_stream_stamps_above_every_stamp_the_state_brought():
    now_ms = 1_700_000_000_000
    ahead = Replica("dev-a", HybridClock(lambda: now_ms + 30_000))  # a sender whose clock runs 30 s ahead
    for number in range(20):
        ahead.set_preference("theme", number)
        ahead.add_message(f"m{number}", {"conversation": "c", "role": "user", "text": "t", "ts_ms": number})
    ahead.log.compact(ahead.vector)
    behind = Replica("dev-c", HybridClock(lambda: now_ms))
    converse(SyncSession(ahead, SessionConfig(part_messages_max=8)), SyncSession(behind))
    assert behind.digest() == ahead.digest()
    behind.set_preference("theme", "mine")
    assert behind.preferences.get("theme") == "mine"  # without the sender's clock, its older stamp lost to the state


def test_large_deltas_are_split_into_bounded_batches(clock):
    a, b = make_replica("dev-a", clock), make_replica("dev-b", clock)
    noise = random.Random(7)
    for i in range(200):
        a.set_preference(f"k{i}", noise.randbytes(1000))  # incompressible, so frames are as large as batches
    config = SessionConfig(batch_bytes_max=20_000)
    sa, sb = SyncSession(a, config), SyncSession(b, config)
    sb.receive_data(sa.generate())
    sa.receive_data(sb.generate())
    sizes = [len(frame) for frame in iter(sa.generate, None)]
    assert len(sizes) > 5 and max(sizes) <= 20_000 + 64
    assert sa.bytes_sent > 200_000


@pytest.mark.parametrize(
    "peer_config, reason",
    [
        (SessionConfig(schema=99), EndReason.SCHEMA_MISMATCH),
        (SessionConfig(protocol=1), EndReason.PROTOCOL_MISMATCH),  # version 1 did not deflate batches
        (SessionConfig(epoch=3), EndReason.EPOCH_MISMATCH),
    ],
)
def test_a_version_or_epoch_mismatch_ends_the_session_with_a_typed_reason(clock, peer_config, reason):
    a, b = seeded_pair(clock, ops_each=3)
    sa, sb = SyncSession(a), SyncSession(b, peer_config)
    digest = a.digest()
    with pytest.raises(RemoteProtocolError) as raised:
        sa.receive_data(sb.generate())
    assert raised.value.reason is reason and "this node" in raised.value.detail
    assert sa.state is SessionState.CLOSED and a.digest() == digest
    # The peer is told why, and then nothing more is sent.
    events = sb.receive_data(sa.generate())
    assert events == [PeerClosed(reason, raised.value.detail)] and sb.state is SessionState.CLOSED
    assert sa.generate() is None and sb.generate() is None


def test_a_malformed_frame_closes_the_session_and_changes_nothing(clock):
    a, b = seeded_pair(clock, ops_each=3)
    sa = SyncSession(a)
    sa.receive_data(SyncSession(b).generate())
    digest = a.digest()
    garbage = b"\xc1\xc1\xc1"
    with pytest.raises(RemoteProtocolError) as raised:
        sa.receive_data(len(garbage).to_bytes(4, "big") + garbage)
    assert raised.value.reason is EndReason.MALFORMED_FRAME
    assert a.digest() == digest
    assert b"malformed" in sa.generate()
    with pytest.raises(LocalProtocolError):
        sa.receive_data(b"more")


def test_a_batch_of_malformed_ops_closes_the_session_and_applies_none(clock):
    a, b = seeded_pair(clock, ops_each=3)
    sa = SyncSession(a)
    sa.receive_data(SyncSession(b).generate())
    digest = a.digest()
    with pytest.raises(RemoteProtocolError, match="batch 1"):
        sa.receive_data(to_wire(Deltas(1, zlib.compress(b"\x93\x01\x90\x91\x90"))))
    assert a.digest() == digest


@pytest.mark.parametrize(
    "body, why",
    [
        (zlib.compress(bytes(2000)), "beyond the 1000-byte limit"),  # a deflate bomb, in miniature
        (zlib.compress(b"\x93\x01\x90\x90")[:-3], "truncated"),
        (zlib.compress(b"\x93\x01\x90\x90") + b"extra", "followed by other bytes"),
        (b"\x93\x01\x90\x90", "not a valid zlib stream"),
    ],
)
def test_a_batch_that_does_not_inflate_within_bounds_closes_the_session(clock, body, why):
    a, b = seeded_pair(clock, ops_each=3)
    sa = SyncSession(a, SessionConfig(decode_limits=DecodeLimits(bytes_max=1000)))
    sa.receive_data(SyncSession(b).generate())
    digest = a.digest()
    with pytest.raises(RemoteProtocolError, match=why) as raised:
        sa.receive_data(to_wire(Deltas(1, body)))
    assert raised.value.reason is EndReason.MALFORMED_FRAME and a.digest() == digest


def test_an_oversized_frame_is_refused_from_its_length_prefix(clock):
    sa = SyncSession(make_replica("dev-a", clock), SessionConfig(frame_bytes_max=1000))
    with pytest.raises(RemoteProtocolError) as raised:
        sa.receive_data((10_000).to_bytes(4, "big"))
    assert raised.value.reason is EndReason.FRAME_TOO_LARGE


def test_a_batch_that_fails_to_unseal_closes_the_session(clock):
    class Refusing:
        def seal(self, plain: bytes) -> bytes:
            return plain

        def open(self, sealed: bytes) -> bytes:
            raise UnsealError("bad MAC")

    a, b = seeded_pair(clock, ops_each=3)
    sa, sb = SyncSession(a, sealer=Refusing()), SyncSession(b)
    sa.receive_data(sb.generate())
    sb.receive_data(sa.generate())
    digest = a.digest()
    with pytest.raises(RemoteProtocolError) as raised:
        pump(sb, sa)
    assert raised.value.reason is EndReason.UNSEAL_FAILED and a.digest() == digest


def test_talking_to_oneself_is_refused(clock):
    a = make_replica("dev-a", clock)
    with pytest.raises(RemoteProtocolError) as raised:
        SyncSession(a).receive_data(SyncSession(a).generate())
    assert raised.value.reason is EndReason.SELF_CONNECTION


def test_frames_before_hello_wait_for_it_and_a_repeated_hello_is_harmless(clock):
    a, b = seeded_pair(clock, ops_each=10)
    sa, sb = SyncSession(a), SyncSession(b)
    sb.receive_data(sa.generate())
    hello_b = sb.generate()
    deltas_b = sb.generate()
    assert sa.receive_data(deltas_b) == []  # early: held until HELLO says it can be read
    events = sa.receive_data(hello_b)
    assert isinstance(events[0], PeerHello) and isinstance(events[1], OpsApplied)
    assert sa.receive_data(hello_b)[0] == events[0]
    assert a.messages.get("m9")["text"] == "t9"


def test_lost_frames_are_resent_after_a_refresh(clock):
    a, b = seeded_pair(clock, ops_each=30)
    sa, sb = SyncSession(a), SyncSession(b)
    sb.receive_data(sa.generate())
    sa.receive_data(sb.generate())
    while sa.generate() is not None:  # every batch a sends is lost
        pass
    assert b.seq_of("dev-a") == 0
    sb.refresh()
    converse(sa, sb)
    assert a.digest() == b.digest()


def test_a_closed_session_says_goodbye_once(clock):
    sa = SyncSession(make_replica("dev-a", clock))
    sa.generate()
    sa.close("shutting down")
    assert b"shutting down" in sa.generate()
    assert sa.generate() is None


def test_over_a_stream_each_op_crosses_once(clock):
    a, b = seeded_pair(clock, ops_each=200)
    sa, sb = SyncSession(a), SyncSession(b)
    converse(sa, sb)
    alone_a = sum(len(f) for f in iter(SyncSession(a).generate, None))  # a HELLO only
    fresh_a, empty = SyncSession(a), SyncSession(make_replica("dev-c", clock))
    fresh_a.receive_data(empty.generate())
    batches = sum(len(f) for f in iter(fresh_a.generate, None)) - alone_a
    # What a sent to b is its HELLO plus at most one copy of the ops b lacked, plus ACKs.
    assert sa.bytes_sent < alone_a + batches * 1.1 + 200


def test_a_lost_hello_is_sent_again_when_the_peer_asks(clock):
    a, b = seeded_pair(clock, ops_each=5)
    sa, sb = SyncSession(a), SyncSession(b)
    sa.generate()  # a's HELLO is lost
    sa.receive_data(sb.generate())
    while sa.generate() is not None:  # and so is everything a sends until b can read it
        pass
    sb.refresh()  # b, still greeting, says HELLO again without having heard a
    sa.receive_data(sb.generate())
    converse(sa, sb)
    assert a.digest() == b.digest() and sb.state is SessionState.SYNCING
