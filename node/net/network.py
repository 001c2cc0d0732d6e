"""The running node's network: its libp2p host, sync sessions, pairing desk, relay mailbox and LAN discovery."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from node.net.host import P2pHost, p2p_host
from node.net.lan import discover_devices
from node.net.mailbox import MailboxSync
from node.net.pairing import InviteDesk
from node.net.sessions import SyncService
from node.sync.receiver import OpsReceiver
from node.trust.identity import DeviceIdentity
from node.trust.keyring import KeyRing
from node.trust.pairing import InviterPaired


@attrs.frozen
class NetworkOptions:
    """Where the node listens, which peers it always dials, whether it uses mDNS, and which relay."""

    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    peers: tuple[str, ...] = ()
    mdns: bool = True
    relay: str | None = None
    mailbox_drain_every_s: float = 5.0


@attrs.define
class Network:
    """The network services of a running node."""

    host: P2pHost
    sync: SyncService
    desk: InviteDesk
    mailbox: MailboxSync | None = None

    def relay_status(self) -> dict[str, Any] | None:
        """The relay's state as `status --json` shows it, or None without a relay."""
        if self.mailbox is None:
            return None
        reservation = self.sync.reservation
        return {
            **self.mailbox.health.as_status(),
            "circuit_address": reservation.circuit_address if reservation else None,
            "reservation_expires_at": reservation.expires_at_s if reservation else None,
        }


async def run_network(
    options: NetworkOptions,
    identity: DeviceIdentity,
    keyring: KeyRing,
    receiver: OpsReceiver,
    bootstrap_peers: dict[str, bytes],
    enrol_paired: Callable[[InviterPaired], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[Network] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the host and every network service until cancelled; `started` hands over the Network."""
    async with p2p_host(identity, options.listen) as host:
        sync = SyncService(
            receiver, identity, keyring, host, static_peers=options.peers, relay=options.relay,
            bootstrap_peers=bootstrap_peers,
        )  # fmt: skip
        network = Network(host, sync, InviteDesk(identity, lambda: keyring.current, host, enrol_paired))
        async with trio.open_nursery() as nursery:
            await nursery.start(sync.run)
            if options.relay:

                def verify_key_of(device_id: str) -> bytes | None:
                    own = device_id == identity.device_id
                    return identity.verify_key_bytes if own else sync.trusted_public_key(device_id)

                network.mailbox = MailboxSync(
                    receiver.data,
                    identity,
                    keyring,
                    host,
                    options.relay,
                    apply_ops=receiver.apply_remote,
                    verify_key_of=verify_key_of,
                    outgoing=receiver.outgoing,
                    drain_every_s=options.mailbox_drain_every_s,
                )
                await nursery.start(network.mailbox.run)
            if options.mdns:
                await nursery.start(discover_devices, sync, identity, keyring, host.addresses)
            task_status.started(network)
