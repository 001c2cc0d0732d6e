"""The running node: identity, stores, projector, bus and the local socket, wired together."""

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import msgpack
import trio

from crdt import Collection, Kind, Op
from node import bus as topics
from node.bus import Bus
from node.embed import default_embedder
from node.errors import NodeError
from node.identity import (
    IDENTITY_FILE,
    DeviceIdentity,
    create_group_key,
    create_identity,
    enrolment_record,
    registry_refusal,
    revocation_record,
    save_group_key,
    unlock_identity,
)
from node.keyring import KeyRing
from node.pairing import INVITE_TTL_S, InviteGuard, display_code, new_invite
from node.rpc import Stream, serve_rpc
from stores.analytics import AnalyticsStore
from stores.datalayer import DataLayer, StoreConfig
from stores.primary import get_meta, set_meta
from stores.projector import Projector
from stores.repositories import DataError, UnitOfWork
from stores.vectors import VectorIndex

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
BOOTSTRAP_PEER = "bootstrap_peer"
SOCKET_FILE = "node.sock"
# The topics a committed op may publish on.
_OP_TOPICS = (topics.USER_PREFERENCES_CHANGED, topics.CONVERSATION_MESSAGE_ADDED, topics.DATA_FORGOTTEN)
Handler = Callable[[dict], Awaitable[Any]]


@attrs.frozen
class NetworkOptions:
    """Where the node listens, which peers it always dials, whether it uses mDNS, and which relay."""

    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    peers: tuple[str, ...] = ()
    mdns: bool = True
    relay: str | None = None
    mailbox_drain_every_s: float = 5.0


class HomeError(NodeError):
    """A node home that is missing, already initialised, or holds an unreadable config."""

    rpc_error_type = "bad_home"


def socket_path(home: Path) -> Path:
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
    return (home / CONFIG_FILE).exists()


def identity_for_joining(home: Path, passphrase: str) -> DeviceIdentity:
    """Return the identity a joining device pairs with: a new one, or the one an interrupted join left."""
    if is_initialised(home):
        raise HomeError(f"{home} already belongs to a group; a device joins once, with a fresh home")
    if (home / IDENTITY_FILE).exists():
        return unlock_identity(home, passphrase)
    return create_identity(home, passphrase)


async def init_joined_home(home: Path, identity: DeviceIdentity, paired: Any, config: StoreConfig) -> None:
    """Finish a joining device's home: the group key it was handed, its stores, and trust in its inviter."""
    save_group_key(home, identity, paired.group_key)
    data = await DataLayer.open(home, identity.device_id, identity.store_key, config)
    try:
        # Until sync brings the registry, the inviter is the one device this node trusts.
        bootstrap = {"device_id": paired.peer_device_id, "public_key": paired.peer_verify_key}
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
            uow.devices.enrol(
                identity.device_id, enrolment_record(identity, identity.device_id, identity.verify_key_bytes, "first device")
            )
            await uow.commit()
    finally:
        await data.close()
    _write_config(home, config)
    return identity


class Node:
    """One device's node: its stores, the projector, the bus, and the handlers behind the local socket."""

    def __init__(self, home: Path, identity: DeviceIdentity, data: DataLayer) -> None:
        self.home = home
        self.identity = identity
        self.data = data
        self.keyring = KeyRing(home, identity)
        data.replica.admit_registry_op = registry_refusal
        self.sync: Any = None  # a SyncService while the network runs
        self.desk: Any = None  # an InviteDesk while the network runs
        self.host: Any = None  # a P2pHost while the network runs
        self.mailbox: Any = None  # a MailboxSync while the network runs with a relay
        self._nursery: trio.Nursery | None = None  # while serving
        self._rotated_away: set[bytes] = set()  # keys this node already replaced for reaching a revoked device
        self.bus = Bus()
        self.projector = Projector(data)
        self.handlers: dict[str, Handler] = {
            "status": self.status,
            "pref.set": self.pref_set,
            "pref.get": self.pref_get,
            "msg.add": self.msg_add,
            "msg.get": self.msg_get,
            "memory.add": self.memory_add,
            "memory.search": self.memory_search,
            "note.edit": self.note_edit,
            "counter.add": self.counter_add,
            "session.set": self.session_set,
            "session.get": self.session_get,
            "counter.get": self.counter_get,
            "note.show": self.note_show,
            "forget": self.forget,
            "analytics.daily": self.analytics_daily,
            "digest": self.digest,
            "conflicts": self.conflicts,
            "rebuild": self.rebuild,
            "devices.list": self.devices_list,
            "devices.revoke": self.devices_revoke,
            "pair.invite": self.pair_invite,
            "bus.publish": self.bus_publish,
            "bus.subscribe": self.bus_subscribe,
        }

    @classmethod
    @asynccontextmanager
    async def opened(cls, home: Path, passphrase: str) -> AsyncIterator["Node"]:
        """Open a node's stores for the duration of the block; on exit drain the projector and close."""
        config = load_store_config(home)
        identity = unlock_identity(home, passphrase)
        data = await DataLayer.open(home, identity.device_id, identity.store_key, config)
        node = cls(home, identity, data)
        try:
            yield node
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await node.projector.drain()
                finally:
                    await data.close()

    def unit_of_work(self) -> UnitOfWork:
        return UnitOfWork(self.data, on_commit=self._committed)

    def _committed(self, ops: list[Op]) -> None:
        self.projector.wake()
        if self.sync is not None:
            self.sync.outgoing.notify()
        self._committed_events(ops)
        self._take_keys_and_revocations(ops)

    def _take_keys_and_revocations(self, ops: list[Op]) -> None:
        """Adopt group keys rotated to this device, and drop the sessions of revoked devices."""
        adopted = self.keyring.adopt(ops, self._trusted_public_key)
        revoked = [op.key for op in ops if op.collection is Collection.DEVICES and op.kind is Kind.REVOKE]
        if self.sync is not None:
            if revoked:
                self.sync.drop_devices(revoked)
            if adopted:
                log.info("adopted group key epoch %s; sessions restart under it", self.keyring.current.epoch)
                self.sync.end_sessions()
        if revoked or adopted:  # only these change which devices hold the current key, or who is revoked
            self._rotate_if_current_key_reached_a_revoked_device()

    def _rotate_if_current_key_reached_a_revoked_device(self) -> None:
        """Rotate again when the newest key was sealed to a device revoked since (two revocations made at once)."""
        current = self.keyring.current
        holders = self.keyring.holders_of_current(self.data.replica.settings) or set()
        reached = [d for d in holders if self.data.replica.devices.revoked_at(d) is not None]
        if reached and self._nursery is not None and current.key_id not in self._rotated_away:
            self._rotated_away.add(current.key_id)  # once per key: other devices may rotate too, the newest wins
            log.warning("group key epoch %s reached revoked %s: rotating again", current.epoch, ", ".join(reached))
            self._nursery.start_soon(self._rotate)

    async def _rotate(self) -> None:
        async with self.unit_of_work() as uow:
            self._stage_rotation(uow, excluding=self.identity.device_id)
            await uow.commit()

    def _stage_rotation(self, uow: UnitOfWork, excluding: str) -> list[str]:
        """Stage a new group key sealed to every trusted device but `excluding` (and this one); return who gets it."""
        devices = self.data.replica.devices
        keeping = [d for d in devices.enrolments if devices.is_trusted(d) and d not in (excluding, self.identity.device_id)]
        rotation = self.keyring.rotation({d: devices.get(d)["public_key"] for d in keeping})
        uow.preferences.set(rotation.setting_key, rotation.value, collection=Collection.SETTINGS)
        return sorted(keeping)

    def _trusted_public_key(self, device_id: str) -> bytes | None:
        devices = self.data.replica.devices
        return devices.get(device_id)["public_key"] if devices.is_trusted(device_id) else None

    def _committed_events(self, ops: list[Op]) -> None:
        # A sync commits thousands of ops at once: with nobody listening, no op is looked at.
        if not self.bus.has_subscribers(*_OP_TOPICS):
            return
        for op in ops:
            if op.collection is Collection.PREFERENCES:
                self.bus.publish(topics.USER_PREFERENCES_CHANGED, {"preference_key": op.key, "new_value": op.payload})
            elif op.collection is Collection.MESSAGES and op.kind == "add":
                self.bus.publish(topics.CONVERSATION_MESSAGE_ADDED, {"message_id": op.key})
            elif op.collection in (Collection.MESSAGES, Collection.MEMORIES) and op.kind in ("delete", "remove"):
                self.bus.publish(topics.DATA_FORGOTTEN, {"collection": op.collection.value, "id": op.key})

    async def serve(self, network: NetworkOptions | None = None, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the projector, the bus services, sync (if `network`) and the local socket until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._rotate_if_current_key_reached_a_revoked_device()  # a rotation a crash cut short
            await nursery.start(self.projector.run)
            await nursery.start(self._memory_store_service)
            if network is not None:
                await nursery.start(self._serve_network, network)
            await nursery.start(serve_rpc, socket_path(self.home), self.handlers)
            task_status.started()

    async def _serve_network(self, network: NetworkOptions, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # libp2p takes ~0.7 s to import: only nodes that sync pay for it.
        from node.p2p import p2p_host
        from node.pair_service import InviteDesk
        from node.sync import SyncService

        async with p2p_host(self.identity, network.listen) as host:
            self.host = host
            bootstrap = await self.data.sql.run(get_meta, BOOTSTRAP_PEER)
            self.sync = SyncService(
                self.data,
                self.identity,
                self.keyring,
                host,
                on_applied=self._applied,
                static_peers=network.peers,
                relay=network.relay,
                bootstrap_peers={bootstrap["device_id"]: bootstrap["public_key"]} if bootstrap else {},
            )
            self.desk = InviteDesk(self.identity, lambda: self.keyring.current, host, self._enrol_paired)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.sync.run)
                    if network.relay:
                        await nursery.start(self._use_relay, network)
                    if network.mdns:
                        await nursery.start(self._discover, host.addresses)
                    task_status.started()
            finally:
                self.sync = self.desk = self.host = self.mailbox = None

    async def _use_relay(self, network: NetworkOptions, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Post to and drain the relay's mailbox."""
        from node.mailbox_sync import MailboxSync

        sync = self.sync
        self.mailbox = MailboxSync(
            self.data,
            self.identity,
            self.keyring,
            self.host,
            network.relay,
            apply_ops=sync.apply_remote,
            verify_key_of=lambda d: self.identity.verify_key_bytes if d == self.identity.device_id else sync.trusted_public_key(d),
            outgoing=sync.outgoing,
            drain_every_s=network.mailbox_drain_every_s,
        )
        await self.mailbox.run(task_status=task_status)

    async def _discover(self, addresses: list[str], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Advertise on the LAN interfaces this node listens on, and keep a session with group members found there."""
        from discovery.mdns import MdnsDiscovery

        lan = [a for a in addresses if not a.startswith(("/ip4/127.", "/ip4/0.0.0.0/"))]
        if not lan:
            log.warning("mDNS is off: listen on a LAN address (--listen /ip4/<ip>/tcp/<port>) to use it")
            task_status.started()
            return
        interfaces = sorted({a.split("/")[2] for a in lan})
        port = int(lan[0].split("/")[4])
        discovery = MdnsDiscovery(
            interfaces,
            lambda: self.keyring.current.secret,
            port,
            lan,
            older_secrets_provider=lambda: [key.secret for key in self.keyring.keys()[1:]],
        )
        async with discovery:
            task_status.started()
            async with trio.open_nursery() as nursery:
                async for found in discovery:
                    # The hint is only a claim: Noise proves who answers, and untrusted peers are dropped.
                    peer = found.peer_hint
                    if not peer or not self.sync.is_trusted(peer):
                        continue
                    self.sync.lan_devices.add(peer)
                    # Of two members that find each other, only the one with the lower id dials: one session each.
                    # A member that missed a key rotation cannot recognise this node's advert, so it is dialled.
                    if peer > self.identity.device_id or found.stale:
                        for address in found.addresses:
                            self.sync.dial(nursery, address)

    def _applied(self, ops: list[Op]) -> None:
        """Publish remote changes that sync applied, and project them."""
        self.projector.wake()
        self.bus.publish(topics.SYNC_REMOTE_APPLIED, {"ops": len(ops)})
        self._committed_events(ops)
        self._take_keys_and_revocations(ops)

    async def _enrol_paired(self, paired) -> None:
        async with self.unit_of_work() as uow:
            uow.devices.enrol(paired.peer_device_id, msgpack.unpackb(paired.enrolment_record))
            await uow.commit()

    async def _memory_store_service(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Answer the seed's `memory.store.request` events with `memory.store.complete`."""
        async with self.bus.subscribe(topics.MEMORY_STORE_REQUEST) as requests:
            task_status.started()
            async for event in requests:
                try:
                    result = await self.memory_add(event.payload)
                    self.bus.publish(topics.MEMORY_STORE_COMPLETE, {"memory_id": result["id"], "status": "success"})
                except (DataError, NodeError) as error:
                    self.bus.publish(topics.MEMORY_STORE_COMPLETE, {"status": "error", "error": str(error)})

    # -- handlers (each takes the request's params) ---------------------------------------------------

    async def status(self, params: dict) -> dict:
        data = self.data
        status = {
            "device_id": self.identity.device_id,
            "group_epoch": self.keyring.current.epoch,
            "revoked": data.replica.devices.revoked_at(self.identity.device_id) is not None,
            "addresses": self.host.addresses if self.host else [],
            "peers": self.sync.status(self.mailbox) if self.sync else [],
            "relay": self._relay_status(),
            "engine": data.config.engine,
            "ops": data.replica.vector.total(),
            "ops_stored": data.ops_stored,
        }
        if params.get("stores", True):
            # Counting opens Chroma and loads DuckDB on first use: `stores=false` spares a caller polling progress.
            status["stores"] = await self._store_counts()
        return status

    async def _store_counts(self) -> dict:
        data = self.data
        (messages, memories, backlog) = await data.sql.query_one(
            "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM memories), "
            "(SELECT coalesce(sum(key_count), 0) FROM outbox)"
        )
        return {
            "messages": messages,
            "memories": memories,
            "analytics_rows": await data.in_analytics(AnalyticsStore.count),
            "vector_items": await data.in_vectors(VectorIndex.count),
            "projector_backlog": backlog,
        }

    async def pref_set(self, params: dict) -> dict:
        async with self.unit_of_work() as uow:
            uow.preferences.set(_text(params, "key"), params.get("value"))
            await uow.commit()
        return {"key": params["key"], "value": params.get("value")}

    async def pref_get(self, params: dict) -> Any:
        async with self.unit_of_work() as uow:
            return await uow.preferences.get(_text(params, "key"))

    async def msg_add(self, params: dict) -> dict:
        async with self.unit_of_work() as uow:
            message_id = uow.conversations.add_message(
                _text(params, "conversation"),
                _text(params, "text"),
                role=params.get("role") or "user",
                sentiment=params.get("sentiment"),
                response_time_ms=params.get("response_time_ms"),
            )
            await uow.commit()
        return {"id": message_id}

    async def msg_get(self, params: dict) -> dict | None:
        async with self.unit_of_work() as uow:
            message = await uow.conversations.get(_text(params, "id"))
        return None if message is None else attrs.asdict(message)

    async def _embedding_of(self, params: dict) -> Any:
        """Return the request's embedding, or embed its text with the optional local model."""
        if params.get("embedding") is not None:
            return params["embedding"]
        text = _text(params, "text")
        embedder = default_embedder()
        return (await trio.to_thread.run_sync(embedder.embed, [text]))[0]

    async def memory_add(self, params: dict) -> dict:
        embedding = await self._embedding_of(params)
        async with self.unit_of_work() as uow:
            memory_id = uow.memories.save_memory(_text(params, "text"), embedding, params.get("metadata"))
            await uow.commit()
        return {"id": memory_id}

    async def memory_search(self, params: dict) -> list[dict]:
        embedding = await self._embedding_of(params)
        await self.projector.drain()  # so a memory stored just before is found
        async with self.unit_of_work() as uow:
            found = await uow.memories.get_memories_by_context(embedding, int(params.get("k", 5)), params.get("where"))
        return [attrs.asdict(memory) for memory in found]

    async def note_edit(self, params: dict) -> dict:
        async with self.unit_of_work() as uow:
            uow.notes.edit(_text(params, "name"), _text(params, "text", empty_ok=True))
            await uow.commit()
        return {"name": params["name"]}

    async def counter_add(self, params: dict) -> dict:
        delta = params.get("delta", 1)
        if type(delta) is not int or abs(delta) > 1 << 40:
            raise DataError("delta must be an integer")
        async with self.unit_of_work() as uow:
            uow.counters.increment(_text(params, "name"), delta)
            await uow.commit()
        return {"name": params["name"]}

    async def session_set(self, params: dict) -> dict:
        async with self.unit_of_work() as uow:
            uow.session.set(_text(params, "key"), params.get("value"), params.get("ttl_s", 3600.0))
        return {"key": params["key"]}

    async def session_get(self, params: dict) -> Any:
        async with self.unit_of_work() as uow:
            return uow.session.get(_text(params, "key"))

    async def counter_get(self, params: dict) -> int:
        async with self.unit_of_work() as uow:
            return await uow.counters.get(_text(params, "name"))

    async def note_show(self, params: dict) -> str | None:
        async with self.unit_of_work() as uow:
            return await uow.notes.get(_text(params, "name"))

    async def forget(self, params: dict) -> dict:
        kind = params.get("kind")
        async with self.unit_of_work() as uow:
            if kind == "message":
                uow.conversations.forget(_text(params, "id"))
            elif kind == "memory":
                uow.memories.forget(_text(params, "id"))
            else:
                raise DataError(f"can forget a message or a memory, not {kind!r}")
            await uow.commit()
        await self.projector.drain()  # gone from the derived stores too before we answer
        return {"forgotten": params["id"]}

    async def analytics_daily(self, params: dict) -> list[dict]:
        days = int(params.get("days", 30))
        if not 1 <= days <= 3660:
            raise DataError("days must be between 1 and 3660")
        await self.projector.drain()
        now_ms = time.time_ns() // 1_000_000
        rows = await self.data.in_analytics(lambda analytics: analytics.daily(days, now_ms))
        return [{**attrs.asdict(row), "day": row.day.isoformat()} for row in rows]

    async def digest(self, params: dict) -> dict:
        return attrs.asdict(self.data.replica.digest())

    async def conflicts(self, params: dict) -> list[dict]:
        limit = int(params.get("limit", 100))
        rows = await self.data.sql.query(
            "SELECT collection, key, field, winner_device, winner_seq, winner_value, loser_device, loser_seq, "
            "loser_value FROM conflicts ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        names = ("collection", "key", "field", "winner_device", "winner_seq", "winner_value")
        names += ("loser_device", "loser_seq", "loser_value")
        return [
            {**dict(zip(names, row)), "winner_value": msgpack.unpackb(row[5]), "loser_value": msgpack.unpackb(row[8])}
            for row in rows
        ]

    async def pair_invite(self, params: dict) -> Stream:
        if self.desk is None or self.host is None:
            raise HomeError("pairing needs the node's network: start it with `aico-node run`")
        ttl_s = float(params.get("ttl_s", INVITE_TTL_S))
        guard = InviteGuard(new_invite(time.time(), ttl_s))
        outcomes = self.desk.open_invite(guard)
        desk, addresses = self.desk, self.host.addresses

        async def progress() -> AsyncIterator[dict]:
            try:
                yield {"code": display_code(guard.invite.code), "addresses": addresses, "expires": guard.invite.expires_at_s}
                with trio.move_on_at(trio.current_time() + ttl_s):
                    async for outcome in outcomes:
                        if isinstance(outcome, str):
                            yield {"paired": outcome}
                            return
                        yield {"refused": outcome.reason.value, "attempts_left": guard.attempts_left}
                        if guard.attempts_left == 0:
                            return
                yield {"expired": True}
            finally:
                desk.close_invite()

        return Stream(progress())

    async def devices_list(self, params: dict) -> list[dict]:
        async with self.unit_of_work() as uow:
            devices = await uow.devices.list()
        return [{**d, "public_key": d["public_key"].hex(), "signature": d["signature"].hex()} for d in devices]

    def _relay_status(self) -> dict | None:
        if self.mailbox is None:
            return None
        reservation = self.sync.reservation
        return {
            **self.mailbox.health.as_status(),
            "circuit_address": reservation.circuit_address if reservation else None,
            "reservation_expires_at": reservation.expires_at if reservation else None,
        }

    async def devices_revoke(self, params: dict) -> dict:
        device_id = params.get("device")
        devices = self.data.replica.devices
        if device_id == self.identity.device_id:
            raise DataError("a device cannot revoke itself; revoke it from another of this user's devices")
        if not isinstance(device_id, str) or devices.get(device_id) is None:
            raise DataError(f"{device_id!r} is not an enrolled device; `aico-node devices` lists them")
        if devices.revoked_at(device_id) is not None:
            raise DataError(f"{device_id} is already revoked")
        async with self.unit_of_work() as uow:
            reason, cutoff_seq = str(params.get("reason") or ""), self.data.replica.seq_of(device_id)
            uow.devices.revoke(device_id, revocation_record(self.identity, device_id, reason, cutoff_seq))
            keeping = self._stage_rotation(uow, excluding=device_id)
            await uow.commit()
        return {"revoked": device_id, "epoch": self.keyring.current.epoch, "key_sent_to": keeping}

    async def rebuild(self, params: dict) -> dict:
        return await self.projector.rebuild()

    async def bus_publish(self, params: dict) -> dict:
        payload = params.get("payload") or {}
        if not isinstance(payload, dict):
            raise DataError("bus payload must be a map")
        return {"delivered": self.bus.publish(_text(params, "topic"), payload)}

    async def bus_subscribe(self, params: dict) -> Stream:
        pattern = _text(params, "pattern")

        async def events() -> AsyncIterator[dict]:
            async with self.bus.subscribe(pattern) as subscription:
                async for event in subscription:
                    yield {"topic": event.topic, "payload": event.payload}

        return Stream(events())


def _text(params: dict, name: str, *, empty_ok: bool = False) -> str:
    value = params.get(name)
    if not isinstance(value, str) or (not value and not empty_ok):
        raise DataError(f"{name} must be a non-empty string")
    return value
