"""The relay's libp2p host: Noise and yamux only, under a persistent Ed25519 key kept in the relay's data folder."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamError
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from relay.errors import RelayError
from relay.stream_credit import batch_yamux_receive_credit

KEY_FILE = "relay.key"
SEED_BYTES = 32
CLOSE_TIMEOUT_S = 2.0  # bound on resetting a stream and on closing the host


async def reset_quietly(stream: INetStream) -> None:
    """Reset `stream` within CLOSE_TIMEOUT_S, even in a cancelled scope; a stream already broken is left as it is."""
    with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
        try:
            await stream.reset()
        except StreamError:
            pass


def load_or_create_seed(directory: Path) -> bytes:
    """The relay's 32-byte key seed from `directory`, created (owner-only) on first use, so its peer id is stable."""
    path = Path(directory) / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        seed = path.read_bytes()
        if len(seed) != SEED_BYTES:
            raise RelayError(f"{path} is not a {SEED_BYTES}-byte relay key") from None
        return seed
    seed = os.urandom(SEED_BYTES)
    with os.fdopen(fd, "wb") as file:
        file.write(seed)
        file.flush()
        os.fsync(file.fileno())
    return seed


def build_relay_host(seed: bytes) -> IHost:
    """A libp2p host under the Ed25519 key of `seed`, speaking Noise and yamux only (as node/p2p.py's hosts)."""
    key_pair = create_new_key_pair(seed=seed)
    # The library's per-read WINDOW_UPDATE doubled the frames a relay forwards (relay/stream_credit.py).
    batch_yamux_receive_credit()
    return new_host(
        key_pair=key_pair,
        # Noise only: libp2p's default security options also accept a plaintext dialer (PLATFORM.md).
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)},
        # yamux only: mplex stalled and reset under a 10 MB echo (PLATFORM.md).
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        # The default of 3 connections per peer adds a fixed 250 ms wait to every connect (PLATFORM.md).
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )


@contextlib.asynccontextmanager
async def running_host(seed: bytes, listen_addrs: Sequence[str]) -> AsyncIterator[IHost]:
    """Run a relay host listening on `listen_addrs`, and close it (listener included) on exit."""
    host = build_relay_host(seed)
    try:
        async with host.run([multiaddr.Multiaddr(text) for text in listen_addrs]):
            yield host
    finally:
        # PLATFORM.md: leaving host.run() leaves the listener accepting; only host.close() stops it.
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await host.close()
