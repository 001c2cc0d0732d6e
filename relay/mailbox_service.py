"""The relay's side of the mailbox over libp2p (`/aico/mailbox/1`): the stream handler and the expiry sweep.

Any peer may open a mailbox stream: authorisation is by mailbox key, not by peer id. Each stream is served on
its own and every failure stays inside it, so one bad client never stops the relay serving others.
"""

from __future__ import annotations

import logging
import os
from typing import NoReturn

import attrs
import trio
from libp2p.abc import IHost, INetStream

from framing import RemoteProtocolError
from p2p import StreamGone, finish_stream, read_chunk, reset_quietly, send_pending
from relay.errors import MailboxReason, MailboxRefused, MailboxStoreError
from relay.mailbox_client import MAILBOX_PROTOCOL
from relay.mailbox_protocol import (
    FETCH_REPLY_BYTES_MAX,
    NONCE_BYTES,
    REQUESTS_PER_SESSION_MAX,
    FetchRequested,
    MailboxServerProtocol,
    ProtocolState,
    PutRequested,
    RequestRefused,
    ServerEvent,
)
from relay.mailbox_store import MailboxStore

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
            # An error escaping a libp2p stream handler stops the whole swarm: drop only this stream.
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
        await send_pending(stream, server, config.write_timeout_s)  # the CHALLENGE
        while server.state is ProtocolState.SERVING:
            events = await _next_requests(stream, server, config.request_timeout_s)
            for event in events:
                await _answer(server, store, event, config.store_timeout_s)
            await send_pending(stream, server, config.write_timeout_s)
    except RemoteProtocolError as error:
        logger.info("mailbox session refused the client's data: %s", error)  # the server queued its ERROR
    except StreamGone as error:
        logger.info("mailbox session lost its stream: %s", error)
        usable = False
    finally:
        server.close()
        await finish_stream(stream, server, usable)


async def _next_requests(stream: INetStream, server: MailboxServerProtocol, timeout_s: float) -> list[ServerEvent]:
    """Read until at least one whole request arrived; close `server` on end of stream or after `timeout_s`."""
    # One deadline for the whole request, so a client dripping bytes cannot hold a session open.
    with trio.move_on_after(timeout_s):
        while True:
            data = await read_chunk(stream)
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

