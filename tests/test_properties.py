"""Random sequences of index/ingest/delete/query on a real Redis, compared with a
plain dict model after every step."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from conftest import clustered, index_state
from lshrs import LSHRS
from lshrs.adapters import InMemoryStore

DIM = 16
VECTORS = clustered(64, DIM, centers=4, seed=5)
#: Ids of an index of 8-byte ids, negative ones included; of one of 4-byte
#: ids (the default), and ids that share their low 4 bytes with those, which
#: a delete names: it must remove nothing.
IDS = st.integers(min_value=-3, max_value=12)
SHORT_IDS = st.integers(min_value=0, max_value=12)
ALIASES = st.integers(min_value=2**32, max_value=2**32 + 12)
ROWS = st.integers(min_value=0, max_value=len(VECTORS) - 1)


def operations(ids: st.SearchStrategy[int], deleted: st.SearchStrategy[int]) -> st.SearchStrategy[list[Any]]:
    return st.lists(
        st.one_of(
            st.tuples(st.just("ingest"), ids, ROWS),
            st.tuples(st.just("index"), st.dictionaries(ids, ROWS, min_size=1, max_size=6)),
            st.tuples(st.just("delete"), st.lists(deleted, max_size=5)),
            st.tuples(st.just("query"), ROWS),
        ),
        min_size=1,
        max_size=20,
    )


#: Ids written at once by a bulk step: over 500 a shard on 2 shards, so the
#: writes are split into several script calls (``_index.WRITE_CHUNK``).
BULK = 1100
cluster_operations = st.lists(
    st.one_of(
        st.tuples(st.just("bulk"), st.integers(min_value=0, max_value=3)),
        st.tuples(st.just("ingest"), SHORT_IDS, ROWS),
        st.tuples(
            st.just("delete"), st.lists(st.one_of(SHORT_IDS, ALIASES, st.integers(100, 100 + 4 * BULK)), max_size=5)
        ),
        st.tuples(st.just("query"), ROWS),
    ),
    min_size=1,
    max_size=6,
)
_prefixes = itertools.count()


def reference_record(vector: Any, projection: Any, bands: int, rows: int) -> bytes:
    """A band's bucket value written out by hand from the raw hyperplanes in
    Redis: bit i of a band is the sign of the vector against hyperplane
    (band * rows + i), packed big-endian into whole bytes. Independent of
    lshrs's own ``Bands.pack`` and projection code, so a hashing bug there
    cannot be mirrored here."""
    width = (rows + 7) // 8
    out = b""
    for band in range(bands):
        value = 0
        for i in range(rows):
            column = [float(projection[d][band * rows + i]) for d in range(len(vector))]
            if sum(float(x) * c for x, c in zip(vector, column)) > 0:
                value |= 1 << (8 * width - 1 - i)
        out += value.to_bytes(width, "big")
    return out


async def play(url: str, steps: list[tuple[Any, ...]], shards: int = 1, id_bytes: int = 4) -> None:
    client: Any = Redis.from_url(url) if shards == 1 else RedisCluster.from_url(url)
    store = InMemoryStore()
    prefix = f"prop{next(_prefixes)}"
    options = {"expected_size": 1000, "hashing": "hyperplane", "shards": shards, "id_bytes": id_bytes}
    async with LSHRS(dim=DIM, redis_url=url, prefix=prefix, store=store, **options) as lsh:  # type: ignore[arg-type]
        config = lsh.config
        raw = await client.get(f"{{{prefix}}}:proj")
        projection = np.frombuffer(raw, "<f4").reshape(DIM, config.num_bands * config.rows_per_band).tolist()
        expected = [reference_record(v, projection, config.num_bands, config.rows_per_band) for v in VECTORS]
        model: dict[int, int] = {}
        for step in steps:
            kind = step[0]
            if kind == "bulk":
                ids = np.arange(100 + step[1] * BULK, 100 + (step[1] + 1) * BULK)
                await lsh.index(ids, VECTORS[ids % len(VECTORS)])
                model.update({int(i): int(i) % len(VECTORS) for i in ids})
            elif kind == "ingest":
                await lsh.ingest(step[1], VECTORS[step[2]])
                model[step[1]] = step[2]
            elif kind == "index":
                ids = list(step[1])
                await lsh.index(ids, VECTORS[[step[1][i] for i in ids]])
                model.update(step[1])
            elif kind == "delete":
                removed = await lsh.delete(step[1])
                assert removed == len(set(step[1]) & set(model))
                for id_ in step[1]:
                    model.pop(id_, None)
            else:
                hits = await lsh.query(VECTORS[step[1]], top_k=5)
                assert {h.id for h in hits} <= set(model)
                assert len({h.id for h in hits}) == len(hits)
                if step[1] in model.values():
                    assert hits[0].score > 0.9999
            state = await index_state(client, lsh)  # buckets and signatures agree
            assert set(state) == set(model)
            for id_, row in model.items():
                assert state[id_] == expected[row]
            assert len(store) == len(model)
        await lsh.drop()
    await client.aclose()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=operations(IDS, IDS))
def test_random_operations_match_a_dict_model(redis_proc: Any, steps: list[tuple[Any, ...]]) -> None:
    asyncio.run(play(f"redis://{redis_proc.host}:{redis_proc.port}/3", steps, id_bytes=8))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=operations(SHORT_IDS, st.one_of(SHORT_IDS, ALIASES)))
@example(steps=[("ingest", 3, 0), ("delete", [2**32 + 3]), ("query", 0)])
def test_random_operations_on_4_byte_ids_match_a_dict_model(redis_proc: Any, steps: list[tuple[Any, ...]]) -> None:
    asyncio.run(play(f"redis://{redis_proc.host}:{redis_proc.port}/3", steps, id_bytes=4))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=cluster_operations)
@example(steps=[("bulk", 0), ("delete", [100, 101, 102]), ("bulk", 1), ("ingest", 150, 3), ("query", 3)])
def test_random_operations_on_a_cluster_match_a_dict_model(
    cluster_ports: list[int], steps: list[tuple[Any, ...]]
) -> None:
    """The same model check on the 3-master cluster, 4-byte ids over 2
    shards, with bulk writes larger than one script call takes."""
    asyncio.run(play(f"redis://127.0.0.1:{cluster_ports[0]}/0", steps, shards=2))


def test_the_property_test_catches_a_lost_delete(redis_proc: Any) -> None:
    """The model comparison fails if the index keeps an id the model dropped."""
    url = f"redis://{redis_proc.host}:{redis_proc.port}/3"

    async def broken() -> None:
        original = LSHRS.delete

        async def forgetful(self: LSHRS, ids: Any) -> int:
            return len(list(ids))  # claims success, removes nothing

        LSHRS.delete = forgetful  # type: ignore[method-assign]
        try:
            await play(url, [("ingest", 1, 0), ("delete", [1])])
        finally:
            LSHRS.delete = original  # type: ignore[method-assign]

    try:
        asyncio.run(broken())
    except AssertionError:
        return
    raise AssertionError("a lost delete went unnoticed")
