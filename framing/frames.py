"""Length-prefixed frames: a big-endian length, then the body."""

from enum import StrEnum

from framing.errors import RemoteProtocolError

LENGTH_PREFIX_BYTES = 4


def length_prefixed(body: bytes, prefix_bytes: int = LENGTH_PREFIX_BYTES) -> bytes:
    """Return `body` behind its length, `prefix_bytes` big-endian."""
    return len(body).to_bytes(prefix_bytes, "big") + body


class FrameBuffer:
    """Collects stream bytes and splits them into length-prefixed frame bodies, refusing oversized frames early.

    A frame over `frame_bytes_max` raises RemoteProtocolError with `too_large`, the reason of the caller's protocol.
    """

    def __init__(self, frame_bytes_max: int, too_large: StrEnum, prefix_bytes: int = LENGTH_PREFIX_BYTES) -> None:
        self.frame_bytes_max = frame_bytes_max
        self.prefix_bytes = prefix_bytes
        self._too_large = too_large
        self._pending = bytearray()

    def feed(self, data: bytes) -> None:
        """Add bytes received from the stream."""
        self._pending += data

    @property
    def buffered_bytes(self) -> int:
        """How many received bytes wait to be taken."""
        return len(self._pending)

    def take(self, size: int) -> bytes | None:
        """Return the next `size` bytes (a fixed-size field), or None until they have arrived."""
        if len(self._pending) < size:
            return None
        taken = bytes(self._pending[:size])
        del self._pending[:size]
        return taken

    def take_rest(self) -> bytes:
        """Return every byte buffered, for whatever reads the stream next."""
        rest = bytes(self._pending)
        self._pending.clear()
        return rest

    def next_body(self) -> bytes | None:
        """Return the next complete frame body, or None until more bytes arrive."""
        prefix = self.prefix_bytes
        if len(self._pending) < prefix:
            return None
        length = int.from_bytes(self._pending[:prefix], "big")
        if length > self.frame_bytes_max:
            # Refused from the prefix alone, before the body is buffered.
            raise RemoteProtocolError(self._too_large, f"frame of {length} bytes exceeds {self.frame_bytes_max}")
        end = prefix + length
        if len(self._pending) < end:
            return None
        body = bytes(self._pending[prefix:end])
        del self._pending[:end]
        return body
