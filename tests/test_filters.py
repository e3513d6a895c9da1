"""Filtered queries (issue 14): hits that pass ``where=``, as many as exist
up to ``top_k``, against exact filtered search; hostile values stay values;
bad filters are refused before any Redis work."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import numpy as np
import pytest
import sqlalchemy as sa
from redis.asyncio import Redis

from conftest import clustered
from lshrs import LSHRS
from lshrs.adapters import InMemoryStore, PostgresStore, SQLAlchemyStore

pytestmark = pytest.mark.anyio

DIM, N = 32, 3000
BASE = clustered(N + 40, DIM, seed=71)
QUERIES = BASE[N:]


def language(i: int) -> str:
    """1% 'en', 10% 'de', the rest 'fr'."""
    return "en" if i % 100 == 0 else "de" if i % 10 == 1 else "fr"


def exact_filtered(queries: np.ndarray, keep: np.ndarray, k: int) -> list[set[int]]:
    unit = BASE[:N] / np.linalg.norm(BASE[:N], axis=1, keepdims=True)
    ids = np.flatnonzero(keep)
    scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit[ids].T
    return [set(ids[np.argsort(-row)[:k]].tolist()) for row in scores]


@pytest.fixture(params=["kmeans", "hyperplane"])
async def table(
    request: pytest.FixtureRequest, postgres_dsn: str, redis_proc: Any
) -> AsyncIterator[tuple[str, str, str]]:
    """A table with a ``lang`` column, indexed; yields (dsn, table, redis url)."""
    name = f"filtered_{request.param[0]}{secrets.token_hex(4)}"
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute(f"CREATE TABLE {name} (id bigint PRIMARY KEY, embedding bytea, lang text)")
    await conn.executemany(
        f"INSERT INTO {name} VALUES ($1, $2, $3)", [(i, BASE[i].tobytes(), language(i)) for i in range(N)]
    )
    await conn.close()
    url = f"redis://{redis_proc.host}:{redis_proc.port}/5"
    store = PostgresStore(postgres_dsn, table=name)
    async with LSHRS(dim=DIM, redis_url=url, prefix=name, store=store, hashing=request.param) as lsh:
        await lsh.index()
        yield postgres_dsn, name, url
        await lsh.drop()
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute(f"DROP TABLE {name}")
    await conn.close()


@pytest.mark.parametrize("lang,least", [("de", 0.9), ("en", 0.9)])
async def test_postgres_filter_finds_what_exact_filtered_search_finds(
    table: tuple[str, str, str], lang: str, least: float
) -> None:
    dsn, name, url = table
    if lang == "en" and name.startswith("filtered_h"):
        pytest.skip("hyperplane probing reaches only rows near the query: documented, no 1% promise")
    keep = np.array([language(i) == lang for i in range(N)])
    truth = exact_filtered(QUERIES, keep, 10)
    async with LSHRS(dim=DIM, redis_url=url, prefix=name, store=PostgresStore(dsn, table=name)) as lsh:
        found = await lsh.query_many(QUERIES, top_k=10, where=("lang = $1", lang))
        alone = await lsh.query(QUERIES[0], top_k=10, where=("lang = $1", lang))
    assert all(language(h.id) == lang for hits in found for h in hits)
    assert all(len(hits) == 10 for hits in found)  # 30 'en' rows exist: a short list would be a lost result
    recall = np.mean([len({h.id for h in hits} & want) / 10 for hits, want in zip(found, truth)])
    assert recall >= least, recall
    assert [h.id for h in alone] == [h.id for h in found[0]]


async def test_postgres_filter_values_are_bound_and_bad_filters_refused(
    table: tuple[str, str, str], redis_proc: Any
) -> None:
    dsn, name, url = table
    client = Redis.from_url(url)
    async with LSHRS(dim=DIM, redis_url=url, prefix=name, store=PostgresStore(dsn, table=name)) as lsh:
        hostile = "en' OR '1'='1'; DROP TABLE " + name + "; --"
        assert await lsh.query(QUERIES[0], where=("lang = $1", hostile)) == []  # a value, matched as one
        before = (await client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
        with pytest.raises(ValueError, match="does not apply"):
            await lsh.query(QUERIES[0], where=("colour = $1", "red"))
        with pytest.raises(ValueError, match="does not apply"):
            await lsh.query(QUERIES[0], where="lang = = 'en'")
        with pytest.raises(ValueError, match="argument"):
            await lsh.query(QUERIES[0], where=("lang = $1 AND id > $2", "en"))
        with pytest.raises(TypeError, match=r"SQL condition, alone or in a tuple .*; got list"):
            await lsh.query(QUERIES[0], where=["lang = 'en'"])
        after = (await client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
        assert after == before  # refused before any Redis work
        assert len(await lsh.query(QUERIES[0], where=("lang = $1 AND id < $2", "de", 500))) == 10
    conn = await asyncpg.connect(dsn)
    assert await conn.fetchval(f"SELECT count(*) FROM {name}") == N  # the table is still there
    await conn.close()
    await client.aclose()


async def test_sqlalchemy_filter(table: tuple[str, str, str]) -> None:
    dsn, name, url = table
    store = SQLAlchemyStore(dsn.replace("postgresql://", "postgresql+asyncpg://"), table=name)
    async with LSHRS(dim=DIM, redis_url=url, prefix=name, store=store) as lsh:
        hits = await lsh.query(QUERIES[1], top_k=10, where=sa.column("lang") == "en")
        assert len(hits) == 10 and all(language(h.id) == "en" for h in hits)
        with pytest.raises(ValueError, match="'colour'"):
            await lsh.query(QUERIES[1], where=sa.column("colour") == "red")
        with pytest.raises(TypeError, match="SQLAlchemy expression"):
            await lsh.query(QUERIES[1], where=("lang = $1", "en"))


async def test_id_filters_work_with_any_store(redis_proc: Any) -> None:
    """A set of ids or a callable over ids: applied by lshrs to the candidates
    before ranking, with an owned store and with none."""
    url = f"redis://{redis_proc.host}:{redis_proc.port}/5"
    allowed = {i for i in range(N) if i % 50 == 7}  # 2%
    keep = np.array([i in allowed for i in range(N)])
    truth = exact_filtered(QUERIES, keep, 10)
    async with LSHRS(dim=DIM, redis_url=url, prefix="ids", store=InMemoryStore()) as lsh:
        await lsh.drop()
        await lsh.index(np.arange(N), BASE[:N])
        by_set = await lsh.query_many(QUERIES, top_k=10, where=allowed)
        by_call = await lsh.query_many(QUERIES, top_k=10, where=lambda ids: ids % 50 == 7)
        assert [[h.id for h in hits] for hits in by_set] == [[h.id for h in hits] for hits in by_call]
        assert all(len(hits) == 10 and {h.id for h in hits} <= allowed for hits in by_set)
        recall = np.mean([len({h.id for h in hits} & want) / 10 for hits, want in zip(by_set, truth)])
        assert recall >= 0.9, recall
        with pytest.raises(ValueError, match="needs a store that evaluates conditions"):
            await lsh.query(QUERIES[0], where=("lang = $1", "en"))
        with pytest.raises(TypeError, match="one bool per id"):
            await lsh.query(QUERIES[0], where=lambda ids: ids.tolist())
        await lsh.drop()
    async with LSHRS(dim=DIM, redis_url=url, prefix="nostore") as estimates:
        await estimates.drop()
        await estimates.index(np.arange(N), BASE[:N])
        hits = await estimates.query(QUERIES[2], top_k=5, where=allowed)
        assert len(hits) == 5 and {h.id for h in hits} <= allowed
        await estimates.drop()


async def test_postgres_passing_answers_the_same_by_either_path(table: tuple[str, str, str]) -> None:
    """Few candidates are looked up by id; many, against a condition few rows
    pass, are met by reading the passing ids: the answer is the same."""
    dsn, name, _ = table
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"ANALYZE {name}")  # the planner's estimate picks the path
    await conn.close()
    store = PostgresStore(dsn, table=name)
    for ids in (np.array([0, 1, 2, 100, 101, 5000]), np.arange(N + 100)):
        for lang in ("en", "fr"):
            expected = [i for i in ids.tolist() if i < N and language(i) == lang]
            assert sorted((await store.passing(ids, ("lang = $1", lang))).tolist()) == expected
    await store.close()
