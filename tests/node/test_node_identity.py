"""Device identity: passphrase-encrypted seed, peer id, store keys, signatures and the group key file."""

import os
import stat
from pathlib import Path

import msgpack
import nacl.signing
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from node.errors import NodeError
from node.trust.identity import (
    GROUP_KEY_FILE,
    IDENTITY_FILE,
    DeviceIdentity,
    GroupKey,
    GroupKeyError,
    IdentityError,
    WrongPassphraseError,
    change_passphrase,
    create_group_key,
    create_identity,
    load_group_key,
    save_group_key,
    unlock_identity,
    verify,
)

PASSPHRASE = "correct horse battery staple"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def identity(home: Path) -> DeviceIdentity:
    return create_identity(home, PASSPHRASE)


def test_create_then_unlock_gives_the_same_identity(home: Path, identity: DeviceIdentity) -> None:
    unlocked = unlock_identity(home, PASSPHRASE)
    assert unlocked == identity
    assert unlocked.device_id == identity.device_id
    assert mode_of(home) == 0o700
    assert mode_of(home / IDENTITY_FILE) == 0o600
    assert [p.name for p in home.iterdir()] == [IDENTITY_FILE]  # no temp file left behind


def test_the_file_holds_no_plaintext_seed_and_records_its_kdf_limits(home: Path, identity: DeviceIdentity) -> None:
    raw = (home / IDENTITY_FILE).read_bytes()
    assert identity.seed not in raw
    assert identity.seed.hex().encode() not in raw
    fields = msgpack.unpackb(raw)
    assert fields["kdf"] == "argon2id" and fields["opslimit"] >= 2 and fields["memlimit"] >= 64 * 1024 * 1024


def test_repr_hides_the_seed(identity: DeviceIdentity) -> None:
    assert identity.seed.hex() not in repr(identity)
    assert repr(identity.seed) not in repr(identity)


def test_wrong_passphrase_is_refused_and_changes_nothing(home: Path, identity: DeviceIdentity) -> None:
    path = home / IDENTITY_FILE
    before = path.read_bytes()
    with pytest.raises(WrongPassphraseError, match=f"wrong passphrase for {path}"):
        unlock_identity(home, PASSPHRASE + "!")
    assert path.read_bytes() == before


def test_a_second_create_is_refused_and_keeps_the_first(home: Path, identity: DeviceIdentity) -> None:
    before = (home / IDENTITY_FILE).read_bytes()
    with pytest.raises(IdentityError, match="already exists"):
        create_identity(home, "another passphrase")
    assert (home / IDENTITY_FILE).read_bytes() == before
    assert unlock_identity(home, PASSPHRASE) == identity


def test_an_empty_passphrase_is_refused(home: Path) -> None:
    with pytest.raises(IdentityError, match="empty"):
        create_identity(home, "")
    assert not (home / IDENTITY_FILE).exists()


def test_a_missing_identity_says_to_run_init(home: Path) -> None:
    with pytest.raises(IdentityError, match="aico-node init"):
        unlock_identity(home, PASSPHRASE)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\xc1 not msgpack",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"format": "aico-identity", "version": 99}),
        msgpack.packb({"format": "aico-identity", "version": 1, "kdf": "argon2id", "opslimit": 2}),
        msgpack.packb(
            {
                "format": "aico-identity",
                "version": 1,
                "kdf": "argon2id",
                "opslimit": 2,
                "memlimit": 1 << 40,  # a tampered limit must not make unlocking allocate a terabyte
                "salt": bytes(16),
                "sealed_seed": bytes(72),
            }
        ),
    ],
)
def test_a_corrupt_file_gives_identity_error(home: Path, identity: DeviceIdentity, content: bytes) -> None:
    (home / IDENTITY_FILE).write_bytes(content)
    with pytest.raises(IdentityError) as raised:
        unlock_identity(home, PASSPHRASE)
    assert not isinstance(raised.value, WrongPassphraseError)
    assert isinstance(raised.value, NodeError)
    assert (home / IDENTITY_FILE).read_bytes() == content


def test_device_id_equals_the_libp2p_peer_id() -> None:
    for _ in range(5):
        seed = bytes(nacl.signing.SigningKey.generate())
        identity = DeviceIdentity(seed)
        libp2p_id = ID.from_pubkey(create_new_key_pair(seed=seed).public_key).to_base58()
        assert identity.device_id == libp2p_id
        assert identity.device_id.startswith("12D3KooW")


def test_device_id_for_a_known_seed_is_stable() -> None:
    seed = bytes(range(32))
    expected = ID.from_pubkey(create_new_key_pair(seed=seed).public_key).to_base58()
    assert DeviceIdentity(seed).device_id == expected


def test_store_keys_are_distinct_deterministic_and_not_the_seed(identity: DeviceIdentity) -> None:
    purposes = ["sql", "cache", "group", "vectors"]
    keys = [identity.store_key(purpose) for purpose in purposes]
    assert all(len(key) == 32 for key in keys)
    assert len(set(keys)) == len(purposes)
    assert identity.seed not in keys
    assert keys == [DeviceIdentity(identity.seed).store_key(purpose) for purpose in purposes]
    other = DeviceIdentity(bytes(nacl.signing.SigningKey.generate()))
    assert other.store_key("sql") != identity.store_key("sql")
    with pytest.raises(IdentityError):
        identity.store_key("")


def test_signatures_verify_only_for_the_signed_data_and_key(identity: DeviceIdentity) -> None:
    signature = identity.sign(b"delta batch")
    assert len(signature) == 64
    assert verify(identity.verify_key_bytes, b"delta batch", signature)
    assert not verify(identity.verify_key_bytes, b"delta batcH", signature)
    other = DeviceIdentity(bytes(nacl.signing.SigningKey.generate()))
    assert not verify(other.verify_key_bytes, b"delta batch", signature)
    assert not verify(b"short", b"delta batch", signature)
    assert not verify(identity.verify_key_bytes, b"delta batch", signature[:10])


def test_change_passphrase_reencrypts_the_same_seed(home: Path, identity: DeviceIdentity) -> None:
    before = (home / IDENTITY_FILE).read_bytes()
    with pytest.raises(WrongPassphraseError):
        change_passphrase(home, "not it", "new passphrase")
    assert (home / IDENTITY_FILE).read_bytes() == before
    with pytest.raises(IdentityError, match="empty"):
        change_passphrase(home, PASSPHRASE, "")
    change_passphrase(home, PASSPHRASE, "new passphrase")
    assert mode_of(home / IDENTITY_FILE) == 0o600
    assert unlock_identity(home, "new passphrase") == identity
    with pytest.raises(WrongPassphraseError):
        unlock_identity(home, PASSPHRASE)


def test_group_key_round_trip(home: Path, identity: DeviceIdentity) -> None:
    group_key = create_group_key()
    assert group_key.epoch == 0 and len(group_key.secret) == 32
    assert group_key.secret.hex() not in repr(group_key)
    save_group_key(home, identity, group_key)
    assert mode_of(home / GROUP_KEY_FILE) == 0o600
    assert group_key.secret not in (home / GROUP_KEY_FILE).read_bytes()
    assert load_group_key(home, identity) == group_key
    rotated = GroupKey(create_group_key().secret, 1)
    save_group_key(home, identity, rotated)
    assert load_group_key(home, identity) == rotated


def test_group_key_errors_are_clear(home: Path, identity: DeviceIdentity) -> None:
    with pytest.raises(GroupKeyError, match="no group key"):
        load_group_key(home, identity)
    save_group_key(home, identity, create_group_key())
    other = DeviceIdentity(bytes(nacl.signing.SigningKey.generate()))
    with pytest.raises(GroupKeyError, match="does not open"):
        load_group_key(home, other)
    (home / GROUP_KEY_FILE).write_bytes(b"garbage")
    with pytest.raises(GroupKeyError, match="corrupt"):
        load_group_key(home, identity)
