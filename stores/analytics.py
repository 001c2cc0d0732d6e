"""In-memory DuckDB analytics over conversation messages, rebuilt from the primary store."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import attrs
import duckdb
import numpy as np
import numpy.typing as npt

from stores.errors import StoreClosedError, StoreError

MESSAGE_COLUMNS = ("id", "conversation", "role", "ts_ms", "sentiment", "response_time_ms")
"""Column names load() expects; NaN in sentiment or response_time_ms means missing."""

_TEXT_COLUMNS = ("id", "conversation", "role")
_FLOAT_COLUMNS = ("sentiment", "response_time_ms")

_CONFIG: dict[str, str | bool | int | float | list[str]] = {
    # In-memory databases otherwise spill to ./.tmp under memory pressure, which would put plaintext on disk.
    "temp_directory": "",
    # Never fetch or load extensions: nothing here needs one, and fetching is network traffic.
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
}
# Never touch files: analytics data only comes from registered Python objects. Set after connecting because
# DuckDB 2.0 refuses a temp_directory that follows enable_external_access=false in the same config.
_NO_FILE_ACCESS = "SET enable_external_access = false"

_SCHEMA = """
CREATE TABLE messages (
    id TEXT PRIMARY KEY,
    conversation TEXT NOT NULL,
    role TEXT NOT NULL,
    ts TIMESTAMP NOT NULL,
    sentiment DOUBLE,
    response_time_ms DOUBLE
)
"""

# DuckDB keeps the first of several rows with one id in a single INSERT OR REPLACE; QUALIFY makes the last win,
# as if the rows were applied in order.
_UPSERT_FROM_INCOMING = """
INSERT OR REPLACE INTO messages
SELECT id, conversation, role, epoch_ms(ts_ms), sentiment, response_time_ms
FROM incoming
QUALIFY row_number() OVER (PARTITION BY id ORDER BY ordinal DESC) = 1
"""

# The seed's daily query, over whole UTC days ending with the day of now_ms.
_DAILY = """
WITH bounds AS (SELECT CAST(epoch_ms(CAST(? AS BIGINT)) AS DATE) AS today)
SELECT CAST(ts AS DATE) AS day,
       count(*),
       avg(sentiment),
       quantile_cont(response_time_ms, 0.95)
FROM messages, bounds
WHERE ts >= today - (CAST(? AS INTEGER) - 1) AND ts < today + 1
GROUP BY day
ORDER BY day DESC
"""


@attrs.frozen
class AnalyticsMessage:
    """The analytics facts of one conversation message."""

    id: str
    conversation: str
    role: str
    ts_ms: int
    sentiment: float | None = None
    response_time_ms: float | None = None


@attrs.frozen
class DailyRow:
    """Message statistics of one UTC day."""

    day: datetime.date
    message_count: int
    sentiment_avg: float | None
    response_time_p95_ms: float | None


def _as_columns(columns: Mapping[str, npt.ArrayLike]) -> dict[str, np.ndarray]:
    """Check the column names and lengths, convert each to the numpy dtype DuckDB scans, and number the rows."""
    if set(columns) != set(MESSAGE_COLUMNS):
        raise StoreError(f"analytics columns must be exactly {MESSAGE_COLUMNS}, got {tuple(columns)}")
    arrays = {name: np.asarray(columns[name], dtype=object) for name in _TEXT_COLUMNS}
    arrays["ts_ms"] = np.asarray(columns["ts_ms"], dtype=np.int64)
    # float64 turns None into NaN, and DuckDB scans NaN in a numpy float array as NULL.
    arrays.update({name: np.asarray(columns[name], dtype=np.float64) for name in _FLOAT_COLUMNS})
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise StoreError(f"analytics columns differ in length: {lengths}")
    arrays["ordinal"] = np.arange(lengths["id"])
    return arrays


class AnalyticsStore:
    """An in-memory DuckDB table of message facts that answers the seed's analytics queries."""

    def __init__(self) -> None:
        self._connection: duckdb.DuckDBPyConnection | None = duckdb.connect(":memory:", config=_CONFIG)
        self._connection.execute(_NO_FILE_ACCESS)
        self._connection.execute(_SCHEMA)

    @contextmanager
    def _live(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Yield the open connection, turning DuckDB errors into store errors."""
        if self._connection is None:
            raise StoreClosedError("analytics store is closed")
        try:
            yield self._connection
        except duckdb.Error as error:
            raise StoreError(f"analytics: {error}") from error

    @contextmanager
    def _incoming(self, columns: Mapping[str, np.ndarray]) -> Iterator[duckdb.DuckDBPyConnection]:
        """Expose the columns to SQL as the view `incoming` for the duration of the block."""
        with self._live() as connection:
            connection.register("incoming", columns)
            try:
                yield connection
            finally:
                connection.unregister("incoming")

    def load(self, columns: Mapping[str, npt.ArrayLike]) -> int:
        """Insert or replace messages given column-wise (see MESSAGE_COLUMNS); return how many rows came in.

        When an id repeats, its last row wins.
        """
        arrays = _as_columns(columns)
        with self._incoming(arrays) as connection:
            connection.execute(_UPSERT_FROM_INCOMING)
        return len(arrays["id"])

    def upsert(self, rows: Iterable[AnalyticsMessage]) -> None:
        """Insert or replace messages; when an id repeats, its last row wins."""
        rows = list(rows)
        self.load({name: [getattr(row, name) for row in rows] for name in MESSAGE_COLUMNS})

    def delete(self, ids: Sequence[str]) -> None:
        """Remove the messages with these ids; unknown ids are ignored."""
        with self._incoming({"id": np.asarray(ids, dtype=object)}) as connection:
            connection.execute("DELETE FROM messages WHERE id IN (SELECT id FROM incoming)")

    def clear(self) -> None:
        """Remove every message."""
        with self._live() as connection:
            connection.execute("DELETE FROM messages")

    def count(self) -> int:
        """Return the number of messages."""
        with self._live() as connection:
            # fetchall, not fetchone: DuckDB 2 refuses further work while a result is unfinished.
            ((count,),) = connection.execute("SELECT count(*) FROM messages").fetchall()
        return int(count)

    def daily(self, days: int, now_ms: int) -> list[DailyRow]:
        """Per UTC day of the last `days` days up to now_ms, newest first: count, mean sentiment, p95 response time."""
        if days < 1:
            raise StoreError(f"days must be at least 1, got {days}")
        with self._live() as connection:
            rows = connection.execute(_DAILY, [now_ms, days]).fetchall()
        return [DailyRow(day, count, sentiment, p95) for day, count, sentiment, p95 in rows]

    def close(self) -> None:
        """Drop the in-memory data; idempotent."""
        if self._connection is not None:
            connection, self._connection = self._connection, None
            connection.close()
