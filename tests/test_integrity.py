"""Writers racing on the same ids, from several processes and several tasks in
each, with the vectors in a ``RedisStore`` on another Redis server than the
index: at the end the index names exactly the ids the store holds."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis

from conftest import clustered, index_state
from lshrs import LSHRS, Rows
from lshrs.adapters import InMemoryStore, RedisStore
from servers import redis_server

DIM = 16
IDS = 60  # few ids, many writers: most writes collide with another on some id
VECTORS = clustered(2000, DIM, seed=11)


async def _race(index_url: str, store_url: str, prefix: str, hashing: str, seed: int, rounds: int) -> None:
    store = RedisStore(store_url, prefix=f"{prefix}-v")
    async with LSHRS(dim=DIM, redis_url=index_url, prefix=prefix, store=store, hashing=hashing) as lsh:

        async def writer(task: int) -> None:
            rng = random.Random(seed * 100 + task)
            for _ in range(rounds):
                ids = rng.sample(range(IDS), rng.randint(1, 4))
                if rng.random() < 0.5:
                    await lsh.index(ids, VECTORS[[rng.randrange(len(VECTORS)) for _ in ids]])
                else:
                    await lsh.delete(ids)

        await asyncio.gather(*(writer(t) for t in range(4)))


def _process(index_url: str, store_url: str, prefix: str, hashing: str, seed: int, rounds: int) -> None:
    asyncio.run(_race(index_url, store_url, prefix, hashing, seed, rounds))


async def _prepare(index_url: str, store_url: str, prefix: str, hashing: str) -> None:
    """Train the index on ids the race never touches, so every writer hashes alike."""
    store = RedisStore(store_url, prefix=f"{prefix}-v")
    async with LSHRS(dim=DIM, redis_url=index_url, prefix=prefix, store=store, hashing=hashing) as lsh:
        await lsh.index(np.arange(10_000, 10_000 + 1000), VECTORS[:1000])


async def _settled(index_url: str, store_url: str, prefix: str) -> tuple[set[int], set[int]]:
    """Ids the index names (its records, checked against its buckets) and ids the store holds."""
    store = RedisStore(store_url, prefix=f"{prefix}-v")
    client: Any = Redis.from_url(index_url)
    async with LSHRS(dim=DIM, redis_url=index_url, prefix=prefix, store=store) as lsh:
        indexed = set(await index_state(client, lsh))
        stored = set((await store.fetch(np.arange(IDS, dtype=np.int64))).ids.tolist())
        stored |= set((await store.fetch(np.arange(10_000, 11_000, dtype=np.int64))).ids.tolist())
    await client.aclose()
    return indexed, stored


@pytest.mark.parametrize("hashing", ["kmeans", "hyperplane"])
def test_processes_racing_on_the_same_ids_leave_index_and_store_equal(redis_proc: Any, hashing: str) -> None:
    index_url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    prefix = f"race-{hashing}"
    with redis_server() as store_server:
        asyncio.run(_prepare(index_url, store_server.url, prefix, hashing))
        context = multiprocessing.get_context("spawn")
        workers = [
            context.Process(target=_process, args=(index_url, store_server.url, prefix, hashing, seed, 40))
            for seed in range(3)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
            assert worker.exitcode == 0, f"a writer process failed (exit code {worker.exitcode})"
        indexed, stored = asyncio.run(_settled(index_url, store_server.url, prefix))
    assert indexed == stored, (
        f"index names {sorted(indexed - stored)} the store lacks; store holds {sorted(stored - indexed)} not indexed"
    )
    assert indexed & set(range(IDS)), "the race ended with nothing written: it tested nothing"


def test_one_client_racing_ingest_and_delete_leaves_index_and_store_equal(redis_proc: Any) -> None:
    """The reported race: ingest(i) and delete([i]) at once from one client, 300 trials."""
    index_url = f"redis://{redis_proc.host}:{redis_proc.port}/0"

    async def trials(store_url: str) -> tuple[set[int], set[int]]:
        store = RedisStore(store_url, prefix="solo-v")
        async with LSHRS(dim=DIM, redis_url=index_url, prefix="solo", store=store, hashing="hyperplane") as lsh:
            for i in range(300):
                await asyncio.gather(lsh.ingest(i, VECTORS[i]), lsh.delete([i]))
        return await _settled_range(index_url, store_url, "solo", 300)

    with redis_server() as store_server:
        indexed, stored = asyncio.run(trials(store_server.url))
    assert indexed == stored, sorted(indexed ^ stored)[:20]


async def _settled_range(index_url: str, store_url: str, prefix: str, count: int) -> tuple[set[int], set[int]]:
    store = RedisStore(store_url, prefix=f"{prefix}-v")
    client: Any = Redis.from_url(index_url)
    async with LSHRS(dim=DIM, redis_url=index_url, prefix=prefix, store=store) as lsh:
        indexed = set(await index_state(client, lsh))
        stored = set((await store.fetch(np.arange(count, dtype=np.int64))).ids.tolist())
    await client.aclose()
    return indexed, stored


@pytest.mark.anyio
async def test_a_delete_between_a_builds_read_and_its_write_leaves_no_trace(redis_url: str, raw_redis: Any) -> None:
    """``index()`` streams rows it read earlier; a delete of some of them that
    lands after the read and before the write must win, or the index would
    name ids the store no longer holds. The store here runs the delete right
    after reading each batch, so every batch meets the race."""
    holder: dict[str, LSHRS] = {}

    class DeletedAfterRead(InMemoryStore):
        async def batches(self, batch_size: int) -> AsyncIterator[Rows]:
            async for rows in super().batches(batch_size):
                await holder["lsh"].delete(rows.ids[::3])
                yield rows

    store = DeletedAfterRead()
    await store.put(np.arange(1500), VECTORS[:1500])
    async with LSHRS(dim=DIM, redis_url=redis_url, store=store, prefix="read-then-deleted", batch_size=200) as lsh:
        holder["lsh"] = lsh
        await lsh.index(np.arange(1500), VECTORS[:1500])  # trained, and every id indexed once
        await lsh.index()  # the rebuild from the store that the deletes race
        stored = set((await store.fetch(np.arange(1500))).ids.tolist())
        assert len(stored) <= 1200  # (a removal moves rows, so a third of what each batch read, give or take)
        assert set(await index_state(raw_redis, lsh)) == stored
        await lsh.reconcile()  # a repair that the deletes race the same way
        stored = set((await store.fetch(np.arange(1500))).ids.tolist())
        assert len(stored) <= 900
        assert set(await index_state(raw_redis, lsh)) == stored
        await lsh.drop()
