"""A node's op log compacted (stores/primary.py plan_compaction), and a device that lacks the compacted ops caught up
from the state streamed in parts, resumed after an interrupt (crdt/stream.py, node/sync/session.py)."""

import functools
import random
import time

import pytest
import trio

from crdt import Collection, HybridClock, Replica, SnapshotRequired
from node.sync.receiver import Notifier, OpsReceiver
from node.sync.session import OpsApplied, SessionConfig, StateMerged, SyncSession
from stores import primary
from stores.datalayer import DataLayer, StoreConfig
from stores.primary import LogBatch
from tests.stores.test_message_store import random_ops
from tests.test_datalayer import DIMS, store_key

INVITER, JOINER = "12D3KooWTestInviter", "12D3KooWTestJoiner"
CONFIG = SessionConfig(part_messages_max=64)
MESSAGE = {"conversation": "c", "role": "user", "text": "hi", "ts_ms": 1}
EVERY_COLLECTION = {collection.value for collection in Collection}  # parts of at most 64 messages


async def open_home(home, device: str) -> DataLayer:
    return await DataLayer.open(home, device, store_key, StoreConfig(embedding_dims=DIMS))


async def filled_home(home, rng: random.Random) -> DataLayer:
    """A home with messages of several devices (adds, edits, deletes) logged in small batches, and a few ops of other
    collections among them."""
    data = await open_home(home, INVITER)
    ops = random_ops(rng)
    for start in range(0, len(ops), 25):
        await data.persist(data.replica.apply(ops[start : start + 25]).applied)
    for start in range(0, 600, 25):
        fields = {"conversation": "c", "role": "user", "text": "hi", "ts_ms": 1}
        await data.persist([data.replica.add_message(f"bulk{number:04}", fields) for number in range(start, start + 25)])
    await data.persist([data.replica.set_preference("theme", "dark"), data.replica.increment("visits", 3)])
    await data.persist([data.replica.edit_note("todo", "buy milk")])
    memory = data.replica.add_memory("mem1", "likes tea", bytes(4 * DIMS), {"source": "chat"})
    await data.persist([memory])
    return data


async def receive(data: DataLayer, events: list) -> None:
    """Persist what a session applied or merged, as a node does (node/net/sessions.py _on_events)."""
    batches = [LogBatch(event.ops) for event in events if isinstance(event, OpsApplied) and event.ops]
    pending = OpsReceiver(data, Notifier(), lambda ops: None).stage(batches, [e for e in events if isinstance(e, StateMerged)])
    if pending is not None:
        await data.write(pending)


async def converse(a: SyncSession, b: SyncSession, data_a: DataLayer, data_b: DataLayer, frames_max: int = 10_000):
    """Let two sessions talk until both are quiet, persisting what each receives; return B's events."""
    seen = []
    for _ in range(frames_max):
        moved = False
        for sender, receiver, data in ((a, b, data_b), (b, a, data_a)):
            if (frame := sender.generate()) is not None:
                moved = True
                events = receiver.receive_data(frame)
                await receive(data, events)
                if receiver is b:
                    seen += events
        if not moved:
            return seen
    raise AssertionError("sessions never went quiet")


@pytest.mark.trio
async def test_compaction_folds_away_batches_of_messages_every_device_has_and_a_start_still_takes_up_the_state(tmp_path):
    data = await filled_home(tmp_path / "a", random.Random(5))
    try:
        digest, vector = data.replica.digest(), dict(data.replica.vector)
        batches_before = (await data.sql.query("SELECT count(*) FROM op_batches"))[0][0]
        # Every trusted device has all but the inviter's last 100 ops.
        safe = {**vector, INVITER: vector[INVITER] - 100}
        deleted = await data.log.compact(data.sql, safe, batches_max=3)  # many small steps
        kept = await data.sql.query("SELECT id, other_ops FROM op_batches")
        assert deleted > 0 and len(kept) == batches_before - deleted
        runs = await data.sql.query("SELECT device, seq_first, seq_last, batch FROM op_runs")
        assert {batch for *_, batch in runs} == {batch for batch, _ in kept}
        for batch, other_ops in kept:
            # A batch stays when it holds ops of other collections or an op some device lacks.
            batch_runs = [run for run in runs if run[3] == batch]
            assert other_ops > 0 or any(seq_last > safe[device] for device, _, seq_last, _ in batch_runs)
        bases = await data.sql.run(primary.log_bases)
        assert bases and all(seq <= safe[device] for device, seq in bases.items())
        assert await data.sql.run(primary.logged_vector) == vector
        # Every op above a device's base is still served; below it, the state must be sent instead.
        for device, base in bases.items():
            assert [op.seq for op in data.replica.log.tail(device, base)] == list(range(base + 1, vector[device] + 1))
            with pytest.raises(SnapshotRequired):
                data.replica.ops_since({**vector, device: base - 1}, 10)
        assert await data.log.compact(data.sql, safe) == 0
        await data.close()
        data = await open_home(tmp_path / "a", INVITER)
        assert data.replica.digest() == digest and data.replica.vector == vector
        assert data.replica.clock.last >= max(hlc for (hlc,) in await data.sql.query("SELECT add_hlc FROM messages"))
    finally:
        await data.close()


@pytest.mark.trio
async def test_batches_logged_while_a_compaction_runs_are_not_deleted_unread(tmp_path):
    data = await filled_home(tmp_path / "a", random.Random(6))
    newcomer = Replica("dev-new", HybridClock(lambda: time.time_ns() // 1_000_000))
    written = [newcomer.add_message(f"new{number}", MESSAGE) for number in range(5)]
    try:
        async with trio.open_nursery() as nursery:
            # Every device said it has everything but the newcomer's ops, which no compaction may delete.
            safe = dict(data.replica.vector)
            nursery.start_soon(functools.partial(data.log.compact, data.sql, safe, batches_max=1))
            for op in written:
                await trio.sleep(0)
                await data.persist(data.replica.apply([op]).applied)
        assert [op.seq for op in data.replica.log.tail("dev-new", 0)] == [1, 2, 3, 4, 5]
        # Once every device has them; the newest batch stays, so batch ids never go back (primary.compaction_scope).
        assert await data.log.compact(data.sql, {**safe, "dev-new": 5}) == 4
    finally:
        await data.close()


@pytest.mark.trio
async def test_a_device_lacking_compacted_ops_gets_the_state_in_parts_resumes_after_an_interrupt_and_keeps_it(tmp_path):
    inviter = await filled_home(tmp_path / "a", random.Random(9))
    joiner = await open_home(tmp_path / "b", JOINER)
    try:
        vector = dict(inviter.replica.vector)
        assert await inviter.log.compact(inviter.sql, vector) > 0
        # The joiner merges a few parts, then the connection drops and the joiner restarts.
        a, b = SyncSession(inviter.replica, CONFIG), SyncSession(joiner.replica, CONFIG)
        b.receive_data(a.generate())
        a.receive_data(b.generate())
        parts = []
        while len(parts) < 4:
            events = b.receive_data(a.generate())
            await receive(joiner, events)
            parts += [event.part for event in events if isinstance(event, StateMerged)]
        assert not any(part.final for part in parts) and set(parts[0].state) == EVERY_COLLECTION - {"messages"}
        assert joiner.state_progress == (parts[-1].messages_done, parts[-1].messages_total)
        await joiner.close()
        joiner = await open_home(tmp_path / "b", JOINER)
        assert joiner.state_resume is not None and joiner.state_resume.after_id == parts[-1].upto
        assert joiner.replica.vector == {}  # no op counts as held until the final part
        # A write on the inviter meanwhile: it follows the resumed stream as a delta.
        await inviter.persist([inviter.replica.add_message("late", {"conversation": "c", "role": "user", "text": "x", "ts_ms": 2})])
        a, b = SyncSession(inviter.replica, CONFIG), SyncSession(joiner.replica, CONFIG, resume=joiner.state_resume)
        events = await converse(a, b, inviter, joiner)
        resumed = [event.part for event in events if isinstance(event, StateMerged)]
        assert resumed[0].vector == parts[0].vector and set(resumed[0].state) == EVERY_COLLECTION - {"messages"}
        resent = [message_id for part in resumed for message_id in part.state.get("messages", {}).get("records", {})]
        assert resent and min(resent) > parts[-1].upto
        assert resumed[-1].final and joiner.state_resume is None and joiner.state_progress is None
        # The clock the state brought is kept for the next start: its stamps are in no logged run.
        assert await joiner.sql.run(primary.get_meta, primary.CLOCK_LAST) >= resumed[-1].clock > 0
        assert any(isinstance(event, OpsApplied) and event.ops for event in events)  # the late write
        assert joiner.replica.digest() == inviter.replica.digest()
        assert joiner.replica.vector == inviter.replica.vector
        await joiner.close()
        joiner = await open_home(tmp_path / "b", JOINER)
        assert joiner.replica.digest() == inviter.replica.digest()
        assert joiner.replica.vector == inviter.replica.vector
        assert joiner.ops_stored == inviter.replica.vector.total()
        # The joiner's own writes sync back to the inviter as deltas.
        await joiner.persist([joiner.replica.set_preference("theme", "light")])
        a, b = SyncSession(inviter.replica, CONFIG), SyncSession(joiner.replica, CONFIG)
        assert not any(isinstance(event, StateMerged) for event in await converse(a, b, inviter, joiner))
        assert inviter.replica.digest() == joiner.replica.digest()
        stored = await joiner.sql.query("SELECT key FROM preferences")
        assert stored == [("theme",)]
        counts = await joiner.sql.query("SELECT id, message_count FROM conversations ORDER BY id")
        recount = await joiner.sql.query("SELECT conversation, count(*) FROM messages GROUP BY conversation ORDER BY 1")
        assert counts == recount
    finally:
        await inviter.close()
        await joiner.close()
