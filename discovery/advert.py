"""The TXT record of an advert: a version, the rotating discovery tag, and the addresses sealed with the group key."""

import base64
import binascii
import hashlib
import hmac
import json
import math
from collections.abc import Mapping, Sequence

import nacl.exceptions
import nacl.secret

from discovery.errors import AdvertTooLargeError, DiscoveryError
from discovery.tags import BUCKET_S, discovery_tag, matching_bucket

TXT_VERSION = "1"
MAX_ADDRESSES = 8
MAX_ADDRESS_CHARS = 200
# Every sealed payload is padded to this size so its length says nothing about the advertiser's addresses.
PLAINTEXT_BYTES = 384
# A DNS TXT string is at most 255 bytes including "key="; the base64 text is split into strings this long.
CHUNK_CHARS = 240
SEALED_CHARS = math.ceil((nacl.secret.SecretBox.NONCE_SIZE + nacl.secret.SecretBox.MACBYTES + PLAINTEXT_BYTES) * 4 / 3)
SEALED_CHUNKS = math.ceil(SEALED_CHARS / CHUNK_CHARS)

_SEAL_DOMAIN = b"aico/mdns/seal/v1\x00"


def _seal_box(group_secret: bytes) -> nacl.secret.SecretBox:
    # A subkey, so the tag MAC and the sealing cipher never share a key.
    return nacl.secret.SecretBox(hmac.new(group_secret, _SEAL_DOMAIN, hashlib.sha256).digest())


def check_addresses(addresses: Sequence[str]) -> None:
    """Raise DiscoveryError unless `addresses` is 1 to MAX_ADDRESSES short printable ASCII strings."""
    if isinstance(addresses, str) or not 1 <= len(addresses) <= MAX_ADDRESSES:
        raise DiscoveryError(f"advertise 1 to {MAX_ADDRESSES} addresses, got {addresses!r}")
    for address in addresses:
        if not isinstance(address, str) or not 0 < len(address) <= MAX_ADDRESS_CHARS or not address.isprintable():
            raise DiscoveryError(f"an address is 1 to {MAX_ADDRESS_CHARS} printable characters, got {address!r}")
        if not address.isascii():
            raise DiscoveryError(f"an address is ASCII, got {address!r}")


def build_txt(group_secret: bytes, bucket: int, addresses: Sequence[str]) -> dict[str, str]:
    """The TXT properties advertising `addresses` to the group in `bucket`: v, tag, addrs0..addrsN."""
    check_addresses(addresses)
    payload = json.dumps({"b": bucket, "a": list(addresses)}, separators=(",", ":")).encode()
    if len(payload) > PLAINTEXT_BYTES:
        raise AdvertTooLargeError(f"the addresses take {len(payload)} bytes sealed; at most {PLAINTEXT_BYTES} fit")
    # JSON ignores trailing spaces, so padding needs no length field.
    sealed = _seal_box(group_secret).encrypt(payload.ljust(PLAINTEXT_BYTES, b" "))
    text = base64.urlsafe_b64encode(bytes(sealed)).rstrip(b"=").decode()
    txt = {"v": TXT_VERSION, "tag": discovery_tag(group_secret, bucket)}
    for index in range(SEALED_CHUNKS):
        txt[f"addrs{index}"] = text[index * CHUNK_CHARS : (index + 1) * CHUNK_CHARS]
    return txt


def _text(properties: Mapping[bytes, bytes | None], key: str) -> str | None:
    value = properties.get(key.encode())
    if value is None:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def open_txt(
    group_secret: bytes, properties: Mapping[bytes, bytes | None], now_s: float, bucket_s: int = BUCKET_S
) -> tuple[str, ...] | None:
    """The addresses in a TXT record, or None unless it is a well-formed advert of this group in an accepted bucket."""
    if _text(properties, "v") != TXT_VERSION:
        return None
    bucket = matching_bucket(group_secret, _text(properties, "tag") or "", now_s, bucket_s)
    if bucket is None:
        return None
    chunks = [_text(properties, f"addrs{index}") for index in range(SEALED_CHUNKS)]
    if any(chunk is None for chunk in chunks):
        return None
    text = "".join(chunks)  # type: ignore[arg-type]
    if len(text) != SEALED_CHARS:
        return None
    try:
        sealed = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        payload = json.loads(_seal_box(group_secret).decrypt(sealed))
    except (binascii.Error, ValueError, nacl.exceptions.CryptoError):
        return None
    # The bucket inside the box binds it to its tag, so a box cannot be replayed under a later tag.
    if not isinstance(payload, dict) or payload.get("b") != bucket or not isinstance(payload.get("a"), list):
        return None
    addresses = tuple(payload["a"])
    try:
        check_addresses(addresses)
    except DiscoveryError:
        return None
    return addresses


def peer_hint(addresses: Sequence[str]) -> str | None:
    """The libp2p peer id the addresses claim (their `/p2p/` component), or None when absent or inconsistent."""
    claimed = {address.rsplit("/p2p/", 1)[1] for address in addresses if "/p2p/" in address}
    return claimed.pop() if len(claimed) == 1 else None
