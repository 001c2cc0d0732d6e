"""The node's libp2p host: Noise + yamux under the device key, the `/aico/sync/1` trust gate, and direct dials."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.exceptions import SwarmDialAllFailedError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from framing import RemoteProtocolError
from node.errors import NodeError
from node.net.interfaces import dialable
from node.trust.identity import DeviceIdentity
from p2p import CLOSE_TIMEOUT_S, forget_dial_failure, reset_quietly, running_host

SYNC_PROTOCOL = TProtocol("/aico/sync/1")
DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)

logger = logging.getLogger(__name__)


class DialError(NodeError):
    """A peer could not be reached, or did not open a stream in time."""


class P2pHost:
    """A running libp2p host that speaks Noise and yamux only, under this device's peer id."""

    def __init__(self, libp2p_host: IHost) -> None:
        self.libp2p_host = libp2p_host
        self.peer_id = str(libp2p_host.get_id())
        self.relayed_addresses: list[str] = []  # where a relay that holds a reservation for this node reaches it

    @property
    def addresses(self) -> list[str]:
        """The multiaddrs peers can dial, each ending in `/p2p/<peer id>`: direct ones first (a listener on every
        interface shows each LAN address, never 0.0.0.0), then relayed ones."""
        return dialable([str(addr) for addr in self.libp2p_host.get_addrs()]) + self.relayed_addresses

    def serve_sync(
        self, is_trusted: Callable[[str], bool], on_stream: Callable[[str, INetStream], Awaitable[None]]
    ) -> None:
        """Accept `/aico/sync/1` streams: reset those from untrusted peer ids unread, hand the rest to `on_stream`
        (which owns them and closes them)."""

        async def handle(stream: INetStream) -> None:
            peer_id = str(stream.muxed_conn.peer_id)
            if not is_trusted(peer_id):
                # docs/spec/sync.md: a stream from a peer that is not a trusted, unrevoked device is reset unread.
                logger.info("reset a sync stream from untrusted peer %s", peer_id)
                await reset_quietly(stream)
                return
            try:
                await on_stream(peer_id, stream)
            except RemoteProtocolError as error:
                logger.info("sync session with %s refused the peer's data: %s", peer_id, error)
            except Exception:
                # An error escaping a libp2p stream handler stops the whole swarm and comes out of host.run(), ending
                # the host (tests/test_p2p.py): log it and drop only this stream.
                logger.exception("sync stream handler failed for %s", peer_id)
                await reset_quietly(stream)

        self.libp2p_host.set_stream_handler(SYNC_PROTOCOL, handle)

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to `peer_id`, within a bound."""
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await self.libp2p_host.disconnect(ID.from_base58(peer_id))
            except (BaseLibp2pError, OSError, ValueError) as error:
                logger.info("closing the connections to %s failed: %s", peer_id, error)


@asynccontextmanager
async def p2p_host(identity: DeviceIdentity, listen_addrs: Sequence[str] = DEFAULT_LISTEN) -> AsyncIterator[P2pHost]:
    """Run a host under `identity` listening on `listen_addrs`, and close it (listener included) on exit."""
    async with running_host(identity.seed, listen_addrs) as libp2p_host:
        if str(libp2p_host.get_id()) != identity.device_id:
            raise NodeError(
                f"libp2p derived peer id {libp2p_host.get_id()} from the device key, not {identity.device_id}"
            )
        yield P2pHost(libp2p_host)


async def dial_direct(host: P2pHost, peer_addr: str, protocol: str, *, timeout_s: float) -> tuple[str, INetStream]:
    """Connect to `peer_addr` (a direct address ending in `/p2p/<peer id>`) and open a `protocol` stream, all within
    `timeout_s`."""
    try:
        info = info_from_p2p_addr(multiaddr.Multiaddr(peer_addr))
    except (ValueError, TypeError) as error:
        raise DialError(f"{peer_addr!r} is not a multiaddr ending in /p2p/<peer id>: {error}") from None
    peer_id = str(info.peer_id)
    if peer_id == host.peer_id:
        raise DialError(f"{peer_addr} is this node itself")
    libp2p_host = host.libp2p_host
    # libp2p dials at most one stored TCP address per peer, and stored addresses outlive a peer's restart on another
    # port (tests/test_p2p.py): dial exactly the address given.
    libp2p_host.get_peerstore().clear_addrs(info.peer_id)
    forget_dial_failure(libp2p_host, info.peer_id)
    reused = bool(libp2p_host.get_network().get_connections(info.peer_id))
    try:
        # A peer that accepts TCP but never speaks makes a libp2p dial hang ~120 s: bound it here.
        with trio.fail_after(timeout_s):
            await libp2p_host.connect(info)
            stream = await libp2p_host.new_stream(info.peer_id, [TProtocol(protocol)])
    except (trio.TooSlowError, BaseLibp2pError, OSError) as error:
        if reused:
            # host.connect() returns at once on any connection libp2p still holds, even one closed ~0.1 s ago or whose
            # network vanished without a close, so every later dial would fail on it too: drop it.
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await libp2p_host.disconnect(info.peer_id)
        if isinstance(error, trio.TooSlowError):
            raise DialError(f"dialling {peer_addr} timed out after {timeout_s} s") from None
        # The swarm's own message names the peer id again and says only that every address failed.
        reason = "nothing there accepted a connection" if isinstance(error, SwarmDialAllFailedError) else str(error)
        raise DialError(f"cannot dial {peer_addr.split('/p2p/')[0]}: {reason}") from error
    return peer_id, stream
