"""Store adapters: encrypted primary SQL, in-memory analytics, vector index and sealed key-value cache."""

from stores.analytics import AnalyticsMessage, AnalyticsStore, DailyRow
from stores.cache import CacheInUseError, PersistentQueue, QueuedItem, QueueFullError, SealedKv
from stores.errors import (
    CacheItemTooLargeError,
    DataError,
    StoreClosedError,
    StoreCorruptError,
    StoreError,
    StoreTimeoutError,
    WrongKeyError,
)
from stores.sql import SQL_ENGINES, AsyncSql, SqlAdapter, migrate, open_sql
from stores.vectors import VectorHit, VectorIndex

__all__ = [
    "SQL_ENGINES",
    "AnalyticsMessage",
    "AnalyticsStore",
    "AsyncSql",
    "CacheInUseError",
    "DataError",
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
    "CacheItemTooLargeError",
    "VectorHit",
    "VectorIndex",
    "WrongKeyError",
    "migrate",
    "open_sql",
]

