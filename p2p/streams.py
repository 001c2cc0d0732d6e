"""Bounded reads, writes, closes and resets of libp2p streams, with the library's errors turned into StreamGone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF, StreamError

from p2p.errors import StreamGone

READ_BYTES = 64 * 1024  # one read's bound; a larger frame arrives over several reads
CLOSE_TIMEOUT_S = 2.0  # bound on closing or resetting a stream and on closing a host


async def read_chunk(stream: INetStream, bytes_max: int = READ_BYTES) -> bytes:
    """Return the next chunk from the peer (at most `bytes_max` bytes), b"" at end of stream."""
    try:
        return await stream.read(bytes_max)
    except StreamEOF:
        return b""
    except StreamError as error:
        raise StreamGone(f"stream failed while reading: {error or type(error).__name__}") from None


async def write_within(stream: INetStream, data: bytes, timeout_s: float) -> None:
    """Write `data` within `timeout_s`; raise StreamGone if the stream cannot take it."""
    try:
        with trio.fail_after(timeout_s):
            await stream.write(data)
    except trio.TooSlowError:
        raise StreamGone(f"the peer took no data for {timeout_s} s") from None
    except StreamError as error:
        raise StreamGone(f"stream failed while writing: {error or type(error).__name__}") from None


class SansIoProtocol(Protocol):
    """A sans-I/O protocol object: `generate` returns the next bytes to send, None when there is nothing to send."""

    def generate(self) -> bytes | None: ...


async def send_pending(stream: INetStream, protocol: SansIoProtocol, timeout_s: float) -> None:
    """Write every frame `protocol` has to send, each within `timeout_s`; raise StreamGone if the stream cannot."""
    while (data := protocol.generate()) is not None:
        await write_within(stream, data, timeout_s)


async def reset_quietly(stream: INetStream) -> None:
    """Reset `stream` within CLOSE_TIMEOUT_S, even in a cancelled scope; a stream already broken is left as it is."""
    with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
        try:
            await stream.reset()
        except StreamError:
            pass


async def close_quietly(stream: INetStream) -> None:
    """Close `stream` within CLOSE_TIMEOUT_S, even in a cancelled scope; reset it if it cannot be closed."""
    with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
        try:
            await stream.close()
        except StreamError:
            await reset_quietly(stream)


async def finish_stream(
    stream: INetStream, protocol: SansIoProtocol, usable: bool, owed: Sequence[bytes] = ()
) -> None:
    """Send the `owed` frames, then what `protocol` still has to say (its goodbye), and close `stream`, within
    CLOSE_TIMEOUT_S even in a cancelled scope; reset it instead if it is not `usable` or the goodbye cannot go out."""
    if usable:
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            try:
                for frame in owed:
                    await write_within(stream, frame, CLOSE_TIMEOUT_S)
                await send_pending(stream, protocol, CLOSE_TIMEOUT_S)
                await stream.close()
                return
            except (StreamGone, StreamError):
                pass
    await reset_quietly(stream)
