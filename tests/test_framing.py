"""Length-prefixed framing shared by the sync, pairing and mailbox protocols."""

import pytest

from framing import FrameBuffer, length_prefixed


class TooLarge(Exception):
    pass


def test_bodies_come_out_whole_however_the_bytes_are_split():
    data = length_prefixed(b"first") + length_prefixed(b"") + length_prefixed(b"third")
    buffer = FrameBuffer(16, TooLarge)
    bodies = []
    for byte in data:
        buffer.feed(bytes([byte]))
        while (body := buffer.next_body()) is not None:
            bodies.append(body)
    assert bodies == [b"first", b"", b"third"]


def test_an_oversized_frame_is_refused_from_its_prefix_with_the_protocols_error():
    buffer = FrameBuffer(16, TooLarge)
    buffer.feed(length_prefixed(b"x" * 17)[:4])
    with pytest.raises(TooLarge, match="frame of 17 bytes exceeds 16"):
        buffer.next_body()
