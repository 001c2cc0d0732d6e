"""Reaching a device directly or through a relay, whichever answers first (happy eyeballs), and moving a relayed
session back to a direct path as soon as one opens."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn, cast

import attrs
import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID

from node.net.circuit import (
    RELAY_ERRORS,
    Path,
    close_connection,
    connection_path,
    dial_relayed,
    is_relayed_connection,
    stream_path,
)
from node.net.dial import dial_protocol, retry_with_backoff
from node.net.host import SYNC_PROTOCOL, DialError, P2pHost
from p2p import forget_dial_failure, reset_quietly

logger = logging.getLogger(__name__)


@attrs.frozen
class RacedStream:
    """The stream that won a direct-versus-relay race, and the path it runs on."""

    peer_id: str
    stream: INetStream
    path: Path


async def dial_sync_racing(
    host: P2pHost,
    direct_addrs: Sequence[str],
    relay_addr: str | None,
    peer_id: str,
    *,
    direct_head_start_s: float = 0.3,
    timeout_s: float = 5.0,
    protocol: str = SYNC_PROTOCOL,
) -> RacedStream:
    """Open a sync stream to `peer_id`: dial its direct addresses, and through the relay after `direct_head_start_s`
    (at once if every direct dial failed first); return the first stream, cancel the other dial and close its
    connection, all within `timeout_s`."""
    winner: RacedStream | None = None
    late_streams: list[INetStream] = []
    failures: list[str] = []
    direct_failed = trio.Event()

    def finish(stream: INetStream, nursery: trio.Nursery) -> None:
        nonlocal winner
        if winner is not None:
            late_streams.append(stream)
            return
        winner = RacedStream(peer_id, stream, stream_path(stream))
        nursery.cancel_scope.cancel()

    async def dial_direct(nursery: trio.Nursery) -> None:
        for addr in direct_addrs:
            try:
                _, stream = await dial_protocol(host, addr, protocol, timeout_s=timeout_s)
            except DialError as error:
                failures.append(f"direct: {error}")
                continue
            finish(stream, nursery)
            return
        direct_failed.set()

    async def dial_through_relay(nursery: trio.Nursery, relay: str) -> None:
        with trio.move_on_after(direct_head_start_s):
            await direct_failed.wait()
        try:
            _, stream = await dial_relayed(host, relay, peer_id, protocol, timeout_s=timeout_s)
        except DialError as error:
            failures.append(f"relayed: {error}")
            return
        finish(stream, nursery)

    with trio.move_on_after(timeout_s) as deadline:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dial_direct, nursery)
            if relay_addr is not None:
                nursery.start_soon(dial_through_relay, nursery, relay_addr)
    for stream in late_streams:
        await reset_quietly(stream)
    if winner is None:
        why = "; ".join(failures) or "no address to dial"
        if deadline.cancelled_caught:
            why = f"timed out after {timeout_s} s ({why})"
        raise DialError(f"cannot reach it: {why}")  # the caller names the device (node.net.dial)
    await _close_other_connections(host, winner.stream)
    return winner


async def _close_other_connections(host: P2pHost, stream: INetStream) -> None:
    """Close the connections to the stream's peer other than the one it runs on: the losers of a race."""
    peer = stream.muxed_conn.peer_id
    for connection in list(host.libp2p_host.get_network().get_connections(peer)):
        if getattr(connection, "muxed_conn", None) is not stream.muxed_conn:
            await close_connection(connection)


async def _wait_for_direct_path(
    host: P2pHost, direct_addrs: Sequence[str], peer_id: str, every_s: float, timeout_s: float
) -> None:
    """Try a direct connection to `peer_id` every `every_s` seconds until one opens, which this host then holds."""
    network = cast(Swarm, host.libp2p_host.get_network())
    destination = ID.from_base58(peer_id)
    while True:
        await trio.sleep(random.uniform(every_s / 2, every_s))
        for addr in direct_addrs:
            try:
                address = multiaddr.Multiaddr(addr).decapsulate(multiaddr.Multiaddr(f"/p2p/{peer_id}"))
                forget_dial_failure(host.libp2p_host, destination)
                # The swarm's own dial would return the relayed connection it holds; dial_addr always dials.
                with trio.fail_after(timeout_s):
                    await network.dial_addr(address, destination)
                return
            except (trio.TooSlowError, *RELAY_ERRORS) as error:
                logger.debug("no direct path to %s at %s yet: %s", peer_id, addr, error or type(error).__name__)


async def _end_relayed_connections(host: P2pHost, peer_id: str) -> None:
    for connection in list(host.libp2p_host.get_network().get_connections(ID.from_base58(peer_id))):
        if is_relayed_connection(connection):
            await close_connection(connection)


async def sync_once(
    host: P2pHost,
    direct_addrs: Sequence[str],
    relay_addr: str | None,
    peer_id: str,
    connect: Callable[[str, INetStream], Awaitable[None]],
    *,
    dial_timeout_s: float = 5.0,
    direct_head_start_s: float = 0.3,
    direct_probe_every_s: float = 30.0,
) -> bool:
    """Open a sync stream to `peer_id`, direct or relayed (raced, direct first), and await `connect` on it (which owns
    it); end a relayed session as soon as a direct connection opens. Return whether that direct connection waits."""
    raced = await dial_sync_racing(
        host, direct_addrs, relay_addr, peer_id, direct_head_start_s=direct_head_start_s, timeout_s=dial_timeout_s
    )
    logger.info("sync with %s over a %s path", peer_id, raced.path)
    if raced.path == "direct" or not direct_addrs:
        await connect(raced.peer_id, raced.stream)
        return False
    async with trio.open_nursery() as nursery:

        async def run_session() -> None:
            await connect(raced.peer_id, raced.stream)
            nursery.cancel_scope.cancel()

        nursery.start_soon(run_session)
        await _wait_for_direct_path(host, direct_addrs, peer_id, direct_probe_every_s, dial_timeout_s)
        logger.info("a direct path to %s opened: ending the relayed session", peer_id)
        nursery.cancel_scope.cancel()
    await _end_relayed_connections(host, peer_id)
    return connection_path(host, peer_id) == "direct"  # the direct connection is waiting: use it now


async def keep_connected_with_relay(
    host: P2pHost,
    direct_addrs: Callable[[], Sequence[str]],
    relay_addr: Callable[[], str | None],
    peer_id: str,
    connect: Callable[[str, INetStream], Awaitable[None]],
    *,
    before_attempt: Callable[[], Awaitable[None]] | None = None,
    dial_timeout_s: float = 5.0,
    direct_head_start_s: float = 0.3,
    direct_probe_every_s: float = 30.0,
    backoff_s_min: float = 0.5,
    backoff_s_max: float = 30.0,
) -> NoReturn:
    """Keep a sync session with `peer_id` forever: dial it at `direct_addrs()` and through `relay_addr()` (raced, direct
    first, both read afresh for each attempt, after `before_attempt` if given), await `connect` on each stream (which
    owns it), end a relayed session as soon as a direct connection opens, and redial with backoff."""

    async def attempt() -> bool:
        if before_attempt is not None:
            await before_attempt()
        return await sync_once(
            host, direct_addrs(), relay_addr(), peer_id, connect, dial_timeout_s=dial_timeout_s,
            direct_head_start_s=direct_head_start_s, direct_probe_every_s=direct_probe_every_s,
        )  # fmt: skip

    await retry_with_backoff(attempt, peer_id, backoff_s_min=backoff_s_min, backoff_s_max=backoff_s_max)
