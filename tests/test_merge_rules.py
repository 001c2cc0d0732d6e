"""Example-based checks of each merge rule's meaning (the properties file checks convergence)."""

import hashlib

import msgpack
import numpy as np
import pytest

from crdt import Collection, InvalidOpError, ValueTooLargeError
from crdt.replica import _canonical
from tests.conftest import make_replica


def exchange(*replicas):
    """Give every replica every op the others have."""
    for receiver in replicas:
        for sender in replicas:
            if receiver is not sender:
                receiver.apply(sender.ops_since(receiver.vector, 100_000))


def test_lww_higher_hlc_wins_and_equal_hlc_falls_to_the_higher_device_id(clock):
    a, b = make_replica("dev-a", clock), make_replica("dev-b", clock)
    a.set_preference("theme", "dark")
    b.set_preference("theme", "light")  # same wall time: the tie goes to the higher device id
    exchange(a, b)
    assert a.preferences.get("theme") == b.preferences.get("theme") == "light"
    clock.now += 1
    a.set_preference("theme", "blue")
    exchange(a, b)
    assert b.preferences.get("theme") == "blue"


def test_concurrent_overwrite_is_journalled_and_a_sequential_one_is_not(clock):
    a, b = make_replica("dev-a", clock), make_replica("dev-b", clock)
    a.set_preference("lang", "en")
    b.set_preference("lang", "de")
    exchange(a, b)
    (conflict,) = list(a.journal)
    assert (conflict.winner_value, conflict.loser_value) == ("de", "en")
    assert conflict.collection == Collection.PREFERENCES and conflict.key == "lang"
    clock.now += 1
    a.set_preference("lang", "fr")  # a has seen "de": a plain overwrite
    exchange(a, b)
    assert len(b.journal) == 1 and b.preferences.get("lang") == "fr"


def test_a_delete_wins_over_a_concurrent_edit_in_either_order(clock):
    a, b = make_replica("dev-a", clock), make_replica("dev-b", clock)
    a.add_message("m1", {"conversation": "c", "role": "user", "text": "secret", "ts_ms": 1})
    exchange(a, b)
    edit = b.edit_message("m1", "text", "still secret")
    delete = a.delete_message("m1")
    for order in ([edit, delete], [delete, edit]):
        observer = make_replica("dev-o", clock)
        observer.apply(a.ops_since({}, 1))
        observer.apply(order)
        assert observer.messages.get("m1") is None
        assert "secret" not in repr(observer.state()["messages"])


def test_memory_add_wins_over_a_concurrent_remove(clock):
    a, b = make_replica("dev-a", clock), make_replica("dev-b", clock)
    a.add_memory("k1", "likes tea", None, {})
    exchange(a, b)
    b.remove_memory("k1")
    a.add_memory("k1", "likes green tea", None, {})  # a re-add b's remove has not seen
    exchange(a, b)
    assert a.memories.get("k1")["text"] == b.memories.get("k1")["text"] == "likes green tea"
    b.remove_memory("k1")  # now b has seen both adds
    exchange(a, b)
    assert a.memories.get("k1") is None and b.memories.get("k1") is None


def test_near_duplicate_memories_collapse_to_the_same_canonical_in_any_order(clock):
    tea = np.array([1, 0, 0, 0], dtype="<f4")
    almost = np.array([1, 0.02, 0, 0], dtype="<f4")
    other = np.array([0, 1, 0, 0], dtype="<f4")
    a, b = make_replica("dev-a", clock), make_replica("dev-b", clock)
    a.add_memory("k-a", "likes tea", tea.tobytes(), {})
    clock.now += 1
    b.add_memory("k-b", "likes tea a lot", almost.tobytes(), {})
    b.add_memory("k-c", "owns a cat", other.tobytes(), {})
    ops = a.ops_since({}, 10) + b.ops_since({}, 10)
    forward, backward = make_replica("dev-x", clock), make_replica("dev-y", clock)
    forward.apply(ops)
    for op in reversed(ops):
        backward.apply([op])
    expected = {"k-a": "k-a", "k-b": "k-a", "k-c": "k-c"}
    assert forward.memories.canonical_ids() == backward.memories.canonical_ids() == expected
    # Removing the canonical hands the cluster to the next memory in line, the same everywhere.
    forward.remove_memory("k-a")
    assert forward.memories.canonical_ids() == {"k-b": "k-b", "k-c": "k-c"}


def test_concurrent_note_edits_both_survive(clock):
    a, b = make_replica("dev-a", clock), make_replica("dev-b", clock)
    a.edit_note("partner", "Sam likes hiking.")
    exchange(a, b)
    a.edit_note("partner", "Sam likes hiking in autumn.")
    b.edit_note("partner", "Sam really likes hiking.")
    exchange(a, b)
    assert a.notes.text("partner") == b.notes.text("partner") == "Sam really likes hiking in autumn."


def test_counters_sum_every_devices_increments_and_decrements(clock):
    a, b = make_replica("dev-a", clock), make_replica("dev-b", clock)
    a.increment("chats", 5)
    a.increment("chats", -2)
    b.increment("chats", 4)
    exchange(a, b)
    assert a.counters.value("chats") == b.counters.value("chats") == 7


def test_revocation_is_permanent_even_against_a_later_enrolment(clock):
    a, b = make_replica("dev-a", clock), make_replica("dev-b", clock)
    a.enrol_device("phone", {"name": "phone", "signer": "dev-a"})
    exchange(a, b)
    b.revoke_device("phone", {"signer": "dev-b"})
    clock.now += 10
    a.enrol_device("phone", {"name": "phone again", "signer": "dev-a"})
    exchange(a, b)
    assert not a.devices.is_trusted("phone") and not b.devices.is_trusted("phone")
    assert a.devices.revoked_at("phone") == b.devices.revoked_at("phone")


def test_ops_from_one_device_wait_for_the_gap_to_fill(clock):
    a, b = make_replica("dev-a", clock), make_replica("dev-b", clock)
    ops = [a.increment("x") for _ in range(3)]
    result = b.apply([ops[2], ops[1]])
    assert result.applied == () and result.held == 2 and b.counters.value("x") == 0
    result = b.apply([ops[0]])
    assert [op.seq for op in result.applied] == [1, 2, 3] and b.held_count == 0
    assert b.counters.value("x") == 3


def test_a_remote_op_stamped_too_far_ahead_is_refused_and_changes_nothing(clock):
    a, b = make_replica("dev-a", clock), make_replica("dev-b", clock)
    b.clock.drift_ms_max = 1_000
    clock.now += 5_000
    op = a.set_preference("x", 1)
    clock.now -= 5_000
    digest = b.digest()
    result = b.apply([op])
    assert result.applied == () and "ahead" in result.refused[0][1]
    assert b.digest() == digest and b.seq_of("dev-a") == 0
    clock.now += 5_000  # once the local clock catches up, the same op is accepted
    assert b.apply([op]).applied == (op,)


def test_malformed_and_oversized_local_writes_are_refused_and_change_nothing(clock):
    a = make_replica("dev-a", clock)
    digest = a.digest()
    with pytest.raises(InvalidOpError):
        a.add_message("m", {"conversation": "c", "role": "user", "text": 5, "ts_ms": 1})
    with pytest.raises(InvalidOpError):
        a.edit_message("m", "sentiment", "very")
    with pytest.raises(ValueTooLargeError):
        a.set_preference("big", "x" * (2 << 20))
    with pytest.raises(ValueTooLargeError):
        a.edit_note("big", "x" * (2 << 20))
    assert a.digest() == digest and a.seq_of("dev-a") == 0 and a.notes.text("big") in (None, "")


@pytest.mark.parametrize("revocation_first", [True, False])
def test_writes_stamped_after_a_revocation_have_no_effect_whichever_arrives_first(clock, revocation_first):
    admin, revoked, observer = make_replica("a", clock), make_replica("c", clock), make_replica("o", clock)
    before = revoked.set_preference("theme", "dark")
    clock.now += 10
    revocation = admin.revoke_device("c", {"signer": "a"})
    clock.now += 10
    after = [revoked.set_preference("theme", "stolen"), revoked.increment("visits", 5)]
    deliveries = [[before, revocation], after] if revocation_first else [[before, *after], [revocation]]
    for ops in deliveries:
        observer.apply(ops)
    assert observer.preferences.get("theme") == "dark"
    assert observer.counters.value("visits") == 0
    assert observer.seq_of("c") == 3  # counted, so never resent
    admin.apply([before, *after])
    assert admin.digest() == observer.digest()


def test_a_device_that_knows_it_was_revoked_can_no_longer_write(clock):
    admin, revoked = make_replica("a", clock), make_replica("c", clock)
    revoked.apply([admin.revoke_device("c", {"signer": "a"})])
    with pytest.raises(InvalidOpError, match="revoked"):
        revoked.edit_note("n", "text")
    assert revoked.seq_of("c") == 0


def test_a_message_row_carries_its_edits_and_is_gone_once_deleted(clock):
    a = make_replica("dev-a", clock)
    a.add_message("m1", {"conversation": "c", "role": "user", "text": "hi", "ts_ms": 1, "sentiment": 0.5})
    stamp = a.messages.records["m1"][:3]  # the add's hlc, device and seq, which the row carries after its fields
    assert a.messages.row("m1") == ("m1", "c", "user", "hi", 1, 0.5, None, *stamp)
    a.edit_message("m1", "text", "hello")
    assert a.messages.row("m1") == ("m1", "c", "user", "hello", 1, 0.5, None, *stamp)
    assert a.messages.get("m1")["text"] == "hello"
    a.delete_message("m1")
    assert a.messages.row("m1") is None and a.messages.row("never") is None


def test_views_taken_before_changes_still_give_the_digest_of_that_moment():
    # A node takes the views under its write lock and hashes them on a worker thread while writes go on.
    a = make_replica("dev-a")
    for number in range(20):
        a.add_message(f"m{number:02}", {"conversation": "c", "role": "user", "text": f"t{number}", "ts_ms": number})
    a.edit_message("m03", "text", "first edit")
    a.add_memory("mem", "likes tea", None, {"topic": "food"})
    before, views = a.digest(), a.views()
    a.add_message("m99", {"conversation": "c", "role": "user", "text": "later", "ts_ms": 99})
    a.edit_message("m03", "text", "second edit")
    a.edit_message("m04", "role", "assistant")
    a.delete_message("m05")
    a.edit_memory("mem", "text", "likes coffee")
    a.set_preference("theme", "dark")
    assert views.digest() == before != a.digest()


def test_the_digest_is_the_sha256_of_the_whole_canonical_state_packed_at_once():
    # Hashed piece by piece so a million messages need no second copy; the value must not change with that.
    a = make_replica("dev-a")
    a.set_preference("theme", "dark")
    for number in range(50):
        a.add_message(f"m{number:02}", {"conversation": f"c{number % 3}", "role": "user", "text": f"t{number}",
                                        "ts_ms": number, "sentiment": 0.5 if number % 2 else None, "response_time_ms": None})  # fmt: skip
    a.edit_message("m07", "text", "edited")
    a.delete_message("m08")
    a.add_memory("mem", "likes tea", None, {"topic": "food"})
    a.edit_note("partner", "Sam")
    a.increment("chats", 3)
    views = {collection.value: dict(rule.view()) for collection, rule in a._rules.items()}
    views["messages"]["messages"] = {key: dict(fields) for key, fields in views["messages"]["messages"].canonical_items()}
    whole = hashlib.sha256(msgpack.packb(_canonical(views), use_bin_type=True)).hexdigest()
    assert a.digest().sha256 == whole
    assert views["messages"]["messages"]["m07"]["text"] == "edited" and "m08" not in views["messages"]["messages"]
    # Every row field, and a sentiment as a float, as a store's row reads back (crdt/messages.py canonical).
    assert views["messages"]["messages"]["m00"] == {"conversation": "c0", "role": "user", "text": "t0", "ts_ms": 0,
                                                    "sentiment": None, "response_time_ms": None}  # fmt: skip
