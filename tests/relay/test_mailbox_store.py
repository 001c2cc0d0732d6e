"""The mailbox store contract, run on both stores: SQLite in a folder (expiry on a clock moved by hand) and a
JetStream stream on a real 3-server nats-server cluster (expiry in real time, with the store's age set to 1 s).
Then what only the SQLite store does: its sweep, kill -9, a corrupt file."""

import itertools
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import pytest
import trio

from relay.errors import MailboxReason, MailboxRefused, MailboxStoreError
from relay.mailbox_sqlite import SqliteMailboxStore
from relay.mailbox_store import MailboxStore, StoreLimits

BOX_A, BOX_B = b"a" * 16, b"b" * 16
EXPIRY_TIMEOUT_S = 10.0
# JetStream reserves a stream's max_bytes on the disk of every replica: the default 4 GiB per test stream would
# exhaust the servers' storage after a dozen tests.
TEST_STREAM_BYTES_MAX = 64 << 20
pytestmark = pytest.mark.trio
_streams = itertools.count()


class Clock:
    """Seconds since the epoch, moved by hand."""

    def __init__(self) -> None:
        self.now_s = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now_s


@attrs.define
class Stores:
    """Opens stores of one kind; each test's stores are its own (a folder, or a stream of its own)."""

    kind: str
    open: Callable[..., Awaitable[MailboxStore]]
    clock: Clock

    async def let_expire(self, store: MailboxStore, mailbox_id: bytes, age_s: float) -> None:
        """Age the mailbox's items past expiry: move the clock (SQLite) or wait for JetStream to drop them."""
        if self.kind == "sqlite":
            self.clock.now_s += age_s
            return
        with trio.fail_after(EXPIRY_TIMEOUT_S):
            while (await store.fetch(mailbox_id, 0, 10, 1 << 20))[0]:
                await trio.sleep(0.05)


@pytest.fixture(params=["sqlite", "jetstream"])
def stores(request, tmp_path) -> Stores:
    clock = Clock()
    if request.param == "sqlite":

        async def open_sqlite(**limits) -> MailboxStore:
            return await SqliteMailboxStore.open(tmp_path, StoreLimits(**limits), clock)

        return Stores("sqlite", open_sqlite, clock)
    cluster = request.getfixturevalue("nats_cluster")
    from relay.mailbox_jetstream import JetStreamMailboxStore

    stream = f"T{os.getpid()}_{next(_streams)}"

    async def open_jetstream(**limits) -> MailboxStore:
        limits = {"total_bytes_max": TEST_STREAM_BYTES_MAX, **limits}
        return await JetStreamMailboxStore.open(cluster.urls, StoreLimits(**limits), stream=stream)

    return Stores("jetstream", open_jetstream, clock)


async def blobs_of(store: MailboxStore, mailbox_id: bytes, after: int = 0) -> list[bytes]:
    return [item.blob for item in (await store.fetch(mailbox_id, after, 1000, 1 << 20))[0]]


async def test_put_then_fetch_after_a_cursor(stores):
    store = await stores.open()
    cursors = [await store.put(BOX_A, f"blob-{i}".encode()) for i in range(5)]
    await store.put(BOX_B, b"other mailbox")
    assert cursors == sorted(cursors)
    items, more = await store.fetch(BOX_A, 0, 3, 1 << 20)
    assert [item.blob for item in items] == [b"blob-0", b"blob-1", b"blob-2"] and more
    items, more = await store.fetch(BOX_A, items[-1].cursor, 10, 1 << 20)
    assert [item.blob for item in items] == [b"blob-3", b"blob-4"] and not more
    assert await store.fetch(BOX_A, cursors[-1], 10, 1 << 20) == ([], False)
    await store.close()


async def test_cursors_increase_with_every_put_across_mailboxes(stores):
    store = await stores.open()
    cursors = [await store.put(box, f"blob-{i}".encode()) for i, box in enumerate([BOX_A, BOX_B] * 5)]
    assert all(later > earlier for earlier, later in zip(cursors, cursors[1:]))
    items, _ = await store.fetch(BOX_B, 0, 10, 1 << 20)
    assert [item.cursor for item in items] == cursors[1::2]
    assert [item.blob for item in items] == [f"blob-{i}".encode() for i in range(1, 10, 2)]
    await store.close()


async def test_fetch_stops_at_its_byte_budget_but_always_returns_one_item(stores):
    store = await stores.open()
    for i in range(3):
        await store.put(BOX_A, bytes([i]) * 100)
    items, more = await store.fetch(BOX_A, 0, 10, 150)
    assert len(items) == 1 and more
    items, more = await store.fetch(BOX_A, 0, 10, 50)
    assert len(items) == 1 and more
    items, more = await store.fetch(BOX_A, 0, 10, 200)
    assert len(items) == 2 and more
    await store.close()


@pytest.mark.parametrize(
    "limits, blobs, reason",
    [
        ({"mailbox_items_max": 2}, [b"1", b"2", b"3"], MailboxReason.QUOTA_EXCEEDED),
        ({"mailbox_bytes_max": 10}, [b"x" * 6, b"y" * 5], MailboxReason.QUOTA_EXCEEDED),
        ({"blob_bytes_max": 4}, [b"x" * 5], MailboxReason.BLOB_TOO_LARGE),
        # JetStream counts its whole record (~200 bytes of subject and headers beyond the blob) against the total.
        ({"total_bytes_max": 10_000}, [b"x" * 6000, b"y" * 5000], MailboxReason.STORE_FULL),
    ],
)
async def test_bounds_refuse_a_put_and_leave_other_mailboxes_alone(stores, limits, blobs, reason):
    store = await stores.open(**limits)
    for blob in blobs[:-1]:
        await store.put(BOX_A, blob)
    with pytest.raises(MailboxRefused) as refused:
        await store.put(BOX_A, blobs[-1])
    assert refused.value.reason is reason
    assert await blobs_of(store, BOX_A) == blobs[:-1]
    if reason is MailboxReason.QUOTA_EXCEEDED:
        await store.put(BOX_B, blobs[-1])
    await store.close()


async def test_concurrent_puts_each_get_their_own_cursor_within_the_quota(stores):
    store = await stores.open(mailbox_items_max=150)
    outcomes: list[int | MailboxReason] = []

    async def put(i: int) -> None:
        try:
            outcomes.append(await store.put(BOX_A, i.to_bytes(4, "big")))
        except MailboxRefused as refused:
            outcomes.append(refused.reason)

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(put, i)
    cursors = [o for o in outcomes if isinstance(o, int)]
    assert len(set(cursors)) == 150 and outcomes.count(MailboxReason.QUOTA_EXCEEDED) == 50
    items, _ = await store.fetch(BOX_A, 0, 1000, 1 << 20)
    assert [item.cursor for item in items] == sorted(cursors)
    await store.close()


async def test_a_retried_put_is_stored_once(stores):
    store = await stores.open()
    first = await store.put(BOX_A, b"sealed batch")
    assert await store.put(BOX_A, b"sealed batch") == first
    other = await store.put(BOX_B, b"sealed batch")  # the same blob in another mailbox is another item
    assert other > first
    assert await blobs_of(store, BOX_A) == [b"sealed batch"]
    await store.close()


async def test_expired_items_are_never_returned_and_free_their_quota(stores):
    store = await stores.open(expire_s=1.0, mailbox_items_max=2)
    await store.put(BOX_A, b"old-1")
    await store.put(BOX_A, b"old-2")
    with pytest.raises(MailboxRefused):
        await store.put(BOX_A, b"over quota")
    await stores.let_expire(store, BOX_A, 1.5)
    assert await store.fetch(BOX_A, 0, 10, 1 << 20) == ([], False)
    await store.purge_expired()
    await store.put(BOX_A, b"new")
    assert await blobs_of(store, BOX_A) == [b"new"]
    await store.close()


async def test_items_quota_usage_and_cursors_survive_reopening(stores):
    store = await stores.open(mailbox_items_max=2, mailbox_bytes_max=12)
    first = await store.put(BOX_A, b"kept")
    await store.close()
    store = await stores.open(mailbox_items_max=2, mailbox_bytes_max=12)
    with pytest.raises(MailboxRefused):
        await store.put(BOX_A, b"over the byte quota")  # 4 + 19 bytes
    second = await store.put(BOX_A, b"kept too")
    assert second > first
    with pytest.raises(MailboxRefused):
        await store.put(BOX_A, b"x")  # a third item
    assert await blobs_of(store, BOX_A) == [b"kept", b"kept too"]
    await store.close()
    with pytest.raises(MailboxStoreError):
        await store.put(BOX_A, b"closed")


# -- SQLite only --------------------------------------------------------------------------------------------


async def test_sqlite_sweep_deletes_expired_items_and_their_bytes(tmp_path):
    clock = Clock()
    store = await SqliteMailboxStore.open(tmp_path, StoreLimits(expire_s=100.0), clock)
    await store.put(BOX_A, b"old-1")
    await store.put(BOX_B, b"old-2")
    clock.now_s += 60
    await store.put(BOX_A, b"young")
    clock.now_s += 50
    assert await store.purge_expired() == 2
    assert store.total_bytes == len(b"young")
    await store.close()


_PUT_THEN_KILL = """
import os, sys, trio
from pathlib import Path
from relay.mailbox_sqlite import SqliteMailboxStore

async def main():
    store = await SqliteMailboxStore.open(Path(sys.argv[1]))
    for i in range(50):
        cursor = await store.put(b"k" * 16, i.to_bytes(4, "big"))
        print(cursor, flush=True)  # acknowledged
    os.kill(os.getpid(), 9)

trio.run(main)
"""


async def test_sqlite_acknowledged_puts_survive_kill_9(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", _PUT_THEN_KILL, str(tmp_path)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )  # fmt: skip
    assert result.returncode == -9
    acknowledged = [int(line) for line in result.stdout.split()]
    assert len(acknowledged) == 50
    store = await SqliteMailboxStore.open(tmp_path)
    items, _ = await store.fetch(b"k" * 16, 0, 100, 1 << 20)
    assert [item.cursor for item in items] == acknowledged
    await store.close()


async def test_sqlite_unopenable_store_raises_store_error(tmp_path):
    (tmp_path / "mailbox.sqlite3").write_bytes(b"not a database" * 100)
    with pytest.raises(MailboxStoreError):
        await SqliteMailboxStore.open(tmp_path)


async def test_sqlite_a_put_is_remembered_for_the_duplicate_window_only(tmp_path):
    clock = Clock()
    store = await SqliteMailboxStore.open(tmp_path, StoreLimits(), clock)
    first = await store.put(BOX_A, b"same")
    clock.now_s += StoreLimits().duplicate_window_s + 1
    await store.purge_expired()
    assert await store.put(BOX_A, b"same") > first  # a new put now, not a retry
    await store.close()
