"""Store adapters: encrypted primary SQL, in-memory analytics, vector index and sealed key-value cache."""

from typing import TYPE_CHECKING

from stores.analytics import AnalyticsMessage, AnalyticsStore, DailyRow
from stores.cache import PersistentQueue, QueuedItem, QueueFullError, SealedKv
from stores.errors import (
    StoreClosedError,
    StoreCorruptError,
    StoreError,
    StoreTimeoutError,
    ValueTooLargeError,
    WrongKeyError,
)
from stores.sql import SQL_ENGINES, AsyncSql, SqlAdapter, migrate, open_sql

if TYPE_CHECKING:
    from stores.vectors import VectorHit, VectorIndex

__all__ = [
    "SQL_ENGINES",
    "AnalyticsMessage",
    "AnalyticsStore",
    "AsyncSql",
    "DailyRow",
    "PersistentQueue",
    "QueueFullError",
    "QueuedItem",
    "SealedKv",
    "SqlAdapter",
    "StoreClosedError",
    "StoreCorruptError",
    "StoreError",
    "StoreTimeoutError",
    "ValueTooLargeError",
    "VectorHit",
    "VectorIndex",
    "WrongKeyError",
    "migrate",
    "open_sql",
]


def __getattr__(name: str) -> object:
    # chromadb takes ~0.6 s to import, so only code that touches vectors pays for it (the CLI stays quick).
    if name in ("VectorHit", "VectorIndex"):
        from stores import vectors

        return getattr(vectors, name)
    raise AttributeError(f"module 'stores' has no attribute {name!r}")
