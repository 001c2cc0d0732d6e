"""Length-prefixed framing shared by the sync, pairing and mailbox protocols."""

from enum import StrEnum

import pytest

from framing import FrameBuffer, RemoteProtocolError, length_prefixed


class Reason(StrEnum):
    TOO_LARGE = "too_large"


def test_bodies_come_out_whole_however_the_bytes_are_split():
    data = length_prefixed(b"first") + length_prefixed(b"") + length_prefixed(b"third")
    buffer = FrameBuffer(16, Reason.TOO_LARGE)
    bodies = []
    for byte in data:
        buffer.feed(bytes([byte]))
        while (body := buffer.next_body()) is not None:
            bodies.append(body)
    assert bodies == [b"first", b"", b"third"]


def test_an_oversized_frame_is_refused_from_its_prefix_with_the_protocols_error():
    buffer = FrameBuffer(16, Reason.TOO_LARGE)
    buffer.feed(length_prefixed(b"x" * 17)[:4])
    with pytest.raises(RemoteProtocolError, match="frame of 17 bytes exceeds 16") as refused:
        buffer.next_body()
    assert refused.value.reason is Reason.TOO_LARGE
