"""The wire format round-trips, and untrusted bytes only ever raise the codec's own error."""

import attrs
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdt import (
    Collection,
    DecodeError,
    DecodeLimits,
    StateResume,
    StateStream,
    decode_ops,
    decode_state_part,
    decode_stored_batch,
    deflate,
    encode_ops,
    encode_state,
    encode_state_part,
    load_replica,
    merge_state,
    save_replica,
    stored_batch_body,
    stored_batch_keys,
    stored_batch_plain,
)
from crdt.codec import STORED_PLAIN_BYTES_MAX
from node.sync.wire import Ack, Deltas, Hello, from_wire, to_wire
from tests.conftest import make_replica

EVERY_COLLECTION = {collection.value for collection in Collection}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sample_replica():
    replica = make_replica("dev-a")
    replica.set_preference("theme", "dark")
    replica.add_message("m1", {"conversation": "c", "role": "user", "text": "hello", "ts_ms": 7, "sentiment": 0.5})
    replica.edit_message("m1", "text", "hello!")
    replica.add_memory("k1", "likes tea", b"\x00\x00\x80?" * 4, {"topic": "food"})
    replica.remove_memory("k1")
    replica.edit_note("n", "a note")
    replica.increment("c", -2)
    replica.enrol_device("phone", {"name": "phone", "sig": b"\x01" * 64})
    replica.delete_message("m1")
    return replica


SAMPLE = sample_replica()
SAMPLE_OPS = SAMPLE.ops_since({}, 100)
SAMPLE_BATCH = encode_ops(SAMPLE_OPS)


def test_ops_round_trip_through_a_batch():
    assert decode_ops(SAMPLE_BATCH) == SAMPLE_OPS


def test_a_stored_batch_gives_the_key_each_op_wrote_without_decoding_the_ops():
    body = deflate(SAMPLE_BATCH)
    assert stored_batch_keys(body) == [(op.collection, op.key) for op in decode_stored_batch(body)]
    with pytest.raises(DecodeError, match="malformed"):
        stored_batch_keys(deflate(encode_ops(SAMPLE_OPS)[:-3]))


def test_a_small_batch_is_logged_as_encoded_and_a_large_one_deflated_and_both_read_back():
    one_op = SAMPLE_OPS[:1]
    small = stored_batch_body(one_op)
    assert small == encode_ops(one_op) and stored_batch_plain(small) == small  # a message add is not deflated
    large_ops = [attrs.evolve(SAMPLE_OPS[0], seq=seq) for seq in range(1, 41)]
    assert len(encode_ops(large_ops)) > STORED_PLAIN_BYTES_MAX
    large = stored_batch_body(large_ops)
    assert large == deflate(encode_ops(large_ops)) and stored_batch_plain(large) == encode_ops(large_ops)
    for body, ops in ((small, one_op), (large, large_ops)):
        assert decode_stored_batch(body) == list(ops)
        assert stored_batch_keys(body) == [(op.collection, op.key) for op in ops]
    with pytest.raises(DecodeError, match="malformed"):
        decode_stored_batch(small[:-3])


def test_a_saved_replica_whose_log_was_compacted_whole_loads_with_its_vector_and_bases():
    replica = sample_replica()
    replica.log.compact(replica.vector)
    loaded = load_replica(save_replica(replica), lambda: 0)
    assert loaded.vector == replica.vector and loaded.digest() == replica.digest()
    assert loaded.log.base("dev-a") == replica.vector["dev-a"]
    # Its next op follows the compacted ones: reusing their seqs would make two different ops with one id.
    assert loaded.set_preference("theme", "light").seq == replica.vector["dev-a"] + 1


def test_a_saved_replica_loads_with_the_same_state_log_and_clock():
    loaded = load_replica(save_replica(SAMPLE), lambda: 0)
    assert loaded.digest() == SAMPLE.digest()
    assert loaded.ops_since({}, 100) == SAMPLE_OPS
    assert loaded.clock.last == SAMPLE.clock.last


@pytest.mark.parametrize(
    "bad, reason",
    [
        (b"", "msgpack"),
        (msgpack.packb([2, [], []]), "format"),
        (msgpack.packb([1, ["d"], [[0, 0, 1, 0, "k", 0, 1, None]]]), "seq"),
        (msgpack.packb([1, ["d"], [[1, 1, 1, 0, "k", 0, 1, None]]]), "device outside"),
        (msgpack.packb([1, ["d"], [[0, 1, 1, 99, "k", 0, 1, None]]]), "collection"),
        (msgpack.packb([1, ["d"], [[0, 1, 1, 0, "k", 1, 1, None]]]), "is not an op of"),
        (msgpack.packb([1, ["d"], [[0, 1, 1, 5, "k", 1, [1, "x"], None]]]), "malformed counters"),
        (msgpack.packb([1, ["d"], [[0, 1, 1, 2, "k", 1, {"text": "x"}, None]]]), "malformed messages"),
        (msgpack.packb([1, ["d"], [[0, 1, 1, 0, "", 0, 1, None]]]), "key"),
        (msgpack.packb([1, ["d"], [[0, 1, 1, 0, "k", 0, 1, [5, 1]]]]), "prev"),
        (b"\x91" * 100_000, "msgpack"),
    ],
)
def test_malformed_batches_raise_decode_error_with_a_reason(bad, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_ops(bad)


def test_oversized_input_is_refused_before_decoding():
    with pytest.raises(DecodeError, match="exceeds"):
        decode_ops(SAMPLE_BATCH, DecodeLimits(bytes_max=len(SAMPLE_BATCH) - 1))
    many = encode_ops(SAMPLE_OPS * 3)
    with pytest.raises(DecodeError):
        decode_ops(many, DecodeLimits(ops_max=len(SAMPLE_OPS)))


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_decode_error(data):
    for decode in (decode_ops, lambda d: from_wire(d, 1 << 20)):
        try:
            decode(data)
        except DecodeError:
            pass


def _mutations(original: bytes):
    return st.lists(
        st.tuples(st.integers(0, len(original) - 1), st.integers(0, 255)), min_size=1, max_size=8
    ).map(lambda flips: _apply_flips(original, flips))


def _apply_flips(original: bytes, flips) -> bytes:
    data = bytearray(original)
    for index, value in flips:
        data[index] = value
    return bytes(data)


@FUZZ
@given(_mutations(SAMPLE_BATCH), st.integers(0, len(SAMPLE_BATCH)))
def test_mutated_and_truncated_batches_only_raise_decode_error(data, cut):
    for candidate in (data, data[:cut]):
        try:
            ops = decode_ops(candidate)
        except DecodeError:
            continue
        fresh = make_replica("dev-z")
        fresh.apply(ops)  # whatever decodes is well formed enough to apply without crashing


SAMPLE_STATE = encode_state(SAMPLE)


@FUZZ
@given(_mutations(SAMPLE_STATE))
def test_a_mutated_snapshot_is_refused_whole_or_merged_whole(data):
    target = make_replica("dev-t")
    target.set_preference("mine", 1)
    digest = target.digest()
    try:
        merge_state(target, data)
    except DecodeError:
        assert target.digest() == digest
        return
    target.digest()  # a snapshot that passed validation leaves a usable replica


def _first_part(replica) -> bytes:
    return encode_state_part(StateStream(replica).peek(10))


@FUZZ
@given(_mutations(_first_part(SAMPLE)))
def test_a_mutated_state_part_is_refused_and_changes_nothing(data):
    target = make_replica("dev-t")
    target.set_preference("mine", 1)
    digest = target.digest()
    try:
        part = decode_state_part(data, target)
    except DecodeError:
        assert target.digest() == digest
        return
    target.join_state(part.vector if part.final else {}, part.state)  # a part that passed validation merges
    target.digest()


def test_a_state_part_round_trips_and_the_stream_sends_the_other_collections_then_memories_then_messages():
    replica = make_replica("dev-a")
    for number in range(25):
        replica.add_message(f"m{number:02}", {"conversation": "c", "role": "user", "text": "t", "ts_ms": number})
    for number in range(5):
        replica.add_memory(f"k{number}", "likes tea", b"\x00\x00\x80?" * 4, {"topic": "food"})
    replica.set_preference("theme", "dark")
    stream = StateStream(replica)
    parts = []
    while not stream.ended:
        parts.append(decode_state_part(encode_state_part(part := stream.peek(10)), make_replica("dev-b")))
        assert parts[-1] == part
        stream.advance(part)
    # Two memories to a part of ten messages: the first part holds the five other collections and two memories.
    assert [sorted(part.state) for part in parts[:3]] == [sorted(EVERY_COLLECTION - {"messages"}), ["memories"], ["memories"]]
    assert [len(part.state["memories"]["adds"]) for part in parts[:3]] == [2, 2, 1]
    assert [list(part.state) for part in parts[3:]] == [["messages"]] * 3
    assert [part.upto for part in parts] == ["", "", "", "m09", "m19", "m24"]
    assert [(part.messages_done, part.final) for part in parts[3:]] == [(10, False), (20, False), (25, True)]
    merged = make_replica("dev-b")
    for part in parts:
        merged.join_state(part.vector if part.final else {}, part.state)
    assert merged.digest() == replica.digest() and merged.vector == replica.vector


@FUZZ
@given(_mutations(save_replica(SAMPLE)))
def test_a_mutated_save_only_raises_decode_error(data):
    try:
        load_replica(data, lambda: 0).digest()
    except DecodeError:
        pass


RESUMING = Hello(2, 1, "dev-a", 0, {"dev-a": 3}, True, StateResume({"dev-b": 9}, "m0042"))


@pytest.mark.parametrize(
    "frame", [Hello(1, 1, "dev-a", 0, {"dev-a": 3}), RESUMING, Deltas(4, b"sealed"), Ack(None, {}), Ack(2, {"x": 1})]
)
def test_frames_round_trip(frame):
    data = to_wire(frame)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert from_wire(data[4:], 1 << 20) == frame


@FUZZ
@given(st.sampled_from([to_wire(frame)[4:] for frame in (Hello(1, 1, "dev-a", 0, {"dev-a": 3}), RESUMING, Ack(2, {"x": 1}))]).flatmap(_mutations))
def test_mutated_frames_only_raise_decode_error(data):
    try:
        from_wire(data, 1 << 20)
    except DecodeError:
        pass


def test_an_edit_naming_its_field_with_a_list_is_refused_as_malformed():
    from crdt import Collection, Kind
    from crdt.schema import payload_is_valid

    for collection in (Collection.MESSAGES, Collection.MEMORIES):
        assert not payload_is_valid(collection, Kind.EDIT, [["text"], "x"])
        assert not payload_is_valid(collection, Kind.EDIT, [{"text": 1}, "x"])


_MESSAGE = {"conversation": "c", "role": "user", "text": "hi", "ts_ms": 7}


@pytest.mark.parametrize(
    "payload",
    [
        *({k: v for k, v in _MESSAGE.items() if k != missing} for missing in _MESSAGE),
        *({**_MESSAGE, field: None} for field in _MESSAGE),
        {**_MESSAGE, "unknown": 1},
        {**_MESSAGE, 1: 1},
        {**_MESSAGE, "ts_ms": -1},
        {**_MESSAGE, "ts_ms": True},
        {**_MESSAGE, "sentiment": "high"},
        [*_MESSAGE.values()],
    ],
)
def test_a_message_add_lacking_a_field_or_with_a_wrong_one_is_refused_in_a_batch(payload):
    from crdt import Collection, Kind, encode_ops
    from crdt.ops import Op

    with pytest.raises(DecodeError, match="malformed messages add payload|not allowed for map key"):
        decode_ops(encode_ops([Op("dev-a", 1, 5, Collection.MESSAGES, "m1", Kind.ADD, payload)]))
