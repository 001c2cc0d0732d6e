"""The mailbox in a NATS JetStream stream: any number of relays pointed at one cluster serve the same mailboxes.

One stream, one subject per mailbox (`<stream>.<mailbox id hex>`); the stream sequence is the cursor. JetStream
enforces, atomically for every relay: expiry (max_age), the item quota (max_msgs_per_subject, discard new per
subject), the store's total (max_bytes, discard new: its own record size, ~blob + 200 bytes), idempotent puts
(a Nats-Msg-Id derived from the blob within the duplicate window) and replication (a put is acknowledged once a
majority of the replicas stored it). The relay enforces the byte quota per mailbox: each item carries the running
byte total of its mailbox, and a put names the mailbox's last sequence it computed that total from
(Nats-Expected-Last-Subject-Sequence), so two relays putting into one mailbox at once cannot both pass the check.
docs/spec/relay.md section 4.

nats-py is asyncio and the relay runs on trio: the client lives on an asyncio loop of its own thread
(relay/asyncio_bridge.py); everything below `_JetStreamMailboxes` runs on that loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import nats
import nats.errors
import nats.js.errors
import trio
from nats.aio.client import Client
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from relay.asyncio_bridge import AsyncioBridge, BridgeClosed
from relay.errors import MailboxReason, MailboxRefused, MailboxStoreError
from relay.mailbox_protocol import MailboxItem
from relay.mailbox_store import StoreLimits, put_digest

T = TypeVar("T")
STREAM_NAME = "AICO_MAILBOX"
REPLICAS_MAX = 3
CALLS_MAX = 1024  # store calls in flight on the NATS loop; more wait in trio
CALL_TIMEOUT_S = 10.0  # one store call, retries included; under the service's store timeout
REQUEST_TIMEOUT_S = 2.0  # one request to NATS
CONNECT_TIMEOUT_S = 5.0
RECONNECT_WAIT_S = 0.5
FAILOVER_WAIT_S = 2.0  # a request waits this long for the client to reconnect to another server, then is refused
FAILOVER_POLL_S = 0.05
RETRY_WAIT_S = (0.05, 0.1, 0.2, 0.4, 0.8)  # between attempts while a stream leader is elected; then the last again
PUT_ATTEMPTS_MAX = 20
STALE_READ_RETRIES = 3  # a replica behind this relay's own last put is asked again this often
STALE_READ_WAIT_S = 0.02
TAILS_MAX = 100_000  # mailboxes whose last sequence and byte total this relay remembers
HEADERS_BYTES_MAX = 1024  # the headers a relay adds to a blob, with room to spare
TOTAL_HEADER = "Aico-Mailbox-Bytes"  # blob bytes put into this item's mailbox, from its first item to this one
BYTES_QUOTA_KEY = "aico.mailbox_bytes_max"  # stream metadata: the per-mailbox byte quota every relay must share
# JetStream API error codes (nats-server errors.json).
# 10164 when the conflict is with a put still being replicated, 10071 otherwise.
WRONG_LAST_SEQUENCE = (10071, 10164)
STORE_FAILED = 10077  # carries the store's refusal: per-subject or total limits
MESSAGE_TOO_LARGE = 10054
REPLICAS_NOT_SUPPORTED = (10074, 10023)  # one server without a cluster; not enough servers

logger = logging.getLogger(__name__)
_UNREACHABLE = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.ConnectionClosedError,
    nats.js.errors.NoStreamResponseError,
    asyncio.TimeoutError,
)


class _Unavailable(Exception):
    """NATS or the stream cannot answer now; worth retrying later."""


@attrs.frozen
class _Tail:
    """What a relay knows of one mailbox: its last sequence, the running byte total there, and the total before
    its oldest live item (so the live bytes are `total - base`)."""

    last_seq: int
    total: int
    base: int


@attrs.define
class _MailboxLock:
    """Serialises one relay's puts into one mailbox; dropped when no put holds or awaits it."""

    lock: asyncio.Lock = attrs.Factory(asyncio.Lock)
    users: int = 0


class JetStreamMailboxStore:
    """The mailbox store in a JetStream stream shared by a fleet of relays; its calls run on the NATS loop."""

    def __init__(self, bridge: AsyncioBridge, mailboxes: _JetStreamMailboxes) -> None:
        self.limits = mailboxes.limits
        self._bridge = bridge
        self._mailboxes: _JetStreamMailboxes | None = mailboxes

    @classmethod
    async def open(
        cls, urls: list[str], limits: StoreLimits | None = None, stream: str = STREAM_NAME
    ) -> JetStreamMailboxStore:
        """Connect to the cluster at `urls` and create the stream (replicas = min(3, cluster size)) or check that
        the existing one has these limits."""
        bridge = AsyncioBridge(CALLS_MAX, name="nats-mailbox")
        mailboxes = _JetStreamMailboxes(limits or StoreLimits(), stream, urls)
        try:
            await bridge.call(mailboxes.open, CONNECT_TIMEOUT_S * len(urls) + CALL_TIMEOUT_S)
        except BaseException as error:
            with trio.CancelScope(shield=True):
                # Stopping the loop cancels a connection still retrying; a connection made is closed first.
                with contextlib.suppress(Exception):
                    await bridge.call(mailboxes.close, CALL_TIMEOUT_S)
                await bridge.aclose()
            if isinstance(error, (*_UNREACHABLE, trio.TooSlowError, nats.errors.NoServersError, OSError)):
                raise MailboxStoreError(f"cannot reach the NATS servers {', '.join(urls)}: {error!r}") from None
            if isinstance(error, nats.js.errors.APIError):
                raise MailboxStoreError(f"JetStream refused the mailbox stream {stream}: {error.description}") from None
            raise
        return cls(bridge, mailboxes)

    async def _call(self, operation: Callable[[_JetStreamMailboxes], Awaitable[T]]) -> T:
        """Run `operation` on the NATS loop; unreachable NATS is a refusal worth retrying (`unavailable`)."""
        mailboxes = self._mailboxes
        if mailboxes is None:
            raise MailboxStoreError("the JetStream mailbox store is closed")
        try:
            return await self._bridge.call(lambda: operation(mailboxes), CALL_TIMEOUT_S)
        except (_Unavailable, trio.TooSlowError, BridgeClosed, *_UNREACHABLE) as error:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to log there any more
                self._bridge.loop.call_soon_threadsafe(mailboxes.health.failed, error)
            raise MailboxRefused(
                MailboxReason.UNAVAILABLE, "the relay's mailbox store is unreachable; try again later"
            ) from None
        except nats.errors.Error as error:
            raise MailboxStoreError(f"JetStream mailbox store: {error!r}") from None

    async def put(self, mailbox_id: bytes, blob: bytes) -> int:
        """Store `blob` in `mailbox_id` once JetStream has it on a majority of replicas; return its sequence."""
        return await self._call(lambda mailboxes: mailboxes.put(mailbox_id, blob))

    async def fetch(
        self, mailbox_id: bytes, after_cursor: int, limit: int, bytes_max: int
    ) -> tuple[list[MailboxItem], bool]:
        """Up to `limit` blobs of `mailbox_id` with sequences above `after_cursor`, oldest first, within
        `bytes_max` (the first one always), and whether more follow."""
        return await self._call(lambda mailboxes: mailboxes.fetch(mailbox_id, after_cursor, limit, bytes_max))

    async def purge_expired(self) -> int:
        """Nothing to do: JetStream deletes items past the stream's max_age itself."""
        return 0

    async def close(self) -> None:
        """Close the NATS connection and stop its loop; idempotent."""
        mailboxes, self._mailboxes = self._mailboxes, None
        if mailboxes is not None:
            with trio.CancelScope(shield=True):
                try:
                    await self._bridge.call(mailboxes.close, CALL_TIMEOUT_S)
                except (TimeoutError, trio.TooSlowError, BridgeClosed, nats.errors.Error) as error:
                    logger.warning("closing the NATS connection failed: %r", error)
                await self._bridge.aclose()


class _Health:
    """Whether NATS answers, logged once per change rather than once per request."""

    def __init__(self) -> None:
        self.answering = True

    def failed(self, error: BaseException) -> None:
        if self.answering:
            self.answering = False
            logger.warning("mailbox store: NATS does not answer (%r); refusing requests as unavailable", error)

    def answered(self) -> None:
        if not self.answering:
            self.answering = True
            logger.warning("mailbox store: NATS answers again")


class _JetStreamMailboxes:
    """The mailbox operations on the NATS loop: one connection, one stream, the tails of recent mailboxes."""

    def __init__(self, limits: StoreLimits, stream: str, urls: list[str]) -> None:
        self.limits = limits
        self.stream = stream
        self.urls = urls
        self.health = _Health()
        self._nc: Client | None = None
        self._tails: OrderedDict[bytes, _Tail] = OrderedDict()
        self._locks: dict[bytes, _MailboxLock] = {}  # of the mailboxes with puts in flight

    # -- connection and stream --

    async def open(self) -> None:
        self._nc = await nats.connect(
            self.urls,
            connect_timeout=CONNECT_TIMEOUT_S,
            reconnect_time_wait=RECONNECT_WAIT_S,
            max_reconnect_attempts=1,  # at start: each server twice at most, so an unreachable cluster fails the start
            pending_size=0,  # while disconnected a publish fails at once instead of being buffered
            allow_reconnect=True,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            error_cb=self._on_error,
            closed_cb=self._on_closed,
            name="aico-relay",
        )
        # Once running, a relay waits for its cluster forever (refusing puts as unavailable meanwhile). nats-py
        # reads this option at each reconnect.
        self._nc.options["max_reconnect_attempts"] = -1
        needed = self.limits.blob_bytes_max + HEADERS_BYTES_MAX
        if self._nc.max_payload < needed:
            raise MailboxStoreError(
                f"the NATS servers accept messages of at most {self._nc.max_payload} bytes; the mailbox needs"
                f" {needed}: set max_payload to at least {needed} in every server's configuration"
            )
        await self._ensure_stream()

    # A failover from one server to another is routine: logged at info. Requests failing is what a warning is
    # for, and _Health says it once.

    async def _on_disconnected(self) -> None:
        logger.info("mailbox store: disconnected from NATS at %s; reconnecting", self._server())

    async def _on_reconnected(self) -> None:
        logger.info("mailbox store: reconnected to NATS at %s", self._server())

    def _server(self) -> str:
        url = self._nc.connected_url if self._nc is not None else None
        return url.netloc if url is not None else "?"

    async def _on_error(self, error: Exception) -> None:
        logger.debug("NATS client error: %r", error)  # every failed reconnect lands here: the transition is logged

    async def _on_closed(self) -> None:
        logger.info("mailbox store: NATS connection closed")

    def _config(self, replicas: int) -> StreamConfig:
        limits = self.limits
        return StreamConfig(
            name=self.stream,
            subjects=[f"{self.stream}.*"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=limits.expire_s,
            max_msgs_per_subject=limits.mailbox_items_max,
            max_bytes=limits.total_bytes_max,
            max_msg_size=limits.blob_bytes_max + HEADERS_BYTES_MAX,
            discard=DiscardPolicy.NEW,
            discard_new_per_subject=True,
            duplicate_window=limits.duplicate_window_s,
            allow_direct=True,
            metadata={BYTES_QUOTA_KEY: str(limits.mailbox_bytes_max)},
        )

    async def _ensure_stream(self) -> None:
        """Create the stream with as many replicas as the cluster allows, up to 3, or check the existing one."""
        js = self._js()
        try:
            existing = (await js.stream_info(self.stream)).config
        except nats.js.errors.NotFoundError:
            await self._create_stream(js)
            return
        wanted = self._config(existing.num_replicas or 1)
        differing = [
            field
            for field in ("subjects", "max_age", "max_msgs_per_subject", "max_bytes", "max_msg_size", "discard",
                          "discard_new_per_subject", "duplicate_window", "allow_direct")
            if getattr(existing, field) != getattr(wanted, field)
        ]  # fmt: skip
        if (existing.metadata or {}).get(BYTES_QUOTA_KEY) != str(self.limits.mailbox_bytes_max):
            differing.append("mailbox_bytes_max")
        if differing:
            raise MailboxStoreError(
                f"the mailbox stream {self.stream} exists with other limits ({', '.join(differing)}): every relay"
                " of a fleet must run with the same limits"
            )

    async def _create_stream(self, js: nats.js.JetStreamContext) -> None:
        for replicas in range(REPLICAS_MAX, 0, -1):
            try:
                await js.add_stream(self._config(replicas))
            except nats.js.errors.APIError as error:
                if error.err_code not in REPLICAS_NOT_SUPPORTED or replicas == 1:
                    raise
                continue
            logger.info("created mailbox stream %s with %d replicas", self.stream, replicas)
            return

    def _js(self) -> nats.js.JetStreamContext:
        if self._nc is None or self._nc.is_closed:
            raise _Unavailable("not connected")
        return self._nc.jetstream(timeout=REQUEST_TIMEOUT_S)

    async def close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()

    def _subject(self, mailbox_id: bytes) -> str:
        return f"{self.stream}.{mailbox_id.hex()}"

    # -- put --

    async def put(self, mailbox_id: bytes, blob: bytes) -> int:
        limits = self.limits
        size = len(blob)
        if size > limits.blob_bytes_max:
            raise MailboxRefused(MailboxReason.BLOB_TOO_LARGE, f"blob of {size} bytes exceeds {limits.blob_bytes_max}")
        await self._connected()
        msg_id = put_digest(mailbox_id, blob).hex()
        lock = self._locks.get(mailbox_id) or self._locks.setdefault(mailbox_id, _MailboxLock())
        lock.users += 1
        try:
            # One put at a time per mailbox in this relay: each names the sequence the previous one got.
            async with lock.lock:
                seq = await self._put_in_order(mailbox_id, blob, msg_id)
        finally:
            lock.users -= 1
            if not lock.users:
                del self._locks[mailbox_id]
        self.health.answered()
        return seq

    async def _put_in_order(self, mailbox_id: bytes, blob: bytes, msg_id: str) -> int:
        limits = self.limits
        size = len(blob)
        tail = self._tails.get(mailbox_id) or await self._read_tail(mailbox_id)
        for attempt in range(PUT_ATTEMPTS_MAX):
            if tail.total - tail.base + size > limits.mailbox_bytes_max:
                tail = await self._read_tail(mailbox_id)  # items may have expired since it was read
                used = tail.total - tail.base
                if used + size > limits.mailbox_bytes_max:
                    raise MailboxRefused(
                        MailboxReason.QUOTA_EXCEEDED,
                        f"mailbox holds {used} bytes; quota {limits.mailbox_items_max} items,"
                        f" {limits.mailbox_bytes_max} bytes",
                    )
            headers = {
                "Nats-Msg-Id": msg_id,
                "Nats-Expected-Last-Subject-Sequence": str(tail.last_seq),
                TOTAL_HEADER: str(tail.total + size),
            }
            try:
                ack = await self._js().publish(self._subject(mailbox_id), blob, headers=headers)
            except nats.js.errors.APIError as error:
                if error.err_code in WRONG_LAST_SEQUENCE:
                    tail = await self._read_tail(mailbox_id)  # another relay put into this mailbox meanwhile
                    continue
                raise _refusal(error) from None
            except _UNREACHABLE as error:
                # No stream leader (an election), or no answer: the same message id makes trying again safe.
                await self._connected()
                logger.debug("a mailbox put found no stream leader (%r); trying again", error)
                await asyncio.sleep(RETRY_WAIT_S[min(attempt, len(RETRY_WAIT_S) - 1)])
                continue
            if ack.duplicate:
                self._tails.pop(mailbox_id, None)  # stored before, maybe before other items: read again next time
            else:
                self._remember(mailbox_id, _Tail(ack.seq, tail.total + size, tail.base))
            return ack.seq
        raise _Unavailable(f"no put into mailbox {mailbox_id.hex()} succeeded in {PUT_ATTEMPTS_MAX} attempts")

    async def _read_tail(self, mailbox_id: bytes) -> _Tail:
        """The mailbox's last sequence and byte totals, from the stream leader (reads that see every put)."""
        js = self._js()
        subject = self._subject(mailbox_id)
        try:
            last = await js.get_msg(self.stream, subject=subject)
            first = await js.get_msg(self.stream, seq=1, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            tail = _Tail(0, 0, 0)  # empty: no item, or all expired
        else:
            base = _running_total(first.headers) - len(first.data or b"")
            tail = _Tail(last.seq or 0, _running_total(last.headers), base)
        self._remember(mailbox_id, tail)
        return tail

    def _remember(self, mailbox_id: bytes, tail: _Tail) -> None:
        self._tails[mailbox_id] = tail
        self._tails.move_to_end(mailbox_id)
        while len(self._tails) > TAILS_MAX:
            self._tails.popitem(last=False)

    async def _connected(self) -> None:
        """Return once connected, waiting out a failover to another server; raise _Unavailable if none comes."""
        for _ in range(int(FAILOVER_WAIT_S / FAILOVER_POLL_S)):
            if self._nc is not None and self._nc.is_connected:
                return
            if self._nc is None or self._nc.is_closed:
                break
            await asyncio.sleep(FAILOVER_POLL_S)
        raise _Unavailable("not connected to any NATS server")

    # -- fetch --

    async def fetch(
        self, mailbox_id: bytes, after_cursor: int, limit: int, bytes_max: int
    ) -> tuple[list[MailboxItem], bool]:
        await self._connected()
        tail = self._tails.get(mailbox_id)
        for _ in range(STALE_READ_RETRIES):
            items, more = await self._direct_get(mailbox_id, after_cursor, limit, bytes_max)
            newest = items[-1].cursor if items else after_cursor
            # Direct gets are answered by any replica. One that has not applied this relay's own last put yet
            # answers a prefix (never skipping), so asking again a moment later is enough.
            if more or tail is None or newest >= tail.last_seq:
                break
            await asyncio.sleep(STALE_READ_WAIT_S)
        self.health.answered()
        return items, more

    async def _direct_get(
        self, mailbox_id: bytes, after_cursor: int, limit: int, bytes_max: int
    ) -> tuple[list[MailboxItem], bool]:
        """One batched direct get (ADR-31): the messages after `after_cursor`, then an end-of-batch status."""
        assert self._nc is not None
        # The server counts whole records (blob, subject, headers) against max_bytes: with room for every record's
        # headers it never stops before the blob budget; what it sends beyond is dropped here.
        request = {
            "seq": after_cursor + 1,
            "next_by_subj": self._subject(mailbox_id),
            "batch": limit,
            "max_bytes": bytes_max + limit * HEADERS_BYTES_MAX,
        }
        inbox = self._nc.new_inbox()
        subscription = await self._nc.subscribe(inbox)
        items: list[MailboxItem] = []
        used = 0
        trimmed = False
        try:
            await self._nc.publish(f"$JS.API.DIRECT.GET.{self.stream}", json.dumps(request).encode(), reply=inbox)
            for _ in range(limit + 1):
                message = await subscription.next_msg(timeout=REQUEST_TIMEOUT_S)
                headers = message.headers or {}
                status = headers.get("Status")
                if status == "404":
                    return items, False
                if status is not None:
                    if status != "204":
                        raise _Unavailable(f"direct get answered {status} {headers.get('Description', '')}")
                    return items, trimmed or int(headers.get("Nats-Num-Pending", "0")) > 0
                blob = message.data
                if trimmed or (items and used + len(blob) > bytes_max):
                    trimmed = True
                    continue
                items.append(MailboxItem(int(headers["Nats-Sequence"]), blob))
                used += len(blob)
            raise _Unavailable("a direct get sent more than its batch")
        finally:
            await subscription.unsubscribe()


def _running_total(headers: dict[str, str] | None) -> int:
    try:
        return int((headers or {})[TOTAL_HEADER])
    except (KeyError, ValueError):
        raise MailboxStoreError(
            f"a mailbox item lacks its {TOTAL_HEADER} header: the stream holds foreign items"
        ) from None


def _refusal(error: nats.js.errors.APIError) -> MailboxRefused | MailboxStoreError:
    """The relay's answer to JetStream refusing a put."""
    description = error.description or ""
    if error.err_code == STORE_FAILED and "per subject" in description:
        return MailboxRefused(MailboxReason.QUOTA_EXCEEDED, f"the mailbox is full ({description})")
    if error.err_code == STORE_FAILED and "bytes" in description:
        return MailboxRefused(MailboxReason.STORE_FULL, "the relay's store is full")
    if error.err_code == MESSAGE_TOO_LARGE:
        return MailboxRefused(MailboxReason.BLOB_TOO_LARGE, description)
    return MailboxStoreError(f"JetStream refused a put: {error.err_code} {description}")
