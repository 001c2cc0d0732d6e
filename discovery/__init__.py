"""LAN discovery: mDNS adverts that only the user's own devices can recognise, and the peers they reveal."""

from discovery.errors import AdvertTooLargeError, DiscoveryError, ZeroconfError
from discovery.mdns import SERVICE_TYPE, Found, MdnsDiscovery
from discovery.tags import discovery_tag, matches, time_bucket

__all__ = [
    "SERVICE_TYPE",
    "AdvertTooLargeError",
    "DiscoveryError",
    "Found",
    "MdnsDiscovery",
    "ZeroconfError",
    "discovery_tag",
    "matches",
    "time_bucket",
]
