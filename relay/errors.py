"""Errors raised by the relay and its clients; every one derives from `RelayError`."""

from enum import StrEnum

from framing import ReasonedError


class MailboxReason(StrEnum):
    """Why a mailbox request was refused or a mailbox session ended, as sent in REFUSED and ERROR frames."""

    # A request is refused; the session goes on.
    UNAUTHORISED = "unauthorised"
    BLOB_TOO_LARGE = "blob_too_large"
    QUOTA_EXCEEDED = "quota_exceeded"
    STORE_FULL = "store_full"
    UNAVAILABLE = "unavailable"
    # The session ends.
    CLOSED = "closed"
    TIMEOUT = "timeout"
    PROTOCOL_MISMATCH = "protocol_mismatch"
    MALFORMED_FRAME = "malformed_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    UNEXPECTED_FRAME = "unexpected_frame"
    TOO_MANY_REQUESTS = "too_many_requests"


class RelayError(Exception):
    """Root of every error the relay and its clients raise (protocol errors are framing's, shared with the node)."""


class MailboxRefused(RelayError, ReasonedError):
    """One mailbox request was refused (unauthorised, too large, over quota, store full); others may succeed."""

    reason: MailboxReason


class MailboxSessionEnded(RelayError, ReasonedError):
    """The other side ended the mailbox session."""

    reason: MailboxReason


class MailboxConnectionError(RelayError):
    """The stream to the relay failed, or the relay did not answer in time; open a new session."""


class MailboxStoreError(RelayError):
    """The mailbox store could not be opened, read or written."""
