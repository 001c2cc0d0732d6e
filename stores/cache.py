"""RocksDB cache, session state and outgoing queue, with every value sealed before it is written."""

from __future__ import annotations

import hashlib
import struct
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import closing, contextmanager
from itertools import islice
from pathlib import Path

import attrs
import nacl.exceptions
import nacl.secret
import rocksdict

from stores.errors import StoreClosedError, StoreCorruptError, StoreError, ValueTooLargeError, WrongKeyError

VALUE_MAX_BYTES = 4 * 1024 * 1024
QUEUE_ITEMS_MAX = 100_000

# User entries and the store's own entries live under distinct first bytes, so no user key can shadow the canary.
_USER = b"u"
_CANARY_KEY = b"m:canary"
_CANARY = b"aico-sealed-kv-1"

# Sealed plaintext: expiry in epoch ms (0 = never), a digest of the storage key, then the value. The digest makes a
# sealed value copied under another key fail to open instead of reading as that key's value.
_HEADER = struct.Struct(">Q16s")


class QueueFullError(StoreError):
    """The persistent queue is at its bound and takes nothing until items are acknowledged."""


def _key_digest(storage_key: bytes) -> bytes:
    return hashlib.blake2b(storage_key, digest_size=16).digest()


def _open_rdict(path: Path) -> rocksdict.Rdict:
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    try:
        return rocksdict.Rdict(str(path), options)
    except Exception as error:  # rocksdict raises bare Exception carrying RocksDB's status text
        if "lock" in str(error).lower():
            raise StoreError(
                f"the cache {path} is in use by another process (a node or a command on the same home); "
                "try again once it has finished"
            ) from error
        raise StoreError(f"cannot open cache {path}: {error}") from error


class SealedKv:
    """A RocksDB key-value store whose values are sealed with a 32-byte key (XSalsa20-Poly1305) before writing.

    Keys are stored in the clear: callers must never put secrets or personal data in keys. Entries may carry a
    time to live, measured with the injected ``now`` clock (epoch seconds); expired entries read as absent and are
    deleted when read. Writes go through RocksDB's write-ahead log without fsync: they survive a process crash,
    and a power loss may drop the last ones. Not thread-safe: one owner at a time.
    """

    def __init__(
        self,
        path: Path,
        key: bytes,
        *,
        now: Callable[[], float] = time.time,
        value_max_bytes: int = VALUE_MAX_BYTES,
    ) -> None:
        if len(key) != nacl.secret.SecretBox.KEY_SIZE:
            raise StoreError(f"a cache key is {nacl.secret.SecretBox.KEY_SIZE} bytes, got {len(key)}")
        self._path = path
        self._box = nacl.secret.SecretBox(key)
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
            raise StoreError(f"cache {self._path}: {error}") from error

    def _check_canary(self) -> None:
        with self._live() as db:
            sealed = db.get(_CANARY_KEY)
        if sealed is None:
            with closing(self._raw_items(_USER)) as entries:
                if next(entries, None) is not None:
                    raise StoreCorruptError(f"cache {self._path} has entries but lost its key canary")
            with self._live() as db:
                db.put(_CANARY_KEY, bytes(self._box.encrypt(_CANARY)))
            return
        try:
            canary = self._box.decrypt(sealed)
        except nacl.exceptions.CryptoError as error:
            raise WrongKeyError(f"the cache key does not open {self._path}: wrong key") from error
        if canary != _CANARY:
            raise StoreCorruptError(f"cache {self._path} has an unexpected key canary")

    def _seal(self, storage_key: bytes, value: bytes, ttl_s: float | None) -> bytes:
        if len(value) > self._value_max_bytes:
            raise ValueTooLargeError(f"cache value of {len(value)} bytes exceeds {self._value_max_bytes} bytes")
        if ttl_s is not None and ttl_s <= 0:
            raise StoreError(f"ttl_s must be positive, got {ttl_s}")
        expires_at_ms = 0 if ttl_s is None else int((self._now() + ttl_s) * 1000)
        return bytes(self._box.encrypt(_HEADER.pack(expires_at_ms, _key_digest(storage_key)) + value))

    def _unseal(self, storage_key: bytes, sealed: bytes) -> bytes | None:
        """Return the value, or None if it has expired."""
        try:
            plain = self._box.decrypt(sealed)
        except nacl.exceptions.CryptoError as error:
            raise StoreCorruptError(f"cache {self._path}: entry {storage_key[1:]!r} failed authentication") from error
        expires_at_ms, digest = _HEADER.unpack_from(plain)
        if digest != _key_digest(storage_key):
            raise StoreCorruptError(f"cache {self._path}: entry {storage_key[1:]!r} holds another key's value")
        if expires_at_ms and expires_at_ms <= self._now() * 1000:
            return None
        return plain[_HEADER.size :]

    def put(self, key: bytes, value: bytes, ttl_s: float | None = None) -> None:
        """Store value under key, expiring after ttl_s seconds if given."""
        self.put_many([(key, value)], ttl_s)

    def put_many(self, items: Iterable[tuple[bytes, bytes]], ttl_s: float | None = None) -> None:
        """Store every (key, value) pair atomically, all with the same time to live."""
        batch = rocksdict.WriteBatch(raw_mode=True)
        for key, value in items:
            batch.put(_USER + key, self._seal(_USER + key, value, ttl_s))
        with self._live() as db:
            db.write(batch)

    def get(self, key: bytes) -> bytes | None:
        """Return the live value under key, or None."""
        storage_key = _USER + key
        with self._live() as db:
            sealed = db.get(storage_key)
        if sealed is None:
            return None
        value = self._unseal(storage_key, sealed)
        if value is None:
            self.delete(key)
        return value

    def delete(self, key: bytes) -> None:
        """Remove key; absent keys are ignored."""
        self.delete_many([key])

    def delete_many(self, keys: Iterable[bytes]) -> None:
        """Remove every key atomically; absent keys are ignored."""
        batch = rocksdict.WriteBatch(raw_mode=True)
        for key in keys:
            batch.delete(_USER + key)
        with self._live() as db:
            db.write(batch)

    def scan_prefix(self, prefix: bytes) -> Generator[tuple[bytes, bytes], None, None]:
        """Yield the live (key, value) pairs whose key starts with prefix, in key order; close() ends the scan."""
        scan = self._scan(prefix)
        self._scans.add(scan)
        return scan

    def _scan(self, prefix: bytes) -> Generator[tuple[bytes, bytes], None, None]:
        expired: list[bytes] = []
        with closing(self._raw_items(_USER + prefix)) as entries:
            for storage_key, sealed in entries:
                value = self._unseal(storage_key, sealed)
                if value is None:
                    expired.append(storage_key[len(_USER) :])
                else:
                    yield storage_key[len(_USER) :], value
        self.delete_many(expired)

    def _raw_items(self, prefix: bytes) -> Generator[tuple[bytes, bytes], None, None]:
        with self._live() as db:
            iterator = db.iter()
        try:
            iterator.seek(prefix)
            while iterator.valid() and (key := iterator.key()).startswith(prefix):
                yield key, iterator.value()
                iterator.next()
        finally:
            del iterator  # dropping the last reference frees the RocksDB iterator and its hold on the lock

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

    The prefix must be dedicated to this queue: its items live under prefix + b"i" + id (8 bytes, big-endian, so key
    order is id order) and the next id under prefix + b"n", written atomically with each item so ids survive reopen.
    """

    def __init__(self, kv: SealedKv, prefix: bytes, *, items_max: int = QUEUE_ITEMS_MAX) -> None:
        self._kv = kv
        self._items_prefix = prefix + b"i"
        self._next_id_key = prefix + b"n"
        self._items_max = items_max
        stored_next_id = kv.get(self._next_id_key)
        self._next_id = int.from_bytes(stored_next_id, "big") if stored_next_id else 1
        oldest = self.peek(1)
        self._head_id = oldest[0].id if oldest else self._next_id

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
        with closing(self._kv.scan_prefix(self._items_prefix)) as entries:
            return [
                QueuedItem(int.from_bytes(key[len(self._items_prefix) :], "big"), payload)
                for key, payload in islice(entries, n)
            ]

    def ack(self, up_to_id: int) -> None:
        """Remove every item whose id is at most up_to_id."""
        new_head_id = max(self._head_id, min(up_to_id + 1, self._next_id))
        self._kv.delete_many(self._item_key(item_id) for item_id in range(self._head_id, new_head_id))
        self._head_id = new_head_id
