"""This machine's interface addresses, so a node listening on every interface hands out addresses others can dial."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import ifaddr

UNSPECIFIED_PREFIX = "/ip4/0.0.0.0/"


def lan_ipv4_addresses() -> list[str]:
    """The IPv4 addresses of this machine's interfaces other than loopback, in address order."""
    found = set()
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                found.add(ip.ip)
    return sorted(found, key=ipaddress.ip_address)


def dialable(listen_addrs: Sequence[str]) -> list[str]:
    """`listen_addrs` with the unspecified IPv4 address (0.0.0.0) replaced by each of this machine's LAN addresses
    (by loopback when it has none): the addresses peers can dial."""
    lan = lan_ipv4_addresses() or ["127.0.0.1"]
    addresses: list[str] = []
    for text in listen_addrs:
        if text.startswith(UNSPECIFIED_PREFIX):
            addresses += [text.replace(UNSPECIFIED_PREFIX, f"/ip4/{ip}/", 1) for ip in lan]
        else:
            addresses.append(text)
    return list(dict.fromkeys(addresses))
