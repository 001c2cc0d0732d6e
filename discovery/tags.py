"""Discovery tags: a rotating, group-keyed label that only holders of the group secret can recognise."""

import hashlib
import hmac
import math
import re

from discovery.errors import DiscoveryError

BUCKET_S = 600
TAG_BYTES = 16
MIN_SECRET_BYTES = 16
# A tag from the bucket before or after the current one is still accepted, to absorb clock skew.
SKEW_BUCKETS = 1

_TAG_DOMAIN = b"aico/mdns/tag/v1\x00"
_TAG_FORMAT = re.compile(f"[0-9a-f]{{{2 * TAG_BYTES}}}")


def check_group_secret(group_secret: bytes) -> None:
    """Raise DiscoveryError unless `group_secret` is bytes long enough to key a MAC."""
    if not isinstance(group_secret, bytes) or len(group_secret) < MIN_SECRET_BYTES:
        raise DiscoveryError(f"a group secret is at least {MIN_SECRET_BYTES} bytes")


def time_bucket(now_s: float, bucket_s: int = BUCKET_S) -> int:
    """The number of the `bucket_s`-second interval since the Unix epoch that contains `now_s`."""
    if type(bucket_s) is not int or bucket_s <= 0:
        raise DiscoveryError(f"a bucket length is a positive number of seconds, got {bucket_s!r}")
    if not math.isfinite(now_s) or now_s < 0:
        raise DiscoveryError(f"a time is finite seconds since the epoch, got {now_s!r}")
    return math.floor(now_s / bucket_s)


def discovery_tag(group_secret: bytes, bucket: int) -> str:
    """The tag for `bucket`: lowercase hex of the first TAG_BYTES of HMAC-SHA256(group secret, domain || bucket)."""
    check_group_secret(group_secret)
    if type(bucket) is not int or not 0 <= bucket < 2**64:
        raise DiscoveryError(f"a bucket is an unsigned 64-bit integer, got {bucket!r}")
    message = _TAG_DOMAIN + bucket.to_bytes(8, "big")
    return hmac.new(group_secret, message, hashlib.sha256).digest()[:TAG_BYTES].hex()


def matching_bucket(group_secret: bytes, tag: str, now_s: float, bucket_s: int = BUCKET_S) -> int | None:
    """The bucket (current or adjacent) whose tag equals `tag`, or None when `tag` is not this group's."""
    if not isinstance(tag, str) or not _TAG_FORMAT.fullmatch(tag):
        return None
    current = time_bucket(now_s, bucket_s)
    for bucket in range(max(current - SKEW_BUCKETS, 0), current + SKEW_BUCKETS + 1):
        if hmac.compare_digest(discovery_tag(group_secret, bucket), tag):
            return bucket
    return None


def matches(group_secret: bytes, tag: str, now_s: float, bucket_s: int = BUCKET_S) -> bool:
    """Whether `tag` is this group's tag for the current bucket or an adjacent one."""
    return matching_bucket(group_secret, tag, now_s, bucket_s) is not None
