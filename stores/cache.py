"""RocksDB cache, session state and outgoing queue: every key a keyed hash, every value sealed, before writing."""

from __future__ import annotations

import hashlib
import struct
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import attrs
import nacl.exceptions
import nacl.secret
import rocksdict

from stores.errors import CacheItemTooLargeError, StoreClosedError, StoreCorruptError, StoreError, WrongKeyError

VALUE_MAX_BYTES = 4 * 1024 * 1024
KEY_MAX_BYTES = 0xFFFF  # the sealed header holds a key's length in two bytes
QUEUE_ITEMS_MAX = 100_000
INDEX_KEY_BYTES = 32
LOG_FILE_BYTES_MAX = 256 * 1024  # RocksDB's own info log (options and events, no keys): at most two such files

# User entries and the store's own entries live under distinct first bytes, so no user key can shadow the canary.
_USER = b"u"
_CANARY_KEY = b"m:canary"
_CANARY = b"aico-sealed-kv-2"
_KEY_DIGEST_BYTES = 16
_KEY_PERSON = b"aico-kv-key"

# Sealed plaintext: expiry in epoch ms (0 = never), the key's length, the key, then the value. Holding the key makes
# a sealed value copied under another key fail to open instead of reading as that key's value, and lets a scan
# return keys that are stored only as hashes.
_HEADER = struct.Struct(">QH")


class QueueFullError(StoreError):
    """The persistent queue is at its bound and takes nothing until items are acknowledged."""


class CacheInUseError(StoreError):
    """The cache is open in another process or another SealedKv."""


def _open_rdict(path: Path) -> rocksdict.Rdict:
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    # Each open starts a new info log; by default RocksDB keeps 1000 of them (30 KB each here).
    options.set_keep_log_file_num(1)
    options.set_max_log_file_size(LOG_FILE_BYTES_MAX)
    try:
        return rocksdict.Rdict(str(path), options)
    except Exception as error:  # rocksdict raises bare Exception carrying RocksDB's status text
        # Only RocksDB's lock failure names the LOCK file ("IO error: While lock file: <path>/LOCK: ..." from another
        # process, "IO error: lock hold by current process ... <path>/LOCK: ..." from this one); a "block checksum"
        # mismatch also contains "lock".
        if str(error).startswith("IO error") and f"{path / 'LOCK'}:" in str(error):
            raise CacheInUseError(
                f"the cache {path} is in use by another process (a node or a command on the same home); "
                "try again once it has finished"
            ) from error
        raise StoreCorruptError(f"cache {path} is damaged or unreadable: {error}") from error


class SealedKv:
    """A RocksDB key-value store that writes each key as a keyed hash (BLAKE2b under `index_key`) and each value
    sealed with `key` (XSalsa20-Poly1305), so its files hold nothing a caller wrote in the clear.

    Entries may carry a time to live, measured with the injected ``now`` clock (epoch seconds); expired entries read
    as absent and are deleted when read. Writes go through RocksDB's write-ahead log without fsync: they survive a
    process crash, and a power loss may drop the last ones. Not thread-safe: one owner at a time.
    """

    def __init__(
        self,
        path: Path,
        key: bytes,
        index_key: bytes,
        *,
        now: Callable[[], float] = time.time,
        value_max_bytes: int = VALUE_MAX_BYTES,
    ) -> None:
        if len(key) != nacl.secret.SecretBox.KEY_SIZE:
            raise StoreError(f"a cache key is {nacl.secret.SecretBox.KEY_SIZE} bytes, got {len(key)}")
        if len(index_key) != INDEX_KEY_BYTES:
            raise StoreError(f"a cache index key is {INDEX_KEY_BYTES} bytes, got {len(index_key)}")
        self._path = path
        self._box = nacl.secret.SecretBox(key)
        self._index_key = index_key
        self._now = now
        self._value_max_bytes = value_max_bytes
        # Unfinished scans hold RocksDB iterators, which keep the database lock even after close().
        self._scans: weakref.WeakSet[Generator[tuple[bytes, bytes], None, None]] = weakref.WeakSet()
        self._db: rocksdict.Rdict | None = _open_rdict(path)
        try:
            self._check_canary()
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> Path:
        """The RocksDB folder."""
        return self._path

    @contextmanager
    def _live(self) -> Iterator[rocksdict.Rdict]:
        """Yield the open database, turning RocksDB errors into store errors."""
        if self._db is None:
            raise StoreClosedError(f"cache {self._path} is closed")
        try:
            yield self._db
        except StoreError:
            raise
        except Exception as error:  # rocksdict raises bare Exception carrying RocksDB's status text
            if str(error).startswith("Corruption"):
                raise StoreCorruptError(f"cache {self._path} is damaged: {error}") from error
            raise StoreError(f"cache {self._path}: {error}") from error

    def _storage_key(self, key: bytes) -> bytes:
        if len(key) > KEY_MAX_BYTES:
            raise CacheItemTooLargeError(f"cache key of {len(key)} bytes exceeds {KEY_MAX_BYTES} bytes")
        digest = hashlib.blake2b(key, key=self._index_key, digest_size=_KEY_DIGEST_BYTES, person=_KEY_PERSON)
        return _USER + digest.digest()

    def _canary(self) -> bytes:
        # Names the index key too: opened with another one, every entry would silently read as absent.
        return _CANARY + hashlib.blake2b(_CANARY, key=self._index_key, digest_size=16, person=_KEY_PERSON).digest()

    def _check_canary(self) -> None:
        with self._live() as db:
            sealed = db.get(_CANARY_KEY)
        if sealed is None:
            with closing(self._raw_items(_USER)) as entries:
                if next(entries, None) is not None:
                    raise StoreCorruptError(f"cache {self._path} has entries but lost its key canary")
            with self._live() as db:
                db.put(_CANARY_KEY, bytes(self._box.encrypt(self._canary())))
            return
        try:
            canary = self._box.decrypt(sealed)
        except nacl.exceptions.CryptoError as error:
            raise WrongKeyError(f"the cache key does not open {self._path}: wrong key") from error
        if not canary.startswith(_CANARY):
            raise StoreCorruptError(f"cache {self._path} is of an older format, whose keys are not hashed")
        if canary != self._canary():
            raise WrongKeyError(f"the cache index key does not match {self._path}: wrong key")

    def _seal(self, key: bytes, value: bytes, ttl_s: float | None) -> bytes:
        if len(value) > self._value_max_bytes:
            raise CacheItemTooLargeError(f"cache value of {len(value)} bytes exceeds {self._value_max_bytes} bytes")
        if ttl_s is not None and ttl_s <= 0:
            raise StoreError(f"ttl_s must be positive, got {ttl_s}")
        expires_at_ms = 0 if ttl_s is None else int((self._now() + ttl_s) * 1000)
        return bytes(self._box.encrypt(_HEADER.pack(expires_at_ms, len(key)) + key + value))

    def _unseal(self, sealed: bytes, key: bytes | None = None) -> tuple[bytes, bytes] | None:
        """Return (key, value) of a sealed entry, or None if it has expired; `key`, if given, must be its key."""
        try:
            plain = self._box.decrypt(sealed)
            expires_at_ms, key_length = _HEADER.unpack_from(plain)
        except (nacl.exceptions.CryptoError, struct.error) as error:
            raise StoreCorruptError(f"cache {self._path}: an entry failed authentication") from error
        stored_key = plain[_HEADER.size : _HEADER.size + key_length]
        if key is not None and stored_key != key:
            raise StoreCorruptError(f"cache {self._path}: entry {key!r:.80} holds another key's value")
        if expires_at_ms and expires_at_ms <= self._now() * 1000:
            return None
        return stored_key, plain[_HEADER.size + key_length :]

    def put(self, key: bytes, value: bytes, ttl_s: float | None = None) -> None:
        """Store value under key, expiring after ttl_s seconds if given."""
        self.write([(key, value)], (), ttl_s)

    def put_many(self, items: Iterable[tuple[bytes, bytes]], ttl_s: float | None = None) -> None:
        """Store every (key, value) pair atomically, all with the same time to live."""
        self.write(items, (), ttl_s)

    def write(
        self, puts: Iterable[tuple[bytes, bytes]], deletes: Iterable[bytes], ttl_s: float | None = None
    ) -> None:
        """Store every (key, value) pair of `puts` (all with the same time to live) and remove every key of
        `deletes`, atomically."""
        batch = rocksdict.WriteBatch(raw_mode=True)
        for key, value in puts:
            batch.put(self._storage_key(key), self._seal(key, value, ttl_s))
        for key in deletes:
            batch.delete(self._storage_key(key))
        with self._live() as db:
            db.write(batch)

    def get(self, key: bytes) -> bytes | None:
        """Return the live value under key, or None."""
        storage_key = self._storage_key(key)
        with self._live() as db:
            sealed = db.get(storage_key)
        if sealed is None:
            return None
        entry = self._unseal(sealed, key)
        if entry is None:
            self.delete(key)
            return None
        return entry[1]

    def delete(self, key: bytes) -> None:
        """Remove key; absent keys are ignored."""
        self.write((), [key])

    def delete_many(self, keys: Iterable[bytes]) -> None:
        """Remove every key atomically; absent keys are ignored."""
        self.write((), keys)

    def scan_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Yield the live (key, value) pairs whose key starts with prefix, in no particular order; close() ends the
        scan. Keys are stored as hashes, so this reads and opens every entry: for rare work such as a rebuild."""
        scan = self._scan(prefix)
        self._scans.add(scan)
        return scan

    def _scan(self, prefix: bytes) -> Generator[tuple[bytes, bytes], None, None]:
        expired: list[bytes] = []
        with closing(self._raw_items(_USER)) as entries:
            for storage_key, sealed in entries:
                entry = self._unseal(sealed)
                if entry is None:
                    expired.append(storage_key)
                elif entry[0].startswith(prefix):
                    yield entry
        if expired:
            batch = rocksdict.WriteBatch(raw_mode=True)
            for storage_key in expired:
                batch.delete(storage_key)
            with self._live() as db:
                db.write(batch)

    def _raw_items(self, prefix: bytes) -> Generator[tuple[bytes, bytes], None, None]:
        with self._live() as db:
            iterator = db.iter()
        try:
            with self._live():
                iterator.seek(prefix)
                while iterator.valid() and (key := iterator.key()).startswith(prefix):
                    yield key, iterator.value()
                    iterator.next()
                iterator.status()  # raises what stopped the iteration early, such as a damaged block
        finally:
            del iterator  # dropping the last reference frees the RocksDB iterator and its hold on the lock

    def compact(self) -> None:
        """Rewrite the store's files without deleted and overwritten entries, so rewriting it keeps its size."""
        with self._live() as db:
            db.compact_range(None, None)

    def close(self) -> None:
        """End unfinished scans and close the database; idempotent."""
        for scan in list(self._scans):
            scan.close()
        if self._db is not None:
            db, self._db = self._db, None
            db.close()


@attrs.frozen
class QueuedItem:
    """One queued payload and its id."""

    id: int
    payload: bytes


class PersistentQueue:
    """A durable, bounded FIFO of byte payloads in a SealedKv, numbered by monotonic 64-bit ids.

    The prefix must be dedicated to this queue: its items live under prefix + b"i" + id (8 bytes, big-endian), the
    next id under prefix + b"n" and the oldest unacknowledged id under prefix + b"h", each written atomically with
    the items it counts, so ids survive reopen. Items are read by id, since the store keeps keys only as hashes.
    """

    def __init__(self, kv: SealedKv, prefix: bytes, *, items_max: int = QUEUE_ITEMS_MAX) -> None:
        self._kv = kv
        self._items_prefix = prefix + b"i"
        self._next_id_key = prefix + b"n"
        self._head_id_key = prefix + b"h"
        self._items_max = items_max
        self._next_id = _stored_id(kv.get(self._next_id_key))
        self._head_id = _stored_id(kv.get(self._head_id_key))
        if not self._head_id <= self._next_id:
            raise StoreCorruptError(f"queue {prefix!r} starts at id {self._head_id}, past its next id {self._next_id}")

    def _item_key(self, item_id: int) -> bytes:
        return self._items_prefix + item_id.to_bytes(8, "big")

    def __len__(self) -> int:
        return self._next_id - self._head_id

    def append(self, payload: bytes) -> int:
        """Add payload at the tail and return its id; raises QueueFullError at items_max items."""
        if len(self) >= self._items_max:
            raise QueueFullError(f"queue holds {len(self)} items, its bound; acknowledge some first")
        item_id = self._next_id
        self._kv.put_many([(self._item_key(item_id), payload), (self._next_id_key, (item_id + 1).to_bytes(8, "big"))])
        self._next_id = item_id + 1
        return item_id

    def peek(self, n: int) -> list[QueuedItem]:
        """Return up to n items from the head, oldest first, without removing them."""
        if n < 0:
            raise StoreError(f"n must not be negative, got {n}")
        items = []
        for item_id in range(self._head_id, min(self._head_id + n, self._next_id)):
            payload = self._kv.get(self._item_key(item_id))
            if payload is None:
                raise StoreCorruptError(f"queue item {item_id} is missing from the cache")
            items.append(QueuedItem(item_id, payload))
        return items

    def ack(self, up_to_id: int) -> None:
        """Remove every item whose id is at most up_to_id."""
        new_head_id = max(self._head_id, min(up_to_id + 1, self._next_id))
        if new_head_id == self._head_id:
            return
        gone = [self._item_key(item_id) for item_id in range(self._head_id, new_head_id)]
        self._kv.write([(self._head_id_key, new_head_id.to_bytes(8, "big"))], gone)
        self._head_id = new_head_id


def _stored_id(stored: bytes | None) -> int:
    return int.from_bytes(stored, "big") if stored else 1
