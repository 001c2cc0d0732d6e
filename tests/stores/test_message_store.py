"""A node's messages kept in the primary store (stores/messages.py) merge exactly as a replica holding them all does."""

import random

import pytest

from crdt import Collection, HybridClock, Op, Replica
from crdt import messages as message_rules
from stores import migrate, open_sql, primary
from stores.datalayer import materialise
from stores.primary import LogBatch
from stores.repositories import UnitOfWork
from tests.test_datalayer import DEVICE, open_data, store_key

SOURCES = ("dev-a", "dev-b", "dev-c")
MESSAGE_IDS = [f"m{number}" for number in range(12)]
SEEDS = range(30)


def random_ops(rng: random.Random) -> list[Op]:
    """Return local writes of several devices on a few messages (adds, edits racing, deletes), interleaved at random."""
    now = [1_700_000_000_000]

    def tick() -> int:
        now[0] += rng.choice((0, 1, 5))
        return now[0]

    sources = [Replica(name, HybridClock(tick)) for name in SOURCES]
    ops: list[Op] = []
    for _ in range(rng.randrange(40, 120)):
        source = rng.choice(sources)
        if ops and rng.random() < 0.4:
            # The source first learns some of what others wrote, so its edits name what they replace (no conflict).
            source.apply(ops[: rng.randrange(len(ops))])
        message_id = rng.choice(MESSAGE_IDS)
        draw = rng.random()
        if draw < 0.45:
            fields = {"conversation": rng.choice("xyz"), "role": "user", "text": f"t{rng.random():.3f}", "ts_ms": now[0]}
            if rng.random() < 0.5:
                fields["sentiment"] = rng.choice((1, -0.5, None))  # a whole sentiment reads back from SQL as a float
            ops.append(source.add_message(message_id, fields))
        elif draw < 0.9:
            field = rng.choice(sorted(message_rules.EDITABLE_FIELDS))
            value = f"e{rng.random():.3f}" if field in ("text", "role") else rng.choice((2, 0.25, None))
            ops.append(source.edit_message(message_id, field, value))
        else:
            ops.append(source.delete_message(message_id))
    return ops


@pytest.mark.trio
@pytest.mark.parametrize("seed", SEEDS)
async def test_a_store_backed_replica_merges_as_one_holding_every_message(tmp_path, monkeypatch, seed):
    # A cache of 2 messages: nearly every op finds its message's state only in the store, or written since.
    monkeypatch.setattr(message_rules, "CACHED_MESSAGES_MAX", 2)
    rng = random.Random(seed)
    ops = random_ops(rng)
    rng.shuffle(ops)  # any delivery order: ops after a gap of their device are held until it fills
    oracle = Replica(DEVICE, HybridClock(lambda: 1_800_000_000_000))
    data = await open_data(tmp_path)
    try:
        done, unprepared, pending = 0, [], []
        while done < len(ops):
            chunk = ops[done : done + rng.randrange(1, 8)]
            done += len(chunk)
            oracle.apply(chunk)
            unprepared += data.replica.apply(chunk).applied
            # As a session's writer does: a write runs while later chunks are applied, and is taken from the replica
            # (prepared) before they are; its changes stay cached until written.
            if unprepared and rng.random() < 0.5:
                pending.append(data.prepare([LogBatch(unprepared)]))
                unprepared = []
            if pending and rng.random() < 0.5:
                await data.write(pending.pop(0))
            if not pending and not unprepared and rng.random() < 0.1:
                # A restart: the replica takes up the store's state, replaying no message op.
                await data.close()
                data = await open_data(tmp_path)
        for write in [*pending, data.prepare([LogBatch(unprepared)])]:
            await data.write(write)
        # Ops held past a restart were dropped; a peer sends again what the vector lacks.
        await data.persist(data.replica.apply(ops).applied)
        assert data.replica.vector == oracle.vector, f"seed {seed}"
        assert data.replica.digest() == oracle.digest(), f"seed {seed}"
        assert len(data.replica.messages) == len(oracle.messages)
        stored = await data.sql.query("SELECT id, conversation, role, text, ts_ms, sentiment, response_time_ms FROM messages")
        assert sorted(stored) == sorted(oracle.messages.row(message_id)[:7] for message_id in oracle.messages.records)
        await data.close()
        data = await open_data(tmp_path)
        assert data.replica.clock.last == max(op.hlc for op in ops)  # taken from the log's runs, not replayed
        assert data.replica.digest() == oracle.digest()
    finally:
        await data.close()


@pytest.mark.trio
async def test_conflicts_are_journalled_as_by_a_replica_holding_every_message(tmp_path, monkeypatch):
    monkeypatch.setattr(message_rules, "CACHED_MESSAGES_MAX", 2)
    rng = random.Random(7)
    ops = random_ops(rng)
    oracle = Replica(DEVICE, HybridClock(lambda: 1_800_000_000_000))
    data = await open_data(tmp_path)
    try:
        for start in range(0, len(ops), 3):
            oracle.apply(ops[start : start + 3])
            await data.persist(data.replica.apply(ops[start : start + 3]).applied)
        assert len(oracle.journal) > 0
        assert list(data.replica.journal) == list(oracle.journal)
    finally:
        await data.close()


@pytest.mark.trio
async def test_a_digest_reads_the_store_as_it_was_when_its_views_were_taken(tmp_path):
    data = await open_data(tmp_path)
    try:
        ops = random_ops(random.Random(3))
        await data.persist(data.replica.apply(ops[:30]).applied)
        before, views = data.replica.digest(), data.replica.views()
        await data.persist(data.replica.apply(ops[30:]).applied)
        assert views.digest() == before != data.replica.digest()
    finally:
        await data.close()


@pytest.mark.trio
async def test_a_home_from_before_has_its_messages_merge_state_written_once_from_its_log(tmp_path):
    ops = random_ops(random.Random(11))
    oracle = Replica(DEVICE, HybridClock(lambda: 1_800_000_000_000))
    oracle.apply(ops)
    oracle.set_preference("theme", "dark")  # a batch holding ops of another collection too
    store = open_sql("sqlcipher", tmp_path / "primary.db", store_key("sql"))
    try:
        migrate(store, primary.MIGRATIONS[:4])  # schema 4: the messages' rows only, their merge state in memory
        with store.transaction():
            (preference,) = oracle.log.tail(DEVICE, 0)
            primary._log_batches(store, [LogBatch(ops[:20]), LogBatch([*ops[20:], preference])], counted=False)
            rows = [oracle.messages.row(message_id)[:7] for message_id in oracle.messages.records]
            store.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    finally:
        store.close()
    data = await open_data(tmp_path)
    try:
        assert data.replica.digest() == oracle.digest()
        assert await data.sql.query("SELECT id, other_ops FROM op_batches ORDER BY id") == [(1, 0), (2, 1)]
        assert await data.sql.run(primary.logged_clock) == oracle.clock.last
    finally:
        await data.close()
    data = await open_data(tmp_path)  # now a start that replays no message op
    try:
        assert data.replica.digest() == oracle.digest()
        assert data.replica.clock.last == oracle.clock.last
        late = Replica("dev-late", HybridClock(lambda: 1_700_000_000_000))  # stamps older than every op above
        concurrent = [late.edit_message(message_id, "text", "late") for message_id in MESSAGE_IDS]
        oracle.apply(concurrent)
        await data.persist(data.replica.apply(concurrent).applied)
        assert data.replica.digest() == oracle.digest()
    finally:
        await data.close()


@pytest.mark.trio
async def test_reading_more_messages_than_the_cache_holds_keeps_it_bounded_and_answers_right(tmp_path, monkeypatch):
    # A re-import reads every message it is given, finds them stored, and writes nothing.
    monkeypatch.setattr(message_rules, "CACHED_MESSAGES_MAX", 8)
    data = await open_data(tmp_path)
    try:
        async with UnitOfWork(data) as uow:
            ids = [uow.conversations.add_message("chat", f"m{number}") for number in range(60)]
            await uow.commit()
        await data.close()
        data = await open_data(tmp_path)
        messages = data.replica.messages
        for start in range(0, 60, 5):
            chunk = [*ids[start : start + 5], f"absent-{start}"]
            assert messages.seen(chunk) == set(ids[start : start + 5])
            assert len(messages.records) <= 8 + 5
        assert messages.seen(ids[:8]) == set(ids[:8])  # read again after being dropped
        # Held ones asked for again, beside more than the bound lets in: none of those asked for is dropped.
        assert messages.seen(ids[50:55]) == set(ids[50:55])
        assert messages.seen([*ids[50:55], *ids[10:16]]) == {*ids[50:55], *ids[10:16]}
    finally:
        await data.close()


def test_a_write_that_rolls_back_leaves_no_stamp_number_in_the_cache(tmp_path):
    # Message rows name their add's device by number; a cached number the store does not hold would lose that device.
    source = Replica("dev-new", HybridClock(lambda: 1_700_000_000_000))
    op = source.add_message("m1", {"conversation": "c", "role": "user", "text": "hi", "ts_ms": 1})
    changes = materialise(source, {Collection.MESSAGES: ["m1"]})
    store = open_sql("sqlcipher", tmp_path / "primary.db", store_key("sql"))
    try:
        primary.open_schema(store)
        numbers: dict[str, int] = {}
        with pytest.raises(TypeError):  # the write fails after it numbered the device
            primary.persist(store, [LogBatch([op])], changes, [], meta={"unpackable": object()}, stamp_numbers=numbers)
        assert numbers == {} and store.query("SELECT device FROM stamp_devices") == []
        primary.persist(store, [LogBatch([op])], changes, [], stamp_numbers=numbers)
        assert numbers == dict(store.query("SELECT device, number FROM stamp_devices")) == {"dev-new": 1}
        assert primary.stored_messages(store, ["m1"])[0][0][-2] == "dev-new"
    finally:
        store.close()
