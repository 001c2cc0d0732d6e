"""Property tests: every merge rule converges for any delivery order, duplication and join order."""

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdt import Collection, Op, Replica, encode_state, load_replica, merge_state, save_replica
from tests.conftest import ManualClock, make_replica

Draw = Callable
DEVICES = ("dev-a", "dev-b", "dev-c")
BASE_VECTORS = [np.eye(4, dtype="<f4")[i] for i in range(3)]


def _existing(draw: Draw, keys) -> str | None:
    keys = sorted(keys)
    return draw(st.sampled_from(keys)) if keys else None


def write_preference(replica: Replica, draw: Draw) -> None:
    collection = draw(st.sampled_from([Collection.PREFERENCES, Collection.SETTINGS]))
    replica.set_preference(draw(st.sampled_from("abc")), draw(st.integers(0, 3)), collection=collection)


def write_message(replica: Replica, draw: Draw) -> None:
    action = draw(st.sampled_from(["add", "add", "edit", "delete"]))
    target = _existing(draw, replica.messages.records)
    if action == "add" or target is None:
        message_id = f"{replica.device_id}-{replica.seq_of(replica.device_id)}"
        fields = {"conversation": "c", "role": "user", "text": draw(st.sampled_from(["hi", "yo"])), "ts_ms": 1}
        replica.add_message(message_id, fields)
    elif action == "edit":
        field, value = draw(st.sampled_from([("text", "x"), ("text", "y"), ("sentiment", 0.5), ("sentiment", None)]))
        replica.edit_message(target, field, value)
    else:
        replica.delete_message(target)


def write_memory(replica: Replica, draw: Draw) -> None:
    action = draw(st.sampled_from(["add", "add", "readd", "edit", "remove"]))
    target = _existing(draw, replica.memories.live_ids())
    vector = BASE_VECTORS[draw(st.integers(0, 2))] + draw(st.sampled_from([0.0, 0.01, 0.5])) * BASE_VECTORS[2]
    if action == "add" or target is None:
        memory_id = f"{replica.device_id}-{replica.seq_of(replica.device_id)}"
        replica.add_memory(memory_id, "m", vector.astype("<f4").tobytes(), {"k": 1})
    elif action == "readd":  # the same id added again: a new tag that a concurrent remove cannot have seen
        replica.add_memory(target, "again", vector.astype("<f4").tobytes(), {})
    elif action == "edit":
        replica.edit_memory(target, "text", draw(st.sampled_from(["x", "y"])))
    else:
        replica.remove_memory(target)


def write_note(replica: Replica, draw: Draw) -> None:
    name = draw(st.sampled_from(["x", "y"]))
    text = replica.notes.text(name) or ""
    position = draw(st.integers(0, len(text)))
    if text and draw(st.booleans()):
        text = text[:position] + text[position + 1 :]
    else:
        text = text[:position] + draw(st.sampled_from(["a", "bc", "d "])) + text[position:]
    replica.edit_note(name, text)


def write_counter(replica: Replica, draw: Draw) -> None:
    replica.increment(draw(st.sampled_from(["p", "q"])), draw(st.integers(-3, 3)))


def write_registry(replica: Replica, draw: Draw) -> None:
    device = draw(st.sampled_from(["phone", "laptop"]))
    if draw(st.booleans()):
        replica.enrol_device(device, {"name": draw(st.sampled_from(["n1", "n2"])), "signer": replica.device_id})
    else:
        replica.revoke_device(device, {"signer": replica.device_id})


RULES = {
    "lww": [write_preference],
    "messages": [write_message],
    "memories": [write_memory],
    "notes": [write_note],
    "counters": [write_counter],
    "registry": [write_registry],
    "all": [write_preference, write_message, write_memory, write_note, write_counter, write_registry],
}
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_history(draw: Draw, writers, steps_max: int = 20) -> list[Replica]:
    """Let three devices write, partly sync and let time pass, as Hypothesis chooses."""
    clock = ManualClock()
    replicas = [make_replica(device, clock) for device in DEVICES]
    for _ in range(draw(st.integers(1, steps_max))):
        step = draw(st.sampled_from(["write", "write", "sync", "tick"]))
        if step == "write":
            replica = replicas[draw(st.integers(0, 2))]
            if replica.devices.revoked_at(replica.device_id) is None:  # a revoked device can no longer write
                draw(st.sampled_from(writers))(replica, draw)
        elif step == "sync":
            receiver, sender = draw(st.integers(0, 2)), draw(st.integers(0, 2))
            if receiver != sender:
                ops = replicas[sender].ops_since(replicas[receiver].vector, draw(st.integers(1, 20)))
                replicas[receiver].apply(ops)
        else:
            clock.now += draw(st.integers(0, 3))
    return replicas


def all_ops(replicas: list[Replica]) -> list[Op]:
    by_id = {op.id: op for replica in replicas for op in replica.ops_since({}, 10_000)}
    return [by_id[key] for key in sorted(by_id)]


def fresh_with(ops) -> Replica:
    replica = make_replica("observer")
    for op in ops:
        replica.apply([op])
    return replica


def copy_of(replica: Replica) -> Replica:
    return load_replica(save_replica(replica), replica.clock._now_ms)


@pytest.mark.parametrize("rule", sorted(RULES))
@SETTINGS
@given(data=st.data())
def test_any_delivery_order_with_duplicates_converges(rule, data):
    replicas = run_history(data.draw, RULES[rule])
    ops = all_ops(replicas)
    reference = fresh_with(ops)
    duplicated = ops + data.draw(st.lists(st.sampled_from(ops), max_size=5)) if ops else []
    shuffled = fresh_with(data.draw(st.permutations(duplicated)))
    assert shuffled.held_count == 0
    assert shuffled.vector == reference.vector
    assert shuffled.digest() == reference.digest()
    for replica in replicas:  # the writers themselves, after a full exchange
        replica.apply(ops)
        assert replica.digest() == reference.digest()
    for replica in [shuffled, reference, *replicas]:  # a deleted message leaves no content behind
        tombstoned = replica.messages.tombstones.keys()
        assert not tombstoned & (replica.messages.records.keys() | replica.messages.edits.keys())


@pytest.mark.parametrize("rule", sorted(RULES))
@SETTINGS
@given(data=st.data())
def test_state_join_is_commutative_associative_and_idempotent(rule, data):
    a, b, c = run_history(data.draw, RULES[rule])

    def joined(*parts: Replica) -> Replica:
        result = copy_of(parts[0])
        for part in parts[1:]:
            merge_state(result, encode_state(part))
        return result

    ab, ba = joined(a, b), joined(b, a)
    assert ab.digest() == ba.digest()
    assert joined(ab, c).digest() == joined(a, joined(b, c)).digest()
    assert joined(a, a).digest() == a.digest()
    # Joining states and applying ops reach the same place.
    assert joined(a, b, c).digest() == fresh_with(all_ops([a, b, c])).digest()


@pytest.mark.parametrize("rule", sorted(RULES))
@SETTINGS
@given(data=st.data())
def test_applying_ops_again_changes_nothing(rule, data):
    replicas = run_history(data.draw, RULES[rule])
    ops = all_ops(replicas)
    once = fresh_with(ops)
    digest = once.digest()
    result = once.apply(ops)
    assert result.applied == () and once.digest() == digest


def write_revocation(replica: Replica, draw: Draw) -> None:
    replica.revoke_device(draw(st.sampled_from(DEVICES)), {"signer": replica.device_id})


def ops_in_effect(ops: list[Op]) -> list[Op]:
    """The ops that count: none stamped after its device's revocation (a revocation counts only if its signer's
    device was not revoked before it)."""
    revoked_at: dict[str, int] = {}
    in_effect = []
    for op in sorted(ops, key=lambda op: op.hlc):
        if op.device in revoked_at and op.hlc > revoked_at[op.device]:
            continue
        in_effect.append(op)
        if op.collection is Collection.DEVICES and op.kind == "revoke":
            revoked_at.setdefault(op.key, op.hlc)
    return in_effect


@SETTINGS
@given(data=st.data())
def test_ops_after_their_devices_revocation_have_no_effect_in_any_delivery_order(data):
    writers = [write_preference, write_message, write_counter, write_note, write_revocation]
    replicas = run_history(data.draw, writers, steps_max=30)
    ops = all_ops(replicas)
    shuffled = fresh_with(data.draw(st.permutations(ops)))
    in_hlc_order = fresh_with(sorted(ops, key=lambda op: op.hlc))
    assert shuffled.vector == in_hlc_order.vector  # void ops are counted, so nobody resends them
    assert shuffled.digest() == in_hlc_order.digest()
    assert shuffled.digest() == fresh_with(ops_in_effect(ops)).digest()
    # A node restarting from its stored log reaches the same state.
    restarted = make_replica("observer")
    restarted.replay(shuffled.ops_since({}, 10_000))
    assert restarted.digest() == shuffled.digest()
