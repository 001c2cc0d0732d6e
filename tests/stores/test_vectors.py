"""VectorIndex: exact search and a real in-memory ChromaDB collection built from it in steps."""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from stores import StoreClosedError, StoreError, VectorIndex

DIM = 64


@pytest.fixture
def index() -> Iterator[VectorIndex]:
    vectors = VectorIndex(DIM)
    yield vectors
    vectors.close()


def random_vectors(rows: int, dim: int = DIM, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


def ids_for(rows: int) -> list[str]:
    return [f"mem-{i}" for i in range(rows)]


def cosine_distances(corpus: np.ndarray, query: np.ndarray) -> np.ndarray:
    return 1 - (corpus @ query) / (np.linalg.norm(corpus, axis=1) * np.linalg.norm(query))


def build(index: VectorIndex, items_max: int = 5000) -> int:
    """Run index steps until Chroma holds every vector; return how many steps it took."""
    steps = 0
    while index.unindexed:
        index.index_step(items_max)
        steps += 1
    return steps


def test_exact_search_answers_before_the_index_is_built_and_chroma_after(index: VectorIndex) -> None:
    corpus = random_vectors(2000)
    index.upsert(ids_for(2000), corpus)
    queries = random_vectors(50, seed=4)
    assert index.indexed() == 0 and index.unindexed == 2000
    for query in queries[:10]:
        exact = [f"mem-{i}" for i in np.argsort(cosine_distances(corpus, query))[:5]]
        assert [hit.id for hit in index.query(query, 5)] == exact

    assert build(index, 700) == 3  # bounded steps
    assert index.indexed() == 2000
    found = 0
    for query in queries:
        distances = cosine_distances(corpus, query)
        exact = {f"mem-{i}" for i in np.argsort(distances)[:5]}
        hits = index.query(query, 5)
        found += len({hit.id for hit in hits} & exact)
        assert [hit.distance for hit in hits] == sorted(hit.distance for hit in hits)
        for hit in hits:
            assert hit.distance == pytest.approx(distances[int(hit.id.removeprefix("mem-"))], abs=1e-4)
    assert found / (5 * len(queries)) >= 0.9


def test_changes_reach_chroma_and_search_stays_exact_until_they_have(index: VectorIndex) -> None:
    corpus = random_vectors(100)
    index.upsert(ids_for(100), corpus)
    build(index)
    index.upsert(["mem-0"], -corpus[1:2])  # mem-0 now points away from mem-1
    index.delete(["mem-1", "unknown"])
    assert index.unindexed == 3 and index.count() == 99
    for _ in range(2):  # exact while Chroma lags, then from Chroma
        assert index.query(-corpus[1], 1)[0].id == "mem-0"
        assert "mem-1" not in {hit.id for hit in index.query(corpus[1], 10)}
        build(index)
    assert index.indexed() == 99


def test_search_among_given_ids_is_exact(index: VectorIndex) -> None:
    corpus = random_vectors(50)
    index.upsert(ids_for(50), corpus)
    build(index)
    even = [f"mem-{i}" for i in range(0, 50, 2)]
    hits = index.query(corpus[1], 5, among=[*even, "gone"])
    assert len(hits) == 5 and all(int(hit.id.removeprefix("mem-")) % 2 == 0 for hit in hits)
    distances = cosine_distances(corpus, corpus[1])
    assert [hit.id for hit in hits] == [f"mem-{i}" for i in sorted(range(0, 50, 2), key=distances.__getitem__)[:5]]
    assert index.query(corpus[1], 5, among=[]) == []


def test_vectors_without_a_direction_leave_the_index_and_wrong_sizes_are_refused(index: VectorIndex) -> None:
    corpus = random_vectors(3)
    corpus[1] = 0
    corpus[2, 0] = np.nan
    assert index.upsert(ids_for(3), corpus) == 1
    assert index.count() == 1
    with pytest.raises(StoreError, match=rf"shape \(1, {DIM}\), got \(1, 8\)"):
        index.upsert(["x"], random_vectors(1, dim=8))
    with pytest.raises(StoreError, match="shape"):
        index.query(np.ones(8), 3)
    with pytest.raises(StoreError, match="no direction"):
        index.query(np.zeros(DIM), 3)


def test_two_indexes_built_on_two_threads_at_once_are_independent() -> None:
    # Chroma's in-memory client is one store per process: each index must keep to a collection of its own.
    first, second = VectorIndex(DIM), VectorIndex(DIM)
    try:
        first.upsert(["a"], random_vectors(1))
        second.upsert(["b", "c"], random_vectors(2, seed=5))
        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(build, (first, second))) == [1, 1]
        assert (first.indexed(), second.indexed()) == (1, 2)
        first.clear()
        first.close()
        assert [hit.id for hit in second.query(random_vectors(1)[0], 5)] != []
        assert second.indexed() == 2
    finally:
        first.close()
        second.close()


def test_nothing_is_written_to_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, index: VectorIndex) -> None:
    monkeypatch.chdir(tmp_path)
    index.upsert(ids_for(300), random_vectors(300))
    build(index)
    index.query(random_vectors(1)[0], 5)
    assert list(tmp_path.iterdir()) == []


def test_clear_and_close(index: VectorIndex) -> None:
    index.upsert(ids_for(10), random_vectors(10))
    build(index)
    index.clear()
    assert index.count() == 0 and index.indexed() == 0 and index.query(random_vectors(1)[0], 3) == []
    index.close()
    index.close()
    with pytest.raises(StoreClosedError):
        index.count()
