"""Random sequences of index/ingest/delete/query on a real Redis, compared with a
plain dict model after every step."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from conftest import clustered, index_state
from lshrs import LSHRS
from lshrs._hashing import project
from lshrs.adapters import InMemoryStore

DIM = 16
VECTORS = clustered(64, DIM, centers=4, seed=5)
IDS = st.integers(min_value=-3, max_value=12)
ROWS = st.integers(min_value=0, max_value=len(VECTORS) - 1)

operations = st.lists(
    st.one_of(
        st.tuples(st.just("ingest"), IDS, ROWS),
        st.tuples(st.just("index"), st.dictionaries(IDS, ROWS, min_size=1, max_size=6)),
        st.tuples(st.just("delete"), st.lists(IDS, max_size=5)),
        st.tuples(st.just("query"), ROWS),
    ),
    min_size=1,
    max_size=20,
)
_prefixes = itertools.count()


async def play(url: str, steps: list[tuple[Any, ...]]) -> None:
    client = Redis.from_url(url)
    store = InMemoryStore()
    async with LSHRS(dim=DIM, redis_url=url, prefix=f"prop{next(_prefixes)}", store=store, expected_size=1000) as lsh:
        opened = await lsh._ready()
        bands, projection = opened.bands, opened.projection
        model: dict[int, int] = {}
        for step in steps:
            kind = step[0]
            if kind == "ingest":
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
                expected = bands.pack(project(VECTORS[row : row + 1], projection) > 0)[0].tobytes()
                assert state[id_] == expected
            assert len(store) == len(model)
        await lsh.drop()
    await client.aclose()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=operations)
def test_random_operations_match_a_dict_model(redis_proc: Any, steps: list[tuple[Any, ...]]) -> None:
    asyncio.run(play(f"redis://{redis_proc.host}:{redis_proc.port}/3", steps))


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
