"""The libp2p transport on loopback: sync between real hosts, the trust gate, Noise only, bounded dials, clean close."""

import os
from collections.abc import Callable
from functools import partial

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.network.exceptions import SwarmException
from libp2p.network.stream.exceptions import StreamEOF, StreamError, StreamReset
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from framing import LENGTH_PREFIX_BYTES, RemoteProtocolError
from node.errors import EndReason
from node.net.dial import dial_sync
from node.net.host import DialError, P2pHost, p2p_host
from node.net.pump import run_session
from node.net.relay_path import keep_connected_with_relay
from node.sync.receiver import Notifier
from node.sync.session import Event, PeerClosed, SessionState, SyncSession
from node.trust.identity import DeviceIdentity
from p2p import READ_BYTES, ListenError
from tests.conftest import make_replica

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


class Side:
    """One device in a test: identity, in-memory replica, and a record of what its sessions saw."""

    def __init__(self, read_timeout_s: float = 5.0) -> None:
        self.identity = DeviceIdentity(os.urandom(32))
        self.read_timeout_s = read_timeout_s
        self.id = self.identity.device_id
        self.replica = make_replica(self.id)
        self.outgoing = Notifier()
        self.outcomes: list[str | RemoteProtocolError] = []
        self.sessions: list[SyncSession] = []
        self._changed = trio.Event()

    async def on_events(self, events: list[Event]) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, stream: INetStream) -> None:
        """Run a sync session over `stream`, recording how it ended."""
        session = SyncSession(self.replica)
        self.sessions.append(session)
        try:
            self.outcomes.append(
                await run_session(
                    stream, session, on_events=self.on_events, outgoing=self.outgoing,
                    read_timeout_s=self.read_timeout_s, refresh_every_s=1.0,
                )
            )
        except RemoteProtocolError as error:
            self.outcomes.append(error)
            raise

    async def serve(self, peer_id: str, stream: INetStream) -> None:
        await self.run(stream)

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Wait, within `timeout_s`, until `predicate` holds after some session event."""
        with trio.fail_after(timeout_s):
            while not predicate():
                await self._changed.wait()


def trusting(*sides: Side) -> Callable[[str], bool]:
    return lambda peer_id: peer_id in {side.id for side in sides}


def converged(*sides: Side) -> bool:
    first = sides[0].replica
    return all(side.replica.digest() == first.digest() and side.replica.vector == first.vector for side in sides)


async def eventually(predicate: Callable[[], bool], timeout_s: float) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.01)


def port_of(host: P2pHost) -> int:
    return int(multiaddr.Multiaddr(host.addresses[0]).value_for_protocol("tcp"))


def seed_ops(a: Side, b: Side, count: int = 40) -> None:
    for i in range(count):
        a.replica.set_preference(f"k{i}", i)
        b.replica.add_message(f"m{i}", {"conversation": "c", "role": "user", "text": f"t{i}", "ts_ms": i})


@pytest.mark.trio
async def test_two_hosts_converge_then_push_live_ops():
    a, b = Side(), Side()
    seed_ops(a, b)
    async with p2p_host(a.identity) as host_a, p2p_host(b.identity) as host_b:
        assert host_a.peer_id == a.id and host_b.peer_id == b.id
        assert host_b.addresses and all(
            addr.startswith("/ip4/127.0.0.1/tcp/") and addr.endswith(f"/p2p/{b.id}") for addr in host_b.addresses
        )
        host_b.serve_sync(trusting(a), b.serve)
        started = trio.current_time()
        peer_id, stream = await dial_sync(host_a, host_b.addresses[0], timeout_s=5)
        print(f"\nconnect + sync stream on loopback: {(trio.current_time() - started) * 1000:.1f} ms")
        assert peer_id == b.id
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.run, stream)
            await eventually(lambda: converged(a, b), 5)
            assert a.replica.vector.get(b.id) == 40 and b.replica.preferences.get("k39") == 39

            started = trio.current_time()
            a.replica.set_preference("live", "yes")
            a.outgoing.notify()
            await b.wait_for(lambda: b.replica.preferences.get("live") == "yes", 2)
            print(f"live op A -> B on loopback: {(trio.current_time() - started) * 1000:.2f} ms")
            nursery.cancel_scope.cancel()  # A leaves: its session tells B why before the stream closes
        await eventually(lambda: len(b.outcomes) == 1, 2)
    assert a.outcomes == [] and "the peer ended the session: closed" in b.outcomes[0]


@pytest.mark.trio
async def test_a_session_stopped_right_after_a_write_still_acknowledges_what_it_wrote():
    # As `pair join` stops its node once the last write is on disk, before the pump has sent that write's ACK: the
    # inviter then counted the joined device as lacking those ops until it next connected.
    a, b = Side(), Side()
    seed_ops(a, b)
    stopping = trio.CancelScope()

    async def write_then_stop(events: list[Event]) -> None:
        if a.replica.vector.get(b.id) == 40:
            stopping.cancel()

    a.on_events = write_then_stop
    async with p2p_host(a.identity) as host_a, p2p_host(b.identity) as host_b:
        host_b.serve_sync(trusting(a), b.serve)
        _, stream = await dial_sync(host_a, host_b.addresses[0], timeout_s=5)
        with stopping:
            await a.run(stream)
        await eventually(lambda: len(b.outcomes) == 1, 5)
    assert a.replica.vector.get(b.id) == 40 and b.sessions[0].peer_vector.get(b.id) == 40


@pytest.mark.trio
async def test_a_stream_from_an_untrusted_peer_is_reset_before_any_data():
    b, stranger = Side(), Side()
    asked: list[str] = []
    served: list[str] = []

    def is_trusted(peer_id: str) -> bool:
        asked.append(peer_id)
        return False

    async def on_stream(peer_id: str, stream: INetStream) -> None:
        served.append(peer_id)

    async with p2p_host(b.identity) as host_b, p2p_host(stranger.identity) as host_s:
        host_b.serve_sync(is_trusted, on_stream)
        _, stream = await dial_sync(host_s, host_b.addresses[0], timeout_s=5)
        hello = SyncSession(stranger.replica).generate()
        # libp2p reports B's reset to the reader as a reset or, once it has dropped the stream, as its end.
        with trio.fail_after(2), pytest.raises(StreamError):
            await stream.write(hello)
            await stream.read(READ_BYTES)
    assert asked == [stranger.id] and served == []


@pytest.mark.trio
async def test_a_failing_stream_handler_drops_only_its_stream():
    a, b = Side(), Side()
    calls: list[str] = []

    async def on_stream(peer_id: str, stream: INetStream) -> None:
        calls.append(peer_id)
        if len(calls) == 1:
            raise ValueError("a bug in the node")
        await b.run(stream)

    async with p2p_host(a.identity) as host_a, p2p_host(b.identity) as host_b:
        host_b.serve_sync(trusting(a), on_stream)
        _, stream = await dial_sync(host_a, host_b.addresses[0], timeout_s=5)
        with trio.fail_after(2), pytest.raises(StreamError):
            await stream.read(READ_BYTES)
        _, stream = await dial_sync(host_a, host_b.addresses[0], timeout_s=5)
        with trio.fail_after(2):
            assert await stream.read(READ_BYTES)  # B's HELLO: the host still serves
        await stream.reset()
    assert calls == [a.id, a.id]


def raw_host(secure_plaintext_only: bool) -> IHost:
    """A libp2p host built outside node.net.host: plaintext-only security, or libp2p's default security options."""
    key_pair = create_new_key_pair(seed=os.urandom(32))
    plaintext = {PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)} if secure_plaintext_only else None
    return new_host(
        key_pair=key_pair,
        sec_opt=plaintext,
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )


@pytest.mark.trio
async def test_a_plaintext_dialer_is_refused():
    b = Side()
    plain, default = raw_host(secure_plaintext_only=True), raw_host(secure_plaintext_only=False)
    listen = [multiaddr.Multiaddr(LOOPBACK)]
    try:
        async with p2p_host(b.identity) as host_b, plain.run(listen), default.run(listen):
            # Control: a host with libp2p's default security options lets this plaintext dialer in.
            with trio.fail_after(5):
                await plain.connect(info_from_p2p_addr(default.get_addrs()[0]))
            assert default.get_id() in plain.get_connected_peers()

            with trio.fail_after(5), pytest.raises(SwarmException):
                await plain.connect(info_from_p2p_addr(multiaddr.Multiaddr(host_b.addresses[0])))
            assert plain.get_id() not in host_b.libp2p_host.get_connected_peers()
    finally:
        await plain.close()
        await default.close()


@pytest.mark.trio
async def test_dialling_a_peer_that_accepts_tcp_but_never_speaks_times_out():
    a = Side()
    accepted: list[trio.SocketStream] = []

    async def never_answer(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()  # ended by the nursery's cancellation below

    async with p2p_host(a.identity) as host_a, trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, never_answer, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        started = trio.current_time()
        with pytest.raises(DialError, match="timed out after 2"):
            await dial_sync(host_a, f"/ip4/127.0.0.1/tcp/{port}/p2p/{Side().id}", timeout_s=2)
        elapsed = trio.current_time() - started
        assert accepted and 2 <= elapsed < 3
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_closing_the_host_stops_the_listener():
    async with p2p_host(Side().identity) as host:
        port = port_of(host)
        with trio.fail_after(2):
            await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
    with trio.fail_after(2), pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


@pytest.mark.trio
async def test_a_second_host_on_a_port_in_use_is_refused():
    async with p2p_host(Side().identity) as host:
        with pytest.raises(ListenError, match="cannot listen"):
            async with p2p_host(Side().identity, [f"/ip4/127.0.0.1/tcp/{port_of(host)}"]):
                pass


@pytest.mark.trio
async def test_a_malformed_frame_ends_that_session_only():
    a, b, c = Side(), Side(), Side()
    seed_ops(a, b, count=5)
    async with (
        p2p_host(a.identity) as host_a,
        p2p_host(b.identity) as host_b,
        p2p_host(c.identity) as host_c,
        trio.open_nursery() as nursery,
    ):
        host_b.serve_sync(trusting(a, c), b.serve)
        _, stream_a = await dial_sync(host_a, host_b.addresses[0], timeout_s=5)
        nursery.start_soon(a.run, stream_a)
        await eventually(lambda: converged(a, b), 5)

        _, stream_c = await dial_sync(host_c, host_b.addresses[0], timeout_s=5)
        await stream_c.write((1).to_bytes(LENGTH_PREFIX_BYTES, "big") + b"\xc1")  # 0xc1 is never valid msgpack
        reader = SyncSession(c.replica)
        events: list[Event] = []
        with trio.fail_after(3):
            while reader.state is not SessionState.CLOSED:
                events += reader.receive_data(await stream_c.read(READ_BYTES))
            with pytest.raises((StreamEOF, StreamReset)):
                await stream_c.read(READ_BYTES)
        assert [e.reason for e in events if isinstance(e, PeerClosed)] == [EndReason.MALFORMED_FRAME]
        await eventually(lambda: len(b.outcomes) == 1, 2)
        assert isinstance(b.outcomes[0], RemoteProtocolError) and b.outcomes[0].reason is EndReason.MALFORMED_FRAME

        a.replica.set_preference("after", 1)
        a.outgoing.notify()
        await b.wait_for(lambda: b.replica.preferences.get("after") == 1, 2)
        assert converged(a, b) and b.replica.vector.get(c.id) is None
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_silent_peer_is_told_why_and_dropped():
    b, quiet = Side(read_timeout_s=0.5), Side()
    async with p2p_host(b.identity) as host_b, p2p_host(quiet.identity) as host_q:
        host_b.serve_sync(trusting(quiet), b.serve)
        started = trio.current_time()  # before B's session starts counting the silence
        _, stream = await dial_sync(host_q, host_b.addresses[0], timeout_s=5)
        reader = SyncSession(quiet.replica)
        events: list[Event] = []
        with trio.fail_after(3):
            while reader.state is not SessionState.CLOSED:
                events += reader.receive_data(await stream.read(READ_BYTES))
        assert 0.5 <= trio.current_time() - started < 1.5
        assert [e.detail for e in events if isinstance(e, PeerClosed)] == ["no data from the peer for 0.5 s"]
        await eventually(lambda: b.outcomes == ["no data from the peer for 0.5 s"], 2)


@pytest.mark.trio
async def test_a_peer_that_went_down_is_dialled_as_soon_as_it_is_back_elsewhere():
    a, b = Side(), Side()
    async with p2p_host(a.identity) as host_a:
        async with p2p_host(b.identity) as host_b:
            host_b.serve_sync(trusting(a), b.serve)
            _, stream = await dial_sync(host_a, host_b.addresses[0], timeout_s=3)
            await stream.reset()
            address = host_b.addresses[0]
        await eventually(lambda: not host_a.libp2p_host.get_connected_peers(), 2)  # A noticed: B is down
        with pytest.raises(DialError, match="cannot dial"):
            await dial_sync(host_a, address, timeout_s=3)  # refused
        async with p2p_host(b.identity) as host_b:  # back, on another port
            host_b.serve_sync(trusting(a), b.serve)
            assert host_b.addresses[0] != address
            peer_id, stream = await dial_sync(host_a, host_b.addresses[0], timeout_s=3)
            await stream.reset()
            assert peer_id == b.id


@pytest.mark.trio
async def test_a_connection_lost_without_a_close_is_replaced_on_the_next_dial():
    a, b = Side(), Side()
    lost = trio.Event()

    async def relay(client: trio.SocketStream) -> None:
        """Forward to B until `lost`, then swallow everything and keep the sockets open, like a vanished network."""
        async with await trio.open_tcp_stream("127.0.0.1", port_of(host_b)) as upstream:
            async with trio.open_nursery() as pipes:
                for source, sink in ((client, upstream), (upstream, client)):
                    pipes.start_soon(pipe, source, sink)
                await lost.wait()
                pipes.cancel_scope.cancel()
            await trio.sleep_forever()  # ended by the nursery's cancellation below

    async def pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        async for chunk in source:
            await sink.send_all(chunk)

    async with p2p_host(a.identity) as host_a, p2p_host(b.identity) as host_b, trio.open_nursery() as nursery:
        host_b.serve_sync(trusting(a), b.serve)
        listeners = await nursery.start(partial(trio.serve_tcp, relay, 0, host="127.0.0.1"))
        relay_port = listeners[0].socket.getsockname()[1]
        _, stream = await dial_sync(host_a, f"/ip4/127.0.0.1/tcp/{relay_port}/p2p/{b.id}", timeout_s=3)
        await stream.reset()
        lost.set()
        with pytest.raises(DialError, match="timed out"):  # libp2p reuses the lost connection for B
            await dial_sync(host_a, host_b.addresses[0], timeout_s=1)
        peer_id, stream = await dial_sync(host_a, host_b.addresses[0], timeout_s=1)
        await stream.reset()
        assert peer_id == b.id
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_keep_connected_redials_a_peer_that_restarts():
    a, b = Side(), Side()
    seed_ops(a, b, count=5)
    sessions: list[str] = []

    async def connect(peer_id: str, stream: INetStream) -> None:
        sessions.append(peer_id)
        await a.run(stream)

    async with p2p_host(a.identity) as host_a, trio.open_nursery() as nursery:
        async with p2p_host(b.identity) as host_b:
            host_b.serve_sync(trusting(a), b.serve)
            address, port = host_b.addresses[0], port_of(host_b)
            backoff = {"dial_timeout_s": 2, "backoff_s_min": 0.05, "backoff_s_max": 0.2}
            keep = partial(keep_connected_with_relay, host_a, lambda: [address], lambda: None, host_b.peer_id, connect)
            nursery.start_soon(partial(keep, **backoff))
            await eventually(lambda: converged(a, b), 5)
        a.replica.set_preference("while-down", 1)
        # B stays down until A has seen its connection go: A then redials into the void.
        await eventually(lambda: not host_a.libp2p_host.get_network().get_connections(host_b.libp2p_host.get_id()), 5)
        async with p2p_host(b.identity, [f"/ip4/127.0.0.1/tcp/{port}"]) as host_b:
            host_b.serve_sync(trusting(a), b.serve)
            await eventually(lambda: b.replica.preferences.get("while-down") == 1, 5)
        assert sessions.count(b.id) >= 2
        nursery.cancel_scope.cancel()
