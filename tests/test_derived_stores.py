"""Derived stores on the real engines: the in-memory vector index built in the background, metadata filters answered
from the primary store, and damaged or leftover derived files mended from the primary store."""

import hashlib
import logging

import numpy as np
import pytest
import trio

from stores.datalayer import DataLayer, StoreConfig
from stores.projector import PREFERENCE_CACHE_PREFIX, Projector
from stores.repositories import DataError, UnitOfWork

DIMS = 16
DEVICE = "12D3KooWTestDevice"


def store_key(purpose: str) -> bytes:
    return hashlib.sha256(b"test-key:" + purpose.encode()).digest()


async def open_data(home, dims: int = DIMS) -> DataLayer:
    return await DataLayer.open(home, DEVICE, store_key, StoreConfig(embedding_dims=dims))


def vectors(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, DIMS)).astype("<f4")


async def save(data: DataLayer, texts_and_vectors, metadata=None) -> list[str]:
    async with UnitOfWork(data) as uow:
        ids = [uow.memories.save_memory(text, vector, metadata) for text, vector in texts_and_vectors]
        await uow.commit()
    return ids


async def search(data: DataLayer, vector, limit=3, where=None) -> list[str]:
    async with UnitOfWork(data) as uow:
        return [m.id for m in await uow.memories.get_memories_by_context(vector, limit=limit, where=where)]


async def wait_for(condition, timeout_s: float = 60) -> None:
    with trio.fail_after(timeout_s):
        while not condition():
            await trio.sleep(0.01)


@pytest.mark.trio
async def test_search_is_exact_while_the_index_builds_and_the_same_once_built(tmp_path):
    data = await open_data(tmp_path)
    try:
        corpus = vectors(300, 1)
        ids = await save(data, [(f"m{i}", v) for i, v in enumerate(corpus)])
        queries = vectors(10, 2)
        units = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
        exact = [[ids[i] for i in np.argsort(-(units @ q))[:3]] for q in queries]
        assert [await search(data, q) for q in queries] == exact  # nothing built yet: exact
        assert data.vectors.indexed() == 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Projector(data).index_vectors)
            await wait_for(lambda: data.vectors.unindexed == 0)
            assert data.vectors.indexed() == 300
            assert [await search(data, q) for q in queries] == exact  # from Chroma now (300 items: its HNSW is exact)
            fresh = (await save(data, [("new", queries[0])]))[0]
            await Projector(data).drain()
            assert (await search(data, queries[0]))[0] == fresh  # exact until Chroma has it
            await wait_for(lambda: data.vectors.unindexed == 0)
            assert (await search(data, queries[0]))[0] == fresh
            nursery.cancel_scope.cancel()
    finally:
        await data.close()


@pytest.mark.trio
async def test_two_data_layers_in_one_process_keep_their_indexes_apart(tmp_path):
    first, second = await open_data(tmp_path / "a"), await open_data(tmp_path / "b")
    try:
        (in_first,) = await save(first, [("first", vectors(1, 3)[0])])
        await save(second, [(f"s{i}", v) for i, v in enumerate(vectors(5, 4))])
        async with trio.open_nursery() as nursery:
            for data in (first, second):
                nursery.start_soon(Projector(data).index_vectors)
                await data.vectors_ready()
            await wait_for(lambda: first.vectors.unindexed == second.vectors.unindexed == 0)
            assert (first.vectors.indexed(), second.vectors.indexed()) == (1, 5)
            assert await search(first, vectors(1, 3)[0], limit=10) == [in_first]
            assert in_first not in await search(second, vectors(1, 3)[0], limit=10)
            nursery.cancel_scope.cancel()
    finally:
        await first.close()
        await second.close()


@pytest.mark.trio
async def test_where_is_answered_from_the_metadata_in_the_primary_store(tmp_path):
    data = await open_data(tmp_path)
    try:
        base = vectors(1, 5)[0]
        long_note = "a diagnosis written out at length " * 5
        sick = await save(data, [("sick", base)], {"health": long_note, "tags": ["x"]})
        other = await save(data, [("other", base + 0.5)], {"health": "fine"})
        await Projector(data).drain()
        assert await search(data, base, where={"health": long_note}) == sick
        assert await search(data, base, where={"tags": ["x"]}) == sick
        assert await search(data, base, where={"health": {"$ne": long_note}}) == other
        assert await search(data, base, where={"health": "nobody"}) == []
        with pytest.raises(DataError, match="unknown where operator"):
            await search(data, base, where={"$near": 1})
    finally:
        await data.close()


@pytest.mark.trio
async def test_memories_of_another_embedding_size_are_left_out_of_the_index(tmp_path):
    data = await open_data(tmp_path, dims=8)
    await save(data, [("eight", np.ones(8))])
    await data.close()
    data = await open_data(tmp_path)  # a device whose embeddings are 16 numbers
    try:
        (sixteen,) = await save(data, [("sixteen", np.ones(DIMS))])
        assert await search(data, np.ones(DIMS)) == [sixteen]
        assert data.vectors.count() == 1
    finally:
        await data.close()


@pytest.mark.trio
async def test_a_damaged_cache_is_made_anew_and_refilled_at_open(tmp_path, caplog):
    data = await open_data(tmp_path)
    async with UnitOfWork(data) as uow:
        uow.preferences.set("theme", "dark")
        await uow.commit()
    await Projector(data).drain()
    data.cache.compact()
    await data.close()
    for table in (tmp_path / "cache").glob("*.sst"):
        damaged = bytearray(table.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        table.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING, logger="stores.datalayer"):
        data = await open_data(tmp_path)
    try:
        assert len(caplog.records) == 1 and "made anew" in caplog.records[0].getMessage()
        assert data.cache.get(PREFERENCE_CACHE_PREFIX + b"theme") is None
        await Projector(data).drain()
        assert data.cache.get(PREFERENCE_CACHE_PREFIX + b"theme") is not None
    finally:
        await data.close()


@pytest.mark.trio
async def test_an_entry_damaged_while_open_reads_as_absent_and_the_cache_is_mended(tmp_path):
    data = await open_data(tmp_path)
    try:
        async with UnitOfWork(data) as uow:
            uow.preferences.set("theme", "dark")
            await uow.commit()
            uow.session.set("topic", "tea")
        await Projector(data).drain()
        raw = data.cache._db  # every sealed entry now fails authentication
        for key, sealed in list(raw.items()):
            if key.startswith(b"u"):
                raw[key] = sealed[:-1] + bytes([sealed[-1] ^ 1])
        async with UnitOfWork(data) as uow:
            assert uow.session.get("topic") is None
        assert data.cache_refill_owed
        await Projector(data).drain()
        assert data.cache.get(PREFERENCE_CACHE_PREFIX + b"theme") is not None
    finally:
        await data.close()


@pytest.mark.trio
async def test_an_older_node_s_vector_folder_is_removed_unopened(tmp_path, caplog):
    data = await open_data(tmp_path)
    await data.close()
    legacy = tmp_path / "vectors" / "5dafcfff-ffe9-4f74-8187-234382b9813a"
    legacy.mkdir(parents=True)
    (legacy / "header.bin").write_bytes(b"\xff" * 100)  # a damaged HNSW header crashed Chroma when opened
    with caplog.at_level(logging.WARNING, logger="stores.datalayer"):
        data = await open_data(tmp_path)
    await data.close()
    assert not (tmp_path / "vectors").exists()
    message = f"removed {tmp_path / 'vectors'}: an older node's vector index, now kept in memory only"
    assert [record.getMessage() for record in caplog.records] == [message]
