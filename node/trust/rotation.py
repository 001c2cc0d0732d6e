"""The rules that keep the group key away from revoked devices (docs/spec/sealing.md, "Key rotation"): a revocation
rotates the key to every device that stays, a device adopts keys rotated to it, and a key that reached a device
revoked since (two revocations made at once) is rotated again."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import attrs

from crdt import Collection, Kind, Op, Replica
from node.trust.identity import DeviceIdentity, GroupKey
from node.trust.keyring import KeyRing
from stores.repositories import UnitOfWork

log = logging.getLogger(__name__)


@attrs.frozen
class TakenOps:
    """What a batch of committed or applied ops means for trust: keys this device adopted, devices revoked."""

    adopted: Sequence[GroupKey]
    revoked: Sequence[str]


class KeyRotation:
    """Decides when this device's group key must change, and stages the change."""

    def __init__(self, identity: DeviceIdentity, keyring: KeyRing, replica: Callable[[], Replica]) -> None:
        self.identity = identity
        self.keyring = keyring
        self._replica = replica
        self._rotated_away: set[bytes] = set()  # keys this device already replaced for reaching a revoked device

    def take(self, ops: Sequence[Op]) -> TakenOps:
        """Adopt the group keys rotated to this device among `ops`, and name the devices they revoke."""
        adopted = self.keyring.adopt(ops, self.trusted_public_key)
        revoked = [op.key for op in ops if op.collection is Collection.DEVICES and op.kind is Kind.REVOKE]
        if adopted:
            log.info("adopted group key epoch %s; sessions restart under it", self.keyring.current.epoch)
        return TakenOps(adopted, revoked)

    def must_rotate_again(self) -> bool:
        """Whether the newest key was sealed to a device revoked since; true once per key (the newest rotation wins
        if other devices rotate too)."""
        current = self.keyring.current
        replica = self._replica()
        holders = self.keyring.holders_of_current(replica.settings) or set()
        reached = sorted(d for d in holders if replica.devices.revoked_at(d) is not None)
        if not reached or current.key_id in self._rotated_away:
            return False
        self._rotated_away.add(current.key_id)
        log.warning("group key epoch %s reached revoked %s: rotating again", current.epoch, ", ".join(reached))
        return True

    def stage(self, uow: UnitOfWork, excluding: str) -> list[str]:
        """Stage a new group key sealed to every trusted device but `excluding` (and this one); return who gets it."""
        own = self.identity.device_id
        public_keys = {d: key for d in self._replica().devices.enrolments if (key := self.trusted_public_key(d))}
        keeping = [d for d in public_keys if d not in (excluding, own)]
        rotation = self.keyring.rotation({d: public_keys[d] for d in keeping})
        uow.preferences.set(rotation.setting_key, rotation.value, collection=Collection.SETTINGS)
        return sorted(keeping)

    def trusted_public_key(self, device_id: str) -> bytes | None:
        """The Ed25519 public key of an enrolled, unrevoked device, or None."""
        devices = self._replica().devices
        record = devices.get(device_id)
        return record["public_key"] if record is not None and devices.is_trusted(device_id) else None
