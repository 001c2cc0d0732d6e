"""Errors raised by the node; every one derives from `NodeError`. Protocol errors (whose fault a failed session is)
are framing's, shared with the relay."""

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


class UnsealError(NodeError):
    """A sealed batch failed authentication, decryption or its signature check."""
