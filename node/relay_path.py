"""The node's circuit relay v2 client: a reservation on a relay, relayed connections in and out, and a direct-first
dial that falls back to the relay (happy eyeballs) and moves back to a direct path when one appears.

Measured in tests/relay/test_circuit.py on py-libp2p 0.8.1: the swarm never dials a `/p2p-circuit` address
(`host.connect` skips them), so this module speaks HOP/STOP itself with the library's protobufs and hands the stream to
the host's normal upgrader: Noise then runs end to end through the relay, and the connection's peer id is the far
device's, proven by its key. A relayed connection and a direct one to the same peer can coexist; new streams then go
over the direct one.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, NoReturn, cast

import attrs
import multiaddr
import trio
from google.protobuf.message import DecodeError
from libp2p.abc import INetConn, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, StopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID as STOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from node.errors import RemoteProtocolError
from node.p2p import (
    CLOSE_TIMEOUT_S,
    SYNC_PROTOCOL,
    DialError,
    P2pHost,
    Stream,
    _forget_dial_failure,
    reset_quietly,
    dial_protocol,
    retry_with_backoff,
)

Path = Literal["direct", "relayed"]
CIRCUIT_PROTOCOL = "p2p-circuit"
STOP_HANDSHAKE_TIMEOUT_S = 10.0  # bound on a relay's STOP exchange and the Noise + yamux upgrade behind it
RESERVATION_RENEW_FRACTION = 0.5  # renew when half of the granted time is left
RESERVATION_RENEW_MIN_S = 5.0  # never renew more often than this, whatever the relay grants
RELAY_CHECK_EVERY_S = 2.0  # how often a held reservation checks that the connection to the relay still stands
# What a relay or a peer behind it can make a HOP/STOP exchange or upgrade raise.
_RELAY_ERRORS = (BaseLibp2pError, OSError, ValueError, DecodeError)

logger = logging.getLogger(__name__)


class CircuitError(DialError):
    """The relay refused a reservation or a circuit, or broke the exchange."""


@attrs.frozen
class Reservation:
    """A slot on a relay: peers reach this node at `circuit_address` until `expires_at` (Unix seconds)."""

    relay_addr: str
    circuit_address: str
    expires_at: float


def is_circuit_addr(addr: str) -> bool:
    """Whether `addr` is a multiaddr through a relay (`.../p2p-circuit/p2p/<peer id>`)."""
    try:
        return CIRCUIT_PROTOCOL in {protocol.name for protocol in multiaddr.Multiaddr(addr).protocols()}
    except ValueError:
        return False


def circuit_addr(relay_addr: str, peer_id: str) -> str:
    """The multiaddr that reaches `peer_id` through the relay at `relay_addr` (which ends in `/p2p/<relay id>`)."""
    return f"{relay_addr}/{CIRCUIT_PROTOCOL}/p2p/{peer_id}"


def split_circuit_addr(addr: str) -> tuple[str, str]:
    """Split `<relay addr>/p2p-circuit/p2p/<peer id>` into the relay's multiaddr and the peer id."""
    relay_addr, separator, peer_part = addr.partition(f"/{CIRCUIT_PROTOCOL}")
    if not separator or not peer_part.startswith("/p2p/"):
        raise DialError(f"{addr!r} is not <relay addr>/p2p-circuit/p2p/<peer id>")
    return relay_addr, peer_part.removeprefix("/p2p/")


def is_relayed_connection(connection: Any) -> bool:
    """Whether a libp2p connection (swarm or muxed) runs through a relay."""
    get_addrs = getattr(connection, "get_transport_addresses", None)
    addrs = get_addrs() if callable(get_addrs) else []
    return any(CIRCUIT_PROTOCOL in {protocol.name for protocol in addr.protocols()} for addr in addrs)


def stream_path(stream: Stream) -> Path:
    """Whether `stream` runs over a direct or a relayed connection."""
    return "relayed" if is_relayed_connection(stream.muxed_conn) else "direct"


def connection_path(host: P2pHost, peer_id: str) -> Path | None:
    """The path this host's open connections to `peer_id` take ("direct" wins over "relayed"), or None if none."""
    connections = host.libp2p_host.get_network().get_connections(ID.from_base58(peer_id))
    if not connections:
        return None
    return "relayed" if all(is_relayed_connection(connection) for connection in connections) else "direct"


def accept_relayed_connections(host: P2pHost) -> None:
    """Accept connections relays open to this node (STOP); their streams reach the usual handlers and trust gate."""
    libp2p_host = host.libp2p_host

    async def handle_stop(stream: INetStream) -> None:
        relay_id = stream.muxed_conn.peer_id
        try:
            with trio.fail_after(STOP_HANDSHAKE_TIMEOUT_S):
                request = await read_delimited_msg(stream, StopMessage)
                if request.type != StopMessage.CONNECT:
                    raise ValueError(f"STOP message of type {request.type}, expected CONNECT")
                claimed_initiator = ID(request.peer.id)
                await write_delimited_msg(stream, StopMessage(type=StopMessage.STATUS, status=StatusCode.OK))
                address = multiaddr.Multiaddr(f"/p2p/{relay_id}/{CIRCUIT_PROTOCOL}/p2p/{claimed_initiator}")
                raw = RawConnection(
                    stream=stream, initiator=False, connection_type=ConnectionType.RELAYED, addresses=[address]
                )
                muxed = await libp2p_host.upgrade_inbound_connection(raw, address)
        except (trio.TooSlowError, *_RELAY_ERRORS) as error:
            # An error escaping a libp2p stream handler stops the whole swarm (node/p2p.py): drop only this stream.
            logger.info("relayed connection through %s failed: %s", relay_id, error or type(error).__name__)
            await reset_quietly(stream)
            return
        if muxed.peer_id != claimed_initiator:
            # Noise proved who is really on the other end; a relay that named someone else is lying about the source.
            logger.info("relay %s named %s but Noise proved %s: closed", relay_id, claimed_initiator, muxed.peer_id)
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await muxed.close()

    libp2p_host.set_stream_handler(STOP_PROTOCOL, handle_stop)


async def _hop_exchange(host: P2pHost, relay_addr: str, request: HopMessage, timeout_s: float) -> tuple[Stream, Any]:
    """Open a HOP stream to the relay, send `request`, and return the stream and the relay's STATUS, within a bound."""
    _, hop_stream = await dial_protocol(host, relay_addr, HOP_PROTOCOL, timeout_s=timeout_s)
    try:
        with trio.fail_after(timeout_s):
            await write_delimited_msg(hop_stream, request)
            response = await read_delimited_msg(hop_stream, HopMessage)
    except (trio.TooSlowError, *_RELAY_ERRORS) as error:
        await reset_quietly(hop_stream)
        raise CircuitError(f"relay {relay_addr} broke the HOP exchange: {error or type(error).__name__}") from None
    if response.type != HopMessage.STATUS or response.status != StatusCode.OK:
        await reset_quietly(hop_stream)
        status = {code.value: code.name for code in StatusCode}.get(response.status, str(response.status))
        raise CircuitError(f"relay {relay_addr} refused: {status}")
    return hop_stream, response


async def reserve(host: P2pHost, relay_addr: str, *, timeout_s: float = 5.0) -> Reservation:
    """Reserve a slot on the relay at `relay_addr` so peers can reach this node through it, within `timeout_s`."""
    with trio.move_on_after(timeout_s) as deadline:
        hop_stream, response = await _hop_exchange(host, relay_addr, HopMessage(type=HopMessage.RESERVE), timeout_s)
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await hop_stream.close()
    if deadline.cancelled_caught:
        raise CircuitError(f"reserving on {relay_addr} timed out after {timeout_s} s")
    return Reservation(relay_addr, circuit_addr(relay_addr, host.peer_id), float(response.reservation.expire))


def _relay_connected(host: P2pHost, relay_addr: str) -> bool:
    relay_id = info_from_p2p_addr(multiaddr.Multiaddr(relay_addr)).peer_id
    return any(not connection.is_closed for connection in host.libp2p_host.get_network().get_connections(relay_id))


async def keep_reservation(
    host: P2pHost,
    relay_addr: str,
    *,
    on_change: Callable[[Reservation | None], None] = lambda reservation: None,
    timeout_s: float = 5.0,
    backoff_s_min: float = 0.5,
    backoff_s_max: float = 30.0,
) -> NoReturn:
    """Hold a reservation on `relay_addr` forever: renew it before it expires and re-reserve when the connection to the
    relay drops (which ends it), telling `on_change` each time it is granted or lost."""
    backoff = backoff_s_min
    while True:
        try:
            reservation = await reserve(host, relay_addr, timeout_s=timeout_s)
        except DialError as error:
            logger.info("reservation on %s: %s", relay_addr, error)
            on_change(None)
            # Jitter keeps devices that lost the same relay at once from retrying in step.
            await trio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, backoff_s_max)
            continue
        on_change(reservation)
        backoff = backoff_s_min
        granted_s = reservation.expires_at - time.time()
        renew_at = trio.current_time() + max(RESERVATION_RENEW_MIN_S, granted_s * RESERVATION_RENEW_FRACTION)
        while trio.current_time() < renew_at and _relay_connected(host, relay_addr):
            await trio.sleep(min(RELAY_CHECK_EVERY_S, renew_at - trio.current_time()))
        if not _relay_connected(host, relay_addr):
            logger.info("connection to relay %s dropped: reserving again", relay_addr)
            on_change(None)


async def dial_relayed(
    host: P2pHost, relay_addr: str, peer_id: str, protocol: str, *, timeout_s: float
) -> tuple[str, Stream]:
    """Open a `protocol` stream to `peer_id` through the relay at `relay_addr`, all within `timeout_s`: on a connection
    this host already holds to the peer if it still works, else on a new circuit (Noise end to end, then yamux)."""
    if peer_id == host.peer_id:
        raise DialError(f"{peer_id} is this node itself")
    destination = ID.from_base58(peer_id)
    libp2p_host = host.libp2p_host
    connection: INetConn | None = None
    try:
        with trio.fail_after(timeout_s):
            if libp2p_host.get_network().get_connections(destination):
                # A new circuit per session would pile up idle circuits against the relay's per-peer limit.
                try:
                    return peer_id, await libp2p_host.new_stream(destination, [TProtocol(protocol)])
                except _RELAY_ERRORS:
                    # Measured (node/p2p.py dial_protocol): a connection libp2p still holds may be dead: drop it.
                    with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                        await libp2p_host.disconnect(destination)
            request = HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=destination.to_bytes()))
            hop_stream, _ = await _hop_exchange(host, relay_addr, request, timeout_s)
            address = multiaddr.Multiaddr(circuit_addr(relay_addr, peer_id))
            raw = RawConnection(
                stream=hop_stream, initiator=True, connection_type=ConnectionType.RELAYED, addresses=[address]
            )
            connection = await libp2p_host.upgrade_outbound_connection(raw, destination)
            # host.new_stream picks among the peer's connections (measured: a direct one when there is one), so the
            # stream may run direct if one opened meanwhile: callers read the real path with stream_path.
            stream = await libp2p_host.new_stream(destination, [TProtocol(protocol)])
    except trio.TooSlowError:
        await _close_connection(connection)
        raise DialError(f"dialling {peer_id} through {relay_addr} timed out after {timeout_s} s") from None
    except CircuitError:
        raise
    except _RELAY_ERRORS as error:
        await _close_connection(connection)
        raise DialError(f"cannot dial {peer_id} through {relay_addr}: {error or type(error).__name__}") from error
    return peer_id, stream


async def _close_connection(connection: INetConn | None) -> None:
    if connection is not None:
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await connection.close()


@attrs.frozen
class RacedStream:
    """The stream that won a direct-versus-relay race, and the path it runs on."""

    peer_id: str
    stream: Stream
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
    late_streams: list[Stream] = []
    failures: list[str] = []
    direct_failed = trio.Event()

    def finish(stream: Stream, nursery: trio.Nursery) -> None:
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
        raise DialError(f"cannot reach {peer_id}: {why}")
    await _close_other_connections(host, winner.stream)
    return winner


async def _close_other_connections(host: P2pHost, stream: Stream) -> None:
    """Close the connections to the stream's peer other than the one it runs on: the losers of a race."""
    peer = stream.muxed_conn.peer_id
    for connection in list(host.libp2p_host.get_network().get_connections(peer)):
        if getattr(connection, "muxed_conn", None) is not stream.muxed_conn:
            await _close_connection(connection)


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
                _forget_dial_failure(host.libp2p_host, destination)
                # The swarm's own dial would return the relayed connection it holds; dial_addr always dials.
                with trio.fail_after(timeout_s):
                    await network.dial_addr(address, destination)
                return
            except (trio.TooSlowError, *_RELAY_ERRORS) as error:
                logger.debug("no direct path to %s at %s yet: %s", peer_id, addr, error or type(error).__name__)


async def _end_relayed_connections(host: P2pHost, peer_id: str) -> None:
    for connection in list(host.libp2p_host.get_network().get_connections(ID.from_base58(peer_id))):
        if is_relayed_connection(connection):
            await _close_connection(connection)


async def keep_connected_with_relay(
    host: P2pHost,
    direct_addrs: Sequence[str],
    relay_addr: str | None,
    peer_id: str,
    connect: Callable[[str, Stream], Awaitable[None]],
    *,
    dial_timeout_s: float = 5.0,
    direct_head_start_s: float = 0.3,
    direct_probe_every_s: float = 30.0,
    backoff_s_min: float = 0.5,
    backoff_s_max: float = 30.0,
) -> NoReturn:
    """Like node.p2p.keep_connected, for one peer reachable at `direct_addrs` and through `relay_addr`: each sync
    stream is raced (direct first), and a relayed session is ended as soon as a direct connection opens, so the next
    one runs direct."""

    async def attempt() -> bool:
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

    await retry_with_backoff(attempt, peer_id, backoff_s_min=backoff_s_min, backoff_s_max=backoff_s_max)
