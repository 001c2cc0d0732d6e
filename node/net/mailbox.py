"""Store and forward through a relay's mailbox: post this device's ops sealed, drain what the other devices posted.

So two devices that are never online at the same time still converge. Each device posts only its own ops, once,
sealed under its current group key for the mailbox of the current time bucket (docs/spec/relay.md, "Mailbox use").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import attrs
import trio

from crdt import Collection, DecodeError, Kind, Op, decode_ops, encode_ops
from node.net.dial import dial_protocol
from node.net.host import DialError, P2pHost
from node.net.relays import RelayChoice
from node.sync.receiver import Notifier
from node.trust.identity import DeviceIdentity, GroupKey
from node.trust.keyring import ROTATION_KEY_PREFIX, KeyRing
from node.trust.sealing import UnsealRefusedError, open_from_mailbox, seal_for_mailbox
from relay import (
    MAILBOX_PROTOCOL,
    MailboxClient,
    MailboxConnectionError,
    MailboxKeys,
    MailboxReason,
    MailboxRefused,
    RelayError,
    current_mailbox,
    mailboxes_to_drain,
)
from relay.mailbox_keys import BUCKET_S, time_bucket
from stores.datalayer import DataLayer
from stores.primary import get_meta, set_meta

log = logging.getLogger(__name__)
MAILBOX_META = "mailbox"
POST_OPS_MAX = 2000  # ops in one posted batch
POST_BYTES_MAX = 512 * 1024  # encoded ops in one posted batch, well under the relay's 1 MiB blob bound
POST_DELAY_S = 0.2  # wait after a local write so a burst goes out as one batch
FETCH_ROUNDS_MAX = 1000  # fetches from one mailbox in one drain; the rest waits for the next drain
KEYS_DRAINED = 2  # the current key's mailboxes and the previous one's, which devices that missed a rotation use
RELAY_TIMEOUT_S = 10.0
# After the relay refuses a put for want of space (its store is full), posting waits this long: the relay sweeps
# expired items every 10 minutes. A full mailbox is not retried before the next time bucket's mailbox opens.
POST_PAUSE_S = 600.0


@attrs.define
class RelayHealth:
    """What this node last saw of its relay's mailbox, for `status`."""

    address: str
    last_ok: float | None = None
    last_error: str | None = None
    posted_seq: int = 0
    posts_paused_until: float | None = None  # after a put refused for want of space, no post before this
    received_from: dict[str, float] = attrs.Factory(dict)  # device id -> when its ops last came from the mailbox

    def as_status(self) -> dict:
        return {
            "address": self.address,
            "last_ok": self.last_ok,
            "last_error": self.last_error,
            "posted_seq": self.posted_seq,
            "posts_paused_until": self.posts_paused_until,
        }


class MailboxSync:
    """Posts this device's new ops to the relay's mailbox and drains the other devices' ops from it."""

    def __init__(
        self,
        data: DataLayer,
        identity: DeviceIdentity,
        keyring: KeyRing,
        host: P2pHost,
        relays: RelayChoice,
        *,
        apply_ops: Callable[[list[Op]], Awaitable[list[Op]]],
        verify_key_of: Callable[[str], bytes | None],
        outgoing: Notifier,
        drain_every_s: float = 5.0,
        now_s: Callable[[], float] = time.time,
    ) -> None:
        self.data = data
        self.identity = identity
        self.keyring = keyring
        self.host = host
        self.relays = relays
        self.health = RelayHealth(relays.current)
        self.drain_every_s = drain_every_s
        self._apply_ops = apply_ops
        self._verify_key_of = verify_key_of
        self._outgoing = outgoing
        self._now_s = now_s
        self._cursors: dict[str, int] = {}  # mailbox id (hex) -> cursor of the last item taken
        self._drained_since_s = 0.0
        self._window: set[str] = set()  # the mailboxes of the current drain

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Post and drain until cancelled; a relay that cannot be reached is retried, never fatal."""
        saved = await self.data.sql.run(get_meta, MAILBOX_META) or {}
        self.health.posted_seq = saved.get("posted_seq", 0)
        self._cursors = dict(saved.get("cursors", {}))
        self._drained_since_s = saved.get("drained_since_s", 0.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._post_loop)
            nursery.start_soon(self._drain_loop)
            task_status.started()

    async def _post_loop(self) -> None:
        seen = -1
        while True:
            with trio.move_on_after(self.drain_every_s):  # also retries a post that failed
                seen = await self._outgoing.wait(seen)
                await trio.sleep(POST_DELAY_S)
            await self.post_round()

    async def post_round(self) -> None:
        """Post this device's unposted ops, unless the relay refused them lately for want of space."""
        paused_until = self.health.posts_paused_until
        if paused_until is None or self._now_s() >= paused_until:
            await self._with_relay(self.post_pending)

    async def _drain_loop(self) -> None:
        while True:
            await self._with_relay(self.drain)
            await trio.sleep(self.drain_every_s)

    async def _with_relay(self, work: Callable[[MailboxClient], Awaitable[None]]) -> None:
        try:
            self.health.address = self.relays.current
            _, stream = await dial_protocol(self.host, self.health.address, MAILBOX_PROTOCOL, timeout_s=RELAY_TIMEOUT_S)
            async with MailboxClient(stream, timeout_s=RELAY_TIMEOUT_S) as client:
                await work(client)
            self.health.last_ok, self.health.last_error = self._now_s(), None
        except (DialError, RelayError) as error:
            self.health.last_error = str(error)
            log.info("mailbox at %s: %s", self.health.address, error)
            if isinstance(error, DialError | MailboxConnectionError):  # unreachable, not refusing: try the next one
                self.relays.failed(self.health.address)

    async def post_pending(self, client: MailboxClient) -> None:
        """Post every op of this device not yet posted, in batches, each under the current key."""
        while ops := self._unposted_ops():
            batch = _first_batch(ops)
            body = encode_ops(batch)
            keys = self.keyring.keys()
            # Devices that missed a rotation drain the previous key's mailboxes; a batch with the rotation goes
            # there too, so they get the new key.
            handing_over = any(_hands_over_keys(op) for op in batch)
            for key in keys[: KEYS_DRAINED if handing_over else 1]:
                mailbox = current_mailbox(key.secret, key.epoch, self._now_s())
                try:
                    await client.put(mailbox, seal_for_mailbox(self.identity, key, mailbox.mailbox_id, body))
                except MailboxRefused as refusal:
                    self._pause_posts(refusal)
                    raise
            self.health.posted_seq = batch[-1].seq
            self.health.posts_paused_until = None
            await self._save()

    def _pause_posts(self, refusal: MailboxRefused) -> None:
        """Post nothing more while the relay has no room: retrying every few seconds would resend the same batch."""
        now_s = self._now_s()
        if refusal.reason is MailboxReason.QUOTA_EXCEEDED:
            self.health.posts_paused_until = float((time_bucket(now_s) + 1) * BUCKET_S)
        elif refusal.reason is MailboxReason.STORE_FULL:
            self.health.posts_paused_until = now_s + POST_PAUSE_S

    def _unposted_ops(self) -> list[Op]:
        replica = self.data.replica
        # Everything but this device's ops counts as held, so only its unposted ops come back. Ops compacted away are
        # held by every trusted device already.
        device_id = self.identity.device_id
        vector = {**replica.vector, device_id: max(self.health.posted_seq, replica.log.base(device_id))}
        return replica.ops_since(vector, POST_OPS_MAX)

    async def drain(self, client: MailboxClient) -> None:
        """Take and apply what other devices posted since the last drain, under each key this device holds."""
        started_s = self._now_s()
        drained: set[bytes] = set()
        self._window = set()
        # A drained rotation may hand this device a new key, whose mailboxes are drained in the same round.
        while fresh := [key for key in self.keyring.keys()[:KEYS_DRAINED] if key.key_id not in drained]:
            for key in fresh:
                drained.add(key.key_id)
                for mailbox in mailboxes_to_drain(key.secret, key.epoch, self._drained_since_s, started_s):
                    await self._drain_mailbox(client, key, mailbox)
        self._drained_since_s = started_s
        # Cursors of mailboxes older than the drain window are never needed again.
        self._cursors = {name: cursor for name, cursor in self._cursors.items() if name in self._window}
        await self._save()

    async def _drain_mailbox(self, client: MailboxClient, key: GroupKey, mailbox: MailboxKeys) -> None:
        name = mailbox.mailbox_id.hex()
        self._window.add(name)
        for _ in range(FETCH_ROUNDS_MAX):
            items, more = await client.fetch(mailbox, self._cursors.get(name, 0))
            for item in items:
                await self._take(key, mailbox, item.blob)
                self._cursors[name] = item.cursor
            if items:
                await self._save()
            if not more:
                return

    async def _take(self, key: GroupKey, mailbox: MailboxKeys, blob: bytes) -> None:
        try:
            sender, body = open_from_mailbox(key, mailbox.mailbox_id, blob, self._verify_key_of)
            ops = decode_ops(body)
        except (UnsealRefusedError, DecodeError) as error:
            log.warning("refused a mailbox batch: %s", error)
            return
        if sender == self.identity.device_id:
            return
        if any(op.device != sender for op in ops):
            log.warning("refused a mailbox batch from %s holding another device's ops", sender)
            return
        if await self._apply_ops(ops):
            self.health.received_from[sender] = self._now_s()

    async def _save(self) -> None:
        state = {
            "posted_seq": self.health.posted_seq,
            "cursors": self._cursors,
            "drained_since_s": self._drained_since_s,
        }
        await self.data.sql.run(set_meta, MAILBOX_META, state)


def _first_batch(ops: list[Op]) -> list[Op]:
    """The longest prefix of `ops` within POST_BYTES_MAX once encoded (at least one op)."""
    size = 0
    for count, op in enumerate(ops):
        size += len(encode_ops([op]))
        if size > POST_BYTES_MAX and count:
            return ops[:count]
    return ops


def _hands_over_keys(op: Op) -> bool:
    """Whether `op` revokes a device or rotates the group key."""
    return op.kind is Kind.REVOKE or (op.collection is Collection.SETTINGS and op.key.startswith(ROTATION_KEY_PREFIX))
