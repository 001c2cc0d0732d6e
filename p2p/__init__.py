"""The libp2p layer the node and the relay share: a Noise + yamux host under an Ed25519 seed, and bounded stream
helpers (read, write, reset) around py-libp2p 0.8.1's behaviour."""

from p2p.errors import ListenError, P2pError, StreamGone
from p2p.host import build_host, forget_dial_failure, running_host
from p2p.streams import (
    CLOSE_TIMEOUT_S,
    READ_BYTES,
    SansIoProtocol,
    close_quietly,
    finish_stream,
    read_chunk,
    reset_quietly,
    send_pending,
    write_within,
)

__all__ = [
    "CLOSE_TIMEOUT_S",
    "READ_BYTES",
    "ListenError",
    "P2pError",
    "SansIoProtocol",
    "StreamGone",
    "build_host",
    "close_quietly",
    "finish_stream",
    "forget_dial_failure",
    "read_chunk",
    "reset_quietly",
    "running_host",
    "send_pending",
    "write_within",
]
