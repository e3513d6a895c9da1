"""A table's rows a build cannot index (NULL, a wrong dimension, NaN, all
zeros) are skipped and counted, or with ``strict=True`` stop it; a Redis out
of memory stops a build with the memory it needs, and it resumes."""

from __future__ import annotations

import logging
import re
from typing import Any

import anyio
import asyncpg
import numpy as np
import pytest
from click.testing import CliRunner
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError

from conftest import clustered, index_state
from lshrs import LSHRS, _lshrs
from lshrs.adapters import PostgresStore, SQLAlchemyStore
from lshrs.cli import main as cli

pytestmark = pytest.mark.anyio

DIM = 16
GOOD = 300
BASE = clustered(GOOD, DIM, seed=31)
#: Bad rows after the good ones (ids GOOD and up), one reason each.
BAD = {
    "NULL vector": None,
    "wrong dimension": np.ones(DIM + 1, np.float32),
    "NaN or infinity": np.full(DIM, np.nan, np.float32),
    "all zeros": np.zeros(DIM, np.float32),
}


async def bytea_table(dsn: str, table: str, rows: list[tuple[int, np.ndarray | None]]) -> None:
    """A fresh table of (id, float32 bytes or NULL) rows, in the order given."""
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"DROP TABLE IF EXISTS {table}")
    await conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, embedding bytea)")
    await conn.executemany(
        f"INSERT INTO {table} VALUES ($1, $2)",
        [(i, None if v is None else v.astype("<f4").tobytes()) for i, v in rows],
    )
    await conn.close()


@pytest.fixture
async def bad_rows_table(postgres_dsn: str) -> str:
    """A bytea table of good rows with one bad row of each kind in the middle."""
    good = [(i, BASE[i]) for i in range(GOOD)]
    bad = [(GOOD + k, v) for k, v in enumerate(BAD.values())]
    await bytea_table(postgres_dsn, "bad_rows", good[:150] + bad + good[150:])
    return postgres_dsn


@pytest.mark.parametrize("block_rows", [None, 200])
async def test_a_build_skips_and_counts_the_rows_it_cannot_index(
    bad_rows_table: str,
    redis_proc: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    block_rows: int | None,
) -> None:
    """With ``block_rows``, the bad rows are hashed in a full block (of
    three batches: the store leaves the NULL row out, so two hold 199
    rows), the last four rows in a block of their own; else all in one."""
    if block_rows is not None:
        monkeypatch.setattr(_lshrs, "_HASH_ROWS", block_rows)
    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    raw = Redis.from_url(url)
    store = PostgresStore(bad_rows_table, table="bad_rows")
    async with LSHRS(dim=DIM, redis_url=url, prefix="badrows", store=store, batch_size=100) as lsh:
        await lsh.drop()
        indexed = await lsh.index(progress=True)
        assert indexed == GOOD
        assert indexed.skipped == {reason: 1 for reason in BAD}
        assert set(await index_state(raw, lsh)) == set(range(GOOD))
        assert "skipped 4 rows it cannot index: 1 NULL vector, 1 NaN or infinity" in capsys.readouterr().err
        # strict: the build stops at the first batch holding one (the second batch of 100 holds all four).
        with pytest.raises(ValueError) as stopped:
            await lsh.index(strict=True)
        assert str(stopped.value) == (
            "the store holds rows a build cannot index: 1 NULL vector, 1 NaN or infinity, 1 all zeros, "
            "1 wrong dimension (id 302); index(strict=True) stops at them, index() skips and counts them"
        )
        # A row that turns bad after its build: a query fetching it skips it,
        # and reconcile takes it out of the index.
        conn = await asyncpg.connect(bad_rows_table)
        await conn.execute("UPDATE bad_rows SET embedding = $1 WHERE id = 7", np.ones(3, "<f4").tobytes())
        await conn.close()
        assert 7 not in {h.id for h in await lsh.query(BASE[7], top_k=5)}
        capsys.readouterr()
        report = await lsh.reconcile(progress=True)
        assert (report.removed, report.added) == (1, 0)
        assert set(await index_state(raw, lsh)) == set(range(GOOD)) - {7}
        assert "skipped 5 rows it cannot index: 1 NULL vector, 1 NaN or infinity, 1 all zeros, 2 wrong dimension\n" in (
            capsys.readouterr().err
        )
        await lsh.drop()
    await raw.aclose()


async def test_null_rows_alone_are_counted_without_an_id_and_logged_without_progress(
    postgres_dsn: str, redis_proc: Any, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """NULL vectors never reach the build (the store leaves them out), so
    a strict build names no id; a build without progress logs what it
    skipped as a warning instead of writing to stderr."""
    await bytea_table(postgres_dsn, "null_rows", [*((i, BASE[i]) for i in range(GOOD)), (GOOD, None)])
    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    store = PostgresStore(postgres_dsn, table="null_rows")
    async with LSHRS(dim=DIM, redis_url=url, prefix="null-rows", store=store) as lsh:
        await lsh.drop()
        with pytest.raises(ValueError) as stopped:
            await lsh.index(strict=True)
        assert str(stopped.value) == (
            "the store holds rows a build cannot index: 1 NULL vector; "
            "index(strict=True) stops at them, index() skips and counts them"
        )
        capsys.readouterr()
        with caplog.at_level(logging.WARNING, logger="lshrs"):
            assert await lsh.index() == GOOD
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.module == "_lshrs"]
        assert warned == ["skipped 1 row it cannot index: 1 NULL vector"]  # the store logs its own too
        assert "skipped" not in capsys.readouterr().err
        await lsh.drop()
    env = {"LSHRS_REDIS_URL": url, "LSHRS_POSTGRES_DSN": postgres_dsn, "LSHRS_TABLE": "null_rows"}
    built = await anyio.to_thread.run_sync(lambda: CliRunner().invoke(cli, ["--prefix", "null-rows", "index"], env=env))
    assert built.exit_code == 0, built.output
    assert "indexed 300 vectors under prefix 'null-rows'; skipped 1 row it cannot index (1 NULL vector)" in built.output
    async with LSHRS(dim=DIM, redis_url=url, prefix="null-rows") as lsh:
        await lsh.drop()


async def test_sqlalchemy_and_array_columns_skip_rows_of_another_length(postgres_dsn: str, redis_proc: Any) -> None:
    """A ``real[]`` column read by PostgresStore (a NULL element sends a
    shorter array, or one of a vector's length that only its flag tells
    apart) and by SQLAlchemyStore (lists of another length)."""
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute("DROP TABLE IF EXISTS bad_arrays")
    await conn.execute("CREATE TABLE bad_arrays (id bigint PRIMARY KEY, embedding real[])")
    await conn.executemany("INSERT INTO bad_arrays VALUES ($1, $2)", [(i, BASE[i].tolist()) for i in range(GOOD)])
    await conn.execute("INSERT INTO bad_arrays VALUES (1000, $1), (1001, $2), (1002, NULL)", [1.0] * 3, [None] * DIM)
    # Two NULLs (4 bytes each) and one value fewer: an array of a vector's length.
    await conn.execute("INSERT INTO bad_arrays VALUES (1003, $1)", [1.0] * (DIM - 1) + [None, None])
    await conn.close()
    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    stores = {
        "postgres": (PostgresStore(postgres_dsn, table="bad_arrays"), {"wrong dimension": 1, "NULL element": 2}),
        "sqlalchemy": (
            SQLAlchemyStore(postgres_dsn.replace("postgresql://", "postgresql+asyncpg://"), table="bad_arrays"),
            {"wrong dimension": 2, "NaN or infinity": 1},  # SQLAlchemy reads a NULL element as NaN
        ),
    }
    for name, (store, expected) in stores.items():
        async with LSHRS(dim=DIM, redis_url=url, prefix=f"badarrays-{name}", store=store, batch_size=100) as lsh:
            await lsh.drop()
            indexed = await lsh.index()
            assert (indexed, indexed.skipped) == (GOOD, {**expected, "NULL vector": 1}), name
            assert await lsh.count() == GOOD
            await lsh.drop()
        fetched = await store.fetch(np.array([5, 1003, 7]))  # a rerank fetch: the two NULLs among good rows
        reason = "NULL element" if name == "postgres" else "wrong dimension"
        assert (fetched.ids.tolist(), fetched.left_out) == ([5, 7], {reason: 1}), name
        await store.close()


async def test_a_build_out_of_memory_says_what_it_needs_and_resumes(redis_proc: Any) -> None:
    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    raw = Redis.from_url(url)
    await raw.flushall()
    base = clustered(20_000, DIM, seed=32)

    async def used() -> int:
        return int((await raw.info("memory"))["used_memory"])

    try:
        async with LSHRS(dim=DIM, redis_url=url, prefix="oom", batch_size=500) as lsh:
            # What the whole index takes, measured by a first build, so the
            # check below does not depend on what the server held before.
            start = await used()
            await lsh.index(np.arange(20_000), base)
            whole = await used() - start
            await lsh.drop()
        empty = await used()
        await raw.config_set("maxmemory", empty + whole // 2)  # room for about half the index
        async with LSHRS(dim=DIM, redis_url=url, prefix="oom", batch_size=500) as lsh:
            with pytest.raises(
                OutOfMemoryError,
                match=r"^Redis refused a write of this build: out of memory \(.*'maxmemory'.*\); after [\d,]+ rows, "
                r"the index took [\d,]+ B a vector, so 20,000 rows need at most about [\d.]+ MB in all, "
                r"against maxmemory [\d.,]+ MB",
            ) as caught:
                await lsh.index(np.arange(20_000), base)
            assert "index(resume=True) finishes the build" in str(caught.value)
            written = await lsh.count()
            assert 0 < written < 20_000
            await raw.config_set("maxmemory", 0)
            await lsh.index(np.arange(20_000), base, resume=True)
            assert set(await index_state(raw, lsh)) == set(range(20_000))
            # What it said the build needs, against what the whole build took:
            # enough, and not wildly more.
            needed = float(re.search(r"about ([\d.,]+) MB", str(caught.value))[1].replace(",", ""))  # type: ignore[index]
            took = await used() / 2**20
            assert took < needed < took + whole / 2**20, (needed, took, whole / 2**20)
            await lsh.drop()
    finally:
        await raw.config_set("maxmemory", 0)
        await raw.aclose()


async def test_a_build_whose_compaction_runs_out_of_memory_is_complete_and_says_so(
    redis_proc: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Every row is written before the buckets are compacted: Redis refusing
    the compaction leaves a whole index, and a warning that says why its
    buckets keep their slack, not an error."""
    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    raw = Redis.from_url(url)
    blocking = SyncRedis(host=redis_proc.host, port=redis_proc.port)
    base = clustered(3_000, DIM, seed=33)

    def full_after_the_last_row(done: int, total: int | None) -> None:
        if done == total:  # every row written: only the compaction is left
            blocking.config_set("maxmemory", 1)

    try:
        async with LSHRS(dim=DIM, redis_url=url, prefix="oom-compact", batch_size=500) as lsh:
            await lsh.drop()
            with caplog.at_level(logging.WARNING, logger="lshrs"):
                indexed = await lsh.index(np.arange(3_000), base, progress=full_after_the_last_row)
            assert indexed == 3_000
            warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert warned == ["Redis is at maxmemory: the build is complete but its buckets keep their slack"]
            # A full Redis still answers what only reads: queries and stats().
            assert 7 in [hit.id for hit in await lsh.query(base[7], top_k=10)]
            assert (await lsh.stats())["vectors"] == 3_000
            await raw.config_set("maxmemory", 0)
            assert set(await index_state(raw, lsh)) == set(range(3_000))
            await lsh.drop()
    finally:
        await raw.config_set("maxmemory", 0)
        await raw.aclose()
        blocking.close()


async def test_a_store_with_too_few_indexable_rows_does_not_train(postgres_dsn: str, redis_proc: Any) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute("DROP TABLE IF EXISTS mostly_nan")
    await conn.execute("CREATE TABLE mostly_nan (id bigint PRIMARY KEY, embedding bytea)")
    nan = np.full(DIM, np.nan, "<f4").tobytes()
    rows = [(i, BASE[i].astype("<f4").tobytes() if i < 20 else nan) for i in range(GOOD)]
    await conn.executemany("INSERT INTO mostly_nan VALUES ($1, $2)", rows)
    await conn.close()
    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    async with LSHRS(
        dim=DIM, redis_url=url, prefix="mostlynan", store=PostgresStore(postgres_dsn, table="mostly_nan")
    ) as lsh:
        await lsh.drop()
        with pytest.raises(
            ValueError, match=r"only 20 of 300 sampled rows hold a vector it can index.*hashing=.hyperplane.$"
        ):
            await lsh.index()
        await lsh.drop()


@pytest.mark.parametrize("block_rows", [50, 100])
async def test_blocks_with_nothing_left_to_hash_still_count_their_rows(
    postgres_dsn: str, redis_proc: Any, monkeypatch: pytest.MonkeyPatch, block_rows: int
) -> None:
    """A block whose every row is skipped (rows a build cannot index, or
    rows a resumed build finds indexed) is not hashed, and still counts the
    rows it read in the build's progress and result. Blocks of one batch
    (ids 100-149 are one, all NaN), and of two (each batch's records cut
    from the block's)."""
    monkeypatch.setattr(_lshrs, "_HASH_ROWS", block_rows)
    nan = np.full(DIM, np.nan, np.float32)
    good = [*range(100), *range(150, GOOD + 50)]  # ids 100-149 are bad
    rows = [(i, BASE[at]) for at, i in enumerate(good)] + [(i, nan) for i in range(100, 150)]
    await bytea_table(postgres_dsn, "bad_block", sorted(rows, key=lambda row: row[0]))
    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    raw = Redis.from_url(url)
    store = PostgresStore(postgres_dsn, table="bad_block")
    seen: list[tuple[int, int | None]] = []
    async with LSHRS(dim=DIM, redis_url=url, prefix="bad-block", store=store, batch_size=50) as lsh:
        await lsh.drop()
        indexed = await lsh.index(progress=lambda done, total: seen.append((done, total)))
        assert (indexed, indexed.skipped) == (GOOD, {"NaN or infinity": 50})
        assert seen == [(done, GOOD + 50) for done in range(50, GOOD + 51, 50)]
        state = await index_state(raw, lsh)
        assert set(state) == set(good)
        first, seen[:] = list(seen), []
        # Resumed over the whole build: every block is either indexed or bad.
        resumed = await lsh.index(resume=True, progress=lambda done, total: seen.append((done, total)))
        assert (resumed, resumed.skipped, seen) == (GOOD, {"NaN or infinity": 50}, first)
        assert await index_state(raw, lsh) == state
        await lsh.drop()
    await raw.aclose()
