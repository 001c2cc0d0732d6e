"""The sync sessions of a running node: one sealed session per reachable trusted device over libp2p, accepted or
dialled (directly, or through the relay), with live pushes of new ops."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import trio
from libp2p.abc import INetStream

from framing import RemoteProtocolError
from node.errors import EndReason
from node.net.circuit import Reservation, accept_relayed_connections, keep_reservation, stream_path
from node.net.host import P2pHost
from node.net.peers import PeerBook, PeerState, seen_listening_at
from node.net.pump import run_session
from node.net.relays import RelayChoice
from node.sync.handshake import SessionHandshake
from node.sync.receiver import OpsReceiver
from node.sync.session import OpsApplied, PeerAcked, PeerHello, SessionConfig, StateMerged, SyncSession
from node.trust.identity import DeviceIdentity
from node.trust.keyring import KeyRing
from node.trust.sealing import GroupSealer, new_session_id
from p2p import StreamGone, read_chunk, reset_quietly, write_within
from stores.datalayer import PendingWrite
from stores.errors import StoreError
from stores.primary import LogBatch

log = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT_S = 10.0
COMPACT_EVERY_S = 600.0  # how often the op log is compacted
UNTRUSTED_WARNED_MAX = 256  # peer ids whose refused streams were reported (once each)


class SyncService:
    """Runs one sealed session per reachable trusted device over libp2p, accepted or dialled, and pushes local changes
    as they commit; node.net.keepers does the dialling."""

    def __init__(
        self,
        receiver: OpsReceiver,
        identity: DeviceIdentity,
        keyring: KeyRing,
        host: P2pHost,
        *,
        bootstrap_peers: dict[str, bytes] | None = None,
        relays: RelayChoice | None = None,
        read_timeout_s: float = 30.0,
        refresh_every_s: float = 10.0,
        compact_every_s: float = COMPACT_EVERY_S,
    ) -> None:
        self.receiver = receiver
        self.data = receiver.data
        self.relays = relays
        self.reservation: Reservation | None = None  # this node's slot on the relay, while it holds one
        self.identity = identity
        self.keyring = keyring
        self.host = host
        self.read_timeout_s = read_timeout_s
        self.refresh_every_s = refresh_every_s
        self.compact_every_s = compact_every_s
        self.outgoing = receiver.outgoing
        self.book = PeerBook(self.data)
        self.lan_devices: set[str] = set()  # devices mDNS found on the LAN
        self.bootstrap_peers = dict(bootstrap_peers or {})  # device id -> public key, trusted before the registry
        self._nursery: trio.Nursery | None = None
        self._warned_untrusted: set[str] = set()
        self._warned_refusing: set[str] = set()

    @property
    def relay(self) -> str | None:
        """The relay in use, if the node has any."""
        return self.relays.current if self.relays is not None else None

    @property
    def peers(self) -> dict[str, PeerState]:
        """Every known peer device's state, by device id."""
        return self.book.peers

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept sessions from trusted devices, and hold a slot on the relay if there is one, until cancelled."""
        await self.book.load()
        self.host.serve_sync(self._admits, self.serve_stream)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.relays is not None:
                accept_relayed_connections(self.host)
                nursery.start_soon(functools.partial(keep_reservation, self.host, self.relays, on_change=self._reserved))
            nursery.start_soon(self._compact_log)
            task_status.started()
            await trio.sleep_forever()  # sessions from other devices arrive through the host's handler

    async def _compact_log(self) -> None:
        """Every so often, fold away the logged ops that every trusted device said it has (their effect stays in the
        tables); a device that later lacks them catches up from a state snapshot."""
        while True:
            await trio.sleep(self.compact_every_s)
            trusted = [device_id for device_id in self.known_devices() if self.is_trusted(device_id)]
            try:
                deleted = await self.book.compact_log(trusted)
            except StoreError as error:  # the log is kept whole meanwhile: a later round tries again
                log.warning("could not compact the op log: %s", error)
                continue
            if deleted:
                log.info("compacted the op log: %d batches of ops every device holds were folded away", deleted)

    def _admits(self, device_id: str) -> bool:
        """The trust gate for incoming streams; a refused device is reported once."""
        if self.is_trusted(device_id):
            return True
        if device_id not in self._warned_untrusted and len(self._warned_untrusted) < UNTRUSTED_WARNED_MAX:
            self._warned_untrusted.add(device_id)
            log.warning("refused %s: it is not (or not yet) one of this user's devices", device_id)
        return False

    def known_devices(self) -> list[str]:
        """The group's devices this node knows of (enrolled, or trusted before the registry arrived), by id."""
        return sorted(set(self.data.replica.devices.enrolments) | set(self.bootstrap_peers))

    def _reserved(self, reservation: Reservation | None) -> None:
        self.reservation = reservation
        self.host.relayed_addresses = [reservation.circuit_address] if reservation else []

    def end_sessions(self) -> None:
        """End every running session; peers that dial redial, and the new sessions pick the newest shared key."""
        for peer in self.book.peers.values():
            if peer.scope is not None:
                peer.scope.cancel()

    def drop_devices(self, device_ids: Sequence[str]) -> None:
        """End the sessions and close the connections of devices that are no longer trusted."""
        for device_id in device_ids:
            if device_id == self.identity.device_id:
                continue  # this device was revoked: its peers drop it, it has no session with itself
            peer = self.book.peers.get(device_id)
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

    def status(self, mailbox: Any = None) -> list[dict[str, Any]]:
        """Return every known device's sync state, as `status --json` shows it."""
        replica = self.data.replica
        rows = []
        for device_id in self.known_devices():
            if not self.is_trusted(device_id):
                continue
            peer = self.book.peers.get(device_id) or PeerState(device_id)
            ahead_in, ahead_out = peer.behind(replica)
            rows.append(
                {
                    "device_id": device_id,
                    "name": replica.devices.name(device_id),
                    "online": peer.online,
                    "path": self._path(peer, mailbox),
                    "last_sync": peer.last_sync_s,
                    "last_seen": peer.seen_s,
                    "seen_via": peer.seen_via,
                    "addresses": peer.addresses,
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
        peer = self.book.get(device_id)
        if not self.is_trusted(device_id) or peer.online or peer.opening:
            # One session per peer: when both sides dial at once, the later stream is dropped (from its handshake
            # on, so two that cross are never both taken for the one session).
            await reset_quietly(stream)
            return
        peer.opening = True
        try:
            await self._serve(peer, stream)
        finally:
            peer.opening = False

    async def _serve(self, peer: PeerState, stream: INetStream) -> None:
        device_id = peer.device_id
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
            why = error or type(error).__name__
            if device_id in self._warned_refusing:
                log.info("session handshake with %s failed: %s", device_id, why)
            else:  # a device that resets our streams unread may no longer count this one among its devices
                self._warned_refusing.add(device_id)
                log.warning("%s did not open a session (%s): it may not trust this device (any more)", device_id, why)
            await reset_quietly(stream)
            return
        self._warned_refusing.discard(device_id)
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
        session = SyncSession(self.data.replica, SessionConfig(epoch=group_key.epoch), sealer, self.data.state_resume)
        scope = trio.CancelScope()
        peer.started(session, scope, stream_path(stream))
        try:
            await self.book.learn(device_id, seen_listening_at(self.host.libp2p_host, stream), "session")
            with scope:
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
            peer.ended(self.data.replica)
            # By now identify has told this host where the peer listens: the address book keeps it for next time.
            peer.learn(seen_listening_at(self.host.libp2p_host, stream), "session")
            await self.book.save()

    def _on_events(self, peer: PeerState, events: list) -> Awaitable[None]:
        """Check what a session did and take the rows its applied ops changed now; return the write that persists
        them (in one transaction). Runs under the write lock, which is held until the write is done."""
        batches: list[LogBatch] = []
        parts: list[StateMerged] = []
        for event in events:
            match event:
                case PeerHello() if event.device_id != peer.device_id:
                    raise RemoteProtocolError(
                        EndReason.UNEXPECTED_FRAME, f"HELLO names {event.device_id}, the connection is {peer.device_id}"
                    )
                case PeerHello():  # the two compared what they hold: a sync, even when neither lacked anything
                    peer.last_sync_s = time.time()
                case OpsApplied() if event.ops:
                    batches.append(LogBatch(event.ops, event.deflated))
                case StateMerged():
                    parts.append(event)
                case PeerAcked():
                    peer.last_sync_s = time.time()
        return self._store(peer, self.receiver.stage(batches, parts))

    async def _store(self, peer: PeerState, pending: PendingWrite | None) -> None:
        if pending is not None:
            await self.receiver.store(pending)
            peer.last_sync_s = time.time()
