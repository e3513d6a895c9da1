"""Breakages that once passed the whole suite (issue 16's audit), each now
guarded by a test that fails when the code it names is broken."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import asyncpg
import numpy as np
import pytest
import redis.exceptions

from conftest import clustered, index_state, stored_id
from lshrs import LSHRS, Hit
from lshrs._index import ShardedIndex
from lshrs._scripts import CHANGE_LOG
from lshrs.adapters import InMemoryStore, PostgresStore, SQLAlchemyStore

pytestmark = pytest.mark.anyio

DIM = 32


async def test_a_reader_past_the_change_log_drops_its_cache(
    make_lsh: Any, raw_redis: Any, backend: str, hashing: str
) -> None:
    """More writes than the change log holds happen while a reader is warm:
    the reader must refetch, never rank with the signatures it cached (the
    log's gap check), so it answers as a reader opened afterwards does. The
    ids checked are those the log no longer names, read from Redis: the order
    a build's blocks reach the log is not fixed, and a test that queried ids
    0, 1 and 2 once passed on CI without the check."""
    size = CHANGE_LOG + 600
    base = clustered(size, DIM, centers=20, seed=4)
    writer = await make_lsh(shards=1)  # one log, so 600 writes fall off it on either backend
    await writer.index(np.arange(size), base)
    reader = await make_lsh(hashing=None, shards=1)
    await reader.warm()
    moved = np.roll(base, -1, axis=0)  # id i takes id i + 1's vector
    await writer.index(np.arange(size), moved)  # every id moves: more log entries than the log keeps
    logged = await raw_redis.lrange(f"{{{writer.prefix}:0}}:l", 0, -1)
    assert len(logged) == CHANGE_LOG
    dropped = sorted(set(range(size)) - {int.from_bytes(i, "little", signed=True) for i in logged})
    assert len(dropped) == 600, len(dropped)
    fresh = await make_lsh(hashing=None, shards=1)  # opened after the writes: nothing cached
    for i in dropped[::10]:
        assert await reader.query(moved[i], top_k=5) == await fresh.query(moved[i], top_k=5), i


async def test_a_capped_query_keeps_the_nearest_candidates(make_lsh: Any, hashing: str) -> None:
    """With ``max_candidates`` far below what the probes read, a stored
    vector still finds itself first, whatever its id (a cap that kept the
    smallest ids passed a test that only ever queried id 0)."""
    base = clustered(2000, DIM, centers=100, seed=3)
    cap = 64  # four learned buckets' worth, far below the 400 probes' ids
    # A learned index is spilled by default (two buckets an id); spill=0 is one.
    for spill in (None, 0) if hashing == "kmeans" else (None,):
        lsh = await make_lsh(
            prefix=f"capped{spill}", max_candidates=cap, probes=400, store=InMemoryStore(), rerank=1000, spill=spill
        )
        await lsh.index(np.arange(2000), base)
        for i in (1999, 1500, 777):
            hits = await lsh.query(base[i], top_k=1000)
            assert hits and hits[0].id == i, (spill, i, hits[:3])
            assert len(hits) <= cap * lsh.config.shards


async def test_ids_the_store_lacks_are_skipped_on_the_query_path(make_lsh: Any) -> None:
    """The index may name ids the store no longer has (a user's table edited
    behind lshrs): they are skipped, never returned twice or with another's score."""
    base = clustered(600, DIM, seed=8)
    store = InMemoryStore()
    lsh = await make_lsh(store=store)
    await lsh.index(np.arange(600), base)
    gone = np.arange(0, 600, 3)
    await store.remove(gone)  # behind lshrs's back: the index still names them
    for i in (1, 2, 4, 5):
        hits = await lsh.query(base[i], top_k=20)
        ids = [h.id for h in hits]
        assert len(ids) == len(set(ids)), ids
        assert not set(ids) & set(gone.tolist())
        assert hits[0].id == i and hits[0].score == pytest.approx(1.0, abs=1e-5)
        for hit in hits:
            assert hit.score == pytest.approx(float(base[hit.id] @ base[i]), abs=1e-5)


class _FailingStore(InMemoryStore):
    """An owned store whose writes fail when told to: a crash between the
    store's write and the index's."""

    fail_put = False

    async def put(self, ids: Any, vectors: Any, texts: Any = None) -> None:
        if self.fail_put:
            raise ConnectionError("the store went away")
        await super().put(ids, vectors, texts)


async def test_a_store_write_that_fails_leaves_the_index_untouched(make_lsh: Any, raw_redis: Any) -> None:
    """The vector is written before the index points at it: when the store
    write fails, the index must not name the new ids."""
    base = clustered(400, DIM, seed=9)
    store = _FailingStore()
    lsh = await make_lsh(store=store)
    await lsh.index(np.arange(300), base[:300])
    store.fail_put = True
    with pytest.raises(ConnectionError):
        await lsh.index(np.arange(300, 400), base[300:])
    assert set(await index_state(raw_redis, lsh)) == set(range(300))


async def test_an_index_delete_that_fails_leaves_the_store_untouched(
    make_lsh: Any, raw_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index forgets an id before the store drops its vector: when Redis
    fails during a delete, the store must still hold every id the index names."""
    base = clustered(300, DIM, seed=10)
    store = InMemoryStore()
    lsh = await make_lsh(store=store)
    await lsh.index(np.arange(300), base)

    async def broken(self: ShardedIndex, ids: Any) -> int:
        raise ConnectionError("Redis went away")

    monkeypatch.setattr(ShardedIndex, "delete", broken)
    with pytest.raises(ConnectionError):
        await lsh.delete([1, 2, 3])
    monkeypatch.undo()
    named = set(await index_state(raw_redis, lsh))
    held = set((await store.fetch(np.arange(300))).ids.tolist())
    assert named <= held, sorted(named - held)


@pytest.fixture
async def big_ids_table(postgres_dsn: str) -> str:
    """Ids past 2**31 (an int4 cast would overflow) in a table and columns
    whose names need quoting."""
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute('DROP TABLE IF EXISTS "Big Ids"')
    await conn.execute('CREATE TABLE "Big Ids" ("Row Id" bigint PRIMARY KEY, "Vec" bytea, "Body" text)')
    base = clustered(400, DIM, seed=12)
    await conn.executemany(
        'INSERT INTO "Big Ids" VALUES ($1, $2, $3)',
        [(2**40 + i, base[i].astype("<f4").tobytes(), f"row {i}") for i in range(400)],
    )
    await conn.close()
    return postgres_dsn


async def test_postgres_ids_past_int32_and_quoted_names(big_ids_table: str, redis_proc: Any) -> None:
    base = clustered(400, DIM, seed=12)
    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    store = PostgresStore(big_ids_table, table="Big Ids", id_column="Row Id", vector_column="Vec", text_column="Body")
    async with LSHRS(dim=DIM, redis_url=url, prefix="bigids", store=store) as lsh:
        await lsh.drop()
        with pytest.raises(ValueError, match=r"id 1099511627776 does not fit .*id_bytes=8"):  # 4 bytes: the default
            await lsh.index()
        await lsh.drop()
    async with LSHRS(dim=DIM, redis_url=url, prefix="bigids", store=store, id_bytes=8) as lsh:
        assert await lsh.index() == 400
        hits = await lsh.query(base[17], top_k=3)
        assert hits[0] == Hit(2**40 + 17, pytest.approx(1.0, abs=1e-5), "row 17")  # type: ignore[arg-type]
        await lsh.drop()


async def test_a_pool_passed_in_stays_open(big_ids_table: str, redis_proc: Any) -> None:
    pool = await asyncpg.create_pool(big_ids_table, min_size=1, max_size=2)
    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    store = PostgresStore(pool, table="Big Ids", id_column="Row Id", vector_column="Vec")
    async with LSHRS(dim=DIM, redis_url=url, prefix="pool", store=store, id_bytes=8) as lsh:
        await lsh.drop()
        await lsh.index()
        await lsh.drop()
    assert not pool._closed  # the caller's pool: the caller closes it
    assert await pool.fetchval("SELECT 1") == 1
    await pool.close()


async def test_a_pool_the_store_opened_is_sized_as_asked_and_closed_with_it(big_ids_table: str) -> None:
    store = PostgresStore(big_ids_table, table="Big Ids", id_column="Row Id", vector_column="Vec", pool_size=3)
    assert await store.count() == 400
    pool = store._pool
    assert pool is not None and (pool.get_min_size(), pool.get_max_size()) == (1, 3)
    await store.close()
    assert pool.is_closing()  # its own pool: a store from a DSN leaves no connections behind


async def test_skipped_nulls_count_each_build_afresh(
    postgres_dsn: str, redis_proc: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """NULL vectors in different batches add up; each build counts afresh
    and says which table they are in."""
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute("DROP TABLE IF EXISTS with_nulls")
    await conn.execute("CREATE TABLE with_nulls (id bigint PRIMARY KEY, embedding real[])")
    base = clustered(300, DIM, seed=13)
    rows = [(i, base[i].tolist()) for i in range(300)]
    # Inserted in this order, a cursor of 100 rows meets the NULLs in two batches.
    await conn.executemany(
        "INSERT INTO with_nulls VALUES ($1, $2)", [*rows[:150], (999, None), *rows[150:], (1000, None)]
    )
    await conn.close()
    store = PostgresStore(postgres_dsn, table="with_nulls")
    assert store.skipped_nulls == 0
    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    async with LSHRS(dim=DIM, redis_url=url, prefix="nulls", store=store, batch_size=100) as lsh:
        await lsh.drop()
        with caplog.at_level("WARNING", logger="lshrs"):
            await lsh.index()
        assert store.skipped_nulls == 2
        assert "skipped 2 rows of with_nulls with a NULL vector" in caplog.text
        await lsh.index()
        assert store.skipped_nulls == 2  # counted again, not added to the last build's
        await lsh.drop()


@pytest.mark.parametrize("column", ["numeric_array", "pgvector_text"])
@pytest.mark.filterwarnings("error::sqlalchemy.exc.SAWarning")  # lshrs decodes the text: no warning for the user
async def test_sqlalchemy_reads_numeric_arrays_and_pgvector_text(
    postgres_dsn: str, redis_proc: Any, column: str
) -> None:
    """Columns SQLAlchemy hands back as lists of Decimal, or as pgvector's
    text form when no pgvector type is registered."""
    base = clustered(300, DIM, seed=14)
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    table = f"sa_{column}"
    await conn.execute(f"DROP TABLE IF EXISTS {table}")
    if column == "numeric_array":
        await conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, embedding numeric[])")
        rows = [(i, [float(x) for x in base[i]]) for i in range(300)]
        await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2::float8[]::numeric[])", rows)
    else:
        await conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, embedding vector({DIM}))")
        text_rows = [(i, "[" + ",".join(map(str, base[i].tolist())) + "]") for i in range(300)]
        await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2::vector)", text_rows)
    await conn.close()
    store = SQLAlchemyStore(postgres_dsn.replace("postgresql://", "postgresql+asyncpg://"), table=table)
    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    async with LSHRS(dim=DIM, redis_url=url, prefix=table, store=store) as lsh:
        await lsh.drop()
        assert await lsh.index() == 300
        hits = await lsh.query(base[42], top_k=2)
        assert hits[0].id == 42 and hits[0].score == pytest.approx(1.0, abs=1e-4)
        await lsh.drop()


def test_the_cli_exits_non_zero_when_a_server_is_down(tmp_path: Path) -> None:
    """Run as a user would, in a subprocess: an unreachable Redis or
    PostgreSQL is a non-zero exit code."""
    import subprocess
    import sys

    import port_for

    lshrs_command = str(Path(sys.executable).with_name("lshrs"))  # the console script, as a user runs it

    dead = int(port_for.select_random())
    env = {"PATH": "/usr/bin:/bin", "LSHRS_REDIS_URL": f"redis://127.0.0.1:{dead}/0", "LSHRS_DIM": str(DIM)}
    result = subprocess.run([lshrs_command, "stats"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1, result.stderr[-500:]
    env["LSHRS_POSTGRES_DSN"] = f"postgresql://postgres@127.0.0.1:{dead}/postgres"
    env["LSHRS_TABLE"] = "passages"
    result = subprocess.run([lshrs_command, "--debug", "stats"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" in result.stderr  # --debug: the whole story
    result = subprocess.run([lshrs_command, "index"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1, result.stderr[-500:]
    # A prefix the library refuses is a usage error, found before any server is asked (Redis is down).
    bad = dict(env, LSHRS_PREFIX="{x}")
    for args, shown in ((["--prefix", "a:b", "stats"], "'a:b'"), (["drop", "--yes"], "'{x}'")):
        result = subprocess.run([lshrs_command, *args], env=bad, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr[-500:]
        refusal = f"Error: Invalid value for '--prefix' (env var: 'LSHRS_PREFIX'): prefix {shown} is not allowed: "
        assert result.stderr.splitlines()[-1].startswith(refusal), result.stderr[-500:]


async def test_a_write_that_fails_leaves_nothing_running_behind_it(make_lsh: Any, raw_redis: Any) -> None:
    """A build is many scripts, a few at a time; when one fails, the call must
    end with the others, not leave them queued to land after the caller was
    told it failed (with redis-py's retries, even after a reconnect)."""
    lsh = await make_lsh(shards=16, batch_size=20_000)
    await raw_redis.set(f"{{{lsh.prefix}:0}}:l", b"not a list")  # shard 0's scripts fail
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        await lsh.index(np.arange(16_000), clustered(16_000, DIM, seed=11))

    async def records() -> list[int]:  # of shards 1 to 15, in either record layout
        keys = [
            k
            async for k in raw_redis.scan_iter(match=f"{{{lsh.prefix}:*}}:s*")
            if not k.startswith(b"{%b:0}" % lsh.prefix.encode())
        ]
        return sorted([await raw_redis.hlen(k) for k in keys])

    before = await records()
    await anyio.sleep(0.5)
    assert await records() == before


async def test_a_cold_query_answers_without_an_id_whose_record_was_lost(make_lsh: Any, raw_redis: Any) -> None:
    """Redis lost an id's record but not its bucket entry (a failover between
    two writes' replication): a reader with a cold cache must answer without
    that id, not fail every query near it until ``reconcile()`` runs."""
    base = clustered(600, DIM, seed=12)
    writer = await make_lsh()
    await writer.index(np.arange(600), base)
    index = (await writer._ready()).sharded
    shard = 5 % writer.config.shards
    assert await raw_redis.hdel(index.record_keys(shard, np.array([5]))[0], stored_id(writer, 5))
    reader = await make_lsh(warm_in_background=False)  # a cold cache: the query script returns the records
    hits = await reader.query(base[5], top_k=5)
    assert len(hits) == 5 and 5 not in {h.id for h in hits}
    assert (await reader.query(base[6], top_k=1))[0].id == 6
