"""The relay: libp2p circuit relay v2 HOP under resource limits, and a zero-knowledge mailbox for sealed batches.

This package's top level exports what devices use (the mailbox client, mailbox keys and errors); the server lives in
relay.server, relay.circuit, relay.mailbox_service and relay.mailbox_store.
"""

from relay.errors import (
    MailboxConnectionError,
    MailboxReason,
    MailboxRefused,
    MailboxSessionEnded,
    MailboxStoreError,
    RelayError,
)
from relay.mailbox_client import MAILBOX_PROTOCOL, MailboxClient
from relay.mailbox_keys import MailboxKeys, current_mailbox, mailbox_keys, mailboxes_to_drain
from relay.mailbox_protocol import MailboxItem

__all__ = [
    "MAILBOX_PROTOCOL",
    "MailboxClient",
    "MailboxConnectionError",
    "MailboxItem",
    "MailboxKeys",
    "MailboxReason",
    "MailboxRefused",
    "MailboxSessionEnded",
    "MailboxStoreError",
    "RelayError",
    "current_mailbox",
    "mailbox_keys",
    "mailboxes_to_drain",
]
