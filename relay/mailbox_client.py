"""A device's side of the mailbox over libp2p (`/aico/mailbox/1`): one session with a relay's mailbox."""

from __future__ import annotations

from collections import deque
from types import TracebackType

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamError

from framing import RemoteProtocolError
from p2p import CLOSE_TIMEOUT_S, StreamGone, read_chunk, send_pending
from relay.errors import MailboxConnectionError, MailboxReason, MailboxRefused, MailboxSessionEnded
from relay.mailbox_keys import MailboxKeys
from relay.mailbox_protocol import (
    FETCH_ITEMS_MAX,
    PROTOCOL_ID,
    ClientEvent,
    ItemsFetched,
    MailboxClientProtocol,
    MailboxItem,
    ProtocolState,
    PutAccepted,
    RequestRefused,
    SessionEnded,
)

MAILBOX_PROTOCOL = TProtocol(PROTOCOL_ID)


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
            await send_pending(self._stream, self._protocol, self._timeout_s)
        except StreamGone as error:
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
                    data = await read_chunk(self._stream)
                    if not data:
                        raise MailboxConnectionError("the relay closed the stream")
                    self._events.extend(self._protocol.receive_data(data))
        except trio.TooSlowError:
            self._broken = True
            raise MailboxConnectionError(f"the relay did not answer within {self._timeout_s} s") from None
        except (StreamGone, MailboxConnectionError, RemoteProtocolError) as error:
            self._broken = True
            if isinstance(error, StreamGone):
                raise MailboxConnectionError(str(error)) from None
            raise
        event = self._events.popleft()
        if isinstance(event, SessionEnded):
            raise MailboxSessionEnded(event.reason, event.detail)
        return event
