"""Finding the group's devices on the LAN: advertise this node over mDNS and keep a session with members found."""

from __future__ import annotations

import logging

import trio

from discovery.mdns import MdnsDiscovery
from node.net.sessions import SyncService
from node.trust.identity import DeviceIdentity
from node.trust.keyring import KeyRing

log = logging.getLogger(__name__)


async def discover_devices(
    sync: SyncService,
    identity: DeviceIdentity,
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
        async with trio.open_nursery() as nursery:
            async for found in discovery:
                # The hint is only a claim: Noise proves who answers, and untrusted peers are dropped.
                peer = found.peer_hint
                if not peer or not sync.is_trusted(peer):
                    continue
                sync.lan_devices.add(peer)
                # Of two members that find each other, only the one with the lower id dials: one session each.
                # A member that missed a key rotation cannot recognise this node's advert, so it is dialled.
                if peer > identity.device_id or found.stale:
                    for address in found.addresses:
                        sync.dial(nursery, address)
