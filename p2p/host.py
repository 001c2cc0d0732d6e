"""A libp2p host under an Ed25519 seed, speaking Noise and yamux only, and run within bounds.

py-libp2p 0.8.1 facts this module relies on (exercised by tests/test_p2p.py and tests/relay/test_circuit.py):
- `create_new_key_pair(seed=...)` gives the same Ed25519 key as nacl's `SigningKey(seed)`, so one seed is both
  peer id and signer.
- The default security options also accept a plaintext dialer: hosts are built with Noise only.
- mplex stalled and reset under a 10 MB echo: yamux only.
- The default of 3 connections per peer adds a fixed 250 ms wait to every connect: 1.
- Listeners use SO_REUSEPORT, so a second host on a port in use would silently share it: the port is probed first.
- Leaving `host.run()` leaves the listener accepting: only `host.close()` stops it.
- After a failed dial the swarm refuses every dial to that peer for 60 s (its negative cache).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import cast

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.config import ConnectionConfig
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from p2p.errors import ListenError
from p2p.stream_credit import batch_yamux_receive_credit
from p2p.streams import CLOSE_TIMEOUT_S


def build_host(seed: bytes) -> IHost:
    """A libp2p host under the Ed25519 key of the 32-byte `seed`, speaking Noise and yamux only."""
    key_pair = create_new_key_pair(seed=seed)
    # The library's per-read WINDOW_UPDATE costs a frame per read, on a relayed connection one more relayed message.
    batch_yamux_receive_credit()
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )


def parse_listen_addr(text: str) -> multiaddr.Multiaddr:
    """The TCP multiaddr in `text`; ListenError for anything else."""
    try:
        addr = multiaddr.Multiaddr(text)
    except (ValueError, TypeError) as error:
        raise ListenError(f"{text!r} is not a multiaddr ({error}); write it like /ip4/0.0.0.0/tcp/4001") from None
    if "tcp" not in {protocol.name for protocol in addr.protocols()}:
        raise ListenError(f"{text} is not a TCP multiaddr; listen on one like /ip4/0.0.0.0/tcp/4001")
    return addr


def check_port_free(addr: multiaddr.Multiaddr) -> None:
    """Raise ListenError if another process listens on `addr`'s TCP port (port 0 is always free)."""
    port = int(addr.value_for_protocol("tcp"))
    if port == 0:
        return
    family, ip = socket.AF_INET, None
    for protocol in addr.protocols():
        if protocol.name in ("ip4", "ip6"):
            family = socket.AF_INET if protocol.name == "ip4" else socket.AF_INET6
            ip = addr.value_for_protocol(protocol.name)
    # A plain bind fails on a port with a listener; SO_REUSEADDR keeps connections left in TIME_WAIT by a restart on
    # the same port from counting.
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((ip or "", port))
        except OSError as error:
            raise ListenError(f"cannot listen on {addr}: {error.strerror}") from None


@asynccontextmanager
async def running_host(seed: bytes, listen_addrs: Sequence[str]) -> AsyncIterator[IHost]:
    """Run a host under `seed` listening on `listen_addrs`, and close it (listener included) on exit."""
    addrs = [parse_listen_addr(text) for text in listen_addrs]
    for addr in addrs:
        check_port_free(addr)
    host = build_host(seed)
    failure: Exception | None = None
    try:
        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(host.run(addrs))
            except (BaseLibp2pError, OSError) as error:
                raise ListenError(f"cannot listen on {', '.join(listen_addrs)}: {error}") from error
            try:
                yield host
            except Exception as error:
                # Re-raised below, outside host.run()'s nurseries, so callers see it rather than nested ExceptionGroups.
                failure = error
    finally:
        # Shielded so a cancelled host still releases its port.
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await host.close()
    if failure is not None:
        raise failure


def forget_dial_failure(host: IHost, peer_id: ID) -> None:
    """Let `host` dial `peer_id` again at once after a failed dial: the caller's backoff is the retry policy."""
    cast(Swarm, host.get_network())._negative_peer_cache.evict(str(peer_id))
