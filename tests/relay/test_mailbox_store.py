"""The mailbox store on real SQLite: cursors, quotas, the global cap, expiry on an injected clock, persistence."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from relay.errors import MailboxReason, MailboxRefused, MailboxStoreError
from relay.mailbox_store import MailboxStore, StoreLimits

BOX_A, BOX_B = b"a" * 16, b"b" * 16
pytestmark = pytest.mark.trio


class Clock:
    """Seconds since the epoch, moved by hand."""

    def __init__(self) -> None:
        self.now_s = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now_s


async def open_store(path: Path, clock: Clock | None = None, **limits) -> MailboxStore:
    return await MailboxStore.open(path, StoreLimits(**limits), clock or Clock())


async def test_put_then_fetch_after_a_cursor(tmp_path):
    store = await open_store(tmp_path)
    cursors = [await store.put(BOX_A, f"blob-{i}".encode()) for i in range(5)]
    await store.put(BOX_B, b"other mailbox")
    assert cursors == sorted(cursors)
    items, more = await store.fetch(BOX_A, 0, 3, 1 << 20)
    assert [item.blob for item in items] == [b"blob-0", b"blob-1", b"blob-2"] and more
    items, more = await store.fetch(BOX_A, items[-1].cursor, 10, 1 << 20)
    assert [item.blob for item in items] == [b"blob-3", b"blob-4"] and not more
    assert await store.fetch(BOX_A, cursors[-1], 10, 1 << 20) == ([], False)
    await store.close()


async def test_fetch_stops_at_its_byte_budget_but_always_returns_one_item(tmp_path):
    store = await open_store(tmp_path)
    for _ in range(3):
        await store.put(BOX_A, b"x" * 100)
    items, more = await store.fetch(BOX_A, 0, 10, 150)
    assert len(items) == 1 and more
    items, more = await store.fetch(BOX_A, 0, 10, 50)
    assert len(items) == 1 and more
    await store.close()


@pytest.mark.parametrize(
    "limits, blobs, reason",
    [
        ({"mailbox_items_max": 2}, [b"1", b"2", b"3"], MailboxReason.QUOTA_EXCEEDED),
        ({"mailbox_bytes_max": 10}, [b"x" * 6, b"x" * 5], MailboxReason.QUOTA_EXCEEDED),
        ({"blob_bytes_max": 4}, [b"x" * 5], MailboxReason.BLOB_TOO_LARGE),
        ({"total_bytes_max": 10}, [b"x" * 6, b"x" * 5], MailboxReason.STORE_FULL),
    ],
)
async def test_bounds_refuse_a_put_and_leave_other_mailboxes_alone(tmp_path, limits, blobs, reason):
    store = await open_store(tmp_path, **limits)
    for blob in blobs[:-1]:
        await store.put(BOX_A, blob)
    with pytest.raises(MailboxRefused) as refused:
        await store.put(BOX_A, blobs[-1])
    assert refused.value.reason is reason
    assert len((await store.fetch(BOX_A, 0, 10, 1 << 20))[0]) == len(blobs) - 1
    if reason is MailboxReason.QUOTA_EXCEEDED:
        await store.put(BOX_B, blobs[-1])
    await store.close()


async def test_concurrent_puts_share_commits_and_each_get_their_own_cursor(tmp_path):
    store = await open_store(tmp_path, mailbox_items_max=150)
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


async def test_expired_items_are_never_returned_and_are_purged_freeing_quota(tmp_path):
    clock = Clock()
    store = await open_store(tmp_path, clock, expire_s=100.0, mailbox_items_max=2)
    await store.put(BOX_A, b"old-1")
    await store.put(BOX_A, b"old-2")
    clock.now_s += 60
    with pytest.raises(MailboxRefused):
        await store.put(BOX_A, b"over quota")
    clock.now_s += 50  # the two old items are now 110 s old
    assert await store.fetch(BOX_A, 0, 10, 1 << 20) == ([], False)
    assert await store.purge_expired() == 2
    assert store.total_bytes == 0
    await store.put(BOX_A, b"new")
    assert [item.blob for item in (await store.fetch(BOX_A, 0, 10, 1 << 20))[0]] == [b"new"]
    await store.close()


async def test_items_quota_usage_and_cursors_survive_reopening(tmp_path):
    store = await open_store(tmp_path, mailbox_items_max=2)
    first = await store.put(BOX_A, b"kept")
    await store.close()
    store = await open_store(tmp_path, mailbox_items_max=2)
    assert store.total_bytes == 4
    second = await store.put(BOX_A, b"kept too")
    assert second > first
    with pytest.raises(MailboxRefused):
        await store.put(BOX_A, b"over quota after reopen")
    assert [item.blob for item in (await store.fetch(BOX_A, 0, 10, 1 << 20))[0]] == [b"kept", b"kept too"]
    await store.close()
    with pytest.raises(MailboxStoreError):
        await store.put(BOX_A, b"closed")


_PUT_THEN_KILL = """
import os, sys, trio
from pathlib import Path
from relay.mailbox_store import MailboxStore

async def main():
    store = await MailboxStore.open(Path(sys.argv[1]))
    for i in range(50):
        cursor = await store.put(b"k" * 16, i.to_bytes(4, "big"))
        print(cursor, flush=True)  # acknowledged
    os.kill(os.getpid(), 9)

trio.run(main)
"""


async def test_acknowledged_puts_survive_kill_9(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", _PUT_THEN_KILL, str(tmp_path)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert result.returncode == -9
    acknowledged = [int(line) for line in result.stdout.split()]
    assert len(acknowledged) == 50
    store = await open_store(tmp_path)
    items, _ = await store.fetch(b"k" * 16, 0, 100, 1 << 20)
    assert [item.cursor for item in items] == acknowledged
    await store.close()


async def test_unopenable_store_raises_store_error(tmp_path):
    (tmp_path / "mailbox.sqlite3").write_bytes(b"not a database" * 100)
    with pytest.raises(MailboxStoreError):
        await open_store(tmp_path)
