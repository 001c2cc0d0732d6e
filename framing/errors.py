"""The errors every stream protocol here raises, saying whose fault a failure is; `ProtocolError` is their root."""

from enum import StrEnum


class ProtocolError(Exception):
    """Root of the errors the sync, pairing, mailbox and RPC protocols raise."""


class LocalProtocolError(ProtocolError):
    """This side used a protocol object wrongly (a bug here, not the peer's fault)."""


class ReasonedError(ProtocolError):
    """An error with a machine-readable `reason` (a StrEnum member of its protocol) and a `detail` for people."""

    def __init__(self, reason: StrEnum, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RemoteProtocolError(ReasonedError):
    """The peer sent something this side cannot accept; the session is over."""
