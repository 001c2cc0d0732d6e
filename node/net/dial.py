"""Dialling a device by any of its addresses (direct or through a relay), and the backoff between attempts to keep a
session with it."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio
from libp2p.abc import INetStream

from framing import RemoteProtocolError
from node.net.circuit import dial_relayed, is_circuit_addr, split_circuit_addr
from node.net.host import SYNC_PROTOCOL, DialError, P2pHost, dial_direct

logger = logging.getLogger(__name__)


async def dial_protocol(host: P2pHost, peer_addr: str, protocol: str, *, timeout_s: float) -> tuple[str, INetStream]:
    """Connect to `peer_addr` (ending in `/p2p/<peer id>`, possibly through a relay: `.../p2p-circuit/p2p/<peer id>`)
    and open a `protocol` stream, all within `timeout_s`."""
    if is_circuit_addr(peer_addr):
        # The swarm never dials a relay address (node.net.circuit): the circuit is opened by hand.
        relay_addr, peer_id = split_circuit_addr(peer_addr)
        return await dial_relayed(host, relay_addr, peer_id, protocol, timeout_s=timeout_s)
    return await dial_direct(host, peer_addr, protocol, timeout_s=timeout_s)


async def dial_sync(host: P2pHost, peer_addr: str, *, timeout_s: float) -> tuple[str, INetStream]:
    """Connect to `peer_addr` and open a sync stream, all within `timeout_s`."""
    return await dial_protocol(host, peer_addr, SYNC_PROTOCOL, timeout_s=timeout_s)


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
