"""Mailbox keys (client side): per-bucket signing keys and mailbox ids derived from the group secret.

Only holders of the group secret can derive a mailbox's signing key; the relay sees the mailbox id and the
verify key, checks that one hashes to the other, and checks signatures, without learning the secret.
"""

import math

import attrs
import nacl.hash
import nacl.signing
from nacl.encoding import RawEncoder

from framing import LocalProtocolError

GROUP_SECRET_BYTES = 32
MAILBOX_ID_BYTES = 16
VERIFY_KEY_BYTES = 32
SIGNATURE_BYTES = 64
BUCKET_S = 86_400
# A mailbox of the bucket after the current one is drained too, to absorb clock skew between devices.
SKEW_BUCKETS = 1
# Drain no further back than the relay keeps items (30 days, see mailbox_store.EXPIRE_S), plus the current day.
DRAIN_BUCKETS_MAX = 31

_SEED_PERSON = b"aico-mailbox-key"  # BLAKE2b personalisation: at most 16 bytes
_ID_PERSON = b"aico-mailbox-id"


def _u64(value: int, name: str) -> bytes:
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise LocalProtocolError(f"{name} is an unsigned 64-bit integer, got {value!r}")
    return value.to_bytes(8, "big")


def mailbox_id_of(verify_key: bytes) -> bytes:
    """The mailbox id that belongs to a 32-byte mailbox verify key."""
    return nacl.hash.blake2b(verify_key, digest_size=MAILBOX_ID_BYTES, person=_ID_PERSON, encoder=RawEncoder)


@attrs.frozen
class MailboxKeys:
    """The signing key and id of one mailbox: one group epoch, one time bucket."""

    seed: bytes = attrs.field(repr=False)
    epoch: int
    bucket: int

    @property
    def verify_key(self) -> bytes:
        """The 32-byte Ed25519 public key the relay checks requests against."""
        return bytes(nacl.signing.SigningKey(self.seed).verify_key)

    @property
    def mailbox_id(self) -> bytes:
        """The mailbox id under which the relay stores this mailbox's blobs."""
        return mailbox_id_of(self.verify_key)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message` by this mailbox's key."""
        return nacl.signing.SigningKey(self.seed).sign(message).signature


def time_bucket(now_s: float, bucket_s: int = BUCKET_S) -> int:
    """The number of the `bucket_s`-second interval since the Unix epoch that contains `now_s`."""
    if type(bucket_s) is not int or bucket_s <= 0:
        raise LocalProtocolError(f"a bucket length is a positive number of seconds, got {bucket_s!r}")
    if not math.isfinite(now_s) or now_s < 0:
        raise LocalProtocolError(f"a time is finite seconds since the epoch, got {now_s!r}")
    return math.floor(now_s / bucket_s)


def mailbox_keys(group_secret: bytes, epoch: int, bucket: int) -> MailboxKeys:
    """The keys of the mailbox of group epoch `epoch` for time bucket `bucket`."""
    if type(group_secret) is not bytes or len(group_secret) != GROUP_SECRET_BYTES:
        raise LocalProtocolError(f"a group secret is {GROUP_SECRET_BYTES} bytes")
    message = _u64(epoch, "an epoch") + _u64(bucket, "a bucket")
    seed = nacl.hash.blake2b(message, key=group_secret, digest_size=32, person=_SEED_PERSON, encoder=RawEncoder)
    return MailboxKeys(seed, epoch, bucket)


def current_mailbox(group_secret: bytes, epoch: int, now_s: float, bucket_s: int = BUCKET_S) -> MailboxKeys:
    """The mailbox a device puts into at `now_s`."""
    return mailbox_keys(group_secret, epoch, time_bucket(now_s, bucket_s))


def mailboxes_to_drain(
    group_secret: bytes, epoch: int, since_s: float, now_s: float, bucket_s: int = BUCKET_S
) -> list[MailboxKeys]:
    """The mailboxes, oldest first, that may hold blobs put from `since_s` to `now_s`, at most DRAIN_BUCKETS_MAX + 1."""
    last = time_bucket(now_s, bucket_s) + SKEW_BUCKETS
    first = max(time_bucket(max(since_s, 0.0), bucket_s) - SKEW_BUCKETS, last - DRAIN_BUCKETS_MAX, 0)
    return [mailbox_keys(group_secret, epoch, bucket) for bucket in range(first, last + 1)]
