"""reconcile(): the index made whole from its table after damage on both
sides, compared key by key with a clean build (issue 13)."""

from __future__ import annotations

import random
import secrets
from typing import Any

import anyio
import asyncpg
import numpy as np
import pytest

from conftest import bucket_members, clustered, index_state, read_keys, stored_id
from lshrs import LSHRS, Reconciled, _lshrs
from lshrs.adapters import InMemoryStore, PostgresStore

pytestmark = pytest.mark.anyio

DIM = 32
BASE = clustered(2600, DIM, seed=47)
ROWS = 2000


async def make_table(dsn: str) -> str:
    table = f"rec_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, embedding bytea, body text)")
    await conn.executemany(
        f"INSERT INTO {table} VALUES ($1, $2, $3)", [(i, BASE[i].tobytes(), "") for i in range(ROWS)]
    )
    await conn.close()
    return table


async def clean_build(raw_redis: Any, url: str, store: Any, shards: int, damaged: LSHRS) -> dict[int, bytes]:
    """A fresh build of the store under another prefix that shares the
    damaged index's configuration, projection and partition (copied), so the
    two must agree record for record."""
    for suffix in ("cfg", "proj", "cent"):
        value = await raw_redis.get(f"{{{damaged.prefix}}}:{suffix}")
        if value is not None:
            await raw_redis.set(f"{{clean}}:{suffix}", value)
    async with LSHRS(dim=DIM, redis_url=url, prefix="clean", store=store, shards=shards) as clean:
        await clean.index()
        return await index_state(raw_redis, clean)


async def bucket_keys(raw_redis: Any, prefix: str) -> list[bytes]:
    return [key async for key in raw_redis.scan_iter(match=f"{{{prefix}:*}}:b*", count=1000)]


async def test_reconcile_repairs_exactly_the_difference(
    postgres_dsn: str, redis_url: str, raw_redis: Any, hashing: str, shards: int
) -> None:
    table = await make_table(postgres_dsn)
    store = PostgresStore(postgres_dsn, table=table)
    async with LSHRS(dim=DIM, redis_url=redis_url, prefix="rec", store=store, hashing=hashing, shards=shards) as lsh:
        assert await lsh.index() == ROWS
        before = await index_state(raw_redis, lsh)
        rng = random.Random(5)

        # Redis loses data: records of 20 ids, and 6 whole bucket keys.
        lost_records = set(range(100, 120))
        index = (await lsh._ready()).sharded
        for i in lost_records:
            key = index.record_keys(i % shards, np.array([i]))[0]  # the shard's record hash, or the id's group
            assert await raw_redis.hdel(key, stored_id(lsh, i)) == 1
        lost_buckets = rng.sample(await bucket_keys(raw_redis, "rec"), 6)
        emptied: set[int] = set()
        for key in lost_buckets:
            emptied |= set(bucket_members(lsh, await raw_redis.get(key)).tolist())
            await raw_redis.delete(key)
        # ...and gains strays: an id in a bucket its record does not name, and an unknown id.
        keys = await bucket_keys(raw_redis, "rec")
        members = {key: bucket_members(lsh, value) for key, value in zip(keys, await read_keys(raw_redis, keys))}
        wrong = next(key for key in keys if 777 not in members[key])
        await raw_redis.append(wrong, stored_id(lsh, 777))
        first_shard = next(key for key in keys if key.startswith(b"{rec:0}"))
        await raw_redis.append(first_shard, stored_id(lsh, 999_999 * shards))

        # The table changes behind lshrs's back: 50 rows in, 40 out, 30 vectors changed.
        conn = await asyncpg.connect(postgres_dsn)
        inserted, deleted, changed = range(5000, 5050), range(300, 340), range(400, 430)
        await conn.executemany(
            f"INSERT INTO {table} VALUES ($1, $2, '')", [(i, BASE[i - 3000].tobytes()) for i in inserted]
        )
        await conn.execute(f"DELETE FROM {table} WHERE id = ANY($1::bigint[])", list(deleted))
        await conn.executemany(
            f"UPDATE {table} SET embedding = $2 WHERE id = $1", [(i, BASE[i + 2000].tobytes()) for i in changed]
        )
        await conn.close()

        report = await lsh.reconcile()
        touched = lost_records | set(deleted) | set(changed)
        repaired = emptied - touched
        assert report == Reconciled(
            added=len(inserted) + len(lost_records),
            removed=len(deleted),
            updated=len(changed),
            unchanged=ROWS - len(touched) - len(repaired),
            repaired=len(repaired),
            strays=2,
        )
        reconciled = await index_state(raw_redis, lsh)  # also checks every bucket against every record
        assert reconciled == await clean_build(raw_redis, redis_url, store, shards, lsh)
        assert {i: before[i] for i in range(ROWS) if i not in touched} == {
            i: reconciled[i] for i in range(ROWS) if i not in touched
        }
        again = await lsh.reconcile()  # nothing left to do
        assert again == Reconciled(0, 0, 0, ROWS + len(inserted) - len(deleted), 0, 0)
        assert (await lsh.query(BASE[2400], top_k=1))[0].id == 400  # a moved id is found at its new place
        await lsh.drop()
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute(f"DROP TABLE {table}")
    await conn.close()


@pytest.mark.parametrize("id_bytes", [4, 8])
async def test_reconcile_with_an_owned_store(
    redis_url: str, raw_redis: Any, hashing: str, shards: int, id_bytes: int
) -> None:
    """An owned store changed directly (not through lshrs) is the truth too;
    also with 8-byte ids past 2**32 over more shards, whose indexed ids are
    listed shard by shard and joined."""
    first, shards = (0, shards) if id_bytes == 4 else (2**40, shards + 2)
    ids, added = first + np.arange(ROWS), first + np.arange(3000, 3005)
    store = InMemoryStore()
    async with LSHRS(
        dim=DIM, redis_url=redis_url, prefix="own", store=store, hashing=hashing, shards=shards, id_bytes=id_bytes
    ) as lsh:
        await lsh.index(ids, BASE[:ROWS])
        await store.remove(ids[:10])
        await store.put(added, BASE[2000:2005], None)
        report = await lsh.reconcile()
        assert (report.added, report.removed, report.updated) == (5, 10, 0)
        assert set(await index_state(raw_redis, lsh)) == set(ids[10:].tolist()) | set(added.tolist())
        await lsh.drop()


class _WrittenAfterTheListing(InMemoryStore):
    """An owned store that another client ingests into once a reconcile has
    listed every row, before it deletes what it did not list."""

    writer: LSHRS | None = None

    async def batches(self, batch_size: int) -> Any:
        async for rows in super().batches(batch_size):
            yield rows
        if self.writer is not None:
            await self.writer.ingest(5000, BASE[2500])


async def test_an_id_ingested_during_a_reconcile_stays_indexed(
    redis_url: str, raw_redis: Any, hashing: str, shards: int
) -> None:
    """The index names an id the pass never listed because it was written
    after the listing: the reconcile asks the store again before deleting."""
    store = _WrittenAfterTheListing()
    options: dict[str, Any] = {"prefix": "late", "store": store, "hashing": hashing, "shards": shards}
    async with (
        LSHRS(dim=DIM, redis_url=redis_url, **options) as lsh,
        LSHRS(dim=DIM, redis_url=redis_url, **options) as writer,
    ):
        await lsh.index(np.arange(ROWS), BASE[:ROWS])
        store.writer = writer
        report = await lsh.reconcile()
        assert report.removed == 0, report
        assert set(await index_state(raw_redis, lsh)) == set(range(ROWS)) | {5000}
        hits = await lsh.query(BASE[2500], top_k=1)
        assert hits and hits[0].id == 5000
        await lsh.drop()


async def test_a_resumed_batch_keeps_the_ids_indexed(redis_url: str, raw_redis: Any, hashing: str, shards: int) -> None:
    """``index(ids, vectors, resume=True)`` of one batch (not streamed) skips
    the ids the index holds, store and records alike, and writes the rest."""
    store = InMemoryStore()
    async with LSHRS(dim=DIM, redis_url=redis_url, prefix="resone", store=store, hashing=hashing, shards=shards) as lsh:
        await lsh.index(np.arange(300), BASE[:300])
        before = await index_state(raw_redis, lsh)
        assert await lsh.index(np.arange(600), BASE[600:1200], resume=True) == 600
        after = await index_state(raw_redis, lsh)
        assert set(after) == set(range(600))
        assert {i: after[i] for i in range(300)} == before
        assert ((await store.fetch(np.arange(300))).vectors == BASE[:300]).all()
        await lsh.drop()


async def test_reconcile_of_a_store_never_indexed_trains_with_progress(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reconcile is also a first build: the partition is fitted on the store,
    and the fit is shown with the reconcile's progress."""
    store = InMemoryStore()
    await store.put(np.arange(600), BASE[:600], None)
    async with LSHRS(dim=DIM, redis_url=redis_url, prefix="first", store=store) as lsh:
        report = await lsh.reconcile(progress=True)
        assert (report.added, report.removed) == (600, 0)
        assert "fitting " in capsys.readouterr().err
        await lsh.drop()


async def test_reconcile_clears_strays_from_every_bucket_key(redis_url: str, raw_redis: Any) -> None:
    """More bucket keys than one stray-removal script takes: every key is
    visited, not only the first chunks."""
    from lshrs._index import WRITE_CHUNK

    async def buckets(keys: list[bytes]) -> list[bytes]:
        pipe = raw_redis.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        return list(await pipe.execute())

    async with LSHRS(dim=DIM, redis_url=redis_url, prefix="many", store=InMemoryStore(), hashing="hyperplane") as lsh:
        await lsh.index(np.arange(300), BASE[:300])
        keys = await bucket_keys(raw_redis, "many")
        assert len(keys) > 2 * WRITE_CHUNK
        before = await buckets(keys)
        pipe = raw_redis.pipeline(transaction=False)
        for key in keys:
            pipe.append(key, stored_id(lsh, 10**9))
        await pipe.execute()
        report = await lsh.reconcile()
        assert report.strays == len(keys)
        assert await buckets(keys) == before
        await lsh.drop()


async def test_reconcile_needs_a_store_that_lists_its_rows(redis_url: str) -> None:
    async with LSHRS(dim=DIM, redis_url=redis_url, prefix="nostore") as lsh:
        with pytest.raises(ValueError, match=r"^reconcile\(\) needs a store: pass store= to LSHRS"):
            await lsh.reconcile()
        with pytest.raises(ValueError, match=r"^index\(\) with no arguments needs a store: pass store= to LSHRS"):
            await lsh.index()

    class FetchOnly:
        async def dimension(self) -> int:
            return DIM

        async def fetch(self, ids: np.ndarray) -> Any:
            raise AssertionError("not reached")

        async def count(self) -> int:
            return 0

        async def close(self) -> None:
            pass

    async with LSHRS(dim=DIM, redis_url=redis_url, prefix="nostore", store=FetchOnly()) as lsh:  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"^FetchOnly cannot list its rows \(no batches\(\)\)"):
            await lsh.reconcile()
        await lsh.drop()


class Cut(Exception):
    """Stands in for a crash in the middle of a build."""


async def test_a_resumed_build_skips_what_was_indexed(
    postgres_dsn: str, redis_url: str, raw_redis: Any, hashing: str, shards: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build cut short at 60% and run again with resume=True hashes only
    the rows it had not reached: an indexed row whose vector changed since
    keeps its record (reconcile() is for that), the rest are indexed, and
    the index is then a clean build's but for that row."""
    table = await make_table(postgres_dsn)
    store = PostgresStore(postgres_dsn, table=table)

    def crash_at_60_percent(done: int, total: int | None) -> None:
        if done >= 0.6 * ROWS:
            raise Cut

    options: dict[str, Any] = {"store": store, "hashing": hashing, "shards": shards, "batch_size": 200}
    # Hashed a batch at a time, not in blocks of 65,536 rows: the cut comes
    # while the table is still being read, as in a large build (blocks of 2
    # batches let the reader finish the table first, now and then).
    monkeypatch.setattr(_lshrs, "_HASH_ROWS", 200)
    async with LSHRS(dim=DIM, redis_url=redis_url, prefix="res", **options) as lsh:
        with pytest.raises(Cut):
            await lsh.index(progress=crash_at_60_percent)
        # The cut build gave its cursor's connection back: closing the pool
        # does not wait for it (it waited forever, now and then).
        with anyio.fail_after(10):
            await store.close()
        cut_short = await index_state(raw_redis, lsh)
        assert 0.6 * ROWS <= len(cut_short) < ROWS
        changed = next(iter(cut_short))
        conn = await asyncpg.connect(postgres_dsn)
        await conn.execute(f"UPDATE {table} SET embedding = $1 WHERE id = $2", BASE[ROWS].tobytes(), changed)
        await conn.close()

        assert await lsh.index(resume=True) == ROWS
        resumed = await index_state(raw_redis, lsh)
        assert resumed[changed] == cut_short[changed]  # skipped, not hashed again
        clean = await clean_build(raw_redis, redis_url, store, shards, lsh)
        assert set(resumed) == set(clean) == set(range(ROWS))
        assert {i for i in clean if resumed[i] != clean[i]} == {changed}

        report = await lsh.reconcile()
        assert report.updated == 1
        assert await index_state(raw_redis, lsh) == clean
    await store.close()


async def cancelled_at_60_percent(lsh: LSHRS) -> None:
    """Build from the store, cancelled as 60% of the rows are written."""
    with anyio.CancelScope() as scope:

        def cancel_at_60_percent(done: int, total: int | None) -> None:
            if done >= 0.6 * ROWS:
                scope.cancel()

        await lsh.index(progress=cancel_at_60_percent)
    assert scope.cancelled_caught


async def test_a_cancelled_build_gives_its_cursor_back(
    postgres_dsn: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build its caller cancels (a deadline, a client gone) closes the
    store's cursor all the same: the store's pool then closes at once
    instead of waiting for the connection the cursor holds."""
    table = await make_table(postgres_dsn)
    store = PostgresStore(postgres_dsn, table=table)
    monkeypatch.setattr(_lshrs, "_HASH_ROWS", 200)
    async with LSHRS(dim=DIM, redis_url=redis_url, prefix="cancelled", store=store, batch_size=200) as lsh:
        await cancelled_at_60_percent(lsh)
        with anyio.fail_after(10):
            await store.close()


class _CleanedUp(InMemoryStore):
    """A store whose rows' generator cleans up with an await, as a real one
    gives its connection back; ``hang`` makes that cleanup never end."""

    def __init__(self, hang: bool = False) -> None:
        super().__init__()
        self.hang, self.cleaned_up = hang, False

    async def batches(self, batch_size: int) -> Any:
        try:
            async for rows in super().batches(batch_size):
                yield rows
        finally:
            await anyio.sleep(0.01)
            if self.hang:
                await anyio.sleep_forever()
            self.cleaned_up = True


async def test_a_cancelled_build_lets_its_stores_rows_clean_up(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cleanup of a cancelled build's rows runs shielded from the
    cancellation (or its first await would end it), and for at most
    ``_CLOSE_SECONDS``: a store whose cleanup hangs does not hang the build."""
    monkeypatch.setattr(_lshrs, "_HASH_ROWS", 200)
    store = _CleanedUp()
    await store.put(np.arange(ROWS), BASE[:ROWS])
    async with LSHRS(dim=DIM, redis_url=redis_url, prefix="cleanup", store=store, batch_size=200) as lsh:
        await cancelled_at_60_percent(lsh)
        assert store.cleaned_up
        await lsh.drop()

    monkeypatch.setattr(_lshrs, "_CLOSE_SECONDS", 0.3)
    store = _CleanedUp(hang=True)
    await store.put(np.arange(ROWS), BASE[:ROWS])
    async with LSHRS(dim=DIM, redis_url=redis_url, prefix="cleanup", store=store, batch_size=200) as lsh:
        with anyio.fail_after(5):
            await cancelled_at_60_percent(lsh)
        assert not store.cleaned_up
        await lsh.drop()


class _PlainRows:
    """An async iterator that is not a generator: it has no ``aclose()``."""

    def __init__(self, rows: Any) -> None:
        self._rows = rows

    def __aiter__(self) -> _PlainRows:
        return self

    async def __anext__(self) -> Any:
        return await self._rows.__anext__()


async def test_a_store_whose_batches_is_a_plain_async_iterator_builds_and_reconciles(
    redis_url: str, raw_redis: Any
) -> None:
    class PlainIterator(InMemoryStore):
        def batches(self, batch_size: int) -> Any:
            return _PlainRows(super().batches(batch_size))

    store = PlainIterator()
    await store.put(np.arange(ROWS), BASE[:ROWS])
    async with LSHRS(dim=DIM, redis_url=redis_url, prefix="plain", store=store, batch_size=300) as lsh:
        assert await lsh.index() == ROWS
        await store.remove(np.arange(5))
        assert (await lsh.reconcile()).removed == 5
        assert set(await index_state(raw_redis, lsh)) == set(range(5, ROWS))
        await lsh.drop()


async def test_reconcile_against_an_emptied_store_removes_every_id(
    redis_url: str, raw_redis: Any, hashing: str
) -> None:
    store = InMemoryStore()
    async with LSHRS(dim=DIM, redis_url=redis_url, prefix="emptied", store=store, hashing=hashing) as lsh:
        await lsh.index(np.arange(ROWS), BASE[:ROWS])
        await store.remove(np.arange(ROWS))
        report = await lsh.reconcile()
        assert (report.added, report.removed, report.updated, report.unchanged) == (0, ROWS, 0, 0)
        assert await index_state(raw_redis, lsh) == {}
        assert await lsh.count() == 0
        await lsh.drop()


async def test_a_resumed_build_of_a_whole_index_rewrites_nothing(redis_url: str, raw_redis: Any, hashing: str) -> None:
    """``resume=True`` skips every id the index holds, in a build's last,
    partial block too (here the only one): a row changed since keeps its
    record until ``reconcile()`` moves it. So does a resumed build of
    given arrays, streamed in batches."""
    store = InMemoryStore()
    options: dict[str, Any] = {"store": store, "hashing": hashing, "batch_size": 500}
    async with LSHRS(dim=DIM, redis_url=redis_url, prefix="whole", **options) as lsh:
        await lsh.index(np.arange(ROWS), BASE[:ROWS])
        before = await index_state(raw_redis, lsh)
        moved = np.roll(BASE[:ROWS], 1, axis=0)
        assert await lsh.index(np.arange(ROWS), moved, resume=True) == ROWS
        assert await index_state(raw_redis, lsh) == before
        await store.put(np.array([ROWS - 1]), BASE[ROWS : ROWS + 1])  # changed behind lshrs's back
        assert await lsh.index(resume=True) == ROWS
        assert await index_state(raw_redis, lsh) == before
        assert (await lsh.reconcile()).updated == 1
        assert (await index_state(raw_redis, lsh))[ROWS - 1] != before[ROWS - 1]
        await lsh.drop()


async def test_resume_must_be_a_bool(redis_url: str) -> None:
    async with LSHRS(dim=DIM, redis_url=redis_url, prefix="resbad", store=InMemoryStore()) as lsh:
        with pytest.raises(TypeError, match="resume must be True or False"):
            await lsh.index(resume="yes")  # type: ignore[arg-type]
