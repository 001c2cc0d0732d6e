"""Batched yamux receive credit (p2p/stream_credit.py) over a real loopback libp2p stream."""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.peerinfo import PeerInfo
from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE, YamuxStream

from p2p import running_host
from p2p.stream_credit import CREDIT_FRACTION

SINK = TProtocol("/aico-test/sink/1")
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
SMALL_WRITE_BYTES = 1024
LARGE_TRANSFER_BYTES = 10 * 1024 * 1024
TIMEOUT_S = 30.0


@asynccontextmanager
async def sink_pair(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[INetStream, trio.MemoryReceiveChannel, list[int]]]:
    """A stream from one loopback relay host to another whose handler reads everything into a channel, and the
    increments of every WINDOW_UPDATE any yamux stream sends."""
    updates: list[int] = []
    send_update = YamuxStream.send_window_update

    async def counted_update(stream: YamuxStream, increment: int, skip_lock: bool = False) -> None:
        updates.append(increment)
        await send_update(stream, increment, skip_lock)

    monkeypatch.setattr(YamuxStream, "send_window_update", counted_update)
    received_send, received = trio.open_memory_channel[int](64)

    async def sink(stream: INetStream) -> None:
        async with received_send:
            while True:
                try:
                    data = await stream.read(64 * 1024)
                except StreamEOF:
                    return
                if not data:
                    return
                await received_send.send(len(data))

    async with running_host(os.urandom(32), LOOPBACK) as receiver, running_host(os.urandom(32), LOOPBACK) as sender:
        receiver.set_stream_handler(SINK, sink)
        with trio.fail_after(TIMEOUT_S):
            await sender.connect(PeerInfo(receiver.get_id(), receiver.get_addrs()))
            stream = await sender.new_stream(receiver.get_id(), [SINK])
        updates.clear()  # the handshake's own streams do not count
        yield stream, received, updates


async def read_at_least(received: trio.MemoryReceiveChannel, total_bytes: int) -> None:
    """Wait, within the timeout, until the sink has read `total_bytes`."""
    with trio.fail_after(TIMEOUT_S):
        read = 0
        while read < total_bytes:
            read += await received.receive()


@pytest.mark.trio
async def test_small_reads_return_no_credit_until_half_the_window_is_consumed(monkeypatch):
    half_window_bytes = DEFAULT_WINDOW_SIZE // CREDIT_FRACTION
    async with sink_pair(monkeypatch) as (stream, received, updates):
        below_half = half_window_bytes // SMALL_WRITE_BYTES - 1
        for _ in range(below_half):
            await stream.write(os.urandom(SMALL_WRITE_BYTES))
            await read_at_least(received, SMALL_WRITE_BYTES)
        assert updates == []
        for _ in range(2):
            await stream.write(os.urandom(SMALL_WRITE_BYTES))
            await read_at_least(received, SMALL_WRITE_BYTES)
        assert len(updates) == 1 and updates[0] >= half_window_bytes
        await stream.close()


@pytest.mark.trio
async def test_a_large_transfer_still_flows(monkeypatch):
    async with sink_pair(monkeypatch) as (stream, received, _):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_at_least, received, LARGE_TRANSFER_BYTES)
            chunk = os.urandom(256 * 1024)
            with trio.fail_after(TIMEOUT_S):
                for _ in range(LARGE_TRANSFER_BYTES // len(chunk)):
                    await stream.write(chunk)
        await stream.close()
