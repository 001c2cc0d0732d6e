"""A node's home folder: what makes it initialised, its config, and the ways a home is made (first device, joiner)."""

import json
from pathlib import Path
from typing import Any

import attrs

from node.errors import NodeError
from node.trust.identity import (
    IDENTITY_FILE,
    DeviceIdentity,
    create_group_key,
    create_identity,
    enrolment_record,
    save_group_key,
    unlock_identity,
)
from node.trust.pairing import JoinerPaired
from stores.datalayer import DataLayer, StoreConfig
from stores.primary import set_meta
from stores.repositories import UnitOfWork

CONFIG_FILE = "config.json"
BOOTSTRAP_PEER = "bootstrap_peer"
SOCKET_FILE = "node.sock"


class HomeError(NodeError):
    """A node home that is missing, already initialised, or holds an unreadable config."""

    rpc_error_type = "bad_home"


def socket_path(home: Path) -> Path:
    """The running node's local RPC socket in `home`."""
    return home / SOCKET_FILE


def load_store_config(home: Path) -> StoreConfig:
    """Read the home's store configuration."""
    path = home / CONFIG_FILE
    try:
        settings = json.loads(path.read_text())
        return StoreConfig(**settings["stores"])
    except FileNotFoundError:
        raise HomeError(f"{home} is not initialised; run `aico-node --home {home} init`") from None
    except (ValueError, KeyError, TypeError) as error:
        raise HomeError(f"unreadable config {path}: {error}") from None


def _write_config(home: Path, config: StoreConfig) -> None:
    # Written last by every way of making a home: a home with a config is a complete home.
    (home / CONFIG_FILE).write_text(json.dumps({"stores": attrs.asdict(config)}, indent=2))


def is_initialised(home: Path) -> bool:
    """Whether `home` holds a complete node home."""
    return (home / CONFIG_FILE).exists()


def identity_for_joining(home: Path, passphrase: str) -> DeviceIdentity:
    """Return the identity a joining device pairs with: a new one, or the one an interrupted join left."""
    if is_initialised(home):
        raise HomeError(f"{home} already belongs to a group; a device joins once, with a fresh home")
    if (home / IDENTITY_FILE).exists():
        return unlock_identity(home, passphrase)
    return create_identity(home, passphrase)


async def init_joined_home(home: Path, identity: DeviceIdentity, paired: JoinerPaired, config: StoreConfig) -> None:
    """Finish a joining device's home: the group key it was handed, its stores, and trust in its inviter."""
    save_group_key(home, identity, paired.group_key)
    data = await DataLayer.open(home, identity.device_id, identity.store_key, config)
    try:
        # Until sync brings the registry, the inviter is the one device this node trusts.
        bootstrap: dict[str, Any] = {"device_id": paired.peer_device_id, "public_key": paired.peer_verify_key}
        await data.sql.run(set_meta, BOOTSTRAP_PEER, bootstrap)
    finally:
        await data.close()
    _write_config(home, config)


async def init_home(home: Path, passphrase: str, config: StoreConfig) -> DeviceIdentity:
    """Create a device identity, its group key, the stores, and enrol the device in its own registry."""
    if is_initialised(home):
        raise HomeError(f"{home} is already initialised")
    identity = create_identity(home, passphrase)
    save_group_key(home, identity, create_group_key())
    data = await DataLayer.open(home, identity.device_id, identity.store_key, config)
    try:
        async with UnitOfWork(data) as uow:
            record = enrolment_record(identity, identity.device_id, identity.verify_key_bytes, "first device")
            uow.devices.enrol(identity.device_id, record)
            await uow.commit()
    finally:
        await data.close()
    _write_config(home, config)
    return identity
