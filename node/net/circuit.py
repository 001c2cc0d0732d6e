"""The node's circuit relay v2 client: a reservation on a relay, relayed connections in and out, and circuit addresses.

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
from collections.abc import Callable
from typing import Any, Literal, NoReturn

import attrs
import multiaddr
import trio
from google.protobuf.message import DecodeError
from libp2p.abc import INetConn, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Status, StopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID as STOP_PROTOCOL
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from node.net.host import DialError, P2pHost, dial_direct
from node.net.relays import RelayChoice
from p2p import CLOSE_TIMEOUT_S, reset_quietly

Path = Literal["direct", "relayed"]
CIRCUIT_PROTOCOL = "p2p-circuit"
STOP_HANDSHAKE_TIMEOUT_S = 10.0  # bound on a relay's STOP exchange and the Noise + yamux upgrade behind it
RESERVATION_RENEW_FRACTION = 0.5  # renew when half of the granted time is left
RESERVATION_RENEW_MIN_S = 5.0  # never renew more often than this, whatever the relay grants
RELAY_CHECK_EVERY_S = 2.0  # how often a held reservation checks that the connection to the relay still stands
# What a relay or a peer behind it can make a HOP/STOP exchange or upgrade raise.
RELAY_ERRORS = (BaseLibp2pError, OSError, ValueError, DecodeError)

logger = logging.getLogger(__name__)


class CircuitError(DialError):
    """The relay refused a reservation or a circuit, or broke the exchange."""


@attrs.frozen
class Reservation:
    """A slot on a relay: peers reach this node at `circuit_address` until `expires_at_s` (Unix seconds)."""

    relay_addr: str
    circuit_address: str
    expires_at_s: float


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


def stream_path(stream: INetStream) -> Path:
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
                await write_delimited_msg(stream, StopMessage(type=StopMessage.STATUS, status=Status.OK))
                address = multiaddr.Multiaddr(f"/p2p/{relay_id}/{CIRCUIT_PROTOCOL}/p2p/{claimed_initiator}")
                raw = RawConnection(
                    stream=stream, initiator=False, connection_type=ConnectionType.RELAYED, addresses=[address]
                )
                muxed = await libp2p_host.upgrade_inbound_connection(raw, address)
        except (trio.TooSlowError, *RELAY_ERRORS) as error:
            # An error escaping a libp2p stream handler stops the whole swarm: drop only this stream.
            logger.info("relayed connection through %s failed: %s", relay_id, error or type(error).__name__)
            await reset_quietly(stream)
            return
        if muxed.peer_id != claimed_initiator:
            # Noise proved who is really on the other end; a relay that named someone else is lying about the source.
            logger.info("relay %s named %s but Noise proved %s: closed", relay_id, claimed_initiator, muxed.peer_id)
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await muxed.close()

    libp2p_host.set_stream_handler(STOP_PROTOCOL, handle_stop)


async def _hop_exchange(
    host: P2pHost, relay_addr: str, request: HopMessage, timeout_s: float
) -> tuple[INetStream, Any]:
    """Open a HOP stream to the relay, send `request`, and return the stream and the relay's STATUS, within a bound."""
    _, hop_stream = await dial_direct(host, relay_addr, HOP_PROTOCOL, timeout_s=timeout_s)
    try:
        with trio.fail_after(timeout_s):
            await write_delimited_msg(hop_stream, request)
            response = await read_delimited_msg(hop_stream, HopMessage)
    except (trio.TooSlowError, *RELAY_ERRORS) as error:
        await reset_quietly(hop_stream)
        raise CircuitError(f"relay {relay_addr} broke the HOP exchange: {error or type(error).__name__}") from None
    if response.type != HopMessage.STATUS or response.status != Status.OK:
        await reset_quietly(hop_stream)
        status = Status.Name(response.status) if response.status in Status.values() else str(response.status)
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
    relays: RelayChoice,
    *,
    on_change: Callable[[Reservation | None], None] = lambda reservation: None,
    timeout_s: float = 5.0,
    backoff_s_min: float = 0.5,
    backoff_s_max: float = 30.0,
) -> NoReturn:
    """Hold a reservation on the relay in use forever: renew it before it expires and re-reserve when the connection to
    the relay drops (which ends it), moving to the next relay when one cannot be reached; tell `on_change` each time a
    reservation is granted or lost."""
    backoff = backoff_s_min
    while True:
        relay_addr = relays.current
        try:
            reservation = await reserve(host, relay_addr, timeout_s=timeout_s)
        except DialError as error:
            logger.info("reservation on %s: %s", relay_addr, error)
            relays.failed(relay_addr)
            on_change(None)
            # Jitter keeps devices that lost the same relay at once from retrying in step.
            await trio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, backoff_s_max)
            continue
        on_change(reservation)
        backoff = backoff_s_min
        granted_s = reservation.expires_at_s - time.time()
        renew_at = trio.current_time() + max(RESERVATION_RENEW_MIN_S, granted_s * RESERVATION_RENEW_FRACTION)
        while trio.current_time() < renew_at and _relay_connected(host, relay_addr):
            await trio.sleep(min(RELAY_CHECK_EVERY_S, renew_at - trio.current_time()))
        if not _relay_connected(host, relay_addr):
            logger.info("connection to relay %s dropped: reserving again", relay_addr)
            on_change(None)


async def dial_relayed(
    host: P2pHost, relay_addr: str, peer_id: str, protocol: str, *, timeout_s: float
) -> tuple[str, INetStream]:
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
                except RELAY_ERRORS:
                    # A connection libp2p still holds may be dead (node.net.host.dial_direct): drop it.
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
        await close_connection(connection)
        raise DialError(f"dialling {peer_id} through {relay_addr} timed out after {timeout_s} s") from None
    except CircuitError:
        raise
    except RELAY_ERRORS as error:
        await close_connection(connection)
        raise DialError(f"cannot dial {peer_id} through {relay_addr}: {error or type(error).__name__}") from error
    return peer_id, stream


async def close_connection(connection: INetConn | None) -> None:
    if connection is not None:
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await connection.close()
