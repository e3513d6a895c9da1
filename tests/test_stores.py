"""One suite for every store: in-memory, Redis, PostgreSQL (each column type)
through asyncpg, and SQLAlchemy on PostgreSQL and SQLite. Real servers only."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import numpy as np
import pytest
from redis.asyncio import Redis

from conftest import brute_force, clustered, keyspace
from lshrs import LSHRS, Rows, VectorStore, WritableStore
from lshrs.adapters import InMemoryStore, PostgresStore, RedisStore, SQLAlchemyStore

pytestmark = pytest.mark.anyio

N, DIM = 1500, 32
BASE = clustered(N, DIM, seed=21)
TEXTS = [f"passage number {i}" for i in range(N)]
NULL_ID = 10_000_000  # a row whose vector is NULL: skipped, counted

PG_COLUMNS = {
    "real": ("real[]", lambda v: v.tolist()),
    "double": ("double precision[]", lambda v: v.astype(np.float64).tolist()),
    "bytea": ("bytea", lambda v: v.astype("<f4").tobytes()),
    "vector": (f"vector({DIM})", lambda v: "[" + ",".join(map(str, v.tolist())) + "]"),
}
STORES = ["memory", "redis", *(f"postgres-{k}" for k in PG_COLUMNS), "sqlalchemy-postgres", "sqlalchemy-sqlite"]


async def fill_pg_table(conn: Any, table: str, column_type: str, encode: Any, rows: int = N) -> None:
    await conn.execute(f'DROP TABLE IF EXISTS "{table}"')
    await conn.execute(f'CREATE TABLE "{table}" (id bigint PRIMARY KEY, embedding {column_type}, body text)')
    cast = "::vector" if column_type.startswith("vector") else ""
    await conn.executemany(
        f'INSERT INTO "{table}" VALUES ($1, $2{cast}, $3)',
        [(i, encode(BASE[i % N]), TEXTS[i % N]) for i in range(rows)],
    )
    await conn.execute(f'INSERT INTO "{table}" VALUES ($1, NULL, $2)', NULL_ID, "no vector")


@pytest.fixture(scope="session")
async def pg_tables(postgres_dsn: str) -> str:
    """One table per vector column type, filled once."""
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    for name, (column_type, encode) in PG_COLUMNS.items():
        await fill_pg_table(conn, f"passages_{name}", column_type, encode)
    await conn.close()
    return postgres_dsn


async def sqlite_table(path: Path) -> str:
    import sqlite3

    db = sqlite3.connect(path)
    db.execute("CREATE TABLE passages (id INTEGER PRIMARY KEY, embedding BLOB, body TEXT)")
    db.executemany(
        "INSERT INTO passages VALUES (?, ?, ?)", [(i, BASE[i].astype("<f4").tobytes(), TEXTS[i]) for i in range(N)]
    )
    db.execute("INSERT INTO passages VALUES (?, NULL, ?)", (NULL_ID, "no vector"))
    db.commit()
    db.close()
    return f"sqlite+aiosqlite:///{path}"


OWNED = ["memory", "redis"]
TABLES = [kind for kind in STORES if kind not in OWNED]


async def open_store(kind: str, tmp_path: Path, pg_tables: str, redis_proc: Any) -> VectorStore:
    if kind == "memory":
        return InMemoryStore()
    if kind == "redis":
        made = RedisStore(f"redis://{redis_proc.host}:{redis_proc.port}/1")
        await made.drop()
        return made
    if kind.startswith("postgres-"):
        return PostgresStore(pg_tables, table=f"public.passages_{kind.split('-')[1]}", text_column="body")
    if kind == "sqlalchemy-postgres":
        url = pg_tables.replace("postgresql://", "postgresql+asyncpg://")
        return SQLAlchemyStore(url, table="passages_bytea", text_column="body")
    return SQLAlchemyStore(await sqlite_table(tmp_path / "db.sqlite"), table="passages", text_column="body")


@pytest.fixture(params=STORES)
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, pg_tables: str, redis_proc: Any
) -> AsyncIterator[VectorStore]:
    made = await open_store(request.param, tmp_path, pg_tables, redis_proc)
    yield made
    await made.close()


@pytest.fixture(params=TABLES)
async def table_store(
    request: pytest.FixtureRequest, tmp_path: Path, pg_tables: str, redis_proc: Any
) -> AsyncIterator[VectorStore]:
    """The read-only views of a user's table."""
    made = await open_store(request.param, tmp_path, pg_tables, redis_proc)
    yield made
    await made.close()


@pytest.fixture(params=OWNED)
async def owned_store(
    request: pytest.FixtureRequest, tmp_path: Path, pg_tables: str, redis_proc: Any
) -> AsyncIterator[VectorStore]:
    """The stores lshrs writes itself."""
    made = await open_store(request.param, tmp_path, pg_tables, redis_proc)
    yield made
    await made.close()


@pytest.fixture
async def single_redis_url(redis_proc: Any) -> str:
    """An emptied single Redis: the stores' suite does not need to run twice."""
    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    client = Redis.from_url(url)
    await client.flushdb()
    await client.aclose()
    return url


async def build(store: VectorStore, url: str) -> LSHRS:
    lsh = LSHRS(dim=DIM, redis_url=url, store=store, expected_size=10_000, batch_size=400)
    await lsh.drop()
    if isinstance(store, WritableStore):
        assert await lsh.index(np.arange(N), BASE, texts=TEXTS) == N
    else:
        seen: list[tuple[int, int | None]] = []
        assert await lsh.index(progress=lambda done, total: seen.append((done, total))) == N
        assert seen[-1] == (N, N)
        assert len(seen) == -(-N // 400)
    return lsh


async def test_store_build_and_query(store: VectorStore, single_redis_url: str) -> None:
    lsh = await build(store, single_redis_url)
    try:
        assert await store.dimension() == DIM
        assert await lsh.count() == N
        hits = await lsh.query(BASE[42], top_k=5)
        assert hits[0].id == 42
        assert hits[0].text == "passage number 42"
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        queries = BASE[:60] + 0.05 * np.random.default_rng(1).standard_normal((60, DIM)).astype(np.float32)
        truth = brute_force(BASE, queries, 10)
        found = await lsh.query_many(queries, top_k=10)
        recall = np.mean([len({h.id for h in hits} & set(row)) / 10 for hits, row in zip(found, truth)])
        assert recall >= 0.9
    finally:
        await lsh.close()


async def test_store_fetch_skips_missing_ids(store: VectorStore, single_redis_url: str) -> None:
    lsh = await build(store, single_redis_url)
    rows = await store.fetch(np.array([3, 999_999, 7, NULL_ID], dtype=np.int64))
    assert sorted(rows.ids.tolist()) == [3, 7]
    at = {int(i): k for k, i in enumerate(rows.ids)}
    np.testing.assert_allclose(rows.vectors[at[7]], BASE[7], rtol=1e-6)
    assert rows.texts is not None and rows.texts[at[3]] == "passage number 3"
    nothing = await store.fetch(np.array([999_998, 999_999], dtype=np.int64))
    assert len(nothing) == 0 and len(nothing.vectors) == 0
    await lsh.close()


@pytest.mark.parametrize("scale", [1, 10**12], ids=["dense ids", "sparse ids"])
async def test_the_memory_store_finds_rows_by_id_in_the_order_asked(scale: int) -> None:
    """Dense ids are looked up in an array, sparse ones in a dict: the same
    rows, in the order asked, after replacements and removals moved rows."""
    store = InMemoryStore()
    ids = np.arange(200, dtype=np.int64) * scale
    expected = {int(i): BASE[k] + (1.0 if k >= 100 else 0.0) for k, i in enumerate(ids)}
    await store.put(ids[:150], BASE[:150], texts=TEXTS[:150])
    await store.put(ids[100:], BASE[100:200] + 1.0, texts=TEXTS[100:200])  # 50 replaced, 50 added
    await store.remove(ids[[0, 120]])  # the last rows move into their places
    assert (store._row_at is None) == (scale > 1) and len(store) == 198
    asked = np.array([ids[199], -5, ids[0], ids[120], ids[7], 3 * 10**13 + 1, ids[7]], np.int64)
    rows = await store.fetch(asked)
    assert rows.ids.tolist() == [ids[199], ids[7], ids[7]]
    assert rows.texts == [TEXTS[199], TEXTS[7], TEXTS[7]]
    np.testing.assert_array_equal(rows.vectors, [expected[int(i)] for i in rows.ids])
    every = await store.fetch(ids)
    assert every.ids.tolist() == [int(i) for i in ids if i not in (ids[0], ids[120])]
    np.testing.assert_array_equal(every.vectors, [expected[int(i)] for i in every.ids])


async def test_read_only_stores_skip_and_count_null_vectors(
    table_store: VectorStore, single_redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = table_store
    assert not isinstance(store, WritableStore)
    with caplog.at_level(logging.WARNING, logger="lshrs"):
        lsh = await build(store, single_redis_url)
    assert store.skipped_nulls == 1  # type: ignore[attr-defined]
    if isinstance(store, PostgresStore):  # the build's own line says what was left out, and where
        table = store._table  # type: ignore[attr-defined]
        assert f"skipped 1 rows of {table} with a NULL vector" in [r.getMessage() for r in caplog.records]
    assert await store.count() == N
    await lsh.close()


async def test_owned_stores_follow_delete(owned_store: VectorStore, single_redis_url: str) -> None:
    store = owned_store
    assert isinstance(store, WritableStore)
    lsh = await build(store, single_redis_url)
    await lsh.delete([1, 2])
    assert len(await store.fetch(np.array([1, 2, 3]))) == 1
    await lsh.ingest(1, BASE[1], text="back")
    assert (await lsh.query(BASE[1], top_k=1))[0].text == "back"
    await lsh.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"table": "no_such_table"}, "does not exist"),
        ({"table": "passages_bytea", "vector_column": "nope"}, "has no column 'nope'"),
        ({"table": "passages_bytea", "text_column": "nope"}, "has no column 'nope'"),
        ({"table": 'passages_bytea"; DROP TABLE passages_real; --'}, "does not exist"),
    ],
)
async def test_postgres_wrong_names_fail_at_open(
    pg_tables: str, single_redis_url: str, options: Any, message: str
) -> None:
    store = PostgresStore(pg_tables, **options)
    with pytest.raises(ValueError, match=message):
        await LSHRS(dim=DIM, redis_url=single_redis_url, prefix="wrong", store=store).open()
    conn = await asyncpg.connect(pg_tables)
    assert await conn.fetchval("SELECT count(*) FROM passages_real") == N + 1  # the hostile name did nothing
    await conn.close()


async def test_sqlalchemy_wrong_names_fail_at_open(pg_tables: str, single_redis_url: str) -> None:
    url = pg_tables.replace("postgresql://", "postgresql+asyncpg://")
    for options, message in (
        ({"table": "missing"}, "does not exist"),
        ({"table": "passages_bytea", "id_column": "pk"}, "no column 'pk'"),
    ):
        store = SQLAlchemyStore(url, **options)
        with pytest.raises(ValueError, match=message):
            await LSHRS(dim=DIM, redis_url=single_redis_url, prefix="wrong", store=store).open()


async def test_dimension_mismatch_fails_at_open(pg_tables: str, single_redis_url: str) -> None:
    store = PostgresStore(pg_tables, table="passages_vector")
    with pytest.raises(ValueError, match="store holds 32-d vectors but the index is 64-d"):
        await LSHRS(dim=64, redis_url=single_redis_url, prefix="dims", store=store).open()


async def test_streaming_build_of_a_50k_row_table(pg_tables: str, single_redis_url: str) -> None:
    conn = await asyncpg.connect(pg_tables)
    await fill_pg_table(conn, "big", "bytea", PG_COLUMNS["bytea"][1], rows=50_000)
    await conn.close()
    store = PostgresStore(pg_tables, table="big", text_column="body")
    async with LSHRS(dim=DIM, redis_url=single_redis_url, prefix="big", store=store, expected_size=50_000) as lsh:
        await lsh.drop()
        assert await lsh.index() == 50_000
        assert await lsh.count() == 50_000
        assert store.skipped_nulls == 1
        hits = await lsh.query(BASE[5], top_k=40)
        assert {h.id for h in hits if h.score > 0.9999} >= {5, 5 + N, 5 + 2 * N}
        assert await lsh.index() == 50_000  # a re-run changes nothing
        assert await lsh.count() == 50_000
        await lsh.drop()


async def test_ingest_with_a_read_only_store_reads_the_row(table_store: VectorStore, single_redis_url: str) -> None:
    """The table is the truth: ingest(id) indexes the stored row; an id the
    table lacks, or a vector that differs from its row, is refused and
    nothing is written; a query finds what ingest(id) indexed."""
    lsh = await build(table_store, single_redis_url)
    client = Redis.from_url(single_redis_url)
    try:
        await lsh.delete([42])
        assert (await lsh.query(BASE[42], top_k=1))[0].id != 42
        await lsh.ingest(42)  # no vector: read from the table
        assert (await lsh.query(BASE[42], top_k=1))[0].id == 42
        await lsh.ingest(43, BASE[43])  # the row's own vector: accepted
        # The row as the caller may hold it: rounded to float16 (a halfvec
        # column), within 1e-3 of each entry; and off by 5e-6 on the entry
        # nearest 0, where only the absolute tolerance (1e-5) accepts it.
        await lsh.ingest(43, BASE[43].astype(np.float16))
        row = int(np.argmin(np.abs(BASE).min(axis=1)))
        near = BASE[row].astype(np.float64)
        entry = int(np.argmin(np.abs(near)))
        assert abs(near[entry]) < 1e-3  # so no relative tolerance of 1e-3 covers 5e-6
        near[entry] += 5e-6
        await lsh.ingest(row, near)
        before = await keyspace(client)
        with pytest.raises(
            ValueError,
            match=r"^the vector given for id 44 differs from the store's row; "
            r"ingest\(id\) with no vector indexes the row as stored$",
        ):
            await lsh.ingest(44, BASE[44] * 1.01)  # 1% off: a different vector, not a rounding of it
        with pytest.raises(ValueError, match=r"^vector must have shape \(n, 32\) or \(32,\), got \(3,\)$"):
            await lsh.ingest(44, [1.0, 0.0, 0.0])
        with pytest.raises(ValueError, match="not in the store"):
            await lsh.ingest(10**9)
        with pytest.raises(ValueError, match="not in the store"):
            await lsh.ingest(10**9, BASE[1])
        with pytest.raises(ValueError, match="differs from the store's row"):
            await lsh.ingest(44, BASE[45])
        assert await keyspace(client) == before
        assert await lsh.count() == N
    finally:
        await client.aclose()
        await lsh.close()


async def test_ingest_into_an_owned_store_needs_the_vector(owned_store: VectorStore, single_redis_url: str) -> None:
    lsh = await build(owned_store, single_redis_url)
    try:
        with pytest.raises(
            TypeError, match=r"^ingest\(\) needs the vector: lshrs writes this store \(or there is none\)$"
        ):
            await lsh.ingest(5)
    finally:
        await lsh.close()


async def analyzed_table(dsn: str, table: str, seed: int, dim: int = 64, stated: int | None = None) -> np.ndarray:
    """A fresh ``bytea`` table of 20,000 random rows (at 64-d about 30 a
    page), analyzed, so the planner knows its size, or believes it to be
    ``stated`` rows (a stale count; autovacuum would set it right, in time);
    returns its vectors by id."""
    vectors = np.random.default_rng(seed).standard_normal((20_000, dim)).astype(np.float32)
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"DROP TABLE IF EXISTS {table}")
    await conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, embedding bytea)")
    await conn.copy_records_to_table(table, records=[(i, v.tobytes()) for i, v in enumerate(vectors)])
    await conn.execute(f"ANALYZE {table}")
    if stated is not None:
        await conn.execute("UPDATE pg_class SET reltuples = $1 WHERE oid = $2::regclass", stated, table)
    await conn.close()
    return vectors


def next_ids_kept(sample: Rows) -> float:
    """The share of sampled rows whose next id came too: most of them in a
    page sample, the sample's own rate in a row sample."""
    return float(np.isin(sample.ids + 1, sample.ids).mean())


@pytest.mark.anyio
async def test_a_large_postgres_table_is_sampled_by_pages(postgres_dsn: str) -> None:
    """A table many times the sample is read by pages (TABLESAMPLE), not
    sorted whole: the rows come back as they are stored, distinct, and about
    as many as asked; a table under four times the sample still gives
    exactly as many, drawn row by row. Rows of 64-d vectors, about 30 a
    page: at 8-d, 150 a page, the 5% of 130 pages drawn was sometimes under
    half the rows asked, and the store rightly fell back to a row sample."""
    vectors = await analyzed_table(postgres_dsn, "sampled", seed=3)
    store = PostgresStore(postgres_dsn, table="sampled")
    try:
        paged = await store.sample(1_000)
        assert 500 <= len(paged) <= 1_000
        assert len(set(paged.ids.tolist())) == len(paged)
        assert np.array_equal(paged.vectors, vectors[paged.ids])
        # Read by pages: neighbouring rows come together (a row sample keeps 5% of them).
        assert next_ids_kept(paged) > 0.3
        # Exactly four times the sample: still by pages (whole pages, or most of them).
        assert next_ids_kept(await store.sample(5_000)) > 0.5
        # Just under: a row sample, exactly as many, a row's neighbour kept at the sample's rate (25%).
        rowwise = await store.sample(5_001)
        assert len(set(rowwise.ids.tolist())) == len(rowwise) == 5_001
        assert next_ids_kept(rowwise) < 0.35
    finally:
        await store.close()


@pytest.mark.parametrize(("stated", "path"), [(10_000, "pages, then rows"), (2_000_000, "rows")])
async def test_a_sample_is_exactly_as_large_as_asked_when_the_statistics_are_off(
    postgres_dsn: str, stated: int, path: str
) -> None:
    """The page share comes from the planner's row count, which can be stale.
    Stated too low, the pages hold more rows than asked: a random subset of
    them, distinct, exactly as many. Stated too high, they hold few: the
    store falls back to a row sample, exactly as many."""
    table = f"sampled_stale_{stated}"
    vectors = await analyzed_table(postgres_dsn, table, seed=4, stated=stated)
    store = PostgresStore(postgres_dsn, table=table)
    try:
        sample = await store.sample(1_000)
        assert len(set(sample.ids.tolist())) == len(sample) == 1_000, path
        assert np.array_equal(sample.vectors, vectors[sample.ids])
        if path == "rows":  # a row sample keeps few neighbours (5%); pages keep most
            assert next_ids_kept(sample) < 0.2
    finally:
        await store.close()


async def test_a_page_sample_under_half_the_rows_asked_gives_way_to_a_row_sample(postgres_dsn: str) -> None:
    """Too few pages drawn (the planner's count 2.4 times the table's) bring
    back about 0.42 of the rows asked: too coarse a sample, so the store
    draws rows instead, exactly as many. Rows of 400-d vectors, 4 a page,
    so the 625 or so pages drawn hold that share to within 4% (one standard
    deviation), far from a third or a half."""
    table, asked, stated = "sampled_coarse", 6_000, 48_000
    vectors = await analyzed_table(postgres_dsn, table, seed=5, dim=400, stated=stated)
    conn = await asyncpg.connect(postgres_dsn)
    # What a page sample of that share yields here, drawn apart from the store's.
    paged = await conn.fetchval(f"SELECT count(*) FROM {table} TABLESAMPLE SYSTEM ($1)", 100.0 * asked / stated)
    await conn.close()
    assert asked // 3 <= paged < asked // 2
    store = PostgresStore(postgres_dsn, table=table)
    try:
        sample = await store.sample(asked)
        assert len(set(sample.ids.tolist())) == len(sample) == asked
        assert np.array_equal(sample.vectors, vectors[sample.ids])
    finally:
        await store.close()


async def test_an_empty_tables_dimension_comes_from_its_column_type(postgres_dsn: str) -> None:
    """``vector(16)`` says 16 with no row to read; ``bytea`` says nothing
    until a row does."""
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    await conn.execute("CREATE TABLE empty_typed (id bigint PRIMARY KEY, embedding vector(16))")
    await conn.execute("CREATE TABLE empty_untyped (id bigint PRIMARY KEY, embedding bytea)")
    await conn.close()
    for table, expected in (("empty_typed", 16), ("empty_untyped", None)):
        store = PostgresStore(postgres_dsn, table=table)
        try:
            assert await store.dimension() == expected, table
        finally:
            await store.close()


async def test_a_row_zeroed_in_the_table_after_its_build_scores_zero(postgres_dsn: str, single_redis_url: str) -> None:
    """The table is the user's: a row set to all zeros after it was indexed
    is still fetched for the rerank, and scores 0 (no cosine to divide by),
    not NaN; the other hits keep their exact cosines."""
    vectors = clustered(400, DIM, seed=5)
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute("CREATE TABLE zeroed (id bigint PRIMARY KEY, embedding bytea)")
    await conn.copy_records_to_table("zeroed", records=[(i, v.astype("<f4").tobytes()) for i, v in enumerate(vectors)])
    store = PostgresStore(postgres_dsn, table="zeroed")
    lsh = LSHRS(dim=DIM, redis_url=single_redis_url, store=store)
    try:
        await lsh.index()
        await conn.execute("UPDATE zeroed SET embedding = $1 WHERE id = 7", np.zeros(DIM, "<f4").tobytes())
        hits = await lsh.query(vectors[7], top_k=400)
        scores = {h.id: h.score for h in hits}
        assert scores[7] == 0.0
        others = [i for i in scores if i != 7]
        assert [scores[i] for i in others] == pytest.approx((vectors[others] @ vectors[7]).tolist(), abs=1e-5)
    finally:
        await conn.close()
        await lsh.close()
        await store.close()


async def test_a_statement_held_up_by_a_lock_times_out_naming_its_method(postgres_dsn: str) -> None:
    """A table another session holds ``ACCESS EXCLUSIVE`` (a migration's
    ``ALTER TABLE``) blocks every statement on it: each of the store's
    methods gives up at ``command_timeout`` with the built-in
    ``TimeoutError`` naming itself and the table, and works once the lock
    is gone."""
    conn = await asyncpg.connect(postgres_dsn)
    await fill_pg_table(conn, "locked", "bytea", PG_COLUMNS["bytea"][1], rows=300)
    fresh = PostgresStore(postgres_dsn, table="locked", command_timeout=0.3)  # not yet inspected
    store = PostgresStore(postgres_dsn, table="locked", command_timeout=0.3)
    assert await store.dimension() == DIM
    ids = np.arange(5, dtype=np.int64)
    calls: list[tuple[str, Any]] = [
        ("dimension", fresh.dimension),  # bytea: its first row says the dimension
        ("count", store.count),
        ("fetch", lambda: store.fetch(ids)),
        ("passing", lambda: store.passing(ids, "id >= 0")),
        ("passing_rows", lambda: store.passing_rows("id < 3", 10)),
        ("check_where", lambda: store.check_where("id < 3")),
        ("sample", lambda: store.sample(10)),
        ("batches", lambda: anext(aiter(store.batches(100)))),
    ]
    try:
        lock = conn.transaction()
        await lock.start()
        await conn.execute('LOCK TABLE "locked" IN ACCESS EXCLUSIVE MODE')
        for method, call in calls:
            with anyio.fail_after(5):  # no command_timeout: it would wait for the lock as long as it is held
                with pytest.raises(TimeoutError) as waited:
                    await call()
            expected = (
                f"PostgreSQL did not answer PostgresStore.{method}() on table 'locked' within command_timeout=0.3 s"
            )
            assert str(waited.value) == expected
        await lock.rollback()
        assert await fresh.dimension() == DIM and await store.count() == 300
        assert (await store.fetch(ids)).ids.tolist() == ids.tolist()
    finally:
        await fresh.close()
        await store.close()
        await conn.execute('DROP TABLE "locked"')
        await conn.close()
