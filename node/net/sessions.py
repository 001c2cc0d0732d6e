"""The sync sessions of a running node: one sealed session per reachable trusted device over libp2p, accepted or
dialled (directly, or through the relay), with live pushes of new ops."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import Any, NoReturn

import attrs
import multiaddr
import trio
from libp2p.abc import INetStream

from crdt import Replica
from framing import RemoteProtocolError
from node.errors import EndReason
from node.net.circuit import (
    Reservation,
    accept_relayed_connections,
    is_circuit_addr,
    keep_reservation,
    split_circuit_addr,
    stream_path,
)
from node.net.dial import keep_connected
from node.net.host import P2pHost
from node.net.pump import run_session
from node.net.relay_path import keep_connected_with_relay
from node.sync.handshake import SessionHandshake
from node.sync.receiver import OpsReceiver
from node.sync.session import OpsApplied, PeerAcked, PeerHello, SessionConfig, StateMerged, SyncSession
from node.trust.identity import DeviceIdentity
from node.trust.keyring import KeyRing
from node.trust.sealing import GroupSealer, new_session_id
from p2p import StreamGone, read_chunk, reset_quietly, write_within
from stores.datalayer import PendingWrite
from stores.primary import LogBatch, get_meta, set_meta

log = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT_S = 10.0
PEERS_DIALLED_MAX = 256
PEERS_META = "sync_peers"
RELAY_DEVICES_CHECK_EVERY_S = 5.0  # how often newly enrolled devices get a session through the relay


@attrs.define
class PeerState:
    """What this node knows of one peer device's sync."""

    device_id: str
    online: bool = False
    last_sync_s: float | None = None  # Unix seconds of the last batch stored or acknowledged
    vector: dict[str, int] = attrs.Factory(dict)  # what the peer last said it has
    session: SyncSession | None = None
    scope: trio.CancelScope | None = None  # ends the running session
    path: str = "direct"  # or "relayed": how the running session's connection goes

    def behind(self, replica: Replica) -> tuple[int, int]:
        """Return (ops the peer has that this node lacks, ops this node has that the peer lacks)."""
        if self.session is not None:
            self.vector = dict(self.session.peer_vector)
        theirs, ours = self.vector, replica.vector
        devices = set(theirs) | set(ours)
        ahead_in = sum(max(0, theirs.get(d, 0) - ours.get(d, 0)) for d in devices)
        ahead_out = sum(max(0, ours.get(d, 0) - theirs.get(d, 0)) for d in devices)
        return ahead_in, ahead_out


class SyncService:
    """Keeps one sealed session per reachable trusted device over libp2p and pushes local changes as they commit."""

    def __init__(
        self,
        receiver: OpsReceiver,
        identity: DeviceIdentity,
        keyring: KeyRing,
        host: P2pHost,
        *,
        static_peers: Sequence[str] = (),
        bootstrap_peers: dict[str, bytes] | None = None,
        relay: str | None = None,
        read_timeout_s: float = 30.0,
        refresh_every_s: float = 10.0,
    ) -> None:
        self.receiver = receiver
        self.data = receiver.data
        self.relay = relay
        self.reservation: Reservation | None = None  # this node's slot on the relay, while it holds one
        self.identity = identity
        self.keyring = keyring
        self.host = host
        self.static_peers = list(static_peers)
        self.read_timeout_s = read_timeout_s
        self.refresh_every_s = refresh_every_s
        self.outgoing = receiver.outgoing
        self.peers: dict[str, PeerState] = {}
        self.lan_devices: set[str] = set()  # devices mDNS found on the LAN
        self.bootstrap_peers = dict(bootstrap_peers or {})  # device id -> public key, trusted before the registry
        self._nursery: trio.Nursery | None = None
        self._dialled: set[str] = set()  # devices kept connected through the relay

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept sessions from trusted devices and keep dialling the static peers, until cancelled."""
        for device_id, saved in (await self.data.sql.run(get_meta, PEERS_META) or {}).items():
            self.peers[device_id] = PeerState(device_id, last_sync_s=saved["last_sync"], vector=saved["vector"])
        self.host.serve_sync(self.is_trusted, self.serve_stream)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.relay:
                # Devices given as static peers are dialled by their own loop, not by the relay's device loop too.
                self._dialled.update(_route(address, self.relay)[0] for address in self.static_peers)
                accept_relayed_connections(self.host)
                nursery.start_soon(functools.partial(keep_reservation, self.host, self.relay, on_change=self._reserved))
                nursery.start_soon(self._dial_devices_through_relay, nursery)
            for address in self.static_peers:
                nursery.start_soon(self._keep_connected, address)
            task_status.started()
            await trio.sleep_forever()  # sessions from other devices arrive through the host's handler

    async def _keep_connected(self, address: str) -> None:
        if self.relay is None:
            await keep_connected(self.host, address, self.serve_stream)
            return
        peer_id, relay_addr, direct_addrs = _route(address, self.relay)
        self._dialled.add(peer_id)
        await keep_connected_with_relay(self.host, direct_addrs, relay_addr, peer_id, self.serve_stream)

    def _reserved(self, reservation: Reservation | None) -> None:
        self.reservation = reservation
        self.host.relayed_addresses = [reservation.circuit_address] if reservation else []

    async def _dial_devices_through_relay(self, nursery: trio.Nursery) -> NoReturn:
        """Keep a session through the relay with every trusted device whose id is above this one's.

        Of two devices, only the lower id dials, so they do not reset each other's streams; no address is needed,
        the relay reaches a device by its id.
        """
        while True:
            for device_id in sorted(set(self.data.replica.devices.enrolments) | set(self.bootstrap_peers)):
                if (
                    device_id > self.identity.device_id
                    and self.is_trusted(device_id)
                    and device_id not in self._dialled
                ):
                    if len(self._dialled) < PEERS_DIALLED_MAX:
                        self._dialled.add(device_id)
                        nursery.start_soon(
                            keep_connected_with_relay, self.host, [], self.relay, device_id, self.serve_stream
                        )
            await trio.sleep(RELAY_DEVICES_CHECK_EVERY_S)

    def dial(self, nursery: trio.Nursery, address: str) -> None:
        """Keep a session with the device at `address` (found by discovery or given by the user)."""
        if address not in self.static_peers and len(self.static_peers) < PEERS_DIALLED_MAX:
            self.static_peers.append(address)
            nursery.start_soon(self._keep_connected, address)

    def end_sessions(self) -> None:
        """End every running session; peers that dial redial, and the new sessions pick the newest shared key."""
        for peer in self.peers.values():
            if peer.scope is not None:
                peer.scope.cancel()

    def drop_devices(self, device_ids: Sequence[str]) -> None:
        """End the sessions and close the connections of devices that are no longer trusted."""
        for device_id in device_ids:
            if device_id == self.identity.device_id:
                continue  # this device was revoked: its peers drop it, it has no session with itself
            peer = self.peers.get(device_id)
            if peer is not None and peer.scope is not None:
                peer.scope.cancel()
            if self._nursery is not None:
                self._nursery.start_soon(self.host.disconnect, device_id)

    def is_trusted(self, device_id: str) -> bool:
        """Return whether a device may sync: enrolled, not revoked, and not this device."""
        if device_id == self.identity.device_id or self.data.replica.devices.revoked_at(device_id) is not None:
            return False
        return self.data.replica.devices.is_trusted(device_id) or device_id in self.bootstrap_peers

    def _public_key(self, device_id: str) -> bytes:
        record = self.data.replica.devices.get(device_id)
        return record["public_key"] if record else self.bootstrap_peers[device_id]

    def trusted_public_key(self, device_id: str) -> bytes | None:
        """Return the Ed25519 public key of a device that may sync with this one, or None."""
        return self._public_key(device_id) if self.is_trusted(device_id) else None

    def status(self, mailbox: Any = None) -> list[dict]:
        """Return every known device's sync state, as `status --json` shows it."""
        replica = self.data.replica
        rows = []
        for device_id in sorted(set(replica.devices.enrolments) | set(self.bootstrap_peers)):
            if not self.is_trusted(device_id):
                continue
            peer = self.peers.get(device_id) or PeerState(device_id)
            ahead_in, ahead_out = peer.behind(replica)
            rows.append(
                {
                    "device_id": device_id,
                    "online": peer.online,
                    "path": self._path(peer, mailbox),
                    "last_sync": peer.last_sync_s,
                    "ops_behind_in": ahead_in,
                    "ops_behind_out": ahead_out,
                    "bytes_in": peer.session.bytes_received if peer.session else 0,
                    "bytes_out": peer.session.bytes_sent if peer.session else 0,
                }
            )
        return rows

    def _path(self, peer: PeerState, mailbox: Any) -> str | None:
        """How this node last reached the device: lan, direct, relayed, or mailbox (offline, ops came from there)."""
        if peer.online:
            return "lan" if peer.device_id in self.lan_devices else peer.path
        if mailbox is not None and peer.device_id in mailbox.health.received_from:
            return "mailbox"
        return None

    async def serve_stream(self, device_id: str, stream: INetStream) -> None:
        """Run one sealed sync session with an authenticated peer over `stream` (which it owns)."""
        peer = self.peers.setdefault(device_id, PeerState(device_id))
        if not self.is_trusted(device_id) or peer.online:
            # One session per peer: when both sides dial at once, the later stream is dropped.
            await stream.reset()
            return
        # Each side picks the session id for the batches it receives, so old batches never replay, and names the
        # group keys it holds, so both seal with the newest key they share.
        handshake = SessionHandshake(new_session_id(), self.keyring.offers())
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                await write_within(stream, handshake.generate() or b"", HANDSHAKE_TIMEOUT_S)
                while not handshake.receive_data(data := await read_chunk(stream)):
                    if not data:
                        raise RemoteProtocolError(
                            EndReason.MALFORMED_FRAME, "stream ended during the session handshake"
                        )
        except (StreamGone, trio.TooSlowError) as error:
            log.info("session handshake with %s failed: %s", device_id, error or type(error).__name__)
            await reset_quietly(stream)
            return
        peer_session_id, peer_offers = handshake.peer_session_id, handshake.peer_offers
        assert peer_session_id is not None and peer_offers is not None  # the handshake is complete
        group_key = self.keyring.shared_key(peer_offers)
        if group_key is None:
            log.warning("no group key in common with %s: it must be paired again", device_id)
            await reset_quietly(stream)
            return
        sealer = GroupSealer(
            self.identity,
            group_key,
            device_id,
            self._public_key(device_id),
            inbound_session_id=handshake.session_id,
            outbound_session_id=peer_session_id,
        )
        session = SyncSession(self.data.replica, SessionConfig(epoch=group_key.epoch), sealer)
        peer.online, peer.session, peer.scope = True, session, trio.CancelScope()
        peer.path = stream_path(stream)
        try:
            with peer.scope:
                reason = await run_session(
                    stream,
                    session,
                    on_events=lambda events: self._on_events(peer, events),
                    outgoing=self.outgoing,
                    read_timeout_s=self.read_timeout_s,
                    refresh_every_s=self.refresh_every_s,
                    apply_lock=self.receiver.write_lock,
                    received_early=handshake.take_rest(),
                )
                log.info("sync session with %s ended: %s", device_id, reason)
        finally:
            peer.online, peer.scope = False, None
            peer.behind(self.data.replica)  # keeps the peer's last vector
            peer.session = None
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S, shield=True):
                await self._save_peers()

    async def _save_peers(self) -> None:
        """Persist what is known of each peer, so `status` can show devices that are offline."""
        saved = {p.device_id: {"last_sync": p.last_sync_s, "vector": p.vector} for p in self.peers.values() if p.vector}
        await self.data.sql.run(set_meta, PEERS_META, saved)

    def _on_events(self, peer: PeerState, events: list) -> Awaitable[None]:
        """Check what a session did and take the rows its applied ops changed now; return the write that persists
        them (in one transaction). Runs under the write lock, which is held until the write is done."""
        batches: list[LogBatch] = []
        for event in events:
            match event:
                case PeerHello() if event.device_id != peer.device_id:
                    raise RemoteProtocolError(
                        EndReason.UNEXPECTED_FRAME, f"HELLO names {event.device_id}, the connection is {peer.device_id}"
                    )
                case OpsApplied() if event.ops:
                    batches.append(LogBatch(event.ops, event.deflated))
                case StateMerged():
                    raise RemoteProtocolError(EndReason.UNEXPECTED_FRAME, "state snapshots are not accepted yet")
                case PeerAcked():
                    peer.last_sync_s = time.time()
        return self._store(peer, self.receiver.stage(batches))

    async def _store(self, peer: PeerState, pending: PendingWrite | None) -> None:
        if pending is not None:
            await self.receiver.store(pending)
            peer.last_sync_s = time.time()


def _route(address: str, relay: str) -> tuple[str, str, list[str]]:
    """Return (device id, relay address, direct addresses) to reach the device at `address` with `relay` as fallback."""
    if is_circuit_addr(address):
        # The first /p2p/ of a circuit address is the relay's; the device is the last, and has no direct address.
        relay_addr, peer_id = split_circuit_addr(address)
        return peer_id, relay_addr, []
    return multiaddr.Multiaddr(address).value_for_protocol("p2p"), relay, [address]
