"""The relay's circuit relay v2 HOP service: reservations and circuits under resource limits, never a destination.

What py-libp2p 0.8.1's `CircuitV2Protocol` enforces by itself, read in its source and measured in
tests/relay/test_circuit.py:
- `max_reservations` (`RelayLimits.max_reservations`): a RESERVE beyond it gets RESOURCE_LIMIT_EXCEEDED. But a
  reservation keeps its slot until its TTL even after its peer disconnected, and any peer may RESERVE naming another
  peer id (the optional `peer` field), taking slots in that peer's name; `LimitedHop` fixes both.
- `max_circuit_conns`: concurrent circuits per *destination* (and per source only when the source holds a reservation
  too). There is no total cap; `LimitedHop` adds `max_circuits` and counts sources without a reservation.
- Bytes: a circuit-wide budget (both directions) checked per forwarded chunk; the chunk that would exceed it resets
  both streams. Enforced.
- Duration: checked only when a chunk arrives, so an idle circuit outlives its limit forever; `LimitedHop` enforces it
  with a deadline that also ends idle circuits.
- Its forwarding loop keys live circuits by peer id, so when one of two circuits to the same destination ends it
  closes the other's streams; `LimitedHop` forwards with its own loop that only touches its own two streams.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import attrs
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits

from p2p import StreamGone, close_quietly, read_chunk, reset_quietly, running_host, write_within
from relay.key import SEED_BYTES

logger = logging.getLogger(__name__)

FORWARD_READ_BYTES = 64 * 1024  # one forwarded chunk's bound
WRITE_TIMEOUT_S = 10.0  # a destination that takes no data for this long ends its circuit


@attrs.frozen
class CircuitLimits:
    """What the relay grants: reservations, concurrent circuits, and each circuit's bytes (both ways) and lifetime."""

    max_reservations: int = 128
    reservation_ttl_s: int = 3600
    max_circuits: int = 256  # concurrent circuits on this relay
    max_circuits_per_peer: int = 8  # concurrent circuits a peer takes part in, as source or destination
    bytes_per_circuit: int = 128 * 1024 * 1024  # 0: unlimited
    duration_per_circuit_s: int = 3600  # 0: unlimited


class LimitedHop(CircuitV2Protocol):
    """py-libp2p's HOP handler with the limits it lacks: total and per-peer circuits, idle deadlines, no spoofed
    reservations, and reservations that lapse when their peer disconnects."""

    def __init__(self, libp2p_host: IHost, limits: CircuitLimits) -> None:
        super().__init__(
            libp2p_host,
            RelayLimits(
                duration=limits.duration_per_circuit_s,
                data=limits.bytes_per_circuit,
                max_circuit_conns=limits.max_circuits_per_peer,
                max_reservations=limits.max_reservations,
                reservation_ttl=limits.reservation_ttl_s,
            ),
            allow_hop=True,
        )
        self.circuit_limits = limits
        self.circuits_by_peer: Counter[ID] = Counter()
        self.circuits_open = 0
        self.circuits_refused = 0
        # Why each open circuit ended, keyed by its source's HOP stream: the first direction to end says it, and
        # `_handle_connect` logs it as the circuit's one line.
        self._end_reasons: dict[INetStream, str | None] = {}

    async def _handle_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        remote = stream.muxed_conn.peer_id
        if msg.HasField("peer") and msg.peer.id and ID(msg.peer.id) != remote:
            # Only the connection's own peer may hold a reservation: a named other peer would take slots in its name.
            await self._send_status(stream, StatusCode.PERMISSION_DENIED, "a peer may only reserve for itself")
            return
        self._drop_reservations_of_disconnected_peers()
        await super()._handle_reserve(stream, msg)

    def _drop_reservations_of_disconnected_peers(self) -> None:
        # The spec ties a reservation to the peer's connection to the relay; the library keeps it until its TTL.
        reservations = self.resource_manager._reservations
        network = self.host.get_network()
        for peer_id in [peer_id for peer_id in reservations if not network.get_connections(peer_id)]:
            del reservations[peer_id]

    async def _handle_connect(self, stream: INetStream, msg: HopMessage) -> None:
        source, destination = stream.muxed_conn.peer_id, ID(msg.peer.id)
        limits = self.circuit_limits
        if (
            self.circuits_open >= limits.max_circuits
            or self.circuits_by_peer[source] >= limits.max_circuits_per_peer
            or self.circuits_by_peer[destination] >= limits.max_circuits_per_peer
        ):
            self.circuits_refused += 1
            await self._send_status(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "too many circuits")
            # Closed, not reset: measured, a reset right after the STATUS can discard it before the peer reads it.
            await close_quietly(stream)
            return
        self.circuits_open += 1
        self.circuits_by_peer[source] += 1
        self.circuits_by_peer[destination] += 1
        self._end_reasons[stream] = None
        started_s = time.monotonic()
        try:
            await super()._handle_connect(stream, msg)
        finally:
            self.circuits_open -= 1
            self.circuits_by_peer[source] -= 1
            self.circuits_by_peer[destination] -= 1
            # Entries the library keeps per peer id for its own cleanup, which this class's forwarding never uses.
            self._active_relays.pop(source, None)
            self._active_relays.pop(destination, None)
            reason = self._end_reasons.pop(stream, None) or "not opened: the destination did not take it"
            logger.info("circuit %s -> %s ended after %.1f s: %s", source, destination, time.monotonic() - started_s, reason)

    def _circuit_ended(self, streams: tuple[INetStream, INetStream], reason: str) -> None:
        """Keep the first reason either direction gives for the circuit these streams belong to."""
        for stream in streams:
            if stream in self._end_reasons and self._end_reasons[stream] is None:
                self._end_reasons[stream] = reason

    async def _relay_data(
        self,
        src_stream: INetStream,
        dst_stream: INetStream,
        peer_id: ID,
        deadline: float | None = None,
        circuit_data_limit: list[int] | None = None,
    ) -> None:
        """Forward one direction of a circuit until either side ends it or a limit is reached, then end both ways."""
        # `deadline` is on time.monotonic(); the library only checks it when a chunk arrives, this scope also when idle.
        seconds_left = float("inf") if deadline is None else max(0.0, deadline - time.monotonic())
        ended_cleanly = False
        streams = (src_stream, dst_stream)
        with trio.move_on_after(seconds_left) as lifetime:
            try:
                while data := await read_chunk(src_stream, FORWARD_READ_BYTES):
                    if circuit_data_limit is not None:
                        if len(data) > circuit_data_limit[0]:
                            self._circuit_ended(streams, "reached its byte limit: reset")
                            break
                        circuit_data_limit[0] -= len(data)
                    await write_within(dst_stream, data, WRITE_TIMEOUT_S)
                else:
                    ended_cleanly = True
                    self._circuit_ended(streams, f"closed by {peer_id}")
            except StreamGone as error:
                self._circuit_ended(streams, f"the stream of {peer_id} ended ({error})")
        if lifetime.cancelled_caught:
            self._circuit_ended(streams, "reached its duration limit: reset")
        # Ending both streams also ends the other direction's read, so the circuit ends as one.
        for stream in (src_stream, dst_stream):
            if ended_cleanly:
                await close_quietly(stream)
            else:
                await reset_quietly(stream)


def enable_hop(libp2p_host: IHost, limits: CircuitLimits) -> LimitedHop:
    """Make `libp2p_host` a circuit relay v2 HOP under `limits` (it registers no STOP handler: never a destination)."""
    hop = LimitedHop(libp2p_host, limits)

    async def handle_hop(stream: INetStream) -> None:
        try:
            await hop._handle_hop_stream(stream)
        except Exception:
            # An error escaping a libp2p stream handler stops the whole swarm: drop only this stream.
            logger.exception("HOP stream from %s failed", stream.muxed_conn.peer_id)
            await reset_quietly(stream)

    libp2p_host.set_stream_handler(HOP_PROTOCOL, handle_hop)
    return hop


@attrs.frozen
class RelayHost:
    """A running relay: its libp2p host, its HOP service, and the multiaddrs devices reserve and dial through."""

    libp2p_host: IHost
    hop: LimitedHop

    @property
    def peer_id(self) -> str:
        """The relay's peer id."""
        return str(self.libp2p_host.get_id())

    @property
    def addresses(self) -> list[str]:
        """The relay's multiaddrs, each ending in `/p2p/<relay id>`."""
        return [str(addr) for addr in self.libp2p_host.get_addrs()]


@asynccontextmanager
async def relay_host(
    listen_addrs: Sequence[str], limits: CircuitLimits = CircuitLimits(), *, seed: bytes | None = None
) -> AsyncIterator[RelayHost]:
    """Run a circuit relay v2 HOP on `listen_addrs` under `limits`, and close it (listener included) on exit."""
    async with running_host(seed or os.urandom(SEED_BYTES), listen_addrs) as libp2p_host:
        yield RelayHost(libp2p_host, enable_hop(libp2p_host, limits))
