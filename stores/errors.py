"""Typed errors raised by every store adapter."""


class StoreError(Exception):
    """A store operation failed; the root of every error the stores raise."""


class WrongKeyError(StoreError):
    """The store key or passphrase does not open the store file."""


class StoreCorruptError(StoreError):
    """Stored bytes failed an integrity check or cannot be parsed."""


class StoreClosedError(StoreError):
    """The store was used after it was closed."""


class CacheItemTooLargeError(StoreError):
    """A cache key or value exceeds the size the cache accepts."""


class StoreTimeoutError(StoreError):
    """A store call did not finish within its time limit."""


class DataError(StoreError):
    """A request the data layer refuses: a malformed value, an unknown id, a wrong embedding size."""

    rpc_error_type = "bad_request"
