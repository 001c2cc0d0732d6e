"""What the relay's mailbox service needs of a store, the bounds every store enforces, and which store a relay opens.

Two stores implement it: SQLite in the relay's data folder (relay/mailbox_sqlite.py, the default) and a NATS
JetStream stream that several relays share (relay/mailbox_jetstream.py). docs/spec/relay.md section 2.4 and 4.
"""

from __future__ import annotations

from typing import Protocol

import attrs
import nacl.hash
from nacl.encoding import RawEncoder

from relay.mailbox_protocol import BLOB_BYTES_MAX, MailboxItem

EXPIRE_S = 30 * 86_400
# A put of the same blob to the same mailbox within this long returns the first put's cursor and stores nothing,
# so a put retried after a lost answer is not stored twice (JetStream's default duplicate window).
DUPLICATE_WINDOW_S = 120.0
PUT_DIGEST_BYTES = 16
_DIGEST_PERSON = b"aico-mailbox-put"


@attrs.frozen
class StoreLimits:
    """Bounds on what the store keeps."""

    blob_bytes_max: int = BLOB_BYTES_MAX
    mailbox_items_max: int = 10_000
    mailbox_bytes_max: int = 64 << 20
    total_bytes_max: int = 4 << 30
    expire_s: float = EXPIRE_S

    @property
    def duplicate_window_s(self) -> float:
        """How long a put is remembered for idempotence: never longer than items are kept."""
        return min(DUPLICATE_WINDOW_S, self.expire_s)


class MailboxStore(Protocol):
    """Opaque blobs under mailbox ids, with quotas, a global cap, expiry and idempotent puts."""

    limits: StoreLimits

    async def put(self, mailbox_id: bytes, blob: bytes) -> int:
        """Store `blob` durably in `mailbox_id` and return its cursor; raise MailboxRefused when over a bound
        (`unavailable` when the store cannot be reached now, a refusal worth retrying)."""
        ...

    async def fetch(
        self, mailbox_id: bytes, after_cursor: int, limit: int, bytes_max: int
    ) -> tuple[list[MailboxItem], bool]:
        """Up to `limit` unexpired blobs of `mailbox_id` after `after_cursor`, oldest first, within `bytes_max`
        (the first one always), and whether more follow."""
        ...

    async def purge_expired(self) -> int:
        """Delete expired items the engine does not delete itself and return how many went."""
        ...

    async def close(self) -> None:
        """Close the store; idempotent, and later calls raise MailboxStoreError."""
        ...


def put_digest(mailbox_id: bytes, blob: bytes) -> bytes:
    """What identifies a put for idempotence: a hash of the mailbox id and the blob."""
    return nacl.hash.blake2b(
        len(mailbox_id).to_bytes(1, "big") + mailbox_id + blob,
        digest_size=PUT_DIGEST_BYTES, person=_DIGEST_PERSON, encoder=RawEncoder,
    )  # fmt: skip
