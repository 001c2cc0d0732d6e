"""Length-prefixed framing, shared by every stream protocol here (sync, pairing, mailbox): pure, no I/O."""

from collections.abc import Callable

LENGTH_PREFIX_BYTES = 4

__all__ = ["LENGTH_PREFIX_BYTES", "FrameBuffer", "length_prefixed"]


def length_prefixed(body: bytes) -> bytes:
    """Return `body` behind its length, 4 bytes big-endian."""
    return len(body).to_bytes(LENGTH_PREFIX_BYTES, "big") + body


class FrameBuffer:
    """Collects stream bytes and splits them into length-prefixed frame bodies, refusing oversized frames early.

    `too_large(detail)` makes the error raised for a frame over `frame_bytes_max`: each protocol has its own.
    """

    def __init__(self, frame_bytes_max: int, too_large: Callable[[str], Exception]) -> None:
        self.frame_bytes_max = frame_bytes_max
        self._too_large = too_large
        self._pending = bytearray()

    def feed(self, data: bytes) -> None:
        self._pending += data

    def next_body(self) -> bytes | None:
        """Return the next complete frame body, or None until more bytes arrive."""
        if len(self._pending) < LENGTH_PREFIX_BYTES:
            return None
        length = int.from_bytes(self._pending[:LENGTH_PREFIX_BYTES], "big")
        if length > self.frame_bytes_max:
            # Refused from the prefix alone, before the body is buffered.
            raise self._too_large(f"frame of {length} bytes exceeds {self.frame_bytes_max}")
        end = LENGTH_PREFIX_BYTES + length
        if len(self._pending) < end:
            return None
        body = bytes(self._pending[LENGTH_PREFIX_BYTES:end])
        del self._pending[:end]
        return body
