"""The relay: libp2p circuit relay v2 HOP under resource limits, and a zero-knowledge mailbox for sealed batches."""

from relay.errors import (
    MailboxConnectionError,
    MailboxReason,
    MailboxRefused,
    MailboxSessionEnded,
    MailboxStoreError,
    RelayError,
)
from relay.mailbox_keys import MailboxKeys, current_mailbox, mailbox_keys, mailboxes_to_drain
from relay.mailbox_protocol import MailboxItem
from relay.mailbox_service import MAILBOX_PROTOCOL, MailboxClient, ServiceConfig, serve_mailbox, sweep_expired
from relay.mailbox_sqlite import SqliteMailboxStore
from relay.mailbox_store import MailboxStore, StoreLimits, open_mailbox_store

__all__ = [
    "MAILBOX_PROTOCOL",
    "MailboxClient",
    "MailboxConnectionError",
    "MailboxItem",
    "MailboxKeys",
    "MailboxReason",
    "MailboxRefused",
    "MailboxSessionEnded",
    "MailboxStore",
    "MailboxStoreError",
    "RelayError",
    "ServiceConfig",
    "SqliteMailboxStore",
    "StoreLimits",
    "current_mailbox",
    "mailbox_keys",
    "mailboxes_to_drain",
    "open_mailbox_store",
    "serve_mailbox",
    "sweep_expired",
]
