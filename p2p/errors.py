"""Errors of the shared libp2p layer; every one derives from `P2pError`."""


class P2pError(Exception):
    """Root of every error the shared libp2p layer raises."""


class ListenError(P2pError):
    """A host could not start or listen on the addresses asked for."""


class StreamGone(P2pError):
    """A stream can no longer carry data: reset, failed, or the peer stopped taking it."""
