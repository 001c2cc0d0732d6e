"""The exchange that opens a sync stream (docs/spec/sync.md, section 3), sans-I/O: each side names the session id
for the batches it will receive and the group keys it holds."""

from __future__ import annotations

from typing import Any

import msgpack

import framing
from framing import FrameBuffer, RemoteProtocolError
from node.errors import EndReason
from node.trust.sealing import SESSION_ID_BYTES

OFFERS_BYTES_MAX = 4096  # the list of group keys; 64 offers take about 1.1 KiB
OFFERS_PREFIX_BYTES = 2


class SessionHandshake:
    """One side of the handshake: `generate` what to send, feed what arrives to `receive_data` until it returns
    True, then read `peer_session_id` and `peer_offers`; bytes that came after the handshake are in `take_rest`."""

    def __init__(self, session_id: bytes, offers: list[list[Any]]) -> None:
        self.session_id = session_id
        packed = msgpack.packb(offers, use_bin_type=True)
        self._outbound: bytes | None = session_id + framing.length_prefixed(packed, OFFERS_PREFIX_BYTES)
        self._inbound = FrameBuffer(OFFERS_BYTES_MAX, EndReason.MALFORMED_FRAME, OFFERS_PREFIX_BYTES)
        self.peer_session_id: bytes | None = None
        self.peer_offers: list[Any] | None = None

    def generate(self) -> bytes | None:
        """Return this side's half of the handshake once, then None."""
        data, self._outbound = self._outbound, None
        return data

    def receive_data(self, data: bytes) -> bool:
        """Take bytes from the peer; return whether the peer's half is complete."""
        self._inbound.feed(data)
        if self.peer_session_id is None:
            self.peer_session_id = self._inbound.take(SESSION_ID_BYTES)
        if self.peer_session_id is not None and self.peer_offers is None:
            body = self._inbound.next_body()
            if body is not None:
                self.peer_offers = _offers(body)
        return self.peer_offers is not None

    def take_rest(self) -> bytes:
        """Return the bytes the peer sent after its half of the handshake: the start of the session."""
        return self._inbound.take_rest()


def _offers(body: bytes) -> list[Any]:
    try:
        offers = msgpack.unpackb(body, raw=False)
    except Exception:  # msgpack raises many exception types for bad input
        offers = None
    if type(offers) is not list:
        raise RemoteProtocolError(EndReason.MALFORMED_FRAME, "the key offers are not a msgpack list")
    return offers
