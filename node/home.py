"""A node's home folder: what makes it initialised, its config, and the ways a home is made (first device, joiner)."""

import contextlib
import fcntl
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import trio

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
LOCK_FILE = "home.lock"
STARTING_FILE = "home.lock.starting"  # a node waiting for the home: commands then wait for its socket, not the lock
NODE_HOLDER = "aico-node run"
LOCK_WAIT_S = 30.0  # how long a command waits for another short one to leave the home
LOCK_POLL_S = 0.05


class HomeError(NodeError):
    """A node home that is missing, already initialised, or holds an unreadable config."""

    rpc_error_type = "bad_home"


class HomeBusy(HomeError):
    """Another process holds the home: a running node, or a command that opened the stores itself."""

    def __init__(self, home: Path, holder: str) -> None:
        super().__init__(f"{home} is in use by {holder}")
        self.holder = holder

    @property
    def by_node(self) -> bool:
        """Whether the holder is a node (running, starting or stopping), which serves the home's socket."""
        return NODE_HOLDER in self.holder


class HomeLock:
    """The exclusive lock on a node home (an flock on `home.lock`): a running node holds it for its life, a command
    that opens the stores itself for the moment it does; the file names the holder."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / LOCK_FILE
        self.starting_path = home / STARTING_FILE

    def node_starting(self) -> bool:
        """Whether a node waits to take the home (a crashed one's mark counts only for a while)."""
        try:
            return time.time() - self.starting_path.stat().st_mtime < 2 * LOCK_WAIT_S
        except FileNotFoundError:
            return False

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """Mark a node as starting on this home for the block, so commands wait for its socket instead of opening the
        stores while it loads (the mark also goes once the node holds the home)."""
        if self.home.is_dir():
            self.starting_path.touch(mode=0o600)
        try:
            yield
        finally:
            self.starting_path.unlink(missing_ok=True)

    def holder(self) -> str | None:
        """Who holds the home now (pid and command), or None if nobody does."""
        if not self.path.exists():
            return None
        with open(self.path, "a+") as probe:
            try:
                fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                probe.seek(0)
                return probe.read(256).strip() or "another process"
            fcntl.flock(probe.fileno(), fcntl.LOCK_UN)
        return None

    @contextlib.asynccontextmanager
    async def held(self, holder: str, wait_s: float = LOCK_WAIT_S) -> AsyncIterator[None]:
        """Hold the home for the block; wait up to `wait_s` for a command that holds it, but not for a node."""
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        node = NODE_HOLDER in holder
        try:
            if node:
                self.starting_path.touch(mode=0o600)  # commands now wait for the node's socket, not for the home
            try:
                await self._take(fd, wait_s)
            finally:
                if node:
                    self.starting_path.unlink(missing_ok=True)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} ({holder})".encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing releases the lock

    async def _take(self, fd: int, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                current = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
                if NODE_HOLDER in current or time.monotonic() > deadline:
                    raise HomeBusy(self.home, current) from None
                await trio.sleep(LOCK_POLL_S)


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


async def init_home(home: Path, passphrase: str, config: StoreConfig, name: str) -> DeviceIdentity:
    """Create a device identity, its group key, the stores, and enrol the device, called `name`, in its own
    registry."""
    if is_initialised(home):
        raise HomeError(f"{home} is already initialised")
    async with HomeLock(home).held("aico-node init"):
        return await _init_home(home, passphrase, config, name)


async def _init_home(home: Path, passphrase: str, config: StoreConfig, name: str) -> DeviceIdentity:
    identity = create_identity(home, passphrase)
    save_group_key(home, identity, create_group_key())
    data = await DataLayer.open(home, identity.device_id, identity.store_key, config)
    try:
        async with UnitOfWork(data) as uow:
            record = enrolment_record(identity, identity.device_id, identity.verify_key_bytes, name)
            uow.devices.enrol(identity.device_id, record)
            await uow.commit()
    finally:
        await data.close()
    _write_config(home, config)
    return identity
