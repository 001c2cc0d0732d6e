"""What a node knows of each of its group's devices: the sync state of its session, and an address book of where it
was last seen, kept in the home so that paired devices find each other again after restarts with no flags."""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStoreError

from crdt import Replica
from node.net.interfaces import UNSPECIFIED_PREFIX
from node.sync.session import SyncSession
from stores.datalayer import DataLayer
from stores.primary import get_meta, set_meta

log = logging.getLogger(__name__)
PEERS_META = "sync_peers"
ADDRESSES_PER_DEVICE_MAX = 8  # the most recent direct addresses kept per device
PEERS_MAX = 256  # devices remembered; beyond it the one seen longest ago is forgotten
ADDRESS_CHARS_MAX = 256
SAVE_TIMEOUT_S = 10.0


@attrs.define
class PeerState:
    """What this node knows of one peer device: its session's state, and where it was last seen."""

    device_id: str
    online: bool = False
    opening: bool = False  # a session's handshake runs: other streams of the device are dropped meanwhile
    last_sync_s: float | None = None  # Unix seconds of the last batch stored or acknowledged
    vector: dict[str, int] = attrs.Factory(dict)  # what the peer last said it has
    session: SyncSession | None = None
    scope: trio.CancelScope | None = None  # ends the running session
    path: str = "direct"  # or "relayed": how the running session's connection goes
    addresses: list[str] = attrs.Factory(list)  # direct addresses it was last reached or found at, newest first
    seen_s: float | None = None  # Unix seconds it was last in session or found on the LAN
    seen_via: str | None = None  # how: "session", "lan", "given" (--peer) or "pairing"
    offline: trio.Event = attrs.Factory(trio.Event)  # set while no session runs with it
    learned: trio.Event = attrs.Factory(trio.Event)  # set when new addresses arrive, for a dialler waiting on them

    def __attrs_post_init__(self) -> None:
        self.offline.set()

    def behind(self, replica: Replica) -> tuple[int, int]:
        """Return (ops the peer has that this node lacks, ops this node has that the peer lacks)."""
        if self.session is not None:
            self.vector = dict(self.session.peer_vector)
        theirs, ours = self.vector, replica.vector
        devices = set(theirs) | set(ours)
        ahead_in = sum(max(0, theirs.get(d, 0) - ours.get(d, 0)) for d in devices)
        ahead_out = sum(max(0, ours.get(d, 0) - theirs.get(d, 0)) for d in devices)
        return ahead_in, ahead_out

    def started(self, session: SyncSession, scope: trio.CancelScope, path: str) -> None:
        """A session with the device began."""
        self.online, self.session, self.scope, self.path = True, session, scope, path
        self.offline = trio.Event()

    def ended(self, replica: Replica) -> None:
        """The session with the device ended."""
        self.behind(replica)  # keeps the peer's last vector
        self.online, self.session, self.scope = False, None, None
        self.seen_s, self.seen_via = time.time(), "session"
        self.offline.set()

    def learn(self, addresses: Iterable[str], via: str) -> bool:
        """Put `addresses` first among those the device is known at; return whether any was new."""
        fresh = [a for a in addresses if is_direct_address(a, self.device_id)]
        known = list(dict.fromkeys(fresh + self.addresses))[:ADDRESSES_PER_DEVICE_MAX]
        changed = any(a not in self.addresses for a in fresh)
        self.addresses = known
        if fresh:
            self.seen_s, self.seen_via = time.time(), via
        if changed:
            self.learned.set()
            self.learned = trio.Event()
        return changed


async def compact_stopped_home(data: DataLayer, own_device: str) -> int:
    """Compact the op log of a home whose node is not running, as a running one does (node/net/sessions.py), from what
    each trusted device last said it has; return how many logged batches went."""
    book = PeerBook(data)
    await book.load()
    devices = data.replica.devices
    return await book.compact_log([d for d in devices.enrolments if d != own_device and devices.revoked_at(d) is None])


def is_direct_address(address: Any, device_id: str) -> bool:
    """Whether `address` is a dialable direct multiaddr (TCP, a specific IP) ending in `/p2p/<device_id>`."""
    if type(address) is not str or len(address) > ADDRESS_CHARS_MAX or address.startswith(UNSPECIFIED_PREFIX):
        return False
    try:
        parsed = multiaddr.Multiaddr(address)
        names = [protocol.name for protocol in parsed.protocols()]
        return "tcp" in names and "p2p-circuit" not in names and parsed.value_for_protocol("p2p") == device_id
    except (ValueError, TypeError):
        return False


def seen_listening_at(host: IHost, stream: INetStream) -> list[str]:
    """The direct addresses the peer of `stream` listens at: what it told identify, its unspecified address replaced
    by the one this connection came from."""
    peer_id: ID = stream.muxed_conn.peer_id
    # yamux connections know their remote address; the interface does not promise it.
    remote = getattr(stream.muxed_conn, "get_remote_address", lambda: None)()
    remote_is_loopback = remote is not None and _is_ipv4(remote[0]) and ipaddress.ip_address(remote[0]).is_loopback
    try:
        told = host.get_peerstore().addrs(peer_id)
    except PeerStoreError:
        return []  # identify has not told it yet (or the connection went before it did)
    addresses = []
    for addr in told:
        text = str(addr)
        if text.startswith("/ip4/127.") and not remote_is_loopback:
            continue  # its loopback is not this machine's
        if text.startswith(UNSPECIFIED_PREFIX):
            if remote is None or not _is_ipv4(remote[0]):
                continue
            text = text.replace(UNSPECIFIED_PREFIX, f"/ip4/{remote[0]}/", 1)
        if "/p2p/" not in text:
            text = f"{text}/p2p/{peer_id}"
        addresses.append(text)
    return addresses


def _is_ipv4(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 4
    except ValueError:
        return False


class PeerBook:
    """Every known peer device's state, persisted (sync progress and addresses) in the primary store's meta table."""

    def __init__(self, data: DataLayer) -> None:
        self.data = data
        self.peers: dict[str, PeerState] = {}

    async def load(self) -> None:
        """Read what earlier runs knew of each peer."""
        for device_id, saved in (await self.data.sql.run(get_meta, PEERS_META) or {}).items():
            peer = self.peers[device_id] = PeerState(device_id, last_sync_s=saved.get("last_sync"))
            peer.vector = dict(saved.get("vector") or {})
            peer.addresses = [a for a in saved.get("addresses") or [] if is_direct_address(a, device_id)]
            peer.seen_s, peer.seen_via = saved.get("seen_s"), saved.get("seen_via")

    def get(self, device_id: str) -> PeerState:
        """The state of `device_id`, made if new."""
        peer = self.peers.get(device_id)
        if peer is None:
            if len(self.peers) >= PEERS_MAX:
                oldest = min(self.peers.values(), key=lambda p: (p.online, p.seen_s or 0.0))
                del self.peers[oldest.device_id]
            peer = self.peers[device_id] = PeerState(device_id)
        return peer

    async def save(self) -> None:
        """Persist what is known of each peer, so `status` and the next start know devices that are offline."""
        saved = {
            p.device_id: {
                "last_sync": p.last_sync_s,
                "vector": p.vector,
                "addresses": p.addresses,
                "seen_s": p.seen_s,
                "seen_via": p.seen_via,
            }
            for p in self.peers.values()
            if p.vector or p.addresses
        }
        with trio.move_on_after(SAVE_TIMEOUT_S, shield=True):
            await self.data.sql.run(set_meta, PEERS_META, saved)

    def applied_everywhere(self, devices: Iterable[str]) -> dict[str, int] | None:
        """Return, per author device, the highest seq every one of `devices` said it has applied; None if one of them
        never said (it may lack any op)."""
        vectors = []
        for device_id in devices:
            peer = self.peers.get(device_id)
            vector = (peer.session.peer_vector if peer.session is not None else peer.vector) if peer else {}
            if not vector:
                return None
            vectors.append(vector)
        if not vectors:
            return None
        authors = set.intersection(*(set(vector) for vector in vectors))
        return {author: min(vector[author] for vector in vectors) for author in authors}

    async def compact_log(self, trusted: Iterable[str]) -> int:
        """Fold away the logged ops every one of the `trusted` devices said it has (their effect stays in the tables);
        return how many logged batches went. A device alone compacts nothing."""
        safe = self.applied_everywhere(trusted)
        return await self.data.log.compact(self.data.sql, safe) if safe else 0

    async def learn(self, device_id: str, addresses: Sequence[str], via: str) -> None:
        """Remember that `device_id` listens at `addresses`, and persist it if that is news."""
        if self.get(device_id).learn(addresses, via):
            await self.save()

