"""The libp2p transport of sync: a Noise + yamux host under the device key, the `/aico/sync/1` trust gate, dialling,
the session pump and reconnection.

The libp2p 0.8.1 workarounds cited below are measured in /work/shared/PLATFORM.md ("libp2p 0.8.1 (trio)") or, where
marked "measured here", were found while writing this module and are exercised by tests/test_p2p.py.
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from enum import Enum
from typing import NoReturn, cast

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from node.errors import NodeError, RemoteProtocolError
from node.identity import DeviceIdentity
from node.session import Event, OpsApplied, PeerClosed, SessionState, SyncSession
from relay.host import reset_quietly
from relay.stream_credit import batch_yamux_receive_credit

SYNC_PROTOCOL = TProtocol("/aico/sync/1")
DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)
READ_BYTES = 64 * 1024  # one read's bound; a frame larger than this arrives over several reads
INBOX_CHUNKS_MAX = 32  # reads (up to 2 MiB) the reader may take ahead of the pump
CLOSE_TIMEOUT_S = 2.0  # bound on closing or resetting a stream and on closing the host
# Applied ops that wait for the persist in flight: one fsync for ~25 full batches. At 20k the pump stalled behind slow
# fsyncs (0.1-0.5 s on this disk); the bound is memory: about 300 bytes of rows per op waiting.
GROUP_OPS_MAX = 50_000

Stream = INetStream
logger = logging.getLogger(__name__)


class P2pError(NodeError):
    """The libp2p host could not start, listen or serve."""


class DialError(P2pError):
    """A peer could not be reached, or did not open a sync stream in time."""


class P2pHost:
    """A running libp2p host that speaks Noise and yamux only, under this device's peer id."""

    def __init__(self, libp2p_host: IHost) -> None:
        self.libp2p_host = libp2p_host
        self.peer_id = str(libp2p_host.get_id())
        self.relayed_addresses: list[str] = []  # where a relay that holds a reservation for this node reaches it

    @property
    def addresses(self) -> list[str]:
        """The multiaddrs peers can dial, each ending in `/p2p/<peer id>`: direct ones first, then relayed ones."""
        return [str(addr) for addr in self.libp2p_host.get_addrs()] + self.relayed_addresses

    def serve_sync(
        self, is_trusted: Callable[[str], bool], on_stream: Callable[[str, Stream], Awaitable[None]]
    ) -> None:
        """Accept `/aico/sync/1` streams: reset those from untrusted peer ids unread, hand the rest to `on_stream`
        (which owns them: `run_session` closes its stream)."""

        async def handle(stream: INetStream) -> None:
            peer_id = str(stream.muxed_conn.peer_id)
            if not is_trusted(peer_id):
                # DESIGN.md: a stream from a peer that is not a trusted, unrevoked device is reset before any data.
                logger.info("reset a sync stream from untrusted peer %s", peer_id)
                await reset_quietly(stream)
                return
            try:
                await on_stream(peer_id, stream)
            except RemoteProtocolError as error:
                logger.info("sync session with %s refused the peer's data: %s", peer_id, error)
            except Exception:
                # Measured here: an error escaping a libp2p stream handler stops the whole swarm and comes out of
                # host.run(), ending the host: log it and drop only this stream.
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


def _build_host(identity: DeviceIdentity) -> IHost:
    # PLATFORM.md: create_new_key_pair(seed=...) gives the same Ed25519 key as nacl's SigningKey(seed).
    key_pair = create_new_key_pair(seed=identity.seed)
    # The library's per-read WINDOW_UPDATE costs a frame per read, on a relayed connection one more relayed message.
    batch_yamux_receive_credit()
    host = new_host(
        key_pair=key_pair,
        # Noise only: libp2p's default security options also accept a plaintext dialer (PLATFORM.md).
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)},
        # yamux only: mplex stalled and reset under a 10 MB echo (PLATFORM.md).
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        # The default of 3 connections per peer adds a fixed 250 ms wait to every connect (PLATFORM.md).
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    if str(host.get_id()) != identity.device_id:
        raise P2pError(f"libp2p derived peer id {host.get_id()} from the device key, expected {identity.device_id}")
    return host


def _parse_listen_addr(text: str) -> multiaddr.Multiaddr:
    try:
        addr = multiaddr.Multiaddr(text)
    except ValueError as error:
        raise P2pError(f"{text!r} is not a multiaddr: {error}") from None
    if "tcp" not in {protocol.name for protocol in addr.protocols()}:
        raise P2pError(f"{text} is not a TCP multiaddr; this node listens on TCP only")
    return addr


def _check_port_free(addr: multiaddr.Multiaddr) -> None:
    # Measured here: libp2p 0.8.1 listens with SO_REUSEPORT (for hole punching), so a second node on a port in use
    # would silently share it, the kernel splitting connections between them. A plain bind fails on a port with a
    # listener; SO_REUSEADDR keeps connections left in TIME_WAIT by a restart on the same port from counting.
    port = int(addr.value_for_protocol("tcp"))
    if port == 0:
        return
    family, ip = socket.AF_INET, None
    for protocol in addr.protocols():
        if protocol.name in ("ip4", "ip6"):
            family = socket.AF_INET if protocol.name == "ip4" else socket.AF_INET6
            ip = addr.value_for_protocol(protocol.name)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((ip or "", port))
        except OSError as error:
            raise P2pError(f"cannot listen on {addr}: {error.strerror}") from None


@asynccontextmanager
async def p2p_host(identity: DeviceIdentity, listen_addrs: Sequence[str] = DEFAULT_LISTEN) -> AsyncIterator[P2pHost]:
    """Run a host under `identity` listening on `listen_addrs`, and close it (listener included) on exit."""
    addrs = [_parse_listen_addr(text) for text in listen_addrs]
    for addr in addrs:
        _check_port_free(addr)
    host = _build_host(identity)
    failure: Exception | None = None
    try:
        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(host.run(addrs))
            except (BaseLibp2pError, OSError) as error:
                raise P2pError(f"cannot listen on {', '.join(listen_addrs)}: {error}") from error
            try:
                yield P2pHost(host)
            except Exception as error:
                # Re-raised below, outside host.run()'s nurseries, so callers see it rather than nested ExceptionGroups.
                failure = error
    finally:
        # PLATFORM.md: leaving host.run() leaves the listener accepting; only host.close() stops it. Shielded so a
        # cancelled node still releases its port.
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await host.close()
    if failure is not None:
        raise failure


def _forget_dial_failure(host: IHost, peer_id: ID) -> None:
    # Measured here: after one failed dial, libp2p 0.8.1 refuses every dial to that peer for 60 s ("negative
    # cache"), which would keep a restarted peer unreachable; the caller's backoff is the retry policy instead.
    cast(Swarm, host.get_network())._negative_peer_cache.evict(str(peer_id))


async def dial_sync(host: P2pHost, peer_addr: str, *, timeout_s: float) -> tuple[str, Stream]:
    """Connect to `peer_addr` (ending in `/p2p/<peer id>`) and open a sync stream, all within `timeout_s`."""
    return await dial_protocol(host, peer_addr, SYNC_PROTOCOL, timeout_s=timeout_s)


async def dial_protocol(host: P2pHost, peer_addr: str, protocol: str, *, timeout_s: float) -> tuple[str, Stream]:
    """Connect to `peer_addr` (ending in `/p2p/<peer id>`, possibly through a relay: `.../p2p-circuit/p2p/<peer id>`)
    and open a `protocol` stream, all within `timeout_s`."""
    if "/p2p-circuit" in peer_addr:
        # Measured: the swarm never dials a relay address; node.relay_path speaks circuit relay v2 itself. Imported
        # here because node.relay_path builds on this module.
        from node.relay_path import dial_relayed, split_circuit_addr

        relay_addr, peer_id = split_circuit_addr(peer_addr)
        return await dial_relayed(host, relay_addr, peer_id, protocol, timeout_s=timeout_s)
    try:
        info = info_from_p2p_addr(multiaddr.Multiaddr(peer_addr))
    except ValueError as error:
        raise DialError(f"{peer_addr!r} is not a multiaddr ending in /p2p/<peer id>: {error}") from None
    peer_id = str(info.peer_id)
    if peer_id == host.peer_id:
        raise DialError(f"{peer_addr} is this node itself")
    libp2p_host = host.libp2p_host
    # Measured here: libp2p dials at most one stored TCP address per peer, and stored addresses outlive a peer's
    # restart on another port; dial exactly the address given.
    libp2p_host.get_peerstore().clear_addrs(info.peer_id)
    _forget_dial_failure(libp2p_host, info.peer_id)
    reused = bool(libp2p_host.get_network().get_connections(info.peer_id))
    try:
        # PLATFORM.md: a peer that accepts TCP but never speaks makes a dial hang ~120 s; bound it here.
        with trio.fail_after(timeout_s):
            await libp2p_host.connect(info)
            stream = await libp2p_host.new_stream(info.peer_id, [protocol])
    except (trio.TooSlowError, BaseLibp2pError, OSError) as error:
        if reused:
            # Measured here: host.connect() returns at once on any connection libp2p still holds, even one closed
            # ~0.1 s ago or whose network vanished without a close, so every later dial would fail on it too: drop it.
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await libp2p_host.disconnect(info.peer_id)
        if isinstance(error, trio.TooSlowError):
            raise DialError(f"dialling {peer_addr} timed out after {timeout_s} s") from None
        raise DialError(f"cannot dial {peer_addr}: {error}") from error
    return peer_id, stream


class Notifier:
    """Wakes every session waiting on it when local ops were committed; call `notify` from the trio thread."""

    def __init__(self) -> None:
        self.version = 0
        self._changed = trio.Event()

    def notify(self) -> None:
        """Tell waiting sessions that there are new local ops to send."""
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, seen: int) -> int:
        """Wait until notified after version `seen` (at once if already so), and return the current version."""
        # A version, not a bare event, so a notify that lands while the waiter is busy sending is not lost.
        if self.version == seen:
            await self._changed.wait()
        return self.version


class _Wake(Enum):
    """Reasons, other than data from the peer, for the pump to act."""

    LOCAL_OPS = "local ops"
    REFRESH = "refresh"
    PERSISTED = "persisted"  # a write of applied ops finished


class _StreamGone(Exception):
    """The stream can no longer carry data (reset, failed, or the peer stopped taking it)."""


# What the pump acts on: a chunk from the peer (b"" at end of stream), a wake-up, or the error that broke the stream.
Message = bytes | _Wake | StreamError
Inbox = trio.MemorySendChannel[Message]


async def _read_stream(stream: INetStream, inbox: Inbox) -> None:
    """Forward chunks from the peer into `inbox`, then b"" at end of stream or the error that ended it."""
    try:
        while data := await stream.read(READ_BYTES):
            await inbox.send(data)
        await inbox.send(b"")
    except StreamEOF:
        await inbox.send(b"")
    except StreamError as error:
        await inbox.send(error)


async def _wake_on_local_ops(outgoing: Notifier, inbox: Inbox) -> NoReturn:
    """Tell the pump each time local ops were committed."""
    seen = outgoing.version
    while True:
        seen = await outgoing.wait(seen)
        await inbox.send(_Wake.LOCAL_OPS)


async def _wake_to_refresh(every_s: float, inbox: Inbox) -> NoReturn:
    """Tell the pump to refresh every `every_s` seconds."""
    while True:
        await trio.sleep(every_s)
        await inbox.send(_Wake.REFRESH)


async def _write(stream: INetStream, data: bytes, write_timeout_s: float) -> None:
    """Write one frame; raise _StreamGone if the stream cannot take it."""
    try:
        with trio.fail_after(write_timeout_s):
            await stream.write(data)
    except trio.TooSlowError:
        raise _StreamGone(f"the peer took no data for {write_timeout_s} s") from None
    except StreamError as error:
        raise _StreamGone(f"stream failed while writing: {error or type(error).__name__}") from None


async def _flush(stream: INetStream, session: SyncSession, write_timeout_s: float) -> None:
    """Write every frame the session has to send; raise _StreamGone if the stream cannot take them."""
    while (data := session.generate()) is not None:
        await _write(stream, data, write_timeout_s)


class _Persister:
    """Persists what the session applied in the background, one group of chunks per transaction, while the pump
    applies the next chunks; writes each group's ACK only once the group is persisted.

    A catch-up is bound by the primary store: this overlaps its worker thread with decoding and applying, and one
    transaction (one fsync) covers every chunk applied while the previous one ran. At most GROUP_OPS_MAX applied ops
    wait beside the group in flight. A finished write tells the pump through its inbox, so the pump never waits on
    a write while the peer's data keeps coming.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        stream: INetStream,
        session: SyncSession,
        on_events: Callable[[list[Event]], Awaitable[None]],
        write_timeout_s: float,
        inbox: Inbox,
    ) -> None:
        self._nursery = nursery
        self._inbox = inbox
        self._stream = stream
        self._session = session
        self._on_events = on_events
        self._write_timeout_s = write_timeout_s
        self._pending: list[Event] = []
        self._pending_ops = 0
        self._pending_ack: bytes | None = None
        self._in_flight: trio.Event | None = None
        self._in_flight_ack: bytes | None = None
        self._failure: Exception | None = None

    @property
    def idle(self) -> bool:
        """Whether everything applied is persisted and acknowledged."""
        return self._in_flight is None and not self._pending

    async def add(self, events: list[Event], ack: bytes | None) -> None:
        """Queue what one chunk applied (and the ACK that claims it) behind the group in flight, or start it."""
        self._pending += events
        self._pending_ops += sum(len(event.ops) for event in events if isinstance(event, OpsApplied))
        self._pending_ack = ack or self._pending_ack
        if self._in_flight is not None and self._pending_ops >= GROUP_OPS_MAX:
            await self._finish()  # the bound: wait for the write in flight
        await self.settle()

    async def settle(self) -> None:
        """Write the ACK of a group whose write finished, and start writing what waits if no write runs."""
        if self._in_flight is not None and self._in_flight.is_set():
            await self._finish()
        if self._in_flight is None and self._pending:
            self._start()

    async def drain(self) -> None:
        """Persist everything applied so far and write its ACK."""
        while not self.idle:
            if self._in_flight is not None:
                await self._finish()
            if self._pending:
                self._start()

    def _start(self) -> None:
        # on_events checks the events and takes the changed rows now, before the pump applies more.
        write = self._on_events(self._pending)
        done = trio.Event()
        self._in_flight, self._in_flight_ack = done, self._pending_ack
        self._pending, self._pending_ops, self._pending_ack = [], 0, None
        self._nursery.start_soon(self._run, write, done)

    async def _run(self, write: Awaitable[None], done: trio.Event) -> None:
        try:
            await write
        except Exception as error:
            self._failure = error  # raised in the pump by _finish, not in the nursery (no ExceptionGroup)
        finally:
            done.set()
        await self._inbox.send(_Wake.PERSISTED)

    async def _finish(self) -> None:
        assert self._in_flight is not None
        await self._in_flight.wait()
        ack, self._in_flight, self._in_flight_ack = self._in_flight_ack, None, None
        if self._failure is not None:
            raise self._failure
        if ack is not None and self._session.state is SessionState.SYNCING:
            await _write(self._stream, ack, self._write_timeout_s)


async def _pump(
    stream: INetStream,
    session: SyncSession,
    inbox: trio.MemoryReceiveChannel[Message],
    persister: _Persister,
    read_timeout_s: float,
    write_timeout_s: float,
    apply_lock: trio.Lock,
) -> str:
    """Drive the session from `inbox` until it ends and return why; raise _StreamGone or RemoteProtocolError."""
    await _flush(stream, session, write_timeout_s)  # our HELLO
    listening_since = trio.current_time()
    holding_lock = False
    try:
        while True:
            # Applying and persisting happen under one lock, so no other writer interleaves between them. It is held
            # until everything applied is persisted, or given up early when another writer waits.
            if not persister.idle and apply_lock.statistics().tasks_waiting:
                await persister.drain()
            if persister.idle:
                if holding_lock:
                    apply_lock.release()
                    holding_lock = False
                # Only now, with everything applied persisted, may frames that claim it (a refresh's ACK) go out.
                await _flush(stream, session, write_timeout_s)
            message: Message | None = None
            with trio.move_on_at(listening_since + read_timeout_s):
                message = await inbox.receive()
            match message:
                case None:
                    # Both sides refresh more often than this, so a live peer is never this quiet.
                    return f"no data from the peer for {read_timeout_s} s"
                case b"":
                    await persister.drain()
                    return "the peer closed the stream"
                case bytes():
                    if not holding_lock:
                        await apply_lock.acquire()
                        holding_lock = True
                    try:
                        events = session.receive_data(message)
                    except RemoteProtocolError:
                        await persister.drain()  # what earlier chunks applied is still kept
                        raise
                    if events:
                        await persister.add(events, session.take_ack())
                    if session.state is SessionState.CLOSED:
                        await persister.drain()
                        closed = next(event for event in events if isinstance(event, PeerClosed))
                        return f"the peer ended the session: {closed.reason}: {closed.detail}"
                    # Silence is counted from when this side was ready to listen again, not from the last chunk.
                    listening_since = trio.current_time()
                case _Wake.PERSISTED:
                    await persister.settle()
                case _Wake.REFRESH:
                    await persister.drain()
                    session.refresh()
                case _Wake.LOCAL_OPS:
                    pass  # the new ops go out at the top of the loop, once nothing applied waits to be persisted
                case StreamError():
                    raise _StreamGone(f"stream failed: {message or type(message).__name__}")
    finally:
        if holding_lock:
            apply_lock.release()


async def _end_stream(stream: INetStream, session: SyncSession, reason: str, usable: bool) -> None:
    """Tell the peer why the session ended (unless it already knows) and close the stream; reset a broken one."""
    session.close(reason)  # no-op if the session already ended, its ERROR frame possibly still queued
    if usable:
        # Shielded so a node that is shutting down still says goodbye, within a bound.
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            try:
                await _flush(stream, session, CLOSE_TIMEOUT_S)
                await stream.close()
                return
            except (_StreamGone, StreamError):
                pass
    await reset_quietly(stream)


async def run_session(
    stream: Stream,
    session: SyncSession,
    *,
    on_events: Callable[[list[Event]], Awaitable[None]],
    outgoing: Notifier,
    read_timeout_s: float = 30.0,
    refresh_every_s: float = 10.0,
    write_timeout_s: float = 10.0,
    apply_lock: trio.Lock | None = None,
) -> str:
    """Run `session` over `stream` until it ends and return why; on bad peer data, tell the peer, then raise.

    `on_events` is called, under `apply_lock` if given, with what the session applied: at once it checks the events
    and takes what to persist; the awaitable it returns persists that, in the background while the pump applies
    later chunks. The lock is held until it is done, and the ACK that claims those ops waits for it.
    """
    # Buffered, so the reader keeps taking the peer's data while the pump waits for a write: the writes then cover
    # many chunks each. Bounded: at most INBOX_CHUNKS_MAX reads are held beyond the session's own bound.
    inbox_send, inbox = trio.open_memory_channel[Message](INBOX_CHUNKS_MAX)
    reason, usable = "this node ended the session", True
    failure: Exception | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_stream, stream, inbox_send)
            nursery.start_soon(_wake_on_local_ops, outgoing, inbox_send)
            nursery.start_soon(_wake_to_refresh, refresh_every_s, inbox_send)
            persister = _Persister(nursery, stream, session, on_events, write_timeout_s, inbox_send)
            try:
                reason = await _pump(
                    stream, session, inbox, persister, read_timeout_s, write_timeout_s, apply_lock or trio.Lock()
                )
            except _StreamGone as error:
                reason, usable = str(error), False
            except Exception as error:
                # Re-raised below, outside the nursery, so callers see it rather than an ExceptionGroup.
                failure, reason = error, str(error)
            nursery.cancel_scope.cancel()
    finally:
        await _end_stream(stream, session, reason, usable)
    if failure is not None:
        raise failure
    return reason


async def keep_connected(
    host: P2pHost,
    peer_addr: str,
    connect: Callable[[str, Stream], Awaitable[None]],
    *,
    dial_timeout_s: float = 5.0,
    backoff_s_min: float = 0.5,
    backoff_s_max: float = 30.0,
) -> NoReturn:
    """Dial `peer_addr` and await `connect` on each sync stream (it owns the stream), forever, with backoff."""

    async def attempt() -> bool:
        peer_id, stream = await dial_sync(host, peer_addr, timeout_s=dial_timeout_s)
        await connect(peer_id, stream)
        return False

    await retry_with_backoff(attempt, peer_addr, backoff_s_min=backoff_s_min, backoff_s_max=backoff_s_max)


async def retry_with_backoff(
    attempt: Callable[[], Awaitable[bool]], peer: str, *, backoff_s_min: float, backoff_s_max: float
) -> NoReturn:
    """Run `attempt` (a dial and its session with `peer`) forever, with jittered exponential backoff between runs.

    An attempt that returns True is run again at once: it left a better connection waiting.
    """
    backoff = backoff_s_min
    while True:
        started = trio.current_time()
        try:
            if await attempt():
                backoff = backoff_s_min
                continue
        except (DialError, RemoteProtocolError) as error:
            logger.info("sync with %s: %s", peer, error)
        # A session that outlived the longest backoff was healthy: redial soon. One that keeps failing fast backs off.
        if trio.current_time() - started >= backoff_s_max:
            backoff = backoff_s_min
        # Jitter keeps devices that lost the same peer at once from redialling in step.
        await trio.sleep(random.uniform(backoff / 2, backoff))
        backoff = min(backoff * 2, backoff_s_max)
