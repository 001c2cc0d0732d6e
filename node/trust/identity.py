"""Device identity (an Ed25519 seed kept encrypted under a passphrase), per-device store keys, and the group key."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import msgpack
import nacl.exceptions
import nacl.hash
import nacl.pwhash
import nacl.secret
import nacl.signing
import nacl.utils
from nacl.encoding import RawEncoder

from crdt import Collection, Kind, Op
from crdt.registry import DeviceRegistry
from crdt.revocation import CUTOFF_FIELD
from node.errors import NodeError

IDENTITY_FILE = "identity.key"
GROUP_KEY_FILE = "group.key"
SEED_BYTES = 32
GROUP_SECRET_BYTES = nacl.secret.SecretBox.KEY_SIZE
GROUP_KEYS_MAX = 256  # one per rotation, i.e. per revoked device
KEY_ID_BYTES = 8
_KEY_ID_PERSON = b"aico-group-kid"
KDF_OPSLIMIT = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
KDF_MEMLIMIT = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE

_IDENTITY_FORMAT = "aico-identity"
_GROUP_KEY_FORMAT = "aico-group-key"
_FORMAT_VERSION = 1
_KDF_NAME = "argon2id"
# Limits read from a file are capped so a tampered file cannot make unlocking eat all memory or time.
_KDF_OPSLIMIT_MAX = nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE
_KDF_MEMLIMIT_MAX = nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE
_KEY_FILE_BYTES_MAX = 64 * 1024
_STORE_KEY_PERSON = b"aico-store-key"
_PURPOSE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_BASE58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
# libp2p PublicKey protobuf header: field 1 (KeyType) = Ed25519 (1), field 2 (Data) of 32 bytes.
_LIBP2P_ED25519_PUBKEY_HEADER = b"\x08\x01\x12\x20"
_MULTIHASH_IDENTITY = b"\x00"


class IdentityError(NodeError):
    """The device identity or a key file is missing, unreadable or cannot be created."""


class WrongPassphraseError(IdentityError):
    """The passphrase does not open the identity file."""


class GroupKeyError(IdentityError):
    """The group key file is missing, corrupt, or not sealed for this device."""


def _base58btc(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    digits = []
    while number:
        number, remainder = divmod(number, 58)
        digits.append(_BASE58_ALPHABET[remainder])
    leading_zeros = len(data) - len(data.lstrip(b"\x00"))
    return "1" * leading_zeros + "".join(reversed(digits))


def _check_seed(_instance: Any, _attribute: Any, seed: bytes) -> None:
    if type(seed) is not bytes or len(seed) != SEED_BYTES:
        raise IdentityError(f"a device seed is {SEED_BYTES} bytes")


def _check_group_secret(_instance: Any, _attribute: Any, secret: bytes) -> None:
    if type(secret) is not bytes or len(secret) != GROUP_SECRET_BYTES:
        raise IdentityError(f"a group secret is {GROUP_SECRET_BYTES} bytes")


def _check_epoch(_instance: Any, _attribute: Any, epoch: int) -> None:
    if type(epoch) is not int or epoch < 0:
        raise IdentityError(f"a group key epoch is a non-negative integer, got {epoch!r}")


@attrs.frozen
class DeviceIdentity:
    """This device's Ed25519 key: its libp2p peer id, its signer, and the root of its store keys."""

    seed: bytes = attrs.field(repr=False, validator=_check_seed)

    @property
    def signing_key(self) -> nacl.signing.SigningKey:
        """The Ed25519 signing key of this device."""
        return nacl.signing.SigningKey(self.seed)

    @property
    def verify_key_bytes(self) -> bytes:
        """The 32-byte Ed25519 public key of this device."""
        return bytes(self.signing_key.verify_key)

    @property
    def device_id(self) -> str:
        """The libp2p peer id of this device's public key, base58btc ("12D3KooW...")."""
        return device_id_of(self.verify_key_bytes)

    def store_key(self, purpose: str) -> bytes:
        """A 32-byte key for one local use ("sql", "cache", "group", ...), derived from the seed and never synced."""
        if not _PURPOSE.fullmatch(purpose):
            raise IdentityError(f"a store key purpose is a short lowercase word, got {purpose!r}")
        return nacl.hash.blake2b(
            purpose.encode(), key=self.seed, person=_STORE_KEY_PERSON, digest_size=32, encoder=RawEncoder
        )

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `data` by this device."""
        return self.signing_key.sign(data).signature


def device_id_of(verify_key: bytes) -> str:
    """The device id (libp2p peer id, base58btc) that belongs to a 32-byte Ed25519 public key."""
    public_key = _LIBP2P_ED25519_PUBKEY_HEADER + verify_key
    return _base58btc(_MULTIHASH_IDENTITY + bytes([len(public_key)]) + public_key)


def enrolment_record(signer: DeviceIdentity, device_id: str, verify_key: bytes, name: str) -> dict[str, Any]:
    """Return a device-registry record enrolling a device, signed by `signer`."""
    record: dict[str, Any] = {"public_key": verify_key, "name": name, "signer": signer.device_id}
    record["signature"] = signer.sign(msgpack.packb([device_id, record], use_bin_type=True))
    return record


def revocation_record(signer: DeviceIdentity, device_id: str, reason: str, cutoff_seq: int) -> dict[str, Any]:
    """Return a device-registry record revoking a device for good, signed by `signer`; the device's ops past
    `cutoff_seq` (its last seq the signer has applied) will have no effect (docs/spec/sync.md, section 2)."""
    record: dict[str, Any] = {"revoked": True, "reason": reason, "signer": signer.device_id, CUTOFF_FIELD: cutoff_seq}
    record["signature"] = signer.sign(msgpack.packb([device_id, record], use_bin_type=True))
    return record


def registry_refusal(op: Op, devices: DeviceRegistry) -> str | None:
    """Why a device-registry op must be refused: not signed by its own author, an enrolled device; else None.

    A device enrolling itself (the first device of a group) signs with the key it enrols. Whether the signer was
    revoked before signing is the replica's rule for every op (docs/spec/sync.md), not checked here.
    """
    if op.collection is not Collection.DEVICES:
        return None
    record = op.payload
    signer, signature = record.get("signer"), record.get("signature")
    if signer != op.device:
        return f"registry op {op.device}:{op.seq} names {signer!r:.80} as its signer, not its author"
    if op.kind is Kind.ENROL and op.key == op.device:
        public_key = record.get("public_key")
    else:
        enrolled = devices.get(signer)
        public_key = enrolled["public_key"] if enrolled else None
    if type(public_key) is not bytes:
        return f"registry op {op.device}:{op.seq} is signed by {signer}, which is not enrolled here (yet)"
    unsigned = {name: value for name, value in record.items() if name != "signature"}
    if type(signature) is not bytes or not verify(
        public_key, msgpack.packb([op.key, unsigned], use_bin_type=True), signature
    ):
        return f"registry op {op.device}:{op.seq} has a bad signature"
    return None


def verify(verify_key_bytes: bytes, data: bytes, signature: bytes) -> bool:
    """Whether `signature` is a valid Ed25519 signature of `data` by the key `verify_key_bytes`."""
    try:
        nacl.signing.VerifyKey(verify_key_bytes).verify(data, signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        # Malformed keys or signatures are as untrustworthy as a bad signature.
        return False
    return True


@attrs.frozen
class GroupKey:
    """The secret shared by the user's trusted devices for one epoch."""

    secret: bytes = attrs.field(repr=False, validator=_check_group_secret)
    epoch: int = attrs.field(validator=_check_epoch)

    @property
    def key_id(self) -> bytes:
        """A short public name of this key, so two devices can find a key they share without revealing it."""
        return nacl.hash.blake2b(self.secret, digest_size=KEY_ID_BYTES, person=_KEY_ID_PERSON, encoder=RawEncoder)

    def rank(self) -> tuple[int, bytes]:
        """The order of keys: a later epoch first; two keys made for one epoch at once are ordered by key id."""
        return (self.epoch, self.key_id)


def create_group_key() -> GroupKey:
    """A new random group key at epoch 0."""
    return GroupKey(nacl.utils.random(GROUP_SECRET_BYTES), 0)


def _passphrase_bytes(passphrase: str) -> bytes:
    # The same passphrase typed on two keyboards may arrive in different Unicode forms; NFC makes them one.
    return unicodedata.normalize("NFC", passphrase).encode()


def _derive_box(passphrase: str, salt: bytes, opslimit: int, memlimit: int) -> nacl.secret.SecretBox:
    key = nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE, _passphrase_bytes(passphrase), salt, opslimit=opslimit, memlimit=memlimit
    )
    return nacl.secret.SecretBox(key)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private_file(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write `data` to `path` atomically with mode 0600; without `overwrite`, refuse if `path` exists."""
    try:
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            if overwrite:
                os.replace(temp_name, path)
            else:
                # link() fails if the target exists, so two racing writers cannot both win.
                os.link(temp_name, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
        _fsync_dir(path.parent)
    except FileExistsError:
        raise IdentityError(f"{path} already exists; refusing to replace it") from None
    except OSError as error:
        raise IdentityError(f"cannot write {path}: {error.strerror}") from error


def _read_key_file(path: Path, missing_hint: str, error: type[IdentityError]) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            raw = file.read(_KEY_FILE_BYTES_MAX + 1)
    except FileNotFoundError:
        raise error(f"{path} does not exist: {missing_hint}") from None
    except OSError as os_error:
        raise error(f"cannot read {path}: {os_error.strerror}") from os_error
    if len(raw) > _KEY_FILE_BYTES_MAX:
        raise error(f"{path} is larger than any key file ({_KEY_FILE_BYTES_MAX} bytes): corrupt")
    try:
        fields = msgpack.unpackb(raw, raw=False)
    except Exception:  # msgpack raises many exception types for bad input
        raise error(f"{path} is not a key file: corrupt") from None
    if type(fields) is not dict:
        raise error(f"{path} is not a key file: corrupt")
    return fields


def _identity_path(home: Path) -> Path:
    return home / IDENTITY_FILE


def _check_new_passphrase(passphrase: str) -> None:
    if not passphrase:
        raise IdentityError("the passphrase must not be empty")


def _encode_identity(seed: bytes, passphrase: str, opslimit: int, memlimit: int) -> bytes:
    salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
    sealed_seed = _derive_box(passphrase, salt, opslimit, memlimit).encrypt(seed)
    return msgpack.packb(
        {
            "format": _IDENTITY_FORMAT,
            "version": _FORMAT_VERSION,
            "kdf": _KDF_NAME,
            "opslimit": opslimit,
            "memlimit": memlimit,
            "salt": salt,
            "sealed_seed": bytes(sealed_seed),
        },
        use_bin_type=True,
    )


@attrs.frozen
class _IdentityFile:
    """The parsed, not yet decrypted, contents of an identity file."""

    opslimit: int
    memlimit: int
    salt: bytes
    sealed_seed: bytes


def _parse_identity(path: Path) -> _IdentityFile:
    fields = _read_key_file(path, "run `aico-node init` to create this device's identity", IdentityError)
    if fields.get("format") != _IDENTITY_FORMAT or fields.get("version") != _FORMAT_VERSION:
        raise IdentityError(
            f"{path} is not an identity file of a format this node reads "
            f"(format {fields.get('format')!r}, version {fields.get('version')!r})"
        )
    opslimit, memlimit = fields.get("opslimit"), fields.get("memlimit")
    salt, sealed_seed = fields.get("salt"), fields.get("sealed_seed")
    if not (
        fields.get("kdf") == _KDF_NAME
        and type(opslimit) is int
        and nacl.pwhash.argon2id.OPSLIMIT_MIN <= opslimit <= _KDF_OPSLIMIT_MAX
        and type(memlimit) is int
        and nacl.pwhash.argon2id.MEMLIMIT_MIN <= memlimit <= _KDF_MEMLIMIT_MAX
        and type(salt) is bytes
        and len(salt) == nacl.pwhash.argon2id.SALTBYTES
        and type(sealed_seed) is bytes
    ):
        raise IdentityError(f"{path} has missing or out-of-range fields: corrupt")
    return _IdentityFile(opslimit, memlimit, salt, sealed_seed)


def _open_identity(path: Path, parsed: _IdentityFile, passphrase: str) -> DeviceIdentity:
    box = _derive_box(passphrase, parsed.salt, parsed.opslimit, parsed.memlimit)
    try:
        seed = box.decrypt(parsed.sealed_seed)
    except nacl.exceptions.CryptoError:
        raise WrongPassphraseError(f"wrong passphrase for {path}") from None
    if len(seed) != SEED_BYTES:
        raise IdentityError(f"{path} holds a key of {len(seed)} bytes, not {SEED_BYTES}: corrupt")
    return DeviceIdentity(seed)


def create_identity(home: Path, passphrase: str) -> DeviceIdentity:
    """Create this device's identity in `home`, encrypted under `passphrase`; refuse if one exists."""
    path = _identity_path(home)
    _check_new_passphrase(passphrase)
    if path.exists():
        raise IdentityError(f"an identity already exists at {path}; refusing to replace it")
    if not home.exists():
        try:
            home.mkdir(mode=0o700, parents=True)
            os.chmod(home, 0o700)  # mkdir's mode is filtered by the umask
        except OSError as error:
            raise IdentityError(f"cannot create the node home {home}: {error.strerror}") from error
    identity = DeviceIdentity(bytes(nacl.signing.SigningKey.generate()))
    _write_private_file(path, _encode_identity(identity.seed, passphrase, KDF_OPSLIMIT, KDF_MEMLIMIT), overwrite=False)
    return identity


def unlock_identity(home: Path, passphrase: str) -> DeviceIdentity:
    """Decrypt this device's identity from `home` with `passphrase`."""
    path = _identity_path(home)
    return _open_identity(path, _parse_identity(path), passphrase)


def change_passphrase(home: Path, old_passphrase: str, new_passphrase: str) -> None:
    """Re-encrypt this device's identity in `home` under `new_passphrase`, replacing the file atomically."""
    path = _identity_path(home)
    _check_new_passphrase(new_passphrase)
    parsed = _parse_identity(path)
    identity = _open_identity(path, parsed, old_passphrase)
    # Keep limits a user raised; lift older files to the current defaults.
    opslimit, memlimit = max(parsed.opslimit, KDF_OPSLIMIT), max(parsed.memlimit, KDF_MEMLIMIT)
    _write_private_file(path, _encode_identity(identity.seed, new_passphrase, opslimit, memlimit), overwrite=True)


def save_group_key(home: Path, identity: DeviceIdentity, group_key: GroupKey) -> None:
    """Store `group_key` in `home` as the only key, sealed with this device's group store key."""
    save_group_keys(home, identity, [group_key])


def save_group_keys(home: Path, identity: DeviceIdentity, group_keys: Sequence[GroupKey]) -> None:
    """Store every group key this device holds in `home`, sealed with its group store key, replacing the file."""
    if not 0 < len(group_keys) <= GROUP_KEYS_MAX:
        raise GroupKeyError(f"a device holds 1 to {GROUP_KEYS_MAX} group keys, not {len(group_keys)}")
    box = nacl.secret.SecretBox(identity.store_key("group"))
    sealed = box.encrypt(msgpack.packb([[key.epoch, key.secret] for key in group_keys], use_bin_type=True))
    body = {"format": _GROUP_KEY_FORMAT, "version": _FORMAT_VERSION, "sealed": bytes(sealed)}
    _write_private_file(home / GROUP_KEY_FILE, msgpack.packb(body, use_bin_type=True), overwrite=True)


def load_group_key(home: Path, identity: DeviceIdentity) -> GroupKey:
    """Read the newest group key from `home`."""
    return max(load_group_keys(home, identity), key=GroupKey.rank)


def load_group_keys(home: Path, identity: DeviceIdentity) -> list[GroupKey]:
    """Read every group key from `home`, opened with this device's group store key."""
    path = home / GROUP_KEY_FILE
    fields = _read_key_file(path, "this device has no group key yet; pair it with `aico-node pair`", GroupKeyError)
    sealed = fields.get("sealed")
    known_format = fields.get("format") == _GROUP_KEY_FORMAT and fields.get("version") == _FORMAT_VERSION
    if not known_format or type(sealed) is not bytes:
        raise GroupKeyError(f"{path} is not a group key file of a format this node reads")
    try:
        plain = nacl.secret.SecretBox(identity.store_key("group")).decrypt(sealed)
    except nacl.exceptions.CryptoError:
        raise GroupKeyError(f"{path} does not open with this device's key: corrupt or from another device") from None
    stored = msgpack.unpackb(plain, raw=False)
    if type(stored) is list and len(stored) == 2 and type(stored[0]) is int:
        stored = [stored]  # written before devices kept more than one key
    try:
        if type(stored) is list and 0 < len(stored) <= GROUP_KEYS_MAX:
            return [GroupKey(secret, epoch) for epoch, secret in stored]
    except (IdentityError, TypeError, ValueError):
        pass
    raise GroupKeyError(f"{path} holds a malformed group key")
