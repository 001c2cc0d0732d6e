"""Errors raised by the relay and its clients; every one derives from `RelayError`."""

from enum import StrEnum


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
    """Root of every error the relay and its clients raise."""


class LocalProtocolError(RelayError):
    """This side used a protocol object wrongly (a bug here, not the peer's fault)."""


class ReasonedError(RelayError):
    """An error with a machine-readable `reason` and a `detail` for people."""

    def __init__(self, reason: MailboxReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RemoteProtocolError(ReasonedError):
    """The peer sent something this side cannot accept; the session is over."""


class MailboxRefused(ReasonedError):
    """One mailbox request was refused (unauthorised, too large, over quota, store full); others may succeed."""


class MailboxSessionEnded(ReasonedError):
    """The other side ended the mailbox session."""


class MailboxConnectionError(RelayError):
    """The stream to the relay failed, or the relay did not answer in time; open a new session."""


class MailboxStoreError(RelayError):
    """The mailbox store could not be opened, read or written."""
