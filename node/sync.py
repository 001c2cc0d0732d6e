"""The sync service: a sealed sync session with every reachable trusted device, live pushes of new ops."""

import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from crdt import Op, Replica
from node.errors import EndReason, RemoteProtocolError
from node.identity import DeviceIdentity, GroupKey
from node.p2p import READ_BYTES, Notifier, P2pHost, Stream, keep_connected, run_session
from node.sealing import GroupSealer, new_session_id
from node.session import OpsApplied, PeerAcked, PeerHello, SessionConfig, StateMerged, SyncSession
from stores.datalayer import DataLayer, PendingWrite
from stores.primary import get_meta, set_meta

log = logging.getLogger(__name__)
SESSION_ID_BYTES = 16
HANDSHAKE_TIMEOUT_S = 10.0
PEERS_DIALLED_MAX = 256
PEERS_META = "sync_peers"


@attrs.define
class PeerState:
    """What this node knows of one peer device's sync."""

    device_id: str
    online: bool = False
    last_sync: float | None = None
    vector: dict[str, int] = attrs.Factory(dict)  # what the peer last said it has
    session: SyncSession | None = None

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
        data: DataLayer,
        identity: DeviceIdentity,
        group_key: GroupKey,
        host: P2pHost,
        *,
        on_applied: Callable[[list[Op]], None],
        static_peers: Sequence[str] = (),
        bootstrap_peers: dict[str, bytes] | None = None,
        read_timeout_s: float = 30.0,
        refresh_every_s: float = 10.0,
    ) -> None:
        self.data = data
        self.identity = identity
        self.group_key = group_key
        self.host = host
        self.static_peers = list(static_peers)
        self.read_timeout_s = read_timeout_s
        self.refresh_every_s = refresh_every_s
        self.outgoing = Notifier()
        self.peers: dict[str, PeerState] = {}
        self.lan_devices: set[str] = set()  # devices mDNS found on the LAN
        self.bootstrap_peers = dict(bootstrap_peers or {})  # device id -> public key, trusted before the registry
        self._on_applied = on_applied

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept sessions from trusted devices and keep dialling the static peers, until cancelled."""
        for device_id, saved in (await self.data.sql.run(get_meta, PEERS_META) or {}).items():
            self.peers[device_id] = PeerState(device_id, last_sync=saved["last_sync"], vector=saved["vector"])
        self.host.serve_sync(self.is_trusted, self.serve_stream)
        async with trio.open_nursery() as nursery:
            for address in self.static_peers:
                nursery.start_soon(keep_connected, self.host, address, self.serve_stream)
            task_status.started()
            await trio.sleep_forever()  # sessions from other devices arrive through the host's handler

    def dial(self, nursery: trio.Nursery, address: str) -> None:
        """Keep a session with the device at `address` (found by discovery or given by the user)."""
        if address not in self.static_peers and len(self.static_peers) < PEERS_DIALLED_MAX:
            self.static_peers.append(address)
            nursery.start_soon(keep_connected, self.host, address, self.serve_stream)

    def is_trusted(self, device_id: str) -> bool:
        """Return whether a device may sync: enrolled, not revoked, and not this device."""
        if device_id == self.identity.device_id or self.data.replica.devices.revoked_at(device_id) is not None:
            return False
        return self.data.replica.devices.is_trusted(device_id) or device_id in self.bootstrap_peers

    def _public_key(self, device_id: str) -> bytes:
        record = self.data.replica.devices.get(device_id)
        return record["public_key"] if record else self.bootstrap_peers[device_id]

    def status(self) -> list[dict]:
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
                    "path": ("lan" if device_id in self.lan_devices else "direct") if peer.online else None,
                    "last_sync": peer.last_sync,
                    "ops_behind_in": ahead_in,
                    "ops_behind_out": ahead_out,
                    "bytes_in": peer.session.bytes_received if peer.session else 0,
                    "bytes_out": peer.session.bytes_sent if peer.session else 0,
                }
            )
        return rows

    async def serve_stream(self, device_id: str, stream: Stream) -> None:
        """Run one sealed sync session with an authenticated peer over `stream` (which it owns)."""
        peer = self.peers.setdefault(device_id, PeerState(device_id))
        if not self.is_trusted(device_id) or peer.online:
            # One session per peer: when both sides dial at once, the later stream is dropped.
            await stream.reset()
            return
        inbound_session_id = new_session_id()
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            # Each side picks the session id for the batches it receives, so old batches never replay.
            await stream.write(inbound_session_id)
            outbound_session_id = await _read_exactly(stream, SESSION_ID_BYTES)
        sealer = GroupSealer(
            self.identity,
            self.group_key,
            device_id,
            self._public_key(device_id),
            inbound_session_id=inbound_session_id,
            outbound_session_id=outbound_session_id,
        )
        session = SyncSession(self.data.replica, SessionConfig(epoch=self.group_key.epoch), sealer)
        peer.online, peer.session = True, session
        try:
            reason = await run_session(
                stream,
                session,
                on_events=lambda events: self._on_events(peer, events),
                outgoing=self.outgoing,
                read_timeout_s=self.read_timeout_s,
                refresh_every_s=self.refresh_every_s,
                apply_lock=self.data.write_lock,
            )
            log.info("sync session with %s ended: %s", device_id, reason)
        finally:
            peer.online = False
            peer.behind(self.data.replica)  # keeps the peer's last vector
            peer.session = None
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S, shield=True):
                await self._save_peers()

    async def _save_peers(self) -> None:
        """Persist what is known of each peer, so `status` can show devices that are offline."""
        saved = {p.device_id: {"last_sync": p.last_sync, "vector": p.vector} for p in self.peers.values() if p.vector}
        await self.data.sql.run(set_meta, PEERS_META, saved)

    def _on_events(self, peer: PeerState, events: list) -> Awaitable[None]:
        """Check what a session did and take the rows its applied ops changed now; return the write that persists
        them (in one transaction). Runs under the data layer's write lock, which is held until the write is done."""
        applied: list[Op] = []
        for event in events:
            match event:
                case PeerHello() if event.device_id != peer.device_id:
                    raise RemoteProtocolError(
                        EndReason.UNEXPECTED_FRAME, f"HELLO names {event.device_id}, the connection is {peer.device_id}"
                    )
                case OpsApplied():
                    applied += event.ops
                case StateMerged():
                    raise RemoteProtocolError(EndReason.UNEXPECTED_FRAME, "state snapshots are not accepted yet")
                case PeerAcked():
                    peer.last_sync = time.time()
        return self._persist(peer, self.data.prepare(applied) if applied else None)

    async def _persist(self, peer: PeerState, pending: PendingWrite | None) -> None:
        if pending is None:
            return
        await self.data.write(pending)
        peer.last_sync = time.time()
        self._on_applied(list(pending.ops))
        self.outgoing.notify()  # other peers may lack these ops


async def _read_exactly(stream: Stream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.read(min(READ_BYTES, size - len(data)))
        if not chunk:
            raise RemoteProtocolError(EndReason.MALFORMED_FRAME, "stream ended during the session handshake")
        data += chunk
    return data
