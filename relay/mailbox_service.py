"""The mailbox over libp2p (`/aico/mailbox/1`): the relay's stream handler and a device's client.

Any peer may open a mailbox stream: authorisation is by mailbox key, not by peer id. Each stream is served on
its own and every failure stays inside it, so one bad client never stops the relay serving others.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from types import TracebackType
from typing import NoReturn

import attrs
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF, StreamError

from relay.errors import (
    MailboxConnectionError,
    MailboxReason,
    MailboxRefused,
    MailboxSessionEnded,
    MailboxStoreError,
    RemoteProtocolError,
)
from relay.host import reset_quietly
from relay.mailbox_keys import MailboxKeys
from relay.mailbox_protocol import (
    FETCH_ITEMS_MAX,
    FETCH_REPLY_BYTES_MAX,
    NONCE_BYTES,
    PROTOCOL_ID,
    REQUESTS_PER_SESSION_MAX,
    ClientEvent,
    FetchRequested,
    ItemsFetched,
    MailboxClientProtocol,
    MailboxItem,
    MailboxServerProtocol,
    ProtocolState,
    PutAccepted,
    PutRequested,
    RequestRefused,
    ServerEvent,
    SessionEnded,
)
from relay.mailbox_store import MailboxStore

MAILBOX_PROTOCOL = TProtocol(PROTOCOL_ID)
READ_BYTES = 64 * 1024  # one read's bound; a larger frame arrives over several reads
CLOSE_TIMEOUT_S = 2.0  # bound on saying goodbye, closing or resetting a stream
EXPIRY_SWEEP_EVERY_S = 600.0

logger = logging.getLogger(__name__)


@attrs.frozen
class ServiceConfig:
    """Bounds the relay puts on mailbox sessions."""

    request_timeout_s: float = 30.0  # a client must send each whole request within this of being answered
    write_timeout_s: float = 10.0
    store_timeout_s: float = 30.0
    sessions_max: int = 256  # each may buffer up to one request frame (~1 MiB)
    requests_max: int = REQUESTS_PER_SESSION_MAX


class _StreamGone(Exception):
    """The stream can no longer carry data."""


async def _write(stream: INetStream, data: bytes, timeout_s: float) -> None:
    try:
        with trio.fail_after(timeout_s):
            await stream.write(data)
    except trio.TooSlowError:
        raise _StreamGone(f"the peer took no data for {timeout_s} s") from None
    except StreamError as error:
        raise _StreamGone(f"stream failed while writing: {error or type(error).__name__}") from None


async def _read(stream: INetStream) -> bytes:
    """The next chunk from the peer, b"" at end of stream."""
    try:
        return await stream.read(READ_BYTES)
    except StreamEOF:
        return b""
    except StreamError as error:
        raise _StreamGone(f"stream failed while reading: {error or type(error).__name__}") from None


# -- server -----------------------------------------------------------------------------------------------


def serve_mailbox(libp2p_host: IHost, store: MailboxStore, config: ServiceConfig | None = None) -> None:
    """Answer `/aico/mailbox/1` streams on `libp2p_host` from `store`, for any peer."""
    config = config or ServiceConfig()
    active = 0

    async def handle(stream: INetStream) -> None:
        nonlocal active
        if active >= config.sessions_max:
            logger.warning("refused a mailbox stream: %d sessions already open", active)
            await reset_quietly(stream)
            return
        active += 1
        try:
            await _serve_session(stream, store, config)
        except Exception:
            # An error escaping a libp2p stream handler stops the whole swarm (node/p2p.py): drop only this stream.
            logger.exception("mailbox stream handler failed")
            await reset_quietly(stream)
        finally:
            active -= 1

    libp2p_host.set_stream_handler(MAILBOX_PROTOCOL, handle)


async def sweep_expired(store: MailboxStore, every_s: float = EXPIRY_SWEEP_EVERY_S) -> NoReturn:
    """Purge expired items from `store` now and every `every_s` seconds, forever."""
    while True:
        try:
            purged = await store.purge_expired()
            if purged:
                logger.info("purged %d expired mailbox items", purged)
        except MailboxStoreError as error:
            logger.warning("mailbox expiry sweep failed: %s", error)
        await trio.sleep(every_s)


async def _serve_session(stream: INetStream, store: MailboxStore, config: ServiceConfig) -> None:
    server = MailboxServerProtocol(
        os.urandom(NONCE_BYTES), blob_bytes_max=store.limits.blob_bytes_max, requests_max=config.requests_max
    )
    usable = True
    try:
        await _flush(stream, server, config.write_timeout_s)  # the CHALLENGE
        while server.state is ProtocolState.SERVING:
            events = await _next_requests(stream, server, config.request_timeout_s)
            for event in events:
                await _answer(server, store, event, config.store_timeout_s)
            await _flush(stream, server, config.write_timeout_s)
    except RemoteProtocolError as error:
        logger.info("mailbox session refused the client's data: %s", error)  # the server queued its ERROR
    except _StreamGone as error:
        logger.info("mailbox session lost its stream: %s", error)
        usable = False
    finally:
        server.close()
        if usable:
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                try:
                    await _flush(stream, server, CLOSE_TIMEOUT_S)
                    await stream.close()
                    return
                except (_StreamGone, StreamError):
                    pass
        await reset_quietly(stream)


async def _next_requests(stream: INetStream, server: MailboxServerProtocol, timeout_s: float) -> list[ServerEvent]:
    """Read until at least one whole request arrived; close `server` on end of stream or after `timeout_s`."""
    # One deadline for the whole request, so a client dripping bytes cannot hold a session open.
    with trio.move_on_after(timeout_s):
        while True:
            data = await _read(stream)
            if not data:
                server.close(MailboxReason.CLOSED, "the client closed the stream")
                return []
            if events := server.receive_data(data):
                return events
    server.close(MailboxReason.TIMEOUT, f"no whole request within {timeout_s} s")
    return []


async def _answer(server: MailboxServerProtocol, store: MailboxStore, event: ServerEvent, timeout_s: float) -> None:
    """Carry out one authorised request on the store and give the server its answer."""
    if isinstance(event, RequestRefused):
        logger.debug("refused a mailbox request: %s: %s", event.reason, event.detail)
        return
    try:
        with trio.fail_after(timeout_s):
            if isinstance(event, PutRequested):
                server.accept_put(await store.put(event.mailbox_id, event.blob))
            else:
                assert isinstance(event, FetchRequested)
                found = await store.fetch(event.mailbox_id, event.after_cursor, event.limit, FETCH_REPLY_BYTES_MAX)
                items, more = found
                server.send_items(items, more)
    except MailboxRefused as refusal:
        server.refuse(refusal.reason, refusal.detail)
    except (MailboxStoreError, trio.TooSlowError) as error:
        logger.warning("mailbox store failed a request: %s", error or type(error).__name__)
        server.refuse(MailboxReason.UNAVAILABLE, "the relay's store failed; try again later")


async def _flush(stream: INetStream, protocol: MailboxServerProtocol | MailboxClientProtocol, timeout_s: float) -> None:
    while (data := protocol.generate()) is not None:
        await _write(stream, data, timeout_s)


# -- client -----------------------------------------------------------------------------------------------


class MailboxClient:
    """A device's session with a relay's mailbox over one open `/aico/mailbox/1` stream, which it closes on exit."""

    def __init__(self, stream: INetStream, *, timeout_s: float = 10.0) -> None:
        self._stream = stream
        self._timeout_s = timeout_s
        self._protocol = MailboxClientProtocol()
        self._events: deque[ClientEvent] = deque()  # a read may complete an answer and the relay's goodbye
        self._broken = False

    async def __aenter__(self) -> MailboxClient:
        try:
            await self._next_event()  # the CHALLENGE
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the stream (reset it if the session broke); idempotent."""
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            if not self._broken:
                try:
                    await self._stream.close()
                    return
                except StreamError:
                    pass
            await self._stream.reset()

    @property
    def requests_left(self) -> int:
        """How many more requests the relay lets this session carry."""
        return self._protocol.requests_left

    async def put(self, keys: MailboxKeys, blob: bytes) -> int:
        """Store `blob` in the mailbox of `keys` and return its cursor; raise MailboxRefused if the relay refuses."""
        self._check_usable()
        self._protocol.put(keys, blob)
        event = await self._exchange()
        assert isinstance(event, PutAccepted)
        return event.cursor

    async def fetch(
        self, keys: MailboxKeys, after_cursor: int = 0, limit: int = FETCH_ITEMS_MAX
    ) -> tuple[list[MailboxItem], bool]:
        """Blobs of the mailbox of `keys` stored after `after_cursor`, oldest first, and whether more follow."""
        self._check_usable()
        self._protocol.fetch(keys, after_cursor, limit)
        event = await self._exchange()
        assert isinstance(event, ItemsFetched)
        return list(event.items), event.more

    def _check_usable(self) -> None:
        if self._broken or self._protocol.state is ProtocolState.CLOSED:
            raise MailboxConnectionError("this mailbox session is over; open another")
        if self._protocol.requests_left <= 0:
            raise MailboxSessionEnded(MailboxReason.TOO_MANY_REQUESTS, "this session carried all it may; open another")

    async def _exchange(self) -> ClientEvent:
        try:
            while (data := self._protocol.generate()) is not None:
                await _write(self._stream, data, self._timeout_s)
        except _StreamGone as error:
            self._broken = True
            raise MailboxConnectionError(str(error)) from None
        event = await self._next_event()
        if isinstance(event, RequestRefused):
            raise MailboxRefused(event.reason, event.detail)
        return event

    async def _next_event(self) -> ClientEvent:
        """The next event from the relay, within the timeout."""
        try:
            with trio.fail_after(self._timeout_s):
                while not self._events:
                    data = await _read(self._stream)
                    if not data:
                        raise MailboxConnectionError("the relay closed the stream")
                    self._events.extend(self._protocol.receive_data(data))
        except trio.TooSlowError:
            self._broken = True
            raise MailboxConnectionError(f"the relay did not answer within {self._timeout_s} s") from None
        except (_StreamGone, MailboxConnectionError, RemoteProtocolError) as error:
            self._broken = True
            if isinstance(error, _StreamGone):
                raise MailboxConnectionError(str(error)) from None
            raise
        event = self._events.popleft()
        if isinstance(event, SessionEnded):
            raise MailboxSessionEnded(event.reason, event.detail)
        return event
