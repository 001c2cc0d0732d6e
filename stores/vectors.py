"""ChromaDB index of embeddings by id, for cosine similarity search; texts never enter it."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

# Must precede the chromadb import, which loads onnxruntime.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import attrs
import chromadb
import chromadb.errors
import numpy as np
import numpy.typing as npt
from chromadb.config import Settings

from stores.errors import StoreClosedError, StoreError, ValueTooLargeError

MetadataValue = str | int | float | bool
Metadata = Mapping[str, MetadataValue]

UPSERT_CHUNK_ITEMS = 5000
"""Chroma refuses more than 5461 items per call."""

METADATA_TEXT_MAX_CHARS = 64
"""Chroma stores metadata in plain SQLite, so string metadata is kept to short tags, never texts."""

_DIM_KEY = "aico_dim"


@attrs.frozen
class VectorHit:
    """One search result: an id and its cosine distance (0 same direction, 2 opposite) to the query."""

    id: str
    distance: float


def _checked_metadata(metadata: Metadata | None) -> dict[str, MetadataValue] | None:
    """Return the metadata as chroma takes it, refusing anything but short scalars."""
    if not metadata:
        return None  # chroma refuses an empty dict but takes None
    for name, value in metadata.items():
        if not isinstance(value, MetadataValue):
            raise StoreError(f"metadata {name!r} must be str, int, float or bool, got {type(value).__name__}")
        if isinstance(value, str) and len(value) > METADATA_TEXT_MAX_CHARS:
            raise ValueTooLargeError(
                f"metadata {name!r} has {len(value)} chars, more than {METADATA_TEXT_MAX_CHARS}: texts stay in the "
                "encrypted primary store"
            )
    return dict(metadata)


class VectorIndex:
    """A persistent cosine-space collection of fixed-dimension embeddings keyed by id."""

    def __init__(self, path: Path, collection: str, dim: int) -> None:
        self._name = collection
        self._dim = dim
        try:
            self._client: chromadb.ClientAPI | None = chromadb.PersistentClient(
                path=str(path), settings=Settings(anonymized_telemetry=False)
            )
        except (chromadb.errors.ChromaError, ValueError) as error:
            raise StoreError(f"vector index {path}: {error}") from error
        try:
            self._collection = self._open_collection()
            stored_dim = (self._collection.metadata or {}).get(_DIM_KEY)
            if stored_dim != dim:
                raise StoreError(
                    f"vector collection {collection!r} in {path} holds {stored_dim}-dim vectors, not {dim}"
                )
        except BaseException:
            self.close()
            raise

    @contextmanager
    def _live(self) -> Iterator[chromadb.ClientAPI]:
        """Yield the open client, turning chroma errors into store errors."""
        if self._client is None:
            raise StoreClosedError(f"vector collection {self._name!r} is closed")
        try:
            yield self._client
        except (chromadb.errors.ChromaError, ValueError) as error:
            raise StoreError(f"vector collection {self._name!r}: {error}") from error

    def _open_collection(self) -> chromadb.Collection:
        with self._live() as client:
            # embedding_function=None: without it chroma would download a model to embed texts itself.
            return client.get_or_create_collection(
                self._name,
                embedding_function=None,
                # Wider search lists than chroma's defaults (ef 100/100, 16 neighbours): measured recall@5 on
                # 100k random 384-dim vectors rose from 0.37, at a few milliseconds per query.
                configuration={"hnsw": {"space": "cosine", "ef_construction": 200, "ef_search": 200, "max_neighbors": 32}},
                metadata={_DIM_KEY: self._dim},
            )

    def _checked_vectors(self, embeddings: npt.ArrayLike, rows: int) -> np.ndarray:
        vectors = np.asarray(embeddings, dtype=np.float32)
        if vectors.shape != (rows, self._dim):
            raise StoreError(f"expected embeddings of shape ({rows}, {self._dim}), got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise StoreError("embeddings contain NaN or infinity")
        return vectors

    def upsert(
        self, ids: Sequence[str], embeddings: npt.ArrayLike, metadatas: Sequence[Metadata | None] | None = None
    ) -> None:
        """Insert or replace the vectors (one row per id) and optional short scalar metadata."""
        vectors = self._checked_vectors(embeddings, len(ids))
        checked = [_checked_metadata(metadata) for metadata in metadatas] if metadatas is not None else None
        if checked is not None and len(checked) != len(ids):
            raise StoreError(f"{len(ids)} ids but {len(checked)} metadatas")
        with self._live():
            for start in range(0, len(ids), UPSERT_CHUNK_ITEMS):
                end = start + UPSERT_CHUNK_ITEMS
                self._collection.upsert(
                    ids=list(ids[start:end]),
                    embeddings=vectors[start:end],
                    metadatas=checked[start:end] if checked is not None else None,
                )

    def delete(self, ids: Sequence[str]) -> None:
        """Remove the vectors with these ids; unknown ids are ignored."""
        if ids:
            with self._live():
                self._collection.delete(ids=list(ids))

    def query(self, embedding: npt.ArrayLike, k: int, where: Mapping[str, object] | None = None) -> list[VectorHit]:
        """Return up to k nearest ids by cosine distance, nearest first, optionally filtered on metadata."""
        if k < 1:
            raise StoreError(f"k must be at least 1, got {k}")
        vector = self._checked_vectors(np.reshape(embedding, (1, -1)), 1)
        with self._live():
            result = self._collection.query(
                query_embeddings=vector, n_results=k, where=dict(where) if where else None, include=["distances"]
            )
        distances = result["distances"]
        assert distances is not None
        return [VectorHit(id, float(distance)) for id, distance in zip(result["ids"][0], distances[0], strict=True)]

    def count(self) -> int:
        """Return the number of vectors."""
        with self._live():
            return self._collection.count()

    def clear(self) -> None:
        """Remove every vector of this collection."""
        with self._live() as client:
            client.delete_collection(self._name)
        self._collection = self._open_collection()

    def close(self) -> None:
        """Release the client; idempotent."""
        if self._client is not None:
            client, self._client = self._client, None
            client.close()
