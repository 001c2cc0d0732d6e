"""Finding the group's devices on the LAN: advertise this node over mDNS and keep a session with members found."""

from __future__ import annotations

import logging

import trio

from discovery.mdns import MdnsDiscovery
from node.net.sessions import SyncService
from node.trust.keyring import KeyRing

log = logging.getLogger(__name__)


async def discover_devices(
    sync: SyncService,
    keyring: KeyRing,
    addresses: list[str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Advertise on the LAN interfaces this node listens on, and keep a session with group members found there."""
    lan = [a for a in addresses if not a.startswith(("/ip4/127.", "/ip4/0.0.0.0/"))]
    if not lan:
        log.warning("mDNS is off: listen on a LAN address (--listen /ip4/<ip>/tcp/<port>) to use it")
        task_status.started()
        return
    interfaces = sorted({a.split("/")[2] for a in lan})
    port = int(lan[0].split("/")[4])
    discovery = MdnsDiscovery(
        interfaces,
        lambda: keyring.current.secret,
        port,
        lan,
        older_secrets_provider=lambda: [key.secret for key in keyring.keys()[1:]],
    )
    async with discovery:
        task_status.started()
        async for found in discovery:
            # The hint is only a claim: Noise proves who answers when the device's keeper dials these addresses.
            peer = found.peer_hint
            if peer and sync.is_trusted(peer):
                sync.lan_devices.add(peer)
                await sync.book.learn(peer, found.addresses, "lan")
