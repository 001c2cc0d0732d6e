"""Circuit relay v2 on loopback: reserve, dial through the relay, sync end to end, the relay's limits, the
direct-versus-relay race and the move back to a direct path."""

import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

import multiaddr
import pytest
import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID

from node.net.circuit import (
    CircuitError,
    _hop_exchange,
    accept_relayed_connections,
    circuit_addr,
    connection_path,
    keep_reservation,
    reserve,
    stream_path,
)
from node.net.dial import dial_protocol, dial_sync
from node.net.host import DialError, P2pHost, p2p_host
from node.net.relay_path import dial_sync_racing, keep_connected_with_relay
from node.net.relays import RelayChoice
from node.sync.session import SyncSession
from node.trust.identity import DeviceIdentity
from p2p import READ_BYTES
from relay.circuit import CircuitLimits, RelayHost, relay_host
from tests.test_p2p import Side, converged, eventually, seed_ops, trusting

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
ECHO = "/aico/test-echo/1"


async def echo(stream: INetStream) -> None:
    """Send back every byte until the stream ends or breaks."""
    try:
        while data := await stream.read(READ_BYTES):
            await stream.write(data)
    except StreamError:
        return
    await stream.close()


@asynccontextmanager
async def relay_and_hosts(
    count: int, limits: CircuitLimits = CircuitLimits()
) -> AsyncIterator[tuple[RelayHost, list[P2pHost]]]:
    """A relay and `count` device hosts on loopback, each device accepting relayed connections and serving ECHO."""
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(relay_host([LOOPBACK], limits))
        hosts = [await stack.enter_async_context(p2p_host(DeviceIdentity(os.urandom(32)))) for _ in range(count)]
        for host in hosts:
            accept_relayed_connections(host)
            host.libp2p_host.set_stream_handler(ECHO, echo)
        yield relay, hosts


async def round_trip(stream: INetStream, payload: bytes) -> bytes:
    """Write `payload` and read back as many bytes."""
    await stream.write(payload)
    received = b""
    while len(received) < len(payload):
        chunk = await stream.read(READ_BYTES)
        if not chunk:
            break
        received += chunk
    return received


@pytest.mark.trio
async def test_reserve_then_dial_through_the_relay_and_move_bytes_both_ways():
    async with relay_and_hosts(2) as (relay, (a, b)):
        seen_from: list[str] = []

        async def record_and_echo(stream: INetStream) -> None:
            seen_from.append(str(stream.muxed_conn.peer_id))
            await echo(stream)

        b.libp2p_host.set_stream_handler(ECHO, record_and_echo)
        reservation = await reserve(b, relay.addresses[0], timeout_s=5)
        assert reservation.circuit_address == f"{relay.addresses[0]}/p2p-circuit/p2p/{b.peer_id}"
        assert reservation.expires_at_s > 0
        # node.net.host.dial_protocol takes the circuit address like any other peer address.
        peer_id, stream = await dial_protocol(a, reservation.circuit_address, ECHO, timeout_s=5)
        assert peer_id == b.peer_id and stream_path(stream) == "relayed"
        with trio.fail_after(5):
            assert await round_trip(stream, b"ping through the relay") == b"ping through the relay"
            big = os.urandom(300_000)
            assert await round_trip(stream, big) == big
        # Noise runs end to end: B sees A's real peer id, not the relay's.
        assert seen_from == [a.peer_id]
        assert connection_path(a, b.peer_id) == connection_path(b, a.peer_id) == "relayed"
        await stream.close()


@pytest.mark.trio
async def test_sync_runs_end_to_end_through_the_relay_and_an_untrusted_peer_is_still_reset():
    side_a, side_b, stranger = Side(), Side(), Side()
    seed_ops(side_a, side_b)
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(relay_host([LOOPBACK]))
        a, b, s = [await stack.enter_async_context(p2p_host(side.identity)) for side in (side_a, side_b, stranger)]
        accept_relayed_connections(b)
        asked: list[str] = []

        def is_trusted(peer_id: str) -> bool:
            asked.append(peer_id)
            return trusting(side_a)(peer_id)

        b.serve_sync(is_trusted, side_b.serve)
        await reserve(b, relay.addresses[0], timeout_s=5)
        through_relay = circuit_addr(relay.addresses[0], b.peer_id)
        peer_id, stream = await dial_sync(a, through_relay, timeout_s=5)
        assert peer_id == side_b.id
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side_a.run, stream)
            await eventually(lambda: converged(side_a, side_b), 10)
            side_a.replica.set_preference("live", "a")
            side_a.outgoing.notify()
            await side_b.wait_for(lambda: side_b.replica.preferences.get("live") == "a", 5)
            side_b.replica.set_preference("live-back", "b")
            side_b.outgoing.notify()
            await side_a.wait_for(lambda: side_a.replica.preferences.get("live-back") == "b", 5)
            nursery.cancel_scope.cancel()

        _, stream = await dial_sync(s, through_relay, timeout_s=5)
        with trio.fail_after(5), pytest.raises(StreamError):
            await stream.write(SyncSession(stranger.replica).generate())
            await stream.read(READ_BYTES)
    assert asked == [side_a.id, stranger.id]


@pytest.mark.trio
async def test_reservations_beyond_the_limit_are_refused_and_a_departed_peers_slot_is_freed():
    async with relay_and_hosts(4, CircuitLimits(max_reservations=2)) as (relay, hosts):
        relay_addr = relay.addresses[0]
        await reserve(hosts[0], relay_addr, timeout_s=5)
        await reserve(hosts[1], relay_addr, timeout_s=5)
        await reserve(hosts[1], relay_addr, timeout_s=5)  # renewing holds the same slot
        with pytest.raises(CircuitError, match="RESOURCE_LIMIT_EXCEEDED"):
            await reserve(hosts[2], relay_addr, timeout_s=5)
        # A peer may not reserve in another peer's name.
        other_peer = CircuitPeerId(id=ID.from_base58(hosts[3].peer_id).to_bytes())
        spoofed = HopMessage(type=HopMessage.RESERVE, peer=other_peer)
        with pytest.raises(CircuitError, match="PERMISSION_DENIED"):
            await _hop_exchange(hosts[2], relay_addr, spoofed, 5)
        await hosts[0].libp2p_host.disconnect(ID.from_base58(relay.peer_id))
        relay_network = relay.libp2p_host.get_network()
        await eventually(lambda: not relay_network.get_connections(ID.from_base58(hosts[0].peer_id)), 5)
        await reserve(hosts[2], relay_addr, timeout_s=5)


@pytest.mark.trio
async def test_a_circuit_beyond_its_byte_limit_is_cut_and_the_relay_keeps_serving_others():
    async with relay_and_hosts(3, CircuitLimits(bytes_per_circuit=256 * 1024)) as (relay, (a, b, c)):
        await reserve(b, relay.addresses[0], timeout_s=5)
        through_relay = circuit_addr(relay.addresses[0], b.peer_id)
        _, stream = await dial_protocol(a, through_relay, ECHO, timeout_s=5)
        assert await round_trip(stream, b"x" * 50_000) == b"x" * 50_000
        with trio.fail_after(10), pytest.raises(StreamError):
            for _ in range(20):
                await round_trip(stream, b"y" * 50_000)
        _, other = await dial_protocol(c, through_relay, ECHO, timeout_s=5)
        with trio.fail_after(5):
            assert await round_trip(other, b"still served") == b"still served"
        # A's circuit is gone with its connection; a new one has a fresh byte budget.
        await eventually(lambda: connection_path(a, b.peer_id) is None, 5)
        _, again = await dial_protocol(a, through_relay, ECHO, timeout_s=5)
        with trio.fail_after(5):
            assert await round_trip(again, b"z" * 100_000) == b"z" * 100_000


@pytest.mark.trio
async def test_an_idle_circuit_is_cut_at_its_duration_limit(caplog):
    caplog.set_level(logging.INFO, logger="relay.circuit")
    async with relay_and_hosts(2, CircuitLimits(duration_per_circuit_s=1)) as (relay, (a, b)):
        await reserve(b, relay.addresses[0], timeout_s=5)
        _, stream = await dial_protocol(a, circuit_addr(relay.addresses[0], b.peer_id), ECHO, timeout_s=5)
        assert await round_trip(stream, b"before") == b"before"
        # No byte crosses the circuit meanwhile: the relay ends it at its deadline all the same.
        await eventually(lambda: relay.hop.circuits_open == 0, 5)
        # One line for the circuit, though both of its directions were cut.
        ended = [record.getMessage() for record in caplog.records if record.name == "relay.circuit"]
        assert len(ended) == 1 and f"{a.peer_id} -> {b.peer_id}" in ended[0], ended
        assert "reached its duration limit" in ended[0], ended
        with trio.fail_after(5), pytest.raises(StreamError):
            await round_trip(stream, b"after")


@pytest.mark.trio
async def test_circuits_beyond_the_per_peer_and_total_limits_are_refused_and_the_relay_keeps_serving():
    limits = CircuitLimits(max_circuits=2, max_circuits_per_peer=1)
    async with relay_and_hosts(6, limits) as (relay, (a, b, c, d, e, f)):
        relay_addr = relay.addresses[0]
        for host in (b, d):
            await reserve(host, relay_addr, timeout_s=5)
        _, a_to_b = await dial_protocol(a, circuit_addr(relay_addr, b.peer_id), ECHO, timeout_s=5)
        with pytest.raises(CircuitError, match="RESOURCE_LIMIT_EXCEEDED"):
            await dial_protocol(c, circuit_addr(relay_addr, b.peer_id), ECHO, timeout_s=5)  # B is in one already
        _, c_to_d = await dial_protocol(c, circuit_addr(relay_addr, d.peer_id), ECHO, timeout_s=5)
        await reserve(e, relay_addr, timeout_s=5)
        with pytest.raises(CircuitError, match="RESOURCE_LIMIT_EXCEEDED"):
            await dial_protocol(f, circuit_addr(relay_addr, e.peer_id), ECHO, timeout_s=5)  # two circuits in all
        with trio.fail_after(5):
            assert await round_trip(a_to_b, b"a-b") == b"a-b"
            assert await round_trip(c_to_d, b"c-d") == b"c-d"
        assert relay.hop.circuits_refused == 2
        await a.libp2p_host.disconnect(ID.from_base58(b.peer_id))  # ends A's circuit
        await eventually(lambda: relay.hop.circuits_open == 1, 5)
        _, e_to_b = await dial_protocol(e, circuit_addr(relay_addr, b.peer_id), ECHO, timeout_s=5)
        with trio.fail_after(5):
            assert await round_trip(e_to_b, b"e-b") == b"e-b"


@pytest.mark.trio
async def test_the_relay_is_never_a_destination():
    async with relay_and_hosts(1) as (relay, (a,)):
        with pytest.raises(CircuitError, match="NO_RESERVATION"):
            await dial_protocol(a, circuit_addr(relay.addresses[0], relay.peer_id), ECHO, timeout_s=5)
        with pytest.raises(DialError):
            await dial_protocol(a, relay.addresses[0], STOP_PROTOCOL_ID, timeout_s=5)


async def _silent_listener(task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept TCP connections and never speak: a dial to it hangs until its timeout."""

    async def hold(connection: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(hold, listeners)


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.trio
async def test_the_race_takes_direct_when_it_works_and_the_relay_when_direct_hangs_or_fails():
    async with relay_and_hosts(2) as (relay, (a, b)), trio.open_nursery() as nursery:
        relay_addr = relay.addresses[0]
        await reserve(b, relay_addr, timeout_s=5)
        raced = await dial_sync_racing(a, b.addresses, relay_addr, b.peer_id, protocol=ECHO, timeout_s=5)
        assert raced.path == "direct" and raced.peer_id == b.peer_id
        assert await round_trip(raced.stream, b"direct") == b"direct"
        await a.libp2p_host.disconnect(ID.from_base58(b.peer_id))

        silent_port = await nursery.start(_silent_listener)
        hanging = [f"/ip4/127.0.0.1/tcp/{silent_port}/p2p/{b.peer_id}"]
        started = trio.current_time()
        raced = await dial_sync_racing(
            a, hanging, relay_addr, b.peer_id, protocol=ECHO, direct_head_start_s=0.3, timeout_s=5
        )
        elapsed_s = trio.current_time() - started
        assert raced.path == "relayed" and 0.3 <= elapsed_s < 2.0
        assert await round_trip(raced.stream, b"relayed") == b"relayed"
        # The hanging direct dial was cancelled: the relayed connection is the only one.
        assert len(a.libp2p_host.get_network().get_connections(ID.from_base58(b.peer_id))) == 1
        await a.libp2p_host.disconnect(ID.from_base58(b.peer_id))

        refused = [f"/ip4/127.0.0.1/tcp/{_unused_port()}/p2p/{b.peer_id}"]
        started = trio.current_time()
        raced = await dial_sync_racing(
            a, refused, relay_addr, b.peer_id, protocol=ECHO, direct_head_start_s=3.0, timeout_s=5
        )
        assert raced.path == "relayed" and trio.current_time() - started < 2.0  # no waiting out the head start
        await a.libp2p_host.disconnect(ID.from_base58(b.peer_id))
        with pytest.raises(DialError, match="cannot reach"):
            await dial_sync_racing(a, refused, None, b.peer_id, protocol=ECHO, timeout_s=2)
        nursery.cancel_scope.cancel()


async def _forward(listener_port_box: list[int], target_port: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Forward TCP connections from a fresh loopback port (put in `listener_port_box`) to `target_port`."""

    async def pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except trio.BrokenResourceError:
            pass
        with trio.move_on_after(1):
            await sink.aclose()

    async def handle(client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", target_port)
        async with trio.open_nursery() as pipes:
            pipes.start_soon(pipe, client, server)
            pipes.start_soon(pipe, server, client)

    listeners = await trio.open_tcp_listeners(listener_port_box[0], host="127.0.0.1")
    task_status.started()
    await trio.serve_listeners(handle, listeners)


@pytest.mark.trio
async def test_keep_connected_with_relay_moves_to_a_direct_path_when_one_appears():
    async with relay_and_hosts(2) as (relay, (a, b)), trio.open_nursery() as nursery:
        # B's direct address goes through a forwarder that is down at first, as if B were unreachable.
        direct_port = _unused_port()
        b_port = int(multiaddr.Multiaddr(b.addresses[0]).value_for_protocol("tcp"))
        direct = [f"/ip4/127.0.0.1/tcp/{direct_port}/p2p/{b.peer_id}"]
        reservations = []
        relays = RelayChoice([relay.addresses[0]])
        nursery.start_soon(partial(keep_reservation, b, relays, on_change=reservations.append))
        await eventually(lambda: reservations and reservations[-1] is not None, 5)

        paths: list[str] = []

        async def connect(peer_id: str, stream: INetStream) -> None:
            paths.append(stream_path(stream))
            await echo(stream)

        async def hold(peer_id: str, stream: INetStream) -> None:
            await echo(stream)

        b.serve_sync(lambda peer_id: True, hold)

        nursery.start_soon(
            partial(
                keep_connected_with_relay, a, lambda: direct, lambda: relay.addresses[0], b.peer_id, connect,
                direct_head_start_s=0.2, direct_probe_every_s=0.4, dial_timeout_s=2, backoff_s_min=0.1,
            )
        )  # fmt: skip
        await eventually(lambda: paths == ["relayed"], 10)
        await nursery.start(_forward, [direct_port], b_port)
        await eventually(lambda: paths[-1:] == ["direct"], 10)
        assert paths == ["relayed", "direct"]
        assert connection_path(a, b.peer_id) == "direct"
        assert len(a.libp2p_host.get_network().get_connections(ID.from_base58(b.peer_id))) == 1
        nursery.cancel_scope.cancel()
