"""The session pump: drives one sans-I/O sync session over a libp2p stream, moving bytes and events.

What a session applies is persisted by its AppliedOpsWriter (node.sync.receiver), which also holds back each ACK
until the ops it claims are stored; the pump sends those ACKs and everything else the session generates.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from enum import Enum
from typing import NoReturn

import trio
from libp2p.abc import INetStream

from framing import RemoteProtocolError
from node.sync.receiver import AppliedOpsWriter, Notifier
from node.sync.session import Event, PeerClosed, SessionState, SyncSession
from p2p import StreamGone, finish_stream, read_chunk, send_pending, write_within

INBOX_CHUNKS_MAX = 32  # reads (up to 2 MiB) the reader may take ahead of the pump


class _Wake(Enum):
    """Reasons, other than data from the peer, for the pump to act."""

    LOCAL_OPS = "local ops"
    REFRESH = "refresh"
    PERSISTED = "persisted"  # a write of applied ops finished


# What the pump acts on: a chunk from the peer (b"" at end of stream), a wake-up, or the error that broke the stream.
Message = bytes | _Wake | StreamGone
Inbox = trio.MemorySendChannel[Message]


async def _read_stream(stream: INetStream, inbox: Inbox) -> None:
    """Forward chunks from the peer into `inbox`, then b"" at end of stream or the error that ended it."""
    try:
        while data := await read_chunk(stream):
            await inbox.send(data)
        await inbox.send(b"")
    except StreamGone as error:
        await inbox.send(error)


async def _wake_on_local_ops(outgoing: Notifier, inbox: Inbox) -> NoReturn:
    """Tell the pump each time there are new ops to send."""
    seen = outgoing.version
    while True:
        seen = await outgoing.wait(seen)
        await inbox.send(_Wake.LOCAL_OPS)


async def _wake_to_refresh(every_s: float, inbox: Inbox) -> NoReturn:
    """Tell the pump to refresh every `every_s` seconds."""
    while True:
        await trio.sleep(every_s)
        await inbox.send(_Wake.REFRESH)


async def _send_all(stream: INetStream, frames: list[bytes], write_timeout_s: float) -> None:
    for frame in frames:
        await write_within(stream, frame, write_timeout_s)


async def _pump(
    stream: INetStream,
    session: SyncSession,
    inbox: trio.MemoryReceiveChannel[Message],
    writer: AppliedOpsWriter,
    read_timeout_s: float,
    write_timeout_s: float,
) -> str:
    """Drive the session from `inbox` until it ends and return why; raise StreamGone or RemoteProtocolError."""
    await send_pending(stream, session, write_timeout_s)  # our HELLO
    listening_since = trio.current_time()
    try:
        while True:
            # The write lock is given up early when another writer waits, once what is applied is persisted.
            if writer.others_waiting and not writer.idle:
                await _send_all(stream, await writer.drain(), write_timeout_s)
            if writer.idle:
                writer.release_lock()
                # Only now, with everything applied persisted, may frames that claim it (a refresh's ACK) go out.
                await send_pending(stream, session, write_timeout_s)
            message: Message | None = None
            with trio.move_on_at(listening_since + read_timeout_s):
                message = await inbox.receive()
            match message:
                case None:
                    # Both sides refresh more often than this, so a live peer is never this quiet.
                    return f"no data from the peer for {read_timeout_s} s"
                case b"":
                    await _send_all(stream, await writer.drain(), write_timeout_s)
                    return "the peer closed the stream"
                case bytes():
                    await writer.hold_lock()
                    try:
                        events = session.receive_data(message)
                    except RemoteProtocolError:
                        await _send_all(stream, await writer.drain(), write_timeout_s)  # earlier chunks are kept
                        raise
                    if events:
                        await _send_all(stream, await writer.add(events, session.take_ack()), write_timeout_s)
                    if session.state is SessionState.CLOSED:
                        await _send_all(stream, await writer.drain(), write_timeout_s)
                        closed = next(event for event in events if isinstance(event, PeerClosed))
                        return f"the peer ended the session: {closed.reason}: {closed.detail}"
                    # Silence is counted from when this side was ready to listen again, not from the last chunk.
                    listening_since = trio.current_time()
                case _Wake.PERSISTED:
                    await _send_all(stream, await writer.settle(), write_timeout_s)
                case _Wake.REFRESH:
                    await _send_all(stream, await writer.drain(), write_timeout_s)
                    session.refresh()
                case _Wake.LOCAL_OPS:
                    pass  # the new ops go out at the top of the loop, once nothing applied waits to be persisted
                case StreamGone():
                    raise message
    finally:
        writer.release_lock()


async def run_session(
    stream: INetStream,
    session: SyncSession,
    *,
    on_events: Callable[[list[Event]], Awaitable[None]],
    outgoing: Notifier,
    apply_lock: trio.Lock | None = None,
    read_timeout_s: float = 30.0,
    refresh_every_s: float = 10.0,
    write_timeout_s: float = 10.0,
    received_early: bytes = b"",
) -> str:
    """Run `session` over `stream` until it ends and return why; on bad peer data, tell the peer, then raise.

    `on_events` is called, under `apply_lock` (if given), with what the session applied: at once it checks the events and takes
    what to persist; the awaitable it returns persists that, in the background while the pump applies later chunks.
    The lock is held until it is done, and the ACK that claims those ops waits for it. `received_early` holds bytes
    of the session already read from the stream (behind a handshake).
    """
    # Buffered, so the reader keeps taking the peer's data while the pump waits for a write: the writes then cover
    # many chunks each. Bounded: at most INBOX_CHUNKS_MAX reads are held beyond the session's own bound.
    inbox_send, inbox = trio.open_memory_channel[Message](INBOX_CHUNKS_MAX)
    reason, usable = "this node ended the session", True
    failure: Exception | None = None
    writer: AppliedOpsWriter | None = None
    try:
        async with trio.open_nursery() as nursery:
            if received_early:
                inbox_send.send_nowait(received_early)
            nursery.start_soon(_read_stream, stream, inbox_send)
            nursery.start_soon(_wake_on_local_ops, outgoing, inbox_send)
            nursery.start_soon(_wake_to_refresh, refresh_every_s, inbox_send)
            writer = AppliedOpsWriter(
                nursery, session, on_events, lambda: inbox_send.send(_Wake.PERSISTED), apply_lock or trio.Lock()
            )
            try:
                reason = await _pump(stream, session, inbox, writer, read_timeout_s, write_timeout_s)
            except StreamGone as error:
                reason, usable = str(error), False
            except Exception as error:
                # Re-raised below, outside the nursery, so callers see it rather than an ExceptionGroup.
                failure, reason = error, str(error)
            nursery.cancel_scope.cancel()
    finally:
        # A write that finished still has its ACK sent when this node stops (`pair join` ends right after its last
        # write): else the peer counts those ops as lacking here until this device next connects.
        owed = [] if writer is None else writer.take_persisted_ack()
        session.close(reason)  # no-op if the session already ended, its ERROR frame possibly still queued
        await finish_stream(stream, session, usable, owed)
    if failure is not None:
        raise failure
    return reason
