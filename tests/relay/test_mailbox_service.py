"""The mailbox over real libp2p hosts on loopback: put and fetch, refusals, bad clients, and a relay restart."""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from libp2p.abc import INetStream

from framing import LENGTH_PREFIX_BYTES, FrameBuffer, LocalProtocolError
from node.net.dial import dial_protocol
from node.net.host import P2pHost, p2p_host
from node.trust.identity import DeviceIdentity
from p2p import running_host
from relay.errors import MailboxReason, MailboxRefused, MailboxSessionEnded
from relay.mailbox_client import MAILBOX_PROTOCOL, MailboxClient
from relay.mailbox_keys import mailbox_keys
from relay.mailbox_protocol import (
    REQUEST_FRAME_BYTES_MAX,
    Challenge,
    Error,
    Frame,
    Put,
    Refused,
    from_wire,
    signed_message,
    to_wire,
)
from relay.mailbox_service import ServiceConfig, serve_mailbox
from relay.mailbox_sqlite import SqliteMailboxStore
from relay.mailbox_store import StoreLimits

pytestmark = pytest.mark.trio
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
GROUP = os.urandom(32)
KEYS = mailbox_keys(GROUP, 0, 19_675)
TIMEOUT_S = 10.0


@asynccontextmanager
async def relay(data: Path, config: ServiceConfig | None = None, **limits) -> AsyncIterator[str]:
    """A relay serving the mailbox from `data`; yields its address."""
    store = await SqliteMailboxStore.open(data, StoreLimits(**limits))
    seed_file = data / "seed"
    try:
        async with running_host(seed_file.read_bytes() if seed_file.exists() else os.urandom(32), [LOOPBACK]) as host:
            serve_mailbox(host, store, config)
            yield str(host.get_addrs()[0])
    finally:
        await store.close()


@asynccontextmanager
async def device() -> AsyncIterator[P2pHost]:
    async with p2p_host(DeviceIdentity(os.urandom(32)), [LOOPBACK]) as host:
        yield host


@asynccontextmanager
async def client(host: P2pHost, relay_addr: str) -> AsyncIterator[MailboxClient]:
    _, stream = await dial_protocol(host, relay_addr, MAILBOX_PROTOCOL, timeout_s=TIMEOUT_S)
    async with MailboxClient(stream, timeout_s=TIMEOUT_S) as mailbox:
        yield mailbox


async def read_frame(stream: INetStream, buffer: FrameBuffer) -> Frame | None:
    """The next frame from a raw stream, None at its end."""
    with trio.fail_after(TIMEOUT_S):
        while (body := buffer.next_body()) is None:
            try:
                data = await stream.read(65536)
            except Exception:
                return None
            if not data:
                return None
            buffer.feed(data)
    return from_wire(body)


async def test_put_and_fetch_after_a_cursor(tmp_path):
    async with relay(tmp_path) as address, device() as a, device() as b:
        async with client(a, address) as writer:
            cursors = [await writer.put(KEYS, f"sealed-{i}".encode()) for i in range(5)]
        async with client(b, address) as reader:
            items, more = await reader.fetch(KEYS, 0, limit=3)
            assert [item.blob for item in items] == [b"sealed-0", b"sealed-1", b"sealed-2"] and more
            items, more = await reader.fetch(KEYS, items[-1].cursor)
            assert [item.cursor for item in items] == cursors[3:] and not more
            assert await reader.fetch(mailbox_keys(GROUP, 0, 19_676)) == ([], False)


async def test_unauthorised_requests_are_refused_and_the_relay_serves_others(tmp_path):
    stranger = mailbox_keys(os.urandom(32), 0, 19_675)
    async with relay(tmp_path) as address, device() as a, device() as b:
        async with client(a, address) as owner:
            await owner.put(KEYS, b"private")
        _, stream = await dial_protocol(b, address, MAILBOX_PROTOCOL, timeout_s=TIMEOUT_S)
        buffer = FrameBuffer(REQUEST_FRAME_BYTES_MAX * 8, MailboxReason.FRAME_TOO_LARGE)
        challenge = await read_frame(stream, buffer)
        assert isinstance(challenge, Challenge)
        # A stranger signs the owner's mailbox id with its own key.
        stolen = stranger.sign(signed_message(challenge.nonce, 0, Put(KEYS.mailbox_id, KEYS.verify_key, b"junk", b"")))
        attempts = [
            Put(KEYS.mailbox_id, stranger.verify_key, b"junk", stolen),
            Put(stranger.mailbox_id, KEYS.verify_key, b"junk", bytes(64)),
            Put(KEYS.mailbox_id, KEYS.verify_key, b"junk", bytes(64)),
        ]
        for attempt in attempts:
            await stream.write(to_wire(attempt))
            reply = await read_frame(stream, buffer)
            assert isinstance(reply, Refused) and reply.reason is MailboxReason.UNAUTHORISED
        await stream.close()
        async with client(b, address) as outsider:
            # A stranger's own keys reach only the stranger's own, empty mailbox.
            assert await outsider.fetch(stranger) == ([], False)
        async with client(a, address) as owner:
            items, _ = await owner.fetch(KEYS)
            assert [item.blob for item in items] == [b"private"]


async def test_over_quota_and_oversized_puts_are_refused_and_the_session_goes_on(tmp_path):
    async with relay(tmp_path, mailbox_items_max=2, blob_bytes_max=100) as address, device() as a:
        async with client(a, address) as mailbox:
            await mailbox.put(KEYS, b"1")
            await mailbox.put(KEYS, b"2")
            with pytest.raises(MailboxRefused) as refused:
                await mailbox.put(KEYS, b"3")
            assert refused.value.reason is MailboxReason.QUOTA_EXCEEDED
            with pytest.raises(LocalProtocolError):
                await mailbox.put(KEYS, b"x" * 101)  # over the bound the relay announced: never sent
            assert len((await mailbox.fetch(KEYS))[0]) == 2


async def test_malformed_and_oversized_frames_end_only_that_session(tmp_path):
    async with relay(tmp_path) as address, device() as a, device() as b:
        oversized = (REQUEST_FRAME_BYTES_MAX + 1).to_bytes(LENGTH_PREFIX_BYTES, "big")
        for garbage in [oversized, b"\x00\x00\x00\x02\xc1\xc1"]:
            _, stream = await dial_protocol(a, address, MAILBOX_PROTOCOL, timeout_s=TIMEOUT_S)
            buffer = FrameBuffer(REQUEST_FRAME_BYTES_MAX * 8, MailboxReason.FRAME_TOO_LARGE)
            assert isinstance(await read_frame(stream, buffer), Challenge)
            await stream.write(garbage)
            ended = await read_frame(stream, buffer)
            assert isinstance(ended, Error)
            assert ended.reason in (MailboxReason.FRAME_TOO_LARGE, MailboxReason.MALFORMED_FRAME)
            assert await read_frame(stream, buffer) is None
        async with client(b, address) as mailbox:
            assert await mailbox.put(KEYS, b"still serving") > 0


async def test_a_silent_client_is_dropped_without_blocking_others(tmp_path):
    config = ServiceConfig(request_timeout_s=1.0)
    async with relay(tmp_path, config) as address, device() as a, device() as b:
        _, silent = await dial_protocol(a, address, MAILBOX_PROTOCOL, timeout_s=TIMEOUT_S)
        buffer = FrameBuffer(REQUEST_FRAME_BYTES_MAX * 8, MailboxReason.FRAME_TOO_LARGE)
        assert isinstance(await read_frame(silent, buffer), Challenge)
        started = trio.current_time()
        async with client(b, address) as busy:
            for _ in range(20):
                await busy.put(KEYS, b"meanwhile")
        assert trio.current_time() - started < 1.0
        ended = await read_frame(silent, buffer)
        assert isinstance(ended, Error) and ended.reason is MailboxReason.TIMEOUT
        assert trio.current_time() - started < 1.0 + 3.0


async def test_session_request_bound_ends_the_session(tmp_path):
    async with relay(tmp_path, ServiceConfig(requests_max=2)) as address, device() as a:
        async with client(a, address) as mailbox:
            await mailbox.put(KEYS, b"1")
            await mailbox.fetch(KEYS)
            assert mailbox.requests_left == 0
            with pytest.raises(MailboxSessionEnded):
                await mailbox.put(KEYS, b"3")


async def test_items_survive_a_relay_restart(tmp_path):
    (tmp_path / "seed").write_bytes(os.urandom(32))
    async with relay(tmp_path) as address, device() as a:
        async with client(a, address) as mailbox:
            cursor = await mailbox.put(KEYS, b"before restart")
    # A new device: node.net.host.dial_direct documents that libp2p reuses a dead connection to a restarted peer once.
    async with relay(tmp_path) as address, device() as b:
        async with client(b, address) as mailbox:
            items, more = await mailbox.fetch(KEYS)
            assert [(item.cursor, item.blob) for item in items] == [(cursor, b"before restart")] and not more
