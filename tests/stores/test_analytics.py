"""AnalyticsStore against the real in-memory DuckDB."""

import datetime
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from stores import AnalyticsMessage, AnalyticsStore, DailyRow, StoreClosedError, StoreError

DAY_MS = 86_400_000
NOW_MS = int(datetime.datetime(2025, 7, 30, 12, tzinfo=datetime.UTC).timestamp() * 1000)
TODAY = datetime.date(2025, 7, 30)


@pytest.fixture
def store() -> Iterator[AnalyticsStore]:
    analytics = AnalyticsStore()
    yield analytics
    analytics.close()


def message(
    id: str, days_ago: float, sentiment: float | None = None, response_time_ms: float | None = None
) -> AnalyticsMessage:
    return AnalyticsMessage(id, "conv-1", "user", int(NOW_MS - days_ago * DAY_MS), sentiment, response_time_ms)


def random_columns(rows: int, seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sentiment = rng.uniform(-1, 1, rows)
    sentiment[rng.random(rows) < 0.1] = np.nan
    return {
        "id": np.array([f"m{i}" for i in range(rows)], dtype=object),
        "conversation": np.array([f"c{i % 97}" for i in range(rows)], dtype=object),
        "role": np.array(["user", "assistant"] * (rows // 2), dtype=object),
        "ts_ms": NOW_MS - rng.integers(0, 40 * DAY_MS, rows),
        "sentiment": sentiment,
        "response_time_ms": rng.gamma(2.0, 300.0, rows),
    }


def test_daily_matches_a_numpy_reference(store: AnalyticsStore) -> None:
    columns = random_columns(20_000)
    store.load(columns)

    rows = store.daily(30, NOW_MS)

    days = (columns["ts_ms"] // DAY_MS).astype("datetime64[D]").astype(datetime.date)
    expected_days = [TODAY - datetime.timedelta(days=offset) for offset in range(30)]
    assert [row.day for row in rows] == expected_days
    for row in rows:
        on_day = days == row.day
        assert row.message_count == on_day.sum()
        assert row.sentiment_avg == pytest.approx(np.nanmean(columns["sentiment"][on_day]))
        assert row.response_time_p95_ms == pytest.approx(np.percentile(columns["response_time_ms"][on_day], 95))


def test_daily_window_and_missing_values(store: AnalyticsStore) -> None:
    store.upsert(
        [
            message("a", 0, sentiment=1.0, response_time_ms=100.0),
            message("b", 0, sentiment=None, response_time_ms=None),
            message("c", 1),
            message("old", 2.5, sentiment=0.5),
            message("tomorrow", -1, sentiment=0.5),
        ]
    )

    assert store.daily(2, NOW_MS) == [
        DailyRow(TODAY, 2, 1.0, 100.0),
        DailyRow(TODAY - datetime.timedelta(days=1), 1, None, None),
    ]
    with pytest.raises(StoreError, match="at least 1"):
        store.daily(0, NOW_MS)


def test_upsert_replaces_and_delete_removes(store: AnalyticsStore) -> None:
    store.upsert([message("a", 0, sentiment=0.0), message("b", 0)])
    store.upsert([message("a", 0, sentiment=1.0)])
    assert store.count() == 2
    assert store.daily(1, NOW_MS)[0].sentiment_avg == 1.0

    store.delete(["a", "unknown"])
    assert store.count() == 1
    store.clear()
    assert store.count() == 0
    assert store.daily(1, NOW_MS) == []


def test_load_100k_rows_fast_and_nothing_on_disk(
    store: AnalyticsStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # DuckDB's default spill folder is relative to the working directory
    columns = random_columns(100_000)

    started = time.perf_counter()
    assert store.load(columns) == 100_000
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    rows = store.daily(30, NOW_MS)
    query_s = time.perf_counter() - started

    assert store.count() == 100_000
    assert sum(row.message_count for row in rows) > 70_000
    assert load_s < 0.8
    assert query_s < 0.2
    assert list(tmp_path.iterdir()) == []


def test_load_checks_columns(store: AnalyticsStore) -> None:
    columns = random_columns(10)
    with pytest.raises(StoreError, match="exactly"):
        store.load({name: values for name, values in columns.items() if name != "role"})
    with pytest.raises(StoreError, match="differ in length"):
        store.load({**columns, "id": columns["id"][:5]})
    with pytest.raises(StoreError, match="(?i)not null"):
        store.load({**columns, "id": [None] * 10})


def test_last_row_of_a_repeated_id_wins(store: AnalyticsStore) -> None:
    store.upsert([message("a", 0, sentiment=0.0), message("a", 0, sentiment=1.0)])
    assert store.count() == 1
    assert store.daily(1, NOW_MS)[0].sentiment_avg == 1.0


def test_closed_store_refuses_calls(store: AnalyticsStore) -> None:
    store.close()
    store.close()
    with pytest.raises(StoreClosedError):
        store.count()


def test_any_call_may_follow_any_other():
    store = AnalyticsStore()
    try:
        for call in (store.count, lambda: store.delete(["x"]), store.count, store.clear, lambda: store.daily(2, 0)):
            call()
        store.upsert([AnalyticsMessage("m", "c", "user", 0)])
        assert store.count() == 1
    finally:
        store.close()
