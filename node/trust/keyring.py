"""The group keys a device holds, one per epoch it took part in, and their rotation when a device is revoked.

A rotation travels as a settings op `group_key/<epoch>/<creator>` whose value holds the new key sealed to each
device that keeps it (docs/spec/sealing.md, "Key rotation"), so it reaches every device the way any op does:
directly, through the relay, or from the mailbox.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import msgpack
import nacl.utils

from crdt import Collection, Op
from crdt.lww import LwwMap
from node.errors import UnsealError
from node.trust.identity import (
    GROUP_SECRET_BYTES,
    DeviceIdentity,
    GroupKey,
    IdentityError,
    load_group_keys,
    save_group_keys,
)
from node.trust.sealing import open_from_device, seal_for_device

ROTATION_KEY_PREFIX = "group_key/"
OFFERS_MAX = 64  # keys named in a session handshake, newest first
log = logging.getLogger(__name__)


@attrs.frozen
class Rotation:
    """A new group key and the settings op value that hands it to each device keeping it."""

    group_key: GroupKey
    setting_key: str
    value: dict[str, Any]


class KeyRing:
    """Every group key this device holds, persisted in its home; the newest is the one it seals with."""

    def __init__(self, home: Path, identity: DeviceIdentity) -> None:
        self.home = home
        self.identity = identity
        self._keys = {key.key_id: key for key in load_group_keys(home, identity)}

    @property
    def current(self) -> GroupKey:
        """The newest key: what new sessions prefer and what the mailbox is sealed with."""
        return max(self._keys.values(), key=GroupKey.rank)

    def keys(self) -> list[GroupKey]:
        """Every key held, newest first."""
        return sorted(self._keys.values(), key=GroupKey.rank, reverse=True)

    def offers(self) -> list[list]:
        """Name the newest keys as [epoch, key id] pairs, for a peer to pick the newest one both hold."""
        return [[key.epoch, key.key_id] for key in self.keys()[:OFFERS_MAX]]

    def shared_key(self, peer_offers: Iterable[Any]) -> GroupKey | None:
        """Return the newest key the peer also holds, judged from its offers, or None."""
        offered = {
            (offer[0], offer[1])
            for offer in list(peer_offers)[:OFFERS_MAX]
            if type(offer) is list and len(offer) == 2 and type(offer[0]) is int and type(offer[1]) is bytes
        }
        for key in self.keys():
            if (key.epoch, key.key_id) in offered:
                return key
        return None

    def rotation(self, recipients: Mapping[str, bytes]) -> Rotation:
        """Make the next epoch's key, sealed to each recipient (device id -> Ed25519 public key) and to this device."""
        group_key = GroupKey(nacl.utils.random(GROUP_SECRET_BYTES), self.current.epoch + 1)
        plain = msgpack.packb([group_key.epoch, group_key.secret], use_bin_type=True)
        holders = {**recipients, self.identity.device_id: self.identity.verify_key_bytes}
        envelopes = {device: seal_for_device(self.identity, key, plain) for device, key in sorted(holders.items())}
        setting_key = f"{ROTATION_KEY_PREFIX}{group_key.epoch}/{self.identity.device_id}"
        value = {"epoch": group_key.epoch, "key_id": group_key.key_id, "envelopes": envelopes}
        return Rotation(group_key, setting_key, value)

    def holders_of_current(self, settings: LwwMap) -> set[str] | None:
        """Return the devices the current key was sealed to, from its rotation in `settings`; None for a founding key."""
        current = self.current
        prefix = f"{ROTATION_KEY_PREFIX}{current.epoch}/"
        for name, register in settings.registers.items():
            value = register.value
            if name.startswith(prefix) and isinstance(value, dict) and value.get("key_id") == current.key_id:
                return set(value.get("envelopes", ()))
        return None

    def adopt(self, ops: Iterable[Op], public_key_of: Any) -> list[GroupKey]:
        """Take the keys that rotations among `ops` sealed to this device; return those new to it.

        `public_key_of(device_id)` gives a trusted device's Ed25519 public key or None; a rotation from anyone
        else, or one that does not open, is logged and changes nothing.
        """
        adopted = []
        for op in ops:
            if op.collection is not Collection.SETTINGS or not op.key.startswith(ROTATION_KEY_PREFIX):
                continue
            try:
                group_key = self._open_rotation(op, public_key_of(op.device))
            except (UnsealError, IdentityError, ValueError, TypeError, KeyError) as error:
                log.warning("refused the group key rotation %s from %s: %s", op.key, op.device, error)
                continue
            if group_key is not None and group_key.key_id not in self._keys:
                self._keys[group_key.key_id] = group_key
                adopted.append(group_key)
        if adopted:
            save_group_keys(self.home, self.identity, self.keys())
        return adopted

    def _open_rotation(self, op: Op, creator_public_key: bytes | None) -> GroupKey | None:
        value = op.payload
        envelope = value["envelopes"].get(self.identity.device_id)
        if envelope is None:
            return None  # not for this device: it was revoked, or enrolled after the rotation
        if creator_public_key is None:
            raise ValueError("its creator is not a trusted device")
        epoch, secret = msgpack.unpackb(open_from_device(self.identity, creator_public_key, envelope), raw=False)
        if epoch != value["epoch"] or op.key != f"{ROTATION_KEY_PREFIX}{epoch}/{op.device}":
            raise ValueError(f"the sealed epoch {epoch!r} does not match the rotation")
        return GroupKey(secret, epoch)
