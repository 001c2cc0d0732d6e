"""The running node's network: its libp2p host, sync sessions, pairing desk, relay mailbox and LAN discovery."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from node.net.host import P2pHost, p2p_host
from node.net.keepers import DeviceKeepers
from node.net.lan import discover_devices
from node.net.mailbox import MailboxSync
from node.net.pairing import InviteDesk
from node.net.relays import RelayChoice
from node.net.sessions import COMPACT_EVERY_S, SyncService
from node.sync.receiver import OpsReceiver
from node.trust.identity import DeviceIdentity
from node.trust.keyring import KeyRing
from node.trust.pairing import InviterPaired
from p2p import ListenError
from p2p.host import check_port_free, parse_listen_addr

DEFAULT_PORT = 4242
PORTS_TRIED = 10  # the default port and the next ones, tried in turn before any free port
log = logging.getLogger(__name__)


@attrs.frozen
class NetworkOptions:
    """Where the node listens (None: every interface on the default port), which peers it always dials, whether it
    uses mDNS, and which relay."""

    listen: tuple[str, ...] | None = None
    peers: tuple[str, ...] = ()
    mdns: bool = True
    relays: tuple[str, ...] = ()  # in order of preference: the next is used when one cannot be reached
    mailbox_drain_every_s: float = 5.0
    compact_every_s: float = COMPACT_EVERY_S  # how often the op log is compacted (docs/spec/sync.md, section 4)


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


def default_listen() -> tuple[str, ...]:
    """Every interface on DEFAULT_PORT, or on the next free port after it (said once), or on any free port."""
    for port in range(DEFAULT_PORT, DEFAULT_PORT + PORTS_TRIED):
        address = f"/ip4/0.0.0.0/tcp/{port}"
        try:
            check_port_free(parse_listen_addr(address))
        except ListenError:
            continue
        if port != DEFAULT_PORT:
            log.warning("port %d is in use (another aico-node?): listening on port %d instead", DEFAULT_PORT, port)
        return (address,)
    log.warning("ports %d to %d are in use: listening on a free port", DEFAULT_PORT, DEFAULT_PORT + PORTS_TRIED - 1)
    return ("/ip4/0.0.0.0/tcp/0",)


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
    async with p2p_host(identity, options.listen or default_listen()) as host:
        relays = RelayChoice(options.relays) if options.relays else None
        sync = SyncService(
            receiver,
            identity,
            keyring,
            host,
            relays=relays,
            bootstrap_peers=bootstrap_peers,
            compact_every_s=options.compact_every_s,
        )
        keepers = DeviceKeepers(sync)
        desk = InviteDesk(identity, lambda: keyring.current, host, enrol_paired, advertise_on_lan=options.mdns)
        network = Network(host, sync, desk)
        async with trio.open_nursery() as nursery:
            await nursery.start(sync.run)
            await nursery.start(network.desk.run)
            await keepers.give(options.peers)
            await nursery.start(keepers.run)
            if relays is not None:

                def verify_key_of(device_id: str) -> bytes | None:
                    own = device_id == identity.device_id
                    return identity.verify_key_bytes if own else sync.trusted_public_key(device_id)

                network.mailbox = MailboxSync(
                    receiver.data,
                    identity,
                    keyring,
                    host,
                    relays,
                    apply_ops=receiver.apply_remote,
                    verify_key_of=verify_key_of,
                    outgoing=receiver.outgoing,
                    drain_every_s=options.mailbox_drain_every_s,
                )
                await nursery.start(network.mailbox.run)
            if options.mdns:
                await nursery.start(discover_devices, sync, keyring, host.addresses)
            task_status.started(network)
