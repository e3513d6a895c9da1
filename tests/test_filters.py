"""Filtered queries (issue 14): hits that pass ``where=``, as many as exist
up to ``top_k``, against exact filtered search; hostile values stay values;
bad filters are refused before any Redis work."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import numpy as np
import pytest
import sqlalchemy as sa
from redis.asyncio import Redis

from conftest import clustered
from lshrs import LSHRS, _filters
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


@pytest.fixture(params=["index", "rows"])
def strategy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How a filtered query is answered: from the index, widening as it must
    (the passing rows made too many to read), or exactly from the passing
    rows (the default for this table, where few rows pass)."""
    if request.param == "index":
        monkeypatch.setattr(_filters, "PREFILTER_DEPTHS", 0)
    return str(request.param)


@pytest.mark.parametrize("lang,least", [("de", 0.9), ("en", 0.9)])
async def test_postgres_filter_finds_what_exact_filtered_search_finds(
    table: tuple[str, str, str], lang: str, least: float, strategy: str
) -> None:
    dsn, name, url = table
    if strategy == "rows":
        least = 1.0  # exact
    elif lang == "en" and name.startswith("filtered_h"):
        # With hyperplanes and 1% passing, probing can run out of buckets near
        # the query before 10 pass: those queries read the passing rows and
        # rank them; the others keep what probing found (0.855 here).
        least = 0.8
    keep = np.array([language(i) == lang for i in range(N)])
    truth = exact_filtered(QUERIES, keep, 10)
    async with LSHRS(dim=DIM, redis_url=url, prefix=name, store=PostgresStore(dsn, table=name)) as lsh:
        found = await lsh.query_many(QUERIES, top_k=10, where=("lang = $1", lang))
        alone = await lsh.query(QUERIES[0], top_k=10, where=("lang = $1", lang))
        # top_p keeps its share of the 30 passing rows, on whichever path a
        # query took (the index's, or the exact one when probing ran short).
        thin = await lsh.query_many(QUERIES, top_k=10, top_p=0.05, where=("lang = $1", lang)) if lang == "en" else []
    for few, hits in zip(thin, found):
        assert 1 <= len(few) <= 2 and [h.id for h in few] == [h.id for h in hits][: len(few)], (few, hits)
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
        refusal = r"^PostgresStore takes where= as a SQL condition, alone or in a tuple .*; got list$"
        with pytest.raises(TypeError, match=refusal):
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


async def test_a_query_probing_runs_short_for_keeps_top_p_of_its_rerank_depth(redis_proc: Any) -> None:
    """Hyperplanes reach only rows near the query: with the passing rows all
    but opposite to it (400, more than the prefilter's 8 x 20 takes),
    probing finds fewer than ``top_k`` and the passing rows are ranked
    exactly. ``top_p`` then keeps its share of the 20 nearest (``rerank``),
    as on the index path, not of all 400."""
    url = f"redis://{redis_proc.host}:{redis_proc.port}/5"
    query = QUERIES[0]
    opposite = -query + 0.1 * np.random.default_rng(3).standard_normal((400, DIM)).astype(np.float32)
    vectors = np.concatenate([BASE[:N], opposite / np.linalg.norm(opposite, axis=1, keepdims=True)])
    away = np.arange(N, N + 400)
    nearest_first = away[np.argsort(-(vectors[away] @ query))].tolist()
    async with LSHRS(
        dim=DIM, redis_url=url, prefix="short", store=InMemoryStore(), hashing="hyperplane", rerank=20
    ) as lsh:
        await lsh.drop()
        await lsh.index(np.arange(len(vectors)), vectors)
        probed = await lsh.query(query, top_k=10, where=lambda ids: ids >= N)  # a callable has no exact path
        assert len(probed) < 10  # else this test proves nothing
        hits = await lsh.query(query, top_k=10, where=set(away.tolist()))
        share = await lsh.query(query, top_k=10, top_p=0.25, where=set(away.tolist()))
        await lsh.drop()
    assert [h.id for h in hits] == nearest_first[:10]
    assert [h.id for h in share] == nearest_first[:5]  # ceil(0.25 * 20)


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


def test_a_filtered_query_widens_by_the_square_root_of_the_share_that_passes() -> None:
    """sqrt(1/share) times the buckets, rounded up to a power of sqrt(2); at
    least WIDEN times more when every candidate was checked and fewer than
    top_k passed; never narrower, never past MAX_WIDEN."""
    from lshrs._filters import MAX_WIDEN, WIDEN, widening

    assert widening(0, 0, False, 1.0, 10) == 1.0  # nothing checked: nothing known
    assert widening(400, 400, False, 1.0, 10) == 1.0  # all pass
    assert widening(400, 200, False, 1.0, 10) == pytest.approx(2**0.5)  # half: sqrt(2)
    assert widening(400, 40, False, 1.0, 10) == pytest.approx(4.0)  # a tenth: sqrt(10) = 3.2, rounded up
    assert widening(3000, 30, False, 1.0, 10) == pytest.approx(2**3.5)  # 1%: 10, rounded up to 11.3
    assert widening(400, 0, False, 1.0, 10) == pytest.approx(2**4.5)  # none yet: a share below 1 in 401
    assert widening(400, 200, False, 4.0, 10) == 4.0  # already wider than the share asks
    assert widening(400, 5, True, 8.0, 10) == 8.0 * WIDEN  # all checked, too few passed
    assert widening(400, 50, False, 8.0, 10) == 8.0  # more to check first
    assert widening(10**6, 0, True, 128.0, 10) == MAX_WIDEN


def test_filter_checks_ask_nearest_first_by_whole_distance_levels() -> None:
    """The nearest unasked candidates, as many as the share seen should need,
    extended to the end of the last one's distance level; none once depth
    passed; a wider read keeps what was asked."""
    from lshrs._filters import Checks
    from lshrs._index import Candidates

    ids = np.array([50, 40, 30, 20, 10, 60, 70, 80], dtype=np.int64)
    distance = np.array([3, 1, 1, 2, 5, 2, 2, 9], dtype=np.int64)
    check = Checks(Candidates(ids, np.zeros((8, 4), np.uint8)), distance, None)
    assert check.ids.tolist() == [30, 40, 20, 60, 70, 50, 10, 80]  # distance order, ties to the smaller id
    first = check.next(depth=2)  # ceil(1.25 * 2) = 3 asked, to the end of level 2
    assert check.ids[first].tolist() == [30, 40, 20, 60, 70]
    check.answer(first, np.array([30, 70]))
    assert check.counts() == (5, 2, False)
    assert len(check.next(depth=2)) == 0  # two passed
    more = check.next(depth=3)  # share 3/6: ceil(1.25 * 1 / 0.5) = 3, only 3 left
    assert check.ids[more].tolist() == [50, 10, 80]
    assert sorted(check.passed().ids.tolist()) == [30, 70]

    wider = Checks(Candidates(np.array([90, 30, 20], np.int64), np.zeros((3, 4), np.uint8)), np.array([0, 1, 2]), check)
    assert wider.counts() == (2, 1, False)  # 30 and 20 were asked; 90 is new
    assert wider.ids[wider.next(depth=5)].tolist() == [90]


async def test_a_filtered_query_asks_about_a_few_hundred_candidates_not_all(redis_proc: Any) -> None:
    """Half the rows pass: the filter is asked about about twice the rerank
    depth, nearest first, not about every candidate the buckets hold; the
    same filter given as a set of ids (too many for the exact path) finds
    the same hits."""
    url = f"redis://{redis_proc.host}:{redis_proc.port}/5"
    n = 20_000
    base = clustered(n + 10, DIM, seed=72)
    asked: list[int] = []

    def even(ids: np.ndarray) -> np.ndarray:
        asked.append(len(ids))
        return ids % 2 == 0

    async with LSHRS(dim=DIM, redis_url=url, prefix="asked", store=InMemoryStore(), rerank=64) as lsh:
        await lsh.drop()
        await lsh.index(np.arange(n), base[:n])
        for query in base[n:]:
            asked.clear()
            hits = await lsh.query(query, top_k=10, where=even)
            assert len(hits) == 10 and all(h.id % 2 == 0 for h in hits)
            assert sum(asked) <= 4 * 64, asked
            everyone = await lsh.query(query, top_k=10, where=set(range(0, n, 2)))
            assert [h.id for h in hits] == [h.id for h in everyone]
        await lsh.drop()


async def test_a_selective_filter_is_answered_exactly_from_the_rows_the_index_holds(
    table: tuple[str, str, str],
) -> None:
    """1% of the rows pass ('en', 30 rows): the planner says so, they are
    read and ranked exactly, without widening over the index. An id deleted
    from the index stays out, although the table still holds its row."""
    dsn, name, url = table
    keep = np.array([language(i) == "en" for i in range(N)])
    async with LSHRS(dim=DIM, redis_url=url, prefix=name, store=PostgresStore(dsn, table=name)) as lsh:
        found = await lsh.query_many(QUERIES, top_k=10, where=("lang = $1", "en"))
        assert [{h.id for h in hits} for hits in found] == exact_filtered(QUERIES, keep, 10)
        gone = found[0][0].id
        await lsh.delete([gone])
        again = await lsh.query(QUERIES[0], top_k=10, where=("lang = $1", "en"))
        assert gone not in {h.id for h in again} and len(again) == 10
        await lsh.ingest(gone)  # back from its row, for the other tests
        few = await lsh.query(QUERIES[0], top_k=10, top_p=0.2, where=("lang = $1", "en"))
        assert [h.id for h in few] == [h.id for h in found[0]][:6]  # a share of the pool: the 30 passing rows


async def test_postgres_passing_keeps_ids_past_2_to_the_53(postgres_dsn: str) -> None:
    """Ids stay int64 by either path: read as float64, 2**62 + 1 would come
    back as 2**62 (a float64 holds 53 bits)."""
    name = f"bigids_{secrets.token_hex(4)}"
    ids = [2**62 + i for i in range(200)]
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute(f"CREATE TABLE {name} (id bigint PRIMARY KEY, embedding bytea, lang text)")
    await conn.executemany(
        f"INSERT INTO {name} VALUES ($1, $2, $3)", [(i, BASE[k].tobytes(), language(k)) for k, i in enumerate(ids)]
    )
    await conn.execute(f"ANALYZE {name}")  # the planner's estimate picks the path
    await conn.close()
    store = PostgresStore(postgres_dsn, table=name)
    try:
        # All 200 asked, 2 pass: the passing ids are read; 5 asked, most pass: looked up by id.
        for asked, lang in ((ids, "en"), (ids[:5], "fr")):
            expected = [i for k, i in enumerate(ids) if i in asked and language(k) == lang]
            assert sorted((await store.passing(np.array(asked), ("lang = $1", lang))).tolist()) == expected
        # A list value (unhashable: its plan estimate is not cached) works the same.
        both = [i for k, i in enumerate(ids) if language(k) in ("en", "de")]
        assert sorted((await store.passing(np.array(ids), ("lang = ANY($1)", ["en", "de"]))).tolist()) == both
    finally:
        await store.close()
        conn = await asyncpg.connect(postgres_dsn)
        await conn.execute(f"DROP TABLE {name}")
        await conn.close()


async def test_postgres_passing_rows_gives_up_when_more_pass_than_it_may_read(
    table: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asked for at most 20 rows: 30 pass, so None, whether the planner says so
    or (its statistics stale) the rows that came back do."""
    dsn, name, _ = table
    store = PostgresStore(dsn, table=name)
    rows = await store.passing_rows(("lang = $1", "en"), 30)
    assert rows is not None and sorted(rows.ids.tolist()) == list(range(0, N, 100))
    assert await store.passing_rows(("lang = $1", "en"), 20) is None

    async def stale(*args: Any) -> float:
        return 1.0

    monkeypatch.setattr(store, "_expected_rows", stale)
    assert await store.passing_rows(("lang = $1", "en"), 20) is None

    async def exactly_30(*args: Any) -> float:
        return 30.0

    monkeypatch.setattr(store, "_expected_rows", exactly_30)  # at most: 30 expected of 30 allowed are read
    rows = await store.passing_rows(("lang = $1", "en"), 30)
    assert rows is not None and sorted(rows.ids.tolist()) == list(range(0, N, 100))
    await store.close()


async def test_an_id_set_of_at_most_most_ids_is_read_whole() -> None:
    """``few_enough`` reads a set of ids from the store when it holds at
    most ``most`` ids, the ones the store has; one more and it declines."""
    store = InMemoryStore()
    await store.put(np.arange(100), BASE[:100])
    wanted = {3, 1, 2, 10**6}  # one id the store lacks
    rows = await _filters.few_enough(wanted, store, 4)
    assert rows is not None and rows.ids.tolist() == [1, 2, 3]
    assert await _filters.few_enough(wanted, store, 3) is None


async def test_an_id_filter_works_with_a_store_that_also_takes_conditions(table: tuple[str, str, str]) -> None:
    """A callable is applied by lshrs, never handed to PostgreSQL as a
    condition, and cannot be listed for the exact path: the index answers."""
    dsn, name, url = table
    async with LSHRS(dim=DIM, redis_url=url, prefix=name, store=PostgresStore(dsn, table=name)) as lsh:
        hits = await lsh.query(QUERIES[3], top_k=10, where=lambda ids: ids % 10 == 1)  # the 'de' rows
        assert len(hits) == 10 and all(language(h.id) == "de" for h in hits)
        by_set = await lsh.query(QUERIES[3], top_k=10, where={i for i in range(N) if i % 10 == 1})
        assert {h.id for h in by_set} == exact_filtered(QUERIES[3:4], np.arange(N) % 10 == 1, 10)[0]


@pytest.mark.parametrize(
    "family", [{"hashing": "kmeans"}, {"hashing": "kmeans", "spill": 0}, {"hashing": "hyperplane"}], ids=str
)
async def test_a_filtered_query_widens_only_as_far_as_its_filter_asks(
    redis_proc: Any, family: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each round of bucket reads is a Redis round trip, counted here: a
    filter every row passes reads once; one that keeps a third reads one
    wider round (twice the probes); one that keeps 1 row in 200 widens until
    its candidates reach ``max_candidates``, never asks Redis for more than
    the room left under the cap, nor for none, and stops after a round that
    brings no new id. Unspilled, a capped round fills the cap exactly (no id
    is in two buckets), and the query must then stop."""
    from lshrs._index import ShardedIndex

    url = f"redis://{redis_proc.host}:{redis_proc.port}/6"
    n, most = 6000, 1500
    base = clustered(n + 5, DIM, seed=79)
    rounds: list[tuple[int, int]] = []  # (cap asked, ids found) a round, one query at a time
    original = ShardedIndex.candidates

    async def counting(self: ShardedIndex, plans: list[bytes], caps: list[int]) -> Any:
        found = await original(self, plans, caps)
        rounds.extend((cap, len(c.ids)) for cap, c in zip(caps, found))
        return found

    monkeypatch.setattr(ShardedIndex, "candidates", counting)
    asked: list[int] = []

    def rare(ids: np.ndarray) -> np.ndarray:
        asked.extend(ids.tolist())
        return np.asarray(ids % 200 == 0)

    prefix, store = f"widen-{len(family)}{family['hashing']}", InMemoryStore()
    async with LSHRS(dim=DIM, redis_url=url, prefix=prefix, store=store, **family) as lsh:
        await lsh.drop()
        await lsh.index(np.arange(n), base[:n])
        # Capped clients that meet the cap in their first round, or only after widening.
        capped = [
            LSHRS(dim=DIM, redis_url=url, prefix=prefix, store=store, max_candidates=most, probes=p) for p in (None, 8)
        ]
        for query in base[n:]:
            rounds.clear()
            await lsh.query(query, top_k=10, where=lambda ids: ids >= 0)
            assert len(rounds) == 1
            rounds.clear()
            await lsh.query(query, top_k=10, where=lambda ids: ids % 3 == 0)
            assert len(rounds) == 2
            for client in capped:
                rounds.clear()
                asked.clear()
                await client.query(query, top_k=10, where=rare)
                assert len(asked) == len(set(asked))  # no candidate asked about twice, however many rounds
                caps = [cap for cap, _ in rounds]
                assert caps[0] == most and all(cap > 0 and found <= cap for cap, found in rounds)
                # The room left under the cap: smaller after each round that brought new ids, and no
                # round follows one that brought none.
                assert all(later < earlier for earlier, later in itertools.pairwise(caps))
        for client in capped:
            await client.close()
        await lsh.drop()


@pytest.mark.parametrize("hashing", ["kmeans", "hyperplane"])
async def test_a_widening_query_reads_each_bucket_once(
    redis_proc: Any, hashing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2% of the rows pass: the query widens several times, and each round
    reads only the buckets the rounds before it did not; the hits still
    pass and match exact filtered search."""
    from lshrs._index import ShardedIndex

    url = f"redis://{redis_proc.host}:{redis_proc.port}/6"
    n = 20_000
    base = clustered(n + 10, DIM, seed=73)
    read: list[bytes] = []
    original = ShardedIndex.candidates

    async def reading(self: ShardedIndex, plans: list[bytes], caps: list[int]) -> Any:
        width = self.probe_key_width
        read.extend(plan[at : at + width] for plan in plans for at in range(0, len(plan), width))
        return await original(self, plans, caps)

    monkeypatch.setattr(ShardedIndex, "candidates", reading)
    keep = np.arange(n) % 50 == 0
    options: dict[str, Any] = {"hashing": hashing, "rerank": 64, "store": InMemoryStore()}
    async with LSHRS(dim=DIM, redis_url=url, prefix=f"once-{hashing}", **options) as lsh:
        await lsh.drop()
        await lsh.index(np.arange(n), base[:n])
        rounds, found = [], []
        for query in base[n:]:
            read.clear()
            hits = await lsh.query(query, top_k=10, where=lambda ids: ids % 50 == 0)
            assert len(read) == len(set(read)), "a bucket was read twice"
            rounds.append(len(read))
            found.append({h.id for h in hits})
            assert all(h.id % 50 == 0 for h in hits)
        assert min(rounds) > lsh._opened.probes  # type: ignore[union-attr]  # every query widened
        unit = base / np.linalg.norm(base, axis=1, keepdims=True)
        passing = np.flatnonzero(keep)
        truth = [set(passing[np.argsort(-(unit[passing] @ q))[:10]].tolist()) for q in unit[n:]]
        assert np.mean([len(f & t) / 10 for f, t in zip(found, truth)]) >= 0.9
        await lsh.drop()
