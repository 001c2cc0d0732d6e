"""Errors raised by LAN discovery; every one derives from `DiscoveryError`."""


class DiscoveryError(Exception):
    """Root of every error discovery raises (kept apart from `node` so the dependency arrow points one way)."""


class AdvertTooLargeError(DiscoveryError):
    """The addresses to advertise do not fit in the fixed-size sealed TXT payload."""


class ZeroconfError(DiscoveryError):
    """python-zeroconf failed, timed out, or could not bind to the requested interfaces."""
