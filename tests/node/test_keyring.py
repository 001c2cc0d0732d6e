"""The key ring: rotations reach exactly the devices that keep their trust, and bad rotations change nothing."""

from pathlib import Path

import attrs
import nacl.signing
import pytest

from crdt import Collection, Kind, Op
from node.trust.identity import DeviceIdentity, GroupKey, create_group_key, load_group_keys, save_group_key
from node.trust.keyring import KeyRing


def device(tmp_path: Path, name: str, group_key: GroupKey) -> KeyRing:
    identity = DeviceIdentity(bytes(nacl.signing.SigningKey.generate()))
    home = tmp_path / name
    home.mkdir()
    save_group_key(home, identity, group_key)
    return KeyRing(home, identity)


def rotation_op(ring: KeyRing, recipients: list[KeyRing]) -> Op:
    rotation = ring.rotation({r.identity.device_id: r.identity.verify_key_bytes for r in recipients})
    return Op(ring.identity.device_id, 1, 1, Collection.SETTINGS, rotation.setting_key, Kind.SET, rotation.value)


@pytest.fixture
def rings(tmp_path):
    founding = create_group_key()
    return [device(tmp_path, name, founding) for name in ("admin", "kept", "revoked")]


def public_keys(*rings: KeyRing):
    known = {ring.identity.device_id: ring.identity.verify_key_bytes for ring in rings}
    return known.get


def test_a_rotation_reaches_the_kept_devices_and_not_the_revoked_one(rings):
    admin, kept, revoked = rings
    op = rotation_op(admin, [kept])
    for ring in (admin, kept):
        [new_key] = ring.adopt([op], public_keys(admin))
        assert new_key.epoch == 1 and ring.current == new_key
        assert load_group_keys(ring.home, ring.identity)[0] == new_key  # persisted, newest first
    assert revoked.adopt([op], public_keys(admin)) == [] and revoked.current.epoch == 0
    assert kept.adopt([op], public_keys(admin)) == []  # a second time changes nothing
    # Sessions pick the newest key both hold: the new one between kept devices, the old one with a laggard.
    assert kept.shared_key(admin.offers()) == admin.current
    assert kept.shared_key(revoked.offers()).epoch == 0


def test_a_rotation_from_an_untrusted_creator_or_tampered_changes_nothing(rings):
    admin, kept, revoked = rings
    op = rotation_op(admin, [kept])
    assert kept.adopt([op], public_keys()) == []  # its creator is not a trusted device
    impostor = {admin.identity.device_id: revoked.identity.verify_key_bytes}.get  # the wrong key for its creator
    assert kept.adopt([op], impostor) == []
    envelopes = dict(op.payload["envelopes"])
    sealed = envelopes[kept.identity.device_id]
    envelopes[kept.identity.device_id] = sealed[:-1] + bytes([sealed[-1] ^ 1])  # one bit flipped (a set byte may be so already)
    assert kept.adopt([attrs.evolve(op, payload={**op.payload, "envelopes": envelopes})], public_keys(admin)) == []
    assert kept.adopt([attrs.evolve(op, payload={**op.payload, "epoch": 7})], public_keys(admin)) == []
    assert kept.adopt([attrs.evolve(op, payload="junk")], public_keys(admin)) == []
    assert kept.current.epoch == 0 and len(load_group_keys(kept.home, kept.identity)) == 1


def test_devices_with_no_key_in_common_share_nothing(tmp_path):
    one, other = device(tmp_path, "one", create_group_key()), device(tmp_path, "other", create_group_key())
    assert one.shared_key(other.offers()) is None
    assert one.shared_key([["not", "an offer"], 5, None]) is None
