"""Sealing: sync batches signed by their device and encrypted with the group key, and messages sealed to one device.

`docs/spec/sealing.md` is the normative text; the byte layouts below follow it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from enum import StrEnum

import nacl.exceptions
import nacl.hash
import nacl.public
import nacl.secret
import nacl.signing
import nacl.utils
from nacl.encoding import RawEncoder

from framing import LocalProtocolError, ReasonedError
from node.errors import UnsealError
from node.trust.identity import DeviceIdentity, GroupKey, verify

SESSION_ID_BYTES = 16
BATCH_DOMAIN_TAG = b"aico-sync-batch-v1"
DEVICE_DOMAIN_TAG = b"aico-device-seal-v1"
MAILBOX_DOMAIN_TAG = b"aico-mailbox-batch-v1"
HINT_BYTES = 4
EPOCH_BYTES = 4
VERIFY_KEY_BYTES = 32
_SIGNATURE_BYTES = 64
_DEVICE_ID_BYTES_MAX = 255  # a device id is signed with a one-byte length prefix
_HINT_PERSON = b"aico-seal-hint"

# Inside the box of a batch: sender hint, recipient hint, session hint, counter, signature; the body follows.
_BATCH_HEADER = struct.Struct(f">{HINT_BYTES}s{HINT_BYTES}s{HINT_BYTES}sQ{_SIGNATURE_BYTES}s")
# Signed with a batch, before the two device ids and the body: epoch, counter, session id.
_BATCH_SIGNED_FIELDS = struct.Struct(f">IQ{SESSION_ID_BYTES}s")
# Inside a mailbox batch: signature, then the sender's id with a one-byte length; the body follows.
_MAILBOX_HEADER = struct.Struct(f">{_SIGNATURE_BYTES}sB")
# Inside a message to one device: sender hint, recipient hint, signature; the body follows.
_DEVICE_HEADER = struct.Struct(f">{HINT_BYTES}s{HINT_BYTES}s{_SIGNATURE_BYTES}s")

BATCH_OVERHEAD_BYTES = (
    EPOCH_BYTES + nacl.secret.SecretBox.NONCE_SIZE + nacl.secret.SecretBox.MACBYTES + _BATCH_HEADER.size
)
MAILBOX_OVERHEAD_BYTES = (
    EPOCH_BYTES + nacl.secret.SecretBox.NONCE_SIZE + nacl.secret.SecretBox.MACBYTES + _MAILBOX_HEADER.size + 1
)
DEVICE_OVERHEAD_BYTES = (
    nacl.public.PublicKey.SIZE + nacl.secret.SecretBox.MACBYTES + _DEVICE_HEADER.size  # SealedBox: ephemeral key, MAC
)


class UnsealReason(StrEnum):
    """Why sealed bytes were refused."""

    MALFORMED = "malformed"
    BAD_EPOCH = "bad epoch"
    CANNOT_DECRYPT = "cannot decrypt"
    WRONG_SENDER = "wrong sender"
    WRONG_RECIPIENT = "wrong recipient"
    WRONG_SESSION = "wrong session"
    BAD_SIGNATURE = "bad signature"
    REPLAYED = "replayed"


class UnsealRefusedError(UnsealError, ReasonedError):
    """Sealed bytes were refused; `reason` says why and `detail` explains."""

    reason: UnsealReason


def new_session_id() -> bytes:
    """A fresh random session id, chosen by the receiving side of a session for the batches it will receive."""
    return nacl.utils.random(SESSION_ID_BYTES)


def _hint(value: bytes) -> bytes:
    """A short digest naming a device or session, so a refusal can say which check failed (never trusted alone)."""
    return nacl.hash.blake2b(value, digest_size=HINT_BYTES, person=_HINT_PERSON, encoder=RawEncoder)


def _device_id_bytes(name: str, device_id: str) -> bytes:
    encoded = device_id.encode()
    if not 0 < len(encoded) <= _DEVICE_ID_BYTES_MAX:
        raise LocalProtocolError(f"{name} must be 1 to {_DEVICE_ID_BYTES_MAX} bytes of UTF-8, got {device_id!r}")
    return encoded


def _check_length(name: str, value: bytes, size: int) -> None:
    if type(value) is not bytes or len(value) != size:
        raise LocalProtocolError(f"{name} must be {size} bytes")


def _batch_signed_data(
    epoch: int, sender_id: bytes, recipient_id: bytes, session_id: bytes, counter: int, body: bytes
) -> bytes:
    fields = _BATCH_SIGNED_FIELDS.pack(epoch, counter, session_id)
    return b"".join(
        (BATCH_DOMAIN_TAG, fields, bytes([len(sender_id)]), sender_id, bytes([len(recipient_id)]), recipient_id, body)
    )


class GroupSealer:
    """The BatchSealer of one session: seals batches for the peer under the group key and opens the peer's."""

    def __init__(
        self,
        identity: DeviceIdentity,
        group_key: GroupKey,
        peer_device_id: str,
        peer_verify_key: bytes,
        *,
        inbound_session_id: bytes,
        outbound_session_id: bytes,
        group_keys_by_epoch: Mapping[int, GroupKey] | None = None,
    ) -> None:
        """Seal under `group_key`; `inbound_session_id` is the id this side chose, `outbound_session_id` the peer's."""
        _check_length("peer_verify_key", peer_verify_key, VERIFY_KEY_BYTES)
        _check_length("inbound_session_id", inbound_session_id, SESSION_ID_BYTES)
        _check_length("outbound_session_id", outbound_session_id, SESSION_ID_BYTES)
        # Other group keys this node holds: a batch sealed under one is authenticated before it is refused, so a
        # genuine peer at a stale epoch is told apart from noise. Only the current epoch is ever accepted.
        keys_by_epoch = dict(group_keys_by_epoch or {})
        for epoch, key in keys_by_epoch.items():
            if key.epoch != epoch:
                raise LocalProtocolError(f"group_keys_by_epoch files the key of epoch {key.epoch} under {epoch}")
        if keys_by_epoch.setdefault(group_key.epoch, group_key) != group_key:
            raise LocalProtocolError(f"group_keys_by_epoch holds another key for the current epoch {group_key.epoch}")
        self._identity = identity
        self._epoch = group_key.epoch
        self._boxes_by_epoch = {epoch: nacl.secret.SecretBox(key.secret) for epoch, key in keys_by_epoch.items()}
        self._own_id = identity.device_id.encode()
        self._peer_id = _device_id_bytes("peer_device_id", peer_device_id)
        self._peer_device_id = peer_device_id
        self._peer_verify_key = peer_verify_key
        self._inbound_session_id = inbound_session_id
        self._outbound_session_id = outbound_session_id
        self._outbound_hints = (_hint(self._own_id), _hint(self._peer_id), _hint(outbound_session_id))
        self._inbound_hints = (_hint(self._peer_id), _hint(self._own_id), _hint(inbound_session_id))
        self._sent_counter = 0
        self._accepted_counter = 0  # counters start at 1, so 0 accepts the first batch

    def seal(self, plain: bytes) -> bytes:
        """Sign `plain` as the next batch of this session to the peer, then encrypt it under the current group key."""
        self._sent_counter += 1
        body = bytes(plain)
        signed = _batch_signed_data(
            self._epoch, self._own_id, self._peer_id, self._outbound_session_id, self._sent_counter, body
        )
        header = _BATCH_HEADER.pack(*self._outbound_hints, self._sent_counter, self._identity.sign(signed))
        box = self._boxes_by_epoch[self._epoch]
        return self._epoch.to_bytes(EPOCH_BYTES, "big") + bytes(box.encrypt(header + body))

    def open(self, sealed: bytes) -> bytes:
        """Return the body of a batch the peer sealed for this session, or raise UnsealRefusedError saying why not."""
        if len(sealed) < BATCH_OVERHEAD_BYTES:
            raise UnsealRefusedError(
                UnsealReason.MALFORMED, f"{len(sealed)} bytes is shorter than any sealed batch ({BATCH_OVERHEAD_BYTES})"
            )
        epoch = int.from_bytes(sealed[:EPOCH_BYTES], "big")
        box = self._boxes_by_epoch.get(epoch)
        if box is None:
            raise UnsealRefusedError(
                UnsealReason.BAD_EPOCH,
                f"sealed under group epoch {epoch}, for which this node has no key (this session is at {self._epoch})",
            )
        try:
            inner = box.decrypt(bytes(sealed[EPOCH_BYTES:]))
        except nacl.exceptions.CryptoError:
            raise UnsealRefusedError(
                UnsealReason.CANNOT_DECRYPT,
                f"the group key of epoch {epoch} does not open it: tampered, or sealed under another group key",
            ) from None
        sender_hint, recipient_hint, session_hint, counter, signature = _BATCH_HEADER.unpack_from(inner)
        body = inner[_BATCH_HEADER.size :]
        expected_sender_hint, expected_recipient_hint, expected_session_hint = self._inbound_hints
        if sender_hint != expected_sender_hint:
            raise UnsealRefusedError(UnsealReason.WRONG_SENDER, f"sent by a device other than {self._peer_device_id}")
        if recipient_hint != expected_recipient_hint:
            raise UnsealRefusedError(UnsealReason.WRONG_RECIPIENT, "addressed to a device other than this one")
        if session_hint != expected_session_hint:
            raise UnsealRefusedError(
                UnsealReason.WRONG_SESSION, "sealed for another session: replayed from an earlier one, or misrouted"
            )
        signed = _batch_signed_data(epoch, self._peer_id, self._own_id, self._inbound_session_id, counter, body)
        if not verify(self._peer_verify_key, signed, signature):
            raise UnsealRefusedError(
                UnsealReason.BAD_SIGNATURE, f"the signature does not verify with the key of {self._peer_device_id}"
            )
        if epoch != self._epoch:
            raise UnsealRefusedError(
                UnsealReason.BAD_EPOCH,
                f"{self._peer_device_id} sealed it under group epoch {epoch}; this session is at {self._epoch}",
            )
        if counter <= self._accepted_counter:
            raise UnsealRefusedError(
                UnsealReason.REPLAYED,
                f"batch counter {counter} is not above {self._accepted_counter}, the last one accepted",
            )
        self._accepted_counter = counter
        return body


def _device_signed_data(sender_verify_key: bytes, recipient_verify_key: bytes, body: bytes) -> bytes:
    return DEVICE_DOMAIN_TAG + sender_verify_key + recipient_verify_key + body


def seal_for_device(identity: DeviceIdentity, recipient_verify_key: bytes, plain: bytes) -> bytes:
    """Sign `plain` for the device with Ed25519 key `recipient_verify_key` and seal it so only that device reads it."""
    _check_length("recipient_verify_key", recipient_verify_key, VERIFY_KEY_BYTES)
    try:
        recipient_public_key = nacl.signing.VerifyKey(recipient_verify_key).to_curve25519_public_key()
    except nacl.exceptions.CryptoError:
        raise LocalProtocolError("recipient_verify_key is not a usable Ed25519 public key") from None
    body = bytes(plain)
    sender_verify_key = identity.verify_key_bytes
    signature = identity.sign(_device_signed_data(sender_verify_key, recipient_verify_key, body))
    header = _DEVICE_HEADER.pack(_hint(sender_verify_key), _hint(recipient_verify_key), signature)
    return bytes(nacl.public.SealedBox(recipient_public_key).encrypt(header + body))


def open_from_device(identity: DeviceIdentity, sender_verify_key: bytes, sealed: bytes) -> bytes:
    """Return the body the device with `sender_verify_key` sealed for this device, or raise UnsealRefusedError."""
    if len(sealed) < DEVICE_OVERHEAD_BYTES:
        raise UnsealRefusedError(
            UnsealReason.MALFORMED, f"{len(sealed)} bytes is shorter than any sealed message ({DEVICE_OVERHEAD_BYTES})"
        )
    private_key = identity.signing_key.to_curve25519_private_key()
    try:
        inner = nacl.public.SealedBox(private_key).decrypt(bytes(sealed))
    except nacl.exceptions.CryptoError:
        raise UnsealRefusedError(UnsealReason.CANNOT_DECRYPT, "not sealed to this device's key, or tampered") from None
    sender_hint, recipient_hint, signature = _DEVICE_HEADER.unpack_from(inner)
    body = inner[_DEVICE_HEADER.size :]
    own_verify_key = identity.verify_key_bytes
    if sender_hint != _hint(sender_verify_key):
        raise UnsealRefusedError(UnsealReason.WRONG_SENDER, "signed by a device other than the expected sender")
    if recipient_hint != _hint(own_verify_key):
        # It opened with this device's key yet was signed for another: someone re-sealed a message meant for them.
        raise UnsealRefusedError(UnsealReason.WRONG_RECIPIENT, "signed for another device and re-sealed to this one")
    if not verify(sender_verify_key, _device_signed_data(sender_verify_key, own_verify_key, body), signature):
        raise UnsealRefusedError(UnsealReason.BAD_SIGNATURE, "the signature does not verify with the sender's key")
    return body


def _mailbox_signed_data(epoch: int, mailbox_id: bytes, sender_id: bytes, body: bytes) -> bytes:
    return b"".join(
        (MAILBOX_DOMAIN_TAG, epoch.to_bytes(EPOCH_BYTES, "big"), bytes([len(mailbox_id)]), mailbox_id, sender_id, body)
    )


def seal_for_mailbox(identity: DeviceIdentity, group_key: GroupKey, mailbox_id: bytes, plain: bytes) -> bytes:
    """Sign `plain` for mailbox `mailbox_id` and encrypt it under `group_key`, for any device holding that key."""
    if not 0 < len(mailbox_id) <= 255:
        raise LocalProtocolError("a mailbox id is 1 to 255 bytes")
    sender_id = _device_id_bytes("the sender's device id", identity.device_id)
    body = bytes(plain)
    signature = identity.sign(_mailbox_signed_data(group_key.epoch, mailbox_id, sender_id, body))
    inner = _MAILBOX_HEADER.pack(signature, len(sender_id)) + sender_id + body
    box = nacl.secret.SecretBox(group_key.secret)
    return group_key.epoch.to_bytes(EPOCH_BYTES, "big") + bytes(box.encrypt(inner))


def open_from_mailbox(
    group_key: GroupKey, mailbox_id: bytes, sealed: bytes, verify_key_of: Callable[[str], bytes | None]
) -> tuple[str, bytes]:
    """Return (sender device id, body) of a batch sealed for mailbox `mailbox_id`, or raise UnsealRefusedError.

    `verify_key_of(device_id)` gives the Ed25519 key of a device this node trusts, or None.
    """
    if len(sealed) < MAILBOX_OVERHEAD_BYTES:
        raise UnsealRefusedError(
            UnsealReason.MALFORMED, f"{len(sealed)} bytes is shorter than any mailbox batch ({MAILBOX_OVERHEAD_BYTES})"
        )
    epoch = int.from_bytes(sealed[:EPOCH_BYTES], "big")
    if epoch != group_key.epoch:
        raise UnsealRefusedError(UnsealReason.BAD_EPOCH, f"sealed under epoch {epoch}, expected {group_key.epoch}")
    try:
        inner = nacl.secret.SecretBox(group_key.secret).decrypt(bytes(sealed[EPOCH_BYTES:]))
    except nacl.exceptions.CryptoError:
        raise UnsealRefusedError(
            UnsealReason.CANNOT_DECRYPT, f"the group key of epoch {epoch} does not open it: tampered, or another group"
        ) from None
    signature, sender_length = _MAILBOX_HEADER.unpack_from(inner)
    sender_id = inner[_MAILBOX_HEADER.size : _MAILBOX_HEADER.size + sender_length]
    body = inner[_MAILBOX_HEADER.size + sender_length :]
    try:
        sender = sender_id.decode()
    except UnicodeDecodeError:
        raise UnsealRefusedError(UnsealReason.MALFORMED, "the sender's device id is not UTF-8") from None
    verify_key = verify_key_of(sender) if len(sender_id) == sender_length and sender_length else None
    if verify_key is None:
        raise UnsealRefusedError(UnsealReason.WRONG_SENDER, f"sent by {sender!r:.80}, not a device this node trusts")
    if not verify(verify_key, _mailbox_signed_data(epoch, mailbox_id, sender_id, body), signature):
        raise UnsealRefusedError(
            UnsealReason.BAD_SIGNATURE, f"the signature does not verify with the key of {sender} for this mailbox"
        )
    return sender, body
