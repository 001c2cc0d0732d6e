"""Pairing on a LAN with the code alone (docs/spec/pairing.md, section 11): the inviter advertises where it listens
under a tag derived from the code, and the joiner finds it; nobody without the code can tell the advert from any
other node's."""

from __future__ import annotations

import logging

import trio

from discovery.mdns import MdnsDiscovery
from node.net.interfaces import lan_ipv4_addresses
from node.trust.pairing import invite_advert_secret

log = logging.getLogger(__name__)
FIND_TIMEOUT_S = 8.0  # adverts answer a query within about a second; an inviter on the LAN is found well before


def _lan_addresses(addresses: list[str], interfaces: list[str]) -> list[str]:
    return [a for a in addresses if "/p2p-circuit" not in a and any(f"/ip4/{ip}/" in a for ip in interfaces)]


async def advertise_invite(
    code: str, addresses: list[str], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Advertise the open invite of `code` on the LAN at `addresses` until cancelled (not at all off a LAN)."""
    secret = await trio.to_thread.run_sync(invite_advert_secret, code)
    interfaces = lan_ipv4_addresses()
    lan = _lan_addresses(addresses, interfaces)
    if not lan:
        log.info("the invite is not advertised: this node listens on no LAN address")
        task_status.started()
        return
    port = int(lan[0].split("/tcp/")[1].split("/")[0])
    async with MdnsDiscovery(interfaces, lambda: secret, port, lan):
        task_status.started()
        await trio.sleep_forever()


async def find_inviter(code: str, timeout_s: float = FIND_TIMEOUT_S) -> list[str]:
    """The addresses the inviter of `code` advertises on this LAN, or [] if none answers within `timeout_s`."""
    secret = await trio.to_thread.run_sync(invite_advert_secret, code)
    interfaces = lan_ipv4_addresses()
    if not interfaces:
        return []
    with trio.move_on_after(timeout_s):
        async with MdnsDiscovery(interfaces, lambda: secret, 0, [], advertise=False) as discovery:
            found = await discovery.receive()
            return list(found.addresses)
    return []
