"""The data layer end to end on the real engines: unit of work, materialised tables, outbox projector."""

import hashlib
import threading
import time

import numpy as np
import pytest
import trio

from crdt import Collection, HybridClock, Replica, encode_op
from crdt import messages as message_rules
from stores import datalayer, migrate, open_sql, primary
from stores.datalayer import DataLayer, StoreConfig
from stores.projector import PREFERENCE_CACHE_PREFIX, Projector
from stores.repositories import DataError, UnitOfWork, new_id
from tests.conftest import ManualClock, make_replica
from tests.test_revocation_cutoff import backdated, revoke

DIMS = 8
MESSAGE = {"conversation": "chat", "role": "user", "text": "hi", "ts_ms": 1}
DEVICE = "12D3KooWTestDevice"


def store_key(purpose: str) -> bytes:
    return hashlib.sha256(b"test-key:" + purpose.encode()).digest()


async def open_data(home, engine="sqlcipher") -> DataLayer:
    return await DataLayer.open(home, DEVICE, store_key, StoreConfig(engine=engine, embedding_dims=DIMS))


def vector(*values: float) -> np.ndarray:
    padded = np.zeros(DIMS, dtype="<f4")
    padded[: len(values)] = values
    return padded


@pytest.fixture(params=["sqlcipher", "libsql"])
def engine(request):
    return request.param


@pytest.mark.trio
async def test_conversation_counts_follow_adds_edits_deletes_and_a_remote_add_that_moves_a_message(tmp_path, engine):
    data = await open_data(tmp_path, engine)

    async def counted() -> tuple[list, list]:
        recounted = await data.sql.query(
            "SELECT conversation, count(*), max(ts_ms) FROM messages GROUP BY conversation ORDER BY max(ts_ms) DESC"
        )
        async with UnitOfWork(data) as uow:
            return [tuple(row) for row in await uow.conversations.conversations()], [tuple(row) for row in recounted]

    try:
        async with UnitOfWork(data) as uow:
            ids = [uow.conversations.add_message(name, f"m{ts}", ts_ms=ts) for name, ts in
                   [("a", 10), ("a", 30), ("a", 20), ("b", 40), ("b", 50)]]  # fmt: skip
            await uow.commit()
        kept, recounted = await counted()
        assert kept == recounted == [("b", 2, 50), ("a", 3, 30)]
        async with UnitOfWork(data) as uow:
            uow.conversations.edit_message(ids[1], "text", "edited")  # an edit changes no count
            uow.conversations.forget(ids[1])  # a's latest leaves: its latest is 20 now
            await uow.commit()
        async with UnitOfWork(data) as uow:
            uow.conversations.forget(ids[3])
            uow.conversations.forget(ids[4])  # b is left with nothing and goes
            uow.conversations.add_message("c", "new", ts_ms=5)
            await uow.commit()
        kept, recounted = await counted()
        assert kept == recounted == [("a", 2, 20), ("c", 1, 5)]
        # Two adds under one id: the earlier stamp wins everywhere, so the message moves to the peer's conversation.
        peer = Replica("dev-peer", HybridClock(lambda: 1))
        result = data.replica.apply([peer.add_message(ids[0], {"conversation": "d", "role": "user", "text": "x",
                                                               "ts_ms": 60, "sentiment": None, "response_time_ms": None})])  # fmt: skip
        await data.persist(result.applied)
        kept, recounted = await counted()
        assert kept == recounted == [("d", 1, 60), ("a", 1, 20), ("c", 1, 5)]
    finally:
        await data.close()


@pytest.mark.trio
async def test_a_unit_of_work_commits_everything_or_nothing(tmp_path, engine):
    data = await open_data(tmp_path, engine)
    try:
        async with UnitOfWork(data) as uow:
            uow.preferences.set("theme", "dark")
            message_id = uow.conversations.add_message("chat", "hello", sentiment=0.5, response_time_ms=120)
            uow.counters.increment("chats", 2)
            uow.notes.edit("partner", "Sam likes tea")
            await uow.commit()
        async with UnitOfWork(data) as uow:
            assert await uow.preferences.get("theme") == "dark"
            assert (await uow.conversations.get(message_id)).text == "hello"
            assert await uow.counters.get("chats") == 2
            assert await uow.notes.get("partner") == "Sam likes tea"
            assert await uow.conversations.conversations() == [("chat", 1, (await uow.conversations.get(message_id)).ts_ms)]
        digest = data.replica.digest()
        with pytest.raises(DataError):
            async with UnitOfWork(data) as uow:
                uow.preferences.set("theme", "light")
                uow.memories.save_memory("bad", vector(1)[:3])  # wrong size: refused at staging
        with pytest.raises(DataError, match="no message"):
            async with UnitOfWork(data) as uow:
                uow.preferences.set("theme", "light")
                uow.conversations.forget("no-such-id")  # refused at commit, after the first write was made
                await uow.commit()
        async with UnitOfWork(data) as uow:
            uow.preferences.set("theme", "blue")  # staged, never committed
        assert data.replica.digest() == digest
        async with UnitOfWork(data) as uow:
            assert await uow.preferences.get("theme") == "dark"
    finally:
        await data.close()


@pytest.mark.trio
async def test_state_survives_reopening_and_the_replica_is_rebuilt_from_the_op_log(tmp_path, engine):
    data = await open_data(tmp_path, engine)
    async with UnitOfWork(data) as uow:
        for i in range(50):
            uow.conversations.add_message(f"c{i % 3}", f"message {i}")
        uow.preferences.set("lang", "de")
        await uow.commit()
    digest = data.replica.digest()
    await data.close()
    data = await open_data(tmp_path, engine)
    try:
        assert data.replica.digest() == digest
        assert (await data.analytics_ready()).count() == 50  # loaded from the rebuilt replica on first use
    finally:
        await data.close()


@pytest.mark.trio
async def test_a_revocation_logged_after_the_ops_it_voids_undoes_them_in_the_store_and_after_a_restart(
    tmp_path, engine, monkeypatch
):
    monkeypatch.setattr(message_rules, "CACHED_MESSAGES_MAX", 1)  # the messages read back from the store
    clock = ManualClock()
    admin, revoked = make_replica("admin", clock), make_replica("revoked", clock)
    enrolment = admin.enrol_device("revoked", {"signer": "admin"})
    before = [revoked.set_preference("theme", "dark"), revoked.add_message("kept", {**MESSAGE, "text": "kept"})]
    admin.apply(before)
    clock.now += 10
    revocation = revoke(admin, "revoked")
    clock.now += 10
    writes = (
        revoked.set_preference("theme", "stolen"),
        revoked.increment("v", 5),
        revoked.add_message("forged", MESSAGE),
        revoked.edit_message("kept", "text", "forged"),
        revoked.delete_message("kept"),
    )
    forged = [backdated(op, revocation) for op in writes]
    data = await open_data(tmp_path, engine)
    for ops in ([enrolment, *before], forged, [revocation]):  # logged in this order: the forged ops first took effect
        await data.persist(data.replica.apply(ops).applied)

    async def undone() -> None:
        assert data.replica.preferences.get("theme") == "dark" and data.replica.counters.value("v") == 0
        assert data.replica.messages.get("kept")["text"] == "kept" and data.replica.messages.get("forged") is None
        assert await data.sql.query("SELECT id, text FROM messages") == [("kept", "kept")]
        assert await data.sql.query("SELECT * FROM message_edits UNION ALL SELECT *, 0, 0, 0, 0, 0 FROM message_tombstones") == []

    await undone()
    digest = data.replica.digest()
    await data.close()
    data = await open_data(tmp_path, engine)
    try:
        assert data.replica.digest() == digest
        await undone()
    finally:
        await data.close()


@pytest.mark.trio
async def test_a_peer_is_served_every_op_from_the_store_written_or_not_and_forgotten_content_never(tmp_path, engine):
    data = await open_data(tmp_path, engine)
    try:
        ids = []
        for round_no in range(3):  # several batches in the log
            async with UnitOfWork(data) as uow:
                ids += [uow.conversations.add_message("c", f"secret {round_no} {i}") for i in range(40)]
                await uow.commit()
        peer = Replica("dev-peer", HybridClock(lambda: 1))
        peer_ops = [peer.set_preference(f"k{i}", i) for i in range(30)]
        pending = data.prepare([primary.LogBatch(data.replica.apply(peer_ops).applied)])  # applied, not written
        everything = data.replica.ops_since({}, 10_000)
        assert len(everything) == 150 and [op.hlc for op in everything] == sorted(op.hlc for op in everything)
        assert data.replica.ops_since({DEVICE: 100, "dev-peer": 25}, 10_000) == [
            op for op in everything if op.seq > {DEVICE: 100, "dev-peer": 25}[op.device]
        ]
        await data.write(pending)
        async with UnitOfWork(data) as uow:
            uow.conversations.forget(ids[7])
            await uow.commit()
        served = data.replica.ops_since({}, 10_000)
        assert len(served) == 151 and [op.id for op in served[:150]] == [op.id for op in everything]
        assert [op.payload["text"] for op in served if op.key == ids[7] and op.kind.value == "add"] == [""]
        await data.close()
        data = await open_data(tmp_path, engine)
        assert data.replica.ops_since({}, 10_000) == served  # read back from the store after a restart
    finally:
        await data.close()


@pytest.mark.trio
async def test_a_write_of_a_few_rows_runs_as_a_brief_store_call_and_a_bulk_write_or_a_forget_does_not(tmp_path):
    data = await open_data(tmp_path)
    try:
        added = data.replica.add_message("m1", MESSAGE)
        assert data.prepare([primary.LogBatch([added])]).brief
        bulk = [data.replica.set_preference(f"k{i}", i) for i in range(datalayer.BRIEF_WRITE_ROWS_MAX // 2 + 1)]
        assert not data.prepare([primary.LogBatch(bulk)]).brief  # as many rows again as ops: over the bound
        forget = data.replica.forget(Collection.MESSAGES, "m1")
        assert not data.prepare([primary.LogBatch([forget])], [(Collection.MESSAGES, "m1")]).brief
    finally:
        await data.close()


@pytest.mark.trio
async def test_analytics_work_runs_off_the_event_loop_one_call_at_a_time(tmp_path):
    data = await open_data(tmp_path)
    running, overlaps = [], []

    def work(analytics) -> int:
        overlaps.append(len(running))
        running.append(threading.get_ident())
        time.sleep(0.01)
        running.pop()
        return analytics.count()

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(data.in_analytics, work)
        assert await data.in_analytics(lambda analytics: threading.get_ident()) != threading.get_ident()
        assert overlaps == [0, 0, 0, 0]
    finally:
        await data.close()


@pytest.mark.trio
async def test_the_projector_brings_every_derived_store_up_to_date(tmp_path):
    data = await open_data(tmp_path)
    projector = Projector(data)
    try:
        async with UnitOfWork(data) as uow:
            tea = uow.memories.save_memory("likes green tea", vector(1, 0), {"topic": "food"})
            tea_again = uow.memories.save_memory("likes green tea a lot", vector(1, 0.01), {"topic": "food"})
            cat = uow.memories.save_memory("has a cat named Miso", vector(0, 1), {"topic": "pets"})
            message_id = uow.conversations.add_message("chat", "hi", sentiment=0.2, response_time_ms=100)
            uow.preferences.set("theme", "dark")
            await uow.commit()
        assert await projector.drain() == 5
        # Neither in-memory store was loaded: the projection skipped them, and a load reads what it would have written.
        assert data.analytics.count() == 0 and data.vectors.count() == 0
        assert (await data.vectors_ready()).count() == 3 and (await data.analytics_ready()).count() == 1
        assert data.cache.get(PREFERENCE_CACHE_PREFIX + b"theme") is not None
        async with UnitOfWork(data) as uow:
            found = await uow.memories.get_memories_by_context(vector(1, 0.005), limit=5)
            assert [m.id for m in found] == [tea, cat]  # the near-duplicate collapsed into its canonical
            assert found[0].text == "likes green tea"
            filtered = await uow.memories.get_memories_by_context(vector(1, 0), limit=5, where={"topic": "pets"})
            assert [m.id for m in filtered] == [cat]
            uow.memories.forget(tea)
            uow.conversations.forget(message_id)
            await uow.commit()
        await projector.drain()
        assert data.vectors.count() == 2 and data.analytics.count() == 0
        async with UnitOfWork(data) as uow:
            found = await uow.memories.get_memories_by_context(vector(1, 0), limit=5)
            assert [m.id for m in found][0] == tea_again
        assert await projector.drain() == 0
        counts = await projector.rebuild()
        assert counts == {"analytics": 0, "vectors": 2, "cache": 1}
    finally:
        await data.close()


@pytest.mark.trio
async def test_a_logged_write_is_projected_from_the_log_and_a_compaction_hands_what_is_unprojected_to_the_outbox(
    tmp_path,
):
    data = await open_data(tmp_path)
    projector = Projector(data)

    async def analytics_today() -> tuple[int, float | None]:
        """The analytics store's count and mean sentiment of today's messages (each test message has its own)."""
        days = await data.in_analytics(lambda analytics: analytics.daily(1, time.time_ns() // 1_000_000))
        return (days[0].message_count, days[0].sentiment_avg) if days else (0, None)

    try:
        await data.analytics_ready()
        async with UnitOfWork(data) as uow:
            first = uow.conversations.add_message("chat", "hi", sentiment=-1.0)
            uow.preferences.set("theme", "dark")
            await uow.commit()
        # The write queued no outbox row: the projector owes its keys by the log.
        assert await data.sql.query("SELECT count(*) FROM outbox") == [(0,)]
        assert (await UnitOfWork(data).totals.counts()).projector_backlog == 2
        assert await projector.drain() == 2
        assert await analytics_today() == (1, -1.0) and data.cache.get(PREFERENCE_CACHE_PREFIX + b"theme") is not None
        assert (await UnitOfWork(data).totals.counts()).projector_backlog == 0
        async with UnitOfWork(data) as uow:
            uow.conversations.add_message("chat", "again", sentiment=0.5)
            await uow.commit()
        async with UnitOfWork(data) as uow:
            uow.conversations.forget(first)
            await uow.commit()
        # The second message's batch is compacted before the projector read it: its key waits in the outbox instead.
        # The first batch holds a preference too, and the newest (the forget) stays.
        assert await data.log.compact(data.sql, dict(data.replica.vector)) == 1
        assert await data.sql.query("SELECT key_count FROM outbox") == [(1,)]
        assert await projector.drain() == 2
        assert await analytics_today() == (1, 0.5)
        # The newest batch stayed, so the next one still comes after the projector's place in the log.
        async with UnitOfWork(data) as uow:
            uow.conversations.add_message("chat", "and again", sentiment=0.25)
            await uow.commit()
        assert await projector.drain() == 1
        assert await analytics_today() == (2, 0.375)
        # The projector's place in the log outlives a restart: nothing is projected twice.
        await data.close()
        data = await open_data(tmp_path)
        assert await Projector(data).drain() == 0
    finally:
        await data.close()


@pytest.mark.trio
async def test_while_the_analytics_store_is_unloaded_the_projector_passes_over_batches_of_messages_alone(tmp_path):
    data = await open_data(tmp_path)
    projector = Projector(data)
    try:
        for write in ("hi", "theme", "again"):
            async with UnitOfWork(data) as uow:
                if write == "theme":
                    uow.preferences.set("theme", "dark")
                else:
                    uow.conversations.add_message("chat", write)
                await uow.commit()
        assert await projector.drain() == 1  # the preference alone: the analytics store will read the messages itself
        assert data.cache.get(PREFERENCE_CACHE_PREFIX + b"theme") is not None
        assert (await UnitOfWork(data).totals.counts()).projector_backlog == 0
        assert (await data.analytics_ready()).count() == 2
        async with UnitOfWork(data) as uow:
            uow.conversations.add_message("chat", "loaded")
            await uow.commit()
        assert await projector.drain() == 1 and data.analytics.count() == 3
    finally:
        await data.close()


def test_a_schema_2_store_keeps_its_op_log_and_outbox_through_the_migrations(tmp_path, engine):
    replica = Replica(DEVICE, HybridClock(lambda: 1_000))
    ops = [replica.set_preference(f"k{i}", i) for i in range(4500)]  # more than one migration page
    store = open_sql(engine, tmp_path / "primary.db", store_key("primary"))
    try:
        migrate(store, primary.MIGRATIONS[:2])  # schema 2: one row per op
        with store.transaction():
            store.executemany(
                "INSERT INTO ops (device, seq, collection, key, body) VALUES (?, ?, ?, ?, ?)",
                [(op.device, op.seq, op.collection.value, op.key, encode_op(op)) for op in ops],
            )
            # One row per projection; a key's actions must stay in order.
            owed = [("cache", "upsert", "k1"), ("cache", "upsert", "k2"), ("vectors", "delete", "m1"),
                    ("cache", "delete", "k1"), *(("analytics", "upsert", f"a{i}") for i in range(700))]  # fmt: skip
            store.executemany("INSERT INTO outbox (target, action, key) VALUES (?, ?, ?)", owed)
        assert primary.open_schema(store) == primary.MIGRATIONS[-1][0]
        # A plain rowid: an AUTOINCREMENT table wrote a page of sqlite_sequence in every write.
        assert "AUTOINCREMENT" not in store.query("SELECT sql FROM sqlite_master WHERE name = 'outbox'")[0][0]
        assert [op for _, logged in primary.logged_pages(store, 0, len(ops)) for op in logged] == ops
        # Those batches' keys wait in the outbox: the projector's place in the log starts after them.
        assert primary.log_projections(store, 10_000) == (0, [])
        entries = primary.outbox_batch(store, 10_000)
        assert [(e.target, e.action, key) for e in entries for key in e.keys] == owed
        assert len(entries) == 5  # the 700 keys take two rows of at most OUTBOX_KEYS_MAX
        assert [e.keys for e in primary.outbox_batch(store, 2)] == [("k1", "k2")]  # fewer rows when fewer keys asked
        assert store.query("SELECT name FROM sqlite_master WHERE name = 'ops'") == []
        # The migrated log is read back by device and seq, as a peer's catch-up reads it (stores/oplog.py).
        ((first, last, batch),) = primary.logged_runs(store, DEVICE, 2100, 1)
        assert first <= 2101 <= last
        logged = primary.logged_pages(store, batch - 1, 1)[0][1]
        assert ops[2100] in logged
    finally:
        store.close()


@pytest.mark.trio
async def test_forgetting_leaves_no_content_in_the_primary_store_file(tmp_path, engine):
    secret = "my-very-distinctive-secret-text"
    data = await open_data(tmp_path, engine)
    async with UnitOfWork(data) as uow:
        message_id = uow.conversations.add_message("chat", secret)
        memory_id = uow.memories.save_memory(secret + "-memory", vector(0, 0, 1), {})
        await uow.commit()
    async with UnitOfWork(data) as uow:
        uow.conversations.forget(message_id)
        uow.memories.forget(memory_id)
        await uow.commit()
    assert data.replica.messages.get(message_id) is None  # the messages' state is the store's (checked below)
    assert secret not in repr(data.replica.memories.to_state())
    assert all(secret not in repr(op.payload) for op in data.replica.ops_since({}, 1000))
    rows = await data.sql.query("SELECT count(*) FROM messages")
    assert rows == [(0,)]
    await data.close()
    data = await open_data(tmp_path, engine)  # the redaction was stored, not just made in memory
    try:
        assert all(secret not in repr(op.payload) for op in data.replica.ops_since({}, 1000))
    finally:
        await data.close()


@pytest.mark.trio
async def test_a_store_of_another_device_or_with_another_key_is_refused(tmp_path):
    from stores.errors import StoreError, WrongKeyError

    data = await open_data(tmp_path)
    await data.close()
    with pytest.raises(StoreError, match="belongs to device"):
        await DataLayer.open(tmp_path, "12D3KooWOther", store_key, StoreConfig(embedding_dims=DIMS))
    with pytest.raises(WrongKeyError):
        await DataLayer.open(tmp_path, DEVICE, lambda p: b"\x01" * 32, StoreConfig(embedding_dims=DIMS))


@pytest.mark.trio
async def test_session_context_is_sealed_and_expires(tmp_path):
    now = [1_700_000_000_000]
    data = await DataLayer.open(tmp_path, DEVICE, store_key, StoreConfig(embedding_dims=DIMS), now_ms=lambda: now[0])
    try:
        async with UnitOfWork(data) as uow:
            uow.session.set("active_context", {"topic": "a very distinctive topic"}, ttl_s=60)
            assert uow.session.get("active_context") == {"topic": "a very distinctive topic"}
            now[0] += 61_000
            assert uow.session.get("active_context") is None
            with pytest.raises(DataError):
                uow.session.set("x", 1, ttl_s=-1)
    finally:
        await data.close()
    assert all(b"a very distinctive topic" not in path.read_bytes() for path in (tmp_path / "cache").rglob("*") if path.is_file())


def test_new_ids_are_unique_and_sort_by_creation_time():
    earlier = [new_id() for _ in range(1000)]
    last_ms = time.time_ns() // 1_000_000
    while time.time_ns() // 1_000_000 <= last_ms:  # ids carry milliseconds: the next one is a millisecond later
        pass
    later = new_id()
    assert len(set(earlier)) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in earlier)
    assert max(earlier) < later


@pytest.mark.trio
async def test_the_analytics_store_loads_in_slices_and_holds_every_message_as_stored(tmp_path, monkeypatch):
    monkeypatch.setattr(datalayer, "ANALYTICS_LOAD_ROWS", 2)
    data = await open_data(tmp_path)
    now_ms = time.time_ns() // 1_000_000
    try:
        async with UnitOfWork(data) as uow:
            ids = [uow.conversations.add_message("chat", f"m{number}", ts_ms=now_ms - number) for number in range(5)]
            await uow.commit()
        async with UnitOfWork(data) as uow:
            uow.conversations.edit_message(ids[1], "sentiment", -0.5)
            uow.conversations.forget(ids[0])
            await uow.commit()
        analytics = await data.analytics_ready()
        assert analytics.count() == 4
        (today,) = analytics.daily(1, now_ms)
        assert (today.message_count, today.sentiment_avg) == (4, -0.5)  # the edit applied, the forgotten message gone
        assert await data.reload_analytics() == 4 and analytics.count() == 4
    finally:
        await data.close()


@pytest.mark.trio
async def test_a_session_running_over_the_replica_sees_it_reloaded_after_a_failed_write(tmp_path):
    from node.sync.session import SyncSession
    from tests.test_session import converse

    data = await open_data(tmp_path)
    try:
        async with UnitOfWork(data) as uow:
            uow.preferences.set("stored", 1)
            await uow.commit()
        session = SyncSession(data.replica)
        peer = Replica("dev-peer", HybridClock(lambda: time.time_ns() // 1_000_000))
        peer_session = SyncSession(peer)
        # An op applied in memory whose write then failed: the reload must take it back out of every session's view.
        data.replica.set_preference("never stored", 2)
        await data.reload_replica()
        assert session.replica is data.replica
        converse(session, peer_session)
        assert peer.preferences.get("stored") == 1
        assert peer.preferences.get("never stored") is None
        assert peer.vector == data.replica.vector
    finally:
        await data.close()
