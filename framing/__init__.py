"""Length-prefixed framing and the protocol errors shared by every stream protocol here (sync, pairing, mailbox,
the local RPC socket): pure, no I/O."""

from framing.errors import LocalProtocolError, ProtocolError, ReasonedError, RemoteProtocolError
from framing.frames import LENGTH_PREFIX_BYTES, FrameBuffer, length_prefixed

__all__ = [
    "LENGTH_PREFIX_BYTES",
    "FrameBuffer",
    "LocalProtocolError",
    "ProtocolError",
    "ReasonedError",
    "RemoteProtocolError",
    "length_prefixed",
]
