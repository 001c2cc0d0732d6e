"""The memory vector index, held in memory only: exact cosine search over every vector at once, and a ChromaDB
collection built from the same vectors a step at a time, which answers once it holds them all."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import attrs
import numpy as np
import numpy.typing as npt

from stores.errors import StoreClosedError, StoreError

if TYPE_CHECKING:
    import chromadb

INDEX_STEP_ITEMS_MAX = 5000
"""Chroma refuses more than 5461 items per call."""

# Wider search lists than chroma's defaults (ef 100/100, 16 neighbours): measured recall@5 on 100k random 384-dim
# vectors rose from 0.37, at a few milliseconds per query.
_HNSW = {"space": "cosine", "ef_construction": 200, "ef_search": 200, "max_neighbors": 32}


_client_lock = threading.Lock()
_client: chromadb.ClientAPI | None = None


def _shared_client() -> chromadb.ClientAPI:
    """Return the process's one in-memory Chroma client.

    Chroma keeps one in-memory store per process whatever the client, and its bookkeeping of clients is not
    thread-safe: two indexes making their clients on two threads at once left a store that was stopped twice.
    """
    global _client
    # Imported here: chromadb takes ~0.6 s to import, and commands that only search exactly never need it.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # read when chromadb loads onnxruntime
    import chromadb
    from chromadb.config import Settings

    with _client_lock:
        if _client is None:
            _client = chromadb.EphemeralClient(settings=Settings(anonymized_telemetry=False))
        return _client


@attrs.frozen
class VectorHit:
    """One search result: an id and its cosine distance (0 same direction, 2 opposite) to the query."""

    id: str
    distance: float


class ExactVectors:
    """Unit vectors by id in one float32 matrix, searched exactly by cosine."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._matrix = np.empty((0, dim), dtype=np.float32)  # rows past len(self._ids) are spare capacity
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, vector_id: object) -> bool:
        return vector_id in self._rows

    def upsert(self, ids: Sequence[str], units: np.ndarray) -> None:
        """Insert or replace unit vectors (one row per id)."""
        fresh = [vector_id for vector_id in dict.fromkeys(ids) if vector_id not in self._rows]
        needed = len(self._ids) + len(fresh)
        if needed > len(self._matrix):
            grown = np.empty((max(needed, 2 * len(self._matrix), 1024), self.dim), dtype=np.float32)
            grown[: len(self._ids)] = self._matrix[: len(self._ids)]
            self._matrix = grown
        for vector_id in fresh:
            self._rows[vector_id] = len(self._ids)
            self._ids.append(vector_id)
        self._matrix[[self._rows[vector_id] for vector_id in ids]] = units

    def delete(self, ids: Sequence[str]) -> None:
        """Remove the vectors with these ids; unknown ids are ignored."""
        for vector_id in ids:
            row = self._rows.pop(vector_id, None)
            if row is None:
                continue
            last_id = self._ids.pop()
            if last_id != vector_id:  # the last row fills the hole
                self._matrix[row] = self._matrix[len(self._ids)]
                self._ids[row] = last_id
                self._rows[last_id] = row

    def units(self, ids: Sequence[str]) -> np.ndarray:
        """Return the unit vectors of these ids (all present), one row each."""
        return self._matrix[[self._rows[vector_id] for vector_id in ids]]

    def ids(self) -> list[str]:
        """Return every id, in row order."""
        return list(self._ids)

    def search(self, unit: np.ndarray, k: int, among: Collection[str] | None = None) -> list[VectorHit]:
        """Return the k nearest ids (of `among`, if given), nearest first."""
        if among is None:
            ids, scores = self._ids, self._matrix[: len(self._ids)] @ unit
        else:
            ids = [vector_id for vector_id in among if vector_id in self._rows]
            scores = self.units(ids) @ unit if ids else np.empty(0, dtype=np.float32)
        if len(ids) > k:
            nearest = np.argpartition(-scores, k - 1)[:k]
        else:
            nearest = np.arange(len(ids))
        nearest = nearest[np.argsort(-scores[nearest], kind="stable")]
        return [VectorHit(ids[row], float(1.0 - scores[row])) for row in nearest]


class VectorIndex:
    """Every memory's unit vector, searched exactly, and an in-memory Chroma collection (HNSW) of the same vectors
    that `index_step` fills a bounded step at a time; `query` answers from Chroma only while it holds every current
    vector, and exactly otherwise. Nothing is written to disk. Not thread-safe: one caller at a time."""

    def __init__(self, dim: int) -> None:
        self._dim = dim
        self._exact: ExactVectors | None = ExactVectors(dim)
        self._collection: chromadb.Collection | None = None
        self._unindexed: dict[str, None] = {}  # ids whose current vector Chroma lacks, oldest first
        self._removed: set[str] = set()  # ids Chroma may still hold that are gone

    def _vectors(self) -> ExactVectors:
        if self._exact is None:
            raise StoreClosedError("vector index is closed")
        return self._exact

    @contextmanager
    def _chroma(self) -> Iterator[chromadb.Collection]:
        """Yield the Chroma collection, creating it on first use, and turn chroma errors into store errors."""
        self._vectors()
        client = _shared_client()
        import chromadb.errors

        try:
            if self._collection is None:
                # Each index keeps to a collection of its own in the process's one store.
                # embedding_function=None: without it chroma would download a model to embed texts itself.
                self._collection = client.create_collection(
                    f"memories-{uuid.uuid4().hex}",
                    embedding_function=None,
                    configuration={"hnsw": _HNSW},  # type: ignore[arg-type]  # chroma types the values narrowly
                )
            yield self._collection
        except (chromadb.errors.ChromaError, ValueError) as error:
            raise StoreError(f"vector index: {error}") from error

    def _units(self, embeddings: npt.ArrayLike, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Return float32 unit vectors of the embeddings, and which rows have one (finite and not zero)."""
        vectors = np.asarray(embeddings, dtype=np.float32)
        if vectors.shape != (rows, self._dim):
            raise StoreError(f"expected embeddings of shape ({rows}, {self._dim}), got {vectors.shape}")
        with np.errstate(invalid="ignore", over="ignore"):
            norms = np.linalg.norm(vectors, axis=1)
            usable = np.isfinite(norms) & (norms > 0)
            return vectors / np.where(usable, norms, 1)[:, None], usable

    def upsert(self, ids: Sequence[str], embeddings: npt.ArrayLike) -> int:
        """Insert or replace the vectors (one row per id); a vector with no direction (zero, NaN or infinite) takes
        its id out of the index, as it has no cosine to anything. Return how many were kept."""
        units, usable = self._units(embeddings, len(ids))
        kept = [vector_id for vector_id, ok in zip(ids, usable) if ok]
        self.delete([vector_id for vector_id, ok in zip(ids, usable) if not ok])
        self._vectors().upsert(kept, units[usable])
        for vector_id in kept:
            self._unindexed[vector_id] = None
            self._removed.discard(vector_id)
        return len(kept)

    def delete(self, ids: Sequence[str]) -> None:
        """Remove the vectors with these ids; unknown ids are ignored."""
        self._vectors().delete(ids)
        for vector_id in ids:
            self._unindexed.pop(vector_id, None)
            if self._collection is not None:
                self._removed.add(vector_id)

    @property
    def unindexed(self) -> int:
        """How many changes Chroma still lacks; 0 when it holds exactly the current vectors."""
        return len(self._unindexed) + len(self._removed)

    def index_step(self, items_max: int) -> int:
        """Give Chroma up to `items_max` of the changes it lacks, removals first; return how many it still lacks.

        Chroma holds the GIL while it adds (measured: another thread stood still for the whole of a 5000-item add),
        so callers keep steps short.
        """
        items_max = max(1, min(items_max, INDEX_STEP_ITEMS_MAX))
        with self._chroma() as collection:
            if self._removed:
                collection.delete(ids=[self._removed.pop() for _ in range(min(items_max, len(self._removed)))])
            elif self._unindexed:
                ids = [self._unindexed.popitem()[0] for _ in range(min(items_max, len(self._unindexed)))]
                collection.upsert(ids=ids, embeddings=self._vectors().units(ids))
        return self.unindexed

    def query(self, embedding: npt.ArrayLike, k: int, among: Collection[str] | None = None) -> list[VectorHit]:
        """Return up to k nearest ids (of `among`, if given) by cosine distance, nearest first."""
        if k < 1:
            raise StoreError(f"k must be at least 1, got {k}")
        units, usable = self._units(np.reshape(embedding, (1, -1)), 1)
        if not usable[0]:
            raise StoreError("the query embedding has no direction (zero, NaN or infinite)")
        exact = self._vectors()
        if among is not None or self.unindexed or not len(exact):
            return exact.search(units[0], k, among)
        with self._chroma() as collection:
            result = collection.query(query_embeddings=units, n_results=min(k, len(exact)), include=["distances"])
        distances = result["distances"]
        assert distances is not None
        return [VectorHit(id, float(distance)) for id, distance in zip(result["ids"][0], distances[0], strict=True)]

    def count(self) -> int:
        """Return the number of vectors."""
        return len(self._vectors())

    def indexed(self) -> int:
        """Return the number of vectors Chroma holds."""
        if self._collection is None:
            return 0
        with self._chroma() as collection:
            return collection.count()

    def clear(self) -> None:
        """Remove every vector."""
        self._vectors()
        self._drop_collection()
        self._exact = ExactVectors(self._dim)
        self._unindexed.clear()
        self._removed.clear()

    def _drop_collection(self) -> None:
        if self._collection is not None:
            with self._chroma() as collection:
                self._collection = None
                _shared_client().delete_collection(collection.name)

    def close(self) -> None:
        """Release the vectors and the Chroma collection; idempotent."""
        if self._exact is not None:
            self._drop_collection()
            self._exact = None
