"""Errors raised by the node; every one derives from `NodeError`."""

from enum import StrEnum


class EndReason(StrEnum):
    """Why a sync session ended, as sent to the peer in an ERROR frame."""

    CLOSED = "closed"
    PROTOCOL_MISMATCH = "protocol_mismatch"
    SCHEMA_MISMATCH = "schema_mismatch"
    EPOCH_MISMATCH = "epoch_mismatch"
    SELF_CONNECTION = "self_connection"
    MALFORMED_FRAME = "malformed_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    UNEXPECTED_FRAME = "unexpected_frame"
    UNSEAL_FAILED = "unseal_failed"


class NodeError(Exception):
    """Root of every error the node raises."""


class LocalProtocolError(NodeError):
    """This side used a protocol object wrongly (a bug here, not the peer's fault)."""


class ReasonedError(NodeError):
    """An error with a machine-readable `reason` (a StrEnum member) and a `detail` for people."""

    def __init__(self, reason: StrEnum, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RemoteProtocolError(ReasonedError):
    """The peer sent something this side cannot accept; the session is over."""

    reason: EndReason


class UnsealError(NodeError):
    """A sealed batch failed authentication, decryption or its signature check."""
