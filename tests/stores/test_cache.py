"""SealedKv and PersistentQueue against a real RocksDB."""

import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import nacl.secret
import pytest
import rocksdict
from hypothesis import given, settings
from hypothesis import strategies as st

from stores import (
    CacheInUseError,
    CacheItemTooLargeError,
    PersistentQueue,
    QueuedItem,
    QueueFullError,
    SealedKv,
    StoreClosedError,
    StoreCorruptError,
    StoreError,
    WrongKeyError,
)

KEY = bytes(range(32))
INDEX_KEY = bytes(range(32, 64))
WRONG_KEY = bytes(32)
SECRET = b"zebra-session-context-4711"


class Clock:
    """A settable stand-in for time.time."""

    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def kv_path(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def clock() -> Clock:
    return Clock(1_000_000.0)


@pytest.fixture
def kv(kv_path: Path, clock: Clock) -> Iterator[SealedKv]:
    store = SealedKv(kv_path, KEY, INDEX_KEY, now=clock)
    yield store
    store.close()


def test_put_get_delete(kv: SealedKv) -> None:
    kv.put(b"a", b"1")
    kv.put_many([(b"b", b"2"), (b"c", b"")])
    assert [kv.get(key) for key in (b"a", b"b", b"c", b"missing")] == [b"1", b"2", b"", None]
    kv.delete(b"a")
    kv.delete(b"missing")
    assert kv.get(b"a") is None


def test_values_are_sealed_and_keys_are_keyed_hashes(
    kv_path: Path, kv: SealedKv, folder_bytes: Callable[[Path], bytes]
) -> None:
    kv.put(b"zebra-preference-key", SECRET * 10)
    kv.close()
    kv = SealedKv(kv_path, KEY, INDEX_KEY)  # reopening writes the memtable out to a table file
    assert kv.get(b"zebra-preference-key") == SECRET * 10
    kv.close()
    on_disk = folder_bytes(kv_path)
    assert list(kv_path.glob("*.sst"))
    assert SECRET not in on_disk and b"zebra-preference-key" not in on_disk


def test_a_wrong_index_key_or_an_older_format_is_refused(kv_path: Path, kv: SealedKv) -> None:
    kv.put(b"a", b"1")
    kv.close()
    with pytest.raises(WrongKeyError, match="index key"):
        SealedKv(kv_path, KEY, WRONG_KEY)
    raw = rocksdict.Rdict(str(kv_path), rocksdict.Options(raw_mode=True))
    raw[b"m:canary"] = bytes(nacl.secret.SecretBox(KEY).encrypt(b"aico-sealed-kv-1"))  # keys were kept in the clear
    raw.close()
    with pytest.raises(StoreCorruptError, match="older format"):
        SealedKv(kv_path, KEY, INDEX_KEY)


def test_a_damaged_table_file_is_reported_as_damage_not_as_a_lock(kv_path: Path, kv: SealedKv) -> None:
    kv.put_many([(f"k{i}".encode(), bytes(200)) for i in range(50)])
    kv.compact()
    kv.close()
    (table,) = kv_path.glob("*.sst")
    damaged = bytearray(table.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    table.write_bytes(bytes(damaged))
    with pytest.raises(StoreCorruptError, match="damaged") as raised:
        reopened = SealedKv(kv_path, KEY, INDEX_KEY)
        try:
            dict(reopened.scan_prefix(b""))
        finally:
            reopened.close()
    assert "in use" not in str(raised.value)


def test_ttl_expiry_follows_the_injected_clock(kv: SealedKv, clock: Clock) -> None:
    kv.put(b"session", b"ctx", ttl_s=10)
    kv.put(b"forever", b"pref")
    clock.now_s += 9.9
    assert kv.get(b"session") == b"ctx"
    clock.now_s += 0.1
    assert kv.get(b"session") is None
    clock.now_s -= 10  # had the expired entry survived the read, it would be live again now
    assert kv.get(b"session") is None
    assert kv.get(b"forever") == b"pref"
    with pytest.raises(StoreError, match="positive"):
        kv.put(b"x", b"y", ttl_s=0)


def test_scan_prefix_finds_its_keys_and_skips_expired(kv: SealedKv, clock: Clock) -> None:
    kv.put_many([(b"s:2", b"two"), (b"s:1", b"one"), (b"t:1", b"other")])
    kv.put(b"s:3", b"soon gone", ttl_s=1)
    clock.now_s += 1
    assert sorted(kv.scan_prefix(b"s:")) == [(b"s:1", b"one"), (b"s:2", b"two")]
    clock.now_s -= 1  # the scan deleted what it found expired
    assert kv.get(b"s:3") is None


def test_close_ends_unfinished_scans_and_releases_the_lock(kv_path: Path, kv: SealedKv) -> None:
    kv.put_many([(b"k1", b"1"), (b"k2", b"2")])
    scan = kv.scan_prefix(b"k")
    assert next(scan) in {(b"k1", b"1"), (b"k2", b"2")}
    kv.close()
    kv.close()
    with pytest.raises(StoreClosedError):
        kv.get(b"k1")

    reopened = SealedKv(kv_path, KEY, INDEX_KEY)
    assert reopened.get(b"k2") == b"2"
    reopened.close()


def test_wrong_key_is_refused_at_open(kv_path: Path, kv: SealedKv) -> None:
    kv.put(b"a", b"1")
    kv.close()
    with pytest.raises(WrongKeyError, match=str(kv_path)):
        SealedKv(kv_path, WRONG_KEY, INDEX_KEY)
    reopened = SealedKv(kv_path, KEY, INDEX_KEY)  # the refused open released the lock
    assert reopened.get(b"a") == b"1"
    reopened.close()


def test_second_opener_is_told_the_store_is_in_use(kv_path: Path, kv: SealedKv) -> None:
    with pytest.raises(CacheInUseError, match="in use by another process"):
        SealedKv(kv_path, KEY, INDEX_KEY)
    opening = f"import pathlib, stores; stores.SealedKv(pathlib.Path({str(kv_path)!r}), bytes(32), bytes(32))"
    other_process = subprocess.run(
        [sys.executable, "-c", opening],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )
    assert other_process.returncode != 0
    assert "CacheInUseError" in other_process.stderr
    assert "in use by another process" in other_process.stderr


def test_value_moved_to_another_key_is_detected(kv_path: Path, kv: SealedKv) -> None:
    kv.put(b"a", b"for a")
    kv.put(b"b", b"for b")
    kv.close()
    raw = rocksdict.Rdict(str(kv_path), rocksdict.Options(raw_mode=True))
    stored = {key: value for key, value in raw.items() if key.startswith(b"u")}
    (key_a, value_a), (key_b, _) = stored.items()
    raw[key_b] = value_a
    raw.close()

    reopened = SealedKv(kv_path, KEY, INDEX_KEY)
    with pytest.raises(StoreCorruptError, match="another key"):
        [reopened.get(key) for key in (b"a", b"b")]
    reopened.close()


def test_values_are_bounded(kv_path: Path) -> None:
    kv = SealedKv(kv_path, KEY, INDEX_KEY, value_max_bytes=100)
    kv.put(b"fits", bytes(100))
    with pytest.raises(CacheItemTooLargeError):
        kv.put(b"big", bytes(101))
    kv.close()


def test_queue_is_fifo_and_ack_removes_a_prefix(kv: SealedKv) -> None:
    queue = PersistentQueue(kv, b"out:")
    assert [queue.append(f"op{i}".encode()) for i in range(5)] == [1, 2, 3, 4, 5]
    assert queue.peek(2) == [QueuedItem(1, b"op0"), QueuedItem(2, b"op1")]
    queue.ack(3)
    assert len(queue) == 2
    assert queue.peek(10) == [QueuedItem(4, b"op3"), QueuedItem(5, b"op4")]
    queue.ack(2)  # already acknowledged: no effect
    queue.ack(99)
    assert len(queue) == 0
    assert queue.peek(10) == []


def test_queue_ids_survive_reopen(kv_path: Path, kv: SealedKv) -> None:
    queue = PersistentQueue(kv, b"out:")
    queue.append(b"a")
    queue.append(b"b")
    queue.ack(2)
    queue.append(b"c")
    kv.close()

    reopened = SealedKv(kv_path, KEY, INDEX_KEY)
    queue = PersistentQueue(reopened, b"out:")
    assert len(queue) == 1
    assert queue.peek(5) == [QueuedItem(3, b"c")]
    queue.ack(3)
    assert queue.append(b"d") == 4  # ids never repeat, even after the queue emptied
    reopened.close()


def test_queue_is_bounded(kv: SealedKv) -> None:
    queue = PersistentQueue(kv, b"out:", items_max=3)
    for payload in (b"1", b"2", b"3"):
        queue.append(payload)
    with pytest.raises(QueueFullError):
        queue.append(b"4")
    queue.ack(1)
    assert queue.append(b"4") == 4


queue_operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.binary(max_size=8)),
        st.tuples(st.just("ack"), st.integers(min_value=0, max_value=30)),
        st.tuples(st.just("reopen"), st.none()),
    ),
    max_size=30,
)


@settings(max_examples=25, deadline=None)
@given(operations=queue_operations)
def test_queue_matches_a_list_model(operations: list[tuple[str, object]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cache"
        kv = SealedKv(path, KEY, INDEX_KEY)
        queue = PersistentQueue(kv, b"q", items_max=1000)
        model: list[QueuedItem] = []
        next_id = 1
        for operation, argument in operations:
            if operation == "append":
                assert isinstance(argument, bytes)
                assert queue.append(argument) == next_id
                model.append(QueuedItem(next_id, argument))
                next_id += 1
            elif operation == "ack":
                assert isinstance(argument, int)
                queue.ack(argument)
                model = [item for item in model if item.id > argument]
            else:
                kv.close()
                kv = SealedKv(path, KEY, INDEX_KEY)
                queue = PersistentQueue(kv, b"q", items_max=1000)
            assert len(queue) == len(model)
            assert queue.peek(1000) == model
        kv.close()
