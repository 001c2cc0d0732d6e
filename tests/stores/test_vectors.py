"""VectorIndex against a real ChromaDB PersistentClient."""

from collections.abc import Callable, Iterator
from pathlib import Path

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings

from stores import StoreClosedError, StoreError, ValueTooLargeError, VectorIndex

DIM = 64
COLLECTION = "memories"


@pytest.fixture
def index_path(tmp_path: Path) -> Path:
    return tmp_path / "vectors"


@pytest.fixture
def index(index_path: Path) -> Iterator[VectorIndex]:
    vectors = VectorIndex(index_path, COLLECTION, DIM)
    yield vectors
    vectors.close()


def random_vectors(rows: int, dim: int = DIM, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


def ids_for(rows: int) -> list[str]:
    return [f"mem-{i}" for i in range(rows)]


def cosine_distances(corpus: np.ndarray, query: np.ndarray) -> np.ndarray:
    return 1 - (corpus @ query) / (np.linalg.norm(corpus, axis=1) * np.linalg.norm(query))


def test_top5_recall_against_exact_cosine_search(index: VectorIndex) -> None:
    corpus = random_vectors(2000)
    index.upsert(ids_for(2000), corpus)
    queries = random_vectors(50, seed=4)

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


def test_upsert_more_than_one_chroma_batch(tmp_path: Path) -> None:
    small = VectorIndex(tmp_path / "small", COLLECTION, 4)
    small.upsert(ids_for(5100), random_vectors(5100, dim=4))
    assert small.count() == 5100
    small.close()


def test_upsert_replaces_and_delete_removes(index: VectorIndex) -> None:
    corpus = random_vectors(100)
    index.upsert(ids_for(100), corpus)
    index.upsert(["mem-0"], -corpus[1:2])  # mem-0 now points away from mem-1

    assert index.query(corpus[1], 1)[0].id == "mem-1"
    assert index.query(-corpus[1], 1)[0].id == "mem-0"

    index.delete(["mem-1", "unknown"])
    assert index.count() == 99
    assert "mem-1" not in {hit.id for hit in index.query(corpus[1], 10)}


def test_where_filters_on_metadata(index: VectorIndex) -> None:
    corpus = random_vectors(20)
    index.upsert(ids_for(20), corpus, [{"kind": "even" if i % 2 == 0 else "odd", "n": i} for i in range(20)])

    hits = index.query(corpus[1], 5, where={"kind": "even"})
    assert len(hits) == 5
    assert all(int(hit.id.removeprefix("mem-")) % 2 == 0 for hit in hits)


def test_survives_reopen_and_clear(index_path: Path, index: VectorIndex) -> None:
    corpus = random_vectors(10)
    index.upsert(ids_for(10), corpus)
    index.close()

    reopened = VectorIndex(index_path, COLLECTION, DIM)
    assert reopened.count() == 10
    assert reopened.query(corpus[3], 1)[0].id == "mem-3"
    reopened.clear()
    assert reopened.count() == 0
    assert reopened.query(corpus[3], 1) == []
    reopened.upsert(["again"], corpus[:1])
    assert reopened.count() == 1
    reopened.close()


def test_wrong_dimension_is_refused(index_path: Path, index: VectorIndex) -> None:
    with pytest.raises(StoreError, match=rf"shape \(1, {DIM}\), got \(1, 8\)"):
        index.upsert(["x"], random_vectors(1, dim=8))
    with pytest.raises(StoreError, match="shape"):
        index.query(np.ones(8), 3)
    with pytest.raises(StoreError, match=f"holds {DIM}-dim vectors, not 8"):
        VectorIndex(index_path, COLLECTION, 8)


def test_only_ids_vectors_and_short_tags_are_stored(
    index_path: Path, index: VectorIndex, folder_bytes: Callable[[Path], bytes]
) -> None:
    text = "zebra memory text: the user's sister lives in Lyon"
    with pytest.raises(ValueTooLargeError, match="texts stay"):
        index.upsert(["m"], random_vectors(1), [{"text": text * 2}])
    with pytest.raises(StoreError, match="must be str, int, float or bool"):
        index.upsert(["m"], random_vectors(1), [{"tags": ["a", "b"]}])  # type: ignore[dict-item]
    index.upsert(["m"], random_vectors(1), [{"kind": "memory"}])
    index.close()

    assert text.encode() not in folder_bytes(index_path)
    raw = chromadb.PersistentClient(path=str(index_path), settings=Settings(anonymized_telemetry=False))
    stored = raw.get_collection(COLLECTION).get(include=["documents", "metadatas"])
    assert stored["ids"] == ["m"]
    assert stored["documents"] == [None]
    assert stored["metadatas"] == [{"kind": "memory"}]
    raw.close()


def test_closed_index_refuses_calls(index: VectorIndex) -> None:
    index.close()
    index.close()
    with pytest.raises(StoreClosedError):
        index.count()
