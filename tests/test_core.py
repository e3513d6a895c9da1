"""The core contract on a real Redis and a real Redis Cluster (DESIGN sections 2-3)."""

from __future__ import annotations

import ast
import asyncio
import collections
import inspect
import logging
import math
import random
import re
import threading
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from conftest import assert_found_itself, brute_force, clustered, index_state, keyspace, planned_probes
from lshrs import LSHRS, Hit
from lshrs._config import choose_bands, choose_rows
from lshrs._family import LearnedFamily
from lshrs._lshrs import MIN_TRAIN
from lshrs._partition import Partition, choose_buckets
from lshrs.adapters import InMemoryStore

pytestmark = pytest.mark.anyio


async def test_stored_vector_is_its_own_best_hit(make_lsh: Any) -> None:
    base = clustered(500, 32)
    lsh = await make_lsh(store=InMemoryStore())
    assert await lsh.index(np.arange(500), base) == 500
    for i in (0, 123, 499):
        hits = await lsh.query(base[i], top_k=3)
        assert hits[0].id == i
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[0].exact
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


@pytest.mark.parametrize("count", [2, 3])
async def test_a_query_finds_ids_on_every_shard(make_lsh: Any, count: int) -> None:
    """Each shard's candidates join one list, whatever the shard count (a
    mutant that kept the first shard's alone where there were exactly two
    passed every other test): every stored vector of a sample finds itself."""
    base = clustered(400, 32, seed=4)
    lsh = await make_lsh(store=InMemoryStore(), shards=count, prefix=f"every-shard-{count}")
    await lsh.index(np.arange(400), base)
    asked = list(range(0, 400, 7))
    assert [(await lsh.query(base[i], top_k=1))[0].id for i in asked] == asked


async def test_recall_at_10_against_brute_force(make_lsh: Any) -> None:
    base, queries = clustered(4000, 32, seed=1), clustered(100, 32, seed=1)[:100]
    queries = queries + 0.05 * np.random.default_rng(3).standard_normal(queries.shape).astype(np.float32)
    lsh = await make_lsh(store=InMemoryStore())
    await lsh.index(np.arange(len(base)), base)
    truth = brute_force(base, queries, 10)
    results = await lsh.query_many(queries, top_k=10)
    recall = np.mean([len({h.id for h in hits} & set(row)) / 10 for hits, row in zip(results, truth)])
    assert recall >= 0.9, recall


async def test_query_many_matches_single_queries(make_lsh: Any) -> None:
    base = clustered(800, 32)
    lsh = await make_lsh(store=InMemoryStore())
    await lsh.index(np.arange(800), base)
    many = await lsh.query_many(base[:20], top_k=5)
    single = [await lsh.query(v, top_k=5) for v in base[:20]]
    assert many == single
    assert await lsh.query_many(base[:3]) == [await lsh.query(v) for v in base[:3]]  # both default to top 10
    assert [len(hits) for hits in await lsh.query_many(base[:3])] == [10] * 3


async def test_without_store_scores_are_marked_estimates(make_lsh: Any) -> None:
    base = clustered(300, 32)
    lsh = await make_lsh()
    await lsh.index(np.arange(300), base)
    hits = await lsh.query(base[7], top_k=4)
    assert (hits[0].id, hits[0].text, hits[0].exact) == (7, None, False)
    assert hits[0].score == pytest.approx(1.0, abs=0.01)  # a sketch's estimate of the vector's own cosine
    assert all(not h.exact and -1.0 <= h.score <= 1.0 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    with pytest.raises(ValueError, match="top_p needs a store"):
        await lsh.query(base[7], top_p=0.5)


async def test_top_p_keeps_a_fraction_of_the_reranked_pool(make_lsh: Any) -> None:
    base = clustered(600, 32, centers=3)
    lsh = await make_lsh(store=InMemoryStore(), rerank=40, probes=10_000)
    await lsh.index(np.arange(600), base)
    pool = await lsh.query(base[0], top_k=10)  # 40 reranked, the best 10 returned
    assert len(pool) == 10
    tenth = await lsh.query(base[0], top_k=10, top_p=0.1)  # ceil(0.1 * 40) = 4
    assert tenth == pool[:4]
    assert await lsh.query(base[0], top_k=2, top_p=0.5) == pool[:2]
    # The rerank depth follows top_k (40 per 10 asked), so top 100 are all exact.
    hundred = await lsh.query(base[0], top_k=100)
    assert len(hundred) == 100
    assert all(deep.score >= shallow.score - 1e-6 for deep, shallow in zip(hundred[:10], pool))  # deeper: no worse
    truth = brute_force(base, base[:1], 100)[0]
    assert len({h.id for h in hundred} & set(truth.tolist())) >= 95


async def test_empty_index_returns_nothing(make_lsh: Any) -> None:
    lsh = await make_lsh(store=InMemoryStore())
    assert await lsh.query(np.ones(32), top_k=5) == []
    assert await lsh.count() == 0
    await lsh.index(np.arange(300), clustered(300, 32))
    assert await lsh.query_many(np.empty((0, 32), np.float32)) == []  # no queries: no answers, no error


async def test_delete_removes_every_trace(make_lsh: Any, raw_redis: Any) -> None:
    base = clustered(300, 32)
    lsh = await make_lsh(store=InMemoryStore())
    await lsh.index(np.arange(300), base)
    before = await index_state(raw_redis, lsh)
    assert set(before) == set(range(300))
    assert await lsh.delete([5, 6, 7, 10_000]) == 3
    after = await index_state(raw_redis, lsh)
    assert set(after) == set(range(300)) - {5, 6, 7}
    width = lsh.config.id_bytes  # how buckets and record fields hold an id; the change log, in 8 bytes
    stored = {i.to_bytes(width, "little", signed=width == 8) for i in (5, 6, 7)}
    logged = {i.to_bytes(8, "little", signed=True) for i in (5, 6, 7)}
    for key, (kind, value) in (await keyspace(raw_redis)).items():
        if kind == "hash":  # record fields
            assert not set(value) & stored, key
        elif kind == "list":  # change-log entries
            assert not set(value) & logged, key
        elif kind == "string" and b"}:b" in key:  # a bucket: ids back to back
            assert not {value[at : at + width] for at in range(0, len(value), width)} & stored, key
    assert all(h.id not in (5, 6, 7) for h in await lsh.query(base[5], top_k=50))
    assert await lsh.delete(range(300)) == 297
    assert {k for k in await keyspace(raw_redis) if not k.endswith((b":cfg", b":proj", b":cent", b":g"))} == set()


async def test_reingest_moves_an_id(make_lsh: Any, raw_redis: Any) -> None:
    base = clustered(400, 32, centers=4)
    lsh = await make_lsh(store=InMemoryStore())
    await lsh.index(np.arange(400), base)
    far = -base[0]
    await lsh.ingest(0, far, text="moved")
    state = await index_state(raw_redis, lsh)
    assert len(state) == 400
    hits = await lsh.query(far, top_k=1)
    assert hits == [Hit(0, pytest.approx(1.0, abs=1e-5), "moved")]  # type: ignore[arg-type]
    assert 0 not in {h.id for h in await lsh.query(base[0], top_k=10) if h.score > 0.99}
    assert await lsh.count() == 400


def test_the_defaults_in_force_are_the_documented_ones() -> None:
    """docs/contract.md's signature of LSHRS names every keyword with the
    default the code declares, and a client given nothing but ``dim`` runs
    with those values (mutated defaults leave the declared signature alone)."""
    text = (Path(__file__).parents[1] / "docs" / "contract.md").read_text()
    written = " ".join(text[text.index("`LSHRS(") : text.index(")`", text.index("`LSHRS("))].split())
    documented = {
        name: ast.literal_eval(value.strip())
        for name, value in re.findall(r"(\w+)=([^,|]+)", written.removeprefix("`LSHRS("))
        if not value.startswith("<")
    }
    declared = {name: p.default for name, p in inspect.signature(LSHRS).parameters.items() if p.default is not p.empty}
    assert declared.pop("redis") is None  # written "redis_url=None | redis=<client>"
    assert documented == declared
    lsh = LSHRS(dim=8)
    in_force = {
        "prefix": lsh.prefix,
        "threshold": lsh._threshold,
        "max_candidates": lsh._max_candidates,
        "signature_cache": lsh._cache_size,
        "warm_in_background": lsh._warm_in_background,
        "batch_size": lsh._batch_size,
        "timeout": lsh._timeout,
        "max_inflight": lsh._admission.limit,
    }
    assert in_force == {name: documented[name] for name in in_force}
    assert lsh._url == "redis://localhost:6379/0" and lsh._redis_options == {}
    config = lsh.config
    assert (config.hashing, config.num_bands, config.rows_per_band) == ("kmeans", 0, 0)
    assert (config.seed, config.shards, config.id_bytes, config.spill) == (0, 1, 4, 1)
    for id_bytes in (4, 8):  # both widths may be asked for by name
        assert LSHRS(dim=8, id_bytes=id_bytes).config.id_bytes == id_bytes
    assert LSHRS(dim=8, seed=0).config.seed == 0  # the smallest seed is a seed
    banded = LSHRS(dim=8, hashing="hyperplane").config
    rows = choose_rows(documented["expected_size"])
    assert (banded.num_bands, banded.rows_per_band) == (choose_bands(documented["threshold"], rows), rows)
    assert (banded.spill, banded.code_bytes) == (0, 0)  # a learned family's settings only


async def test_the_seed_decides_the_learned_partition_and_its_codes(make_lsh: Any, raw_redis: Any) -> None:
    """The same vectors and seed fit the same partition and codebooks; another
    seed fits others (both fits draw from the seed, not from a default).
    80 buckets keep all 600 rows to fit on, so no seeded subsample differs."""
    vectors = clustered(600, 32, seed=6)
    stored = []
    for prefix, seed in (("seeded-a", 3), ("seeded-b", 3), ("seeded-c", 4)):
        lsh = await make_lsh(prefix=prefix, hashing="kmeans", seed=seed, buckets=80)
        await lsh.index(np.arange(600), vectors)
        stored.append(await raw_redis.get(f"{{{lsh.prefix}}}:cent"))
    partition_bytes = len(stored[0]) - len(Partition.split(stored[0], 32)[1])
    assert stored[0] == stored[1]
    assert stored[0][:partition_bytes] != stored[2][:partition_bytes]  # the partition
    assert stored[0][partition_bytes:] != stored[2][partition_bytes:]  # the codebooks


async def test_a_client_never_opened_closes_quietly_and_one_that_cannot_connect_says_so() -> None:
    """close() before any use does nothing; an open() that cannot connect
    raises redis's own error (after closing what it opened, which must not
    fail in turn)."""
    import redis

    lsh = LSHRS(dim=8, redis_url="redis://127.0.0.1:1/0", timeout=0.5)  # port 1: refused at once
    await lsh.close()
    with pytest.raises(redis.ConnectionError, match=r"127\.0\.0\.1:1\b"):
        await lsh.open()


async def test_close_ends_the_connections_it_opened_and_not_a_client_passed_in(redis_proc: Any) -> None:
    """close() closes the Redis client lshrs opened, and leaves one the caller
    passed in connected (counted by the server)."""
    from redis.asyncio import Redis

    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    watcher = Redis.from_url(url)

    async def connected(settled: int | None = None) -> int:
        for _ in range(100):  # the server counts a closed socket once it reads its end
            count = int((await watcher.info("clients"))["connected_clients"])
            if settled is None or count == settled:
                break
            await anyio.sleep(0.01)
        return count

    before = await connected()
    own = LSHRS(dim=8, redis_url=url, prefix="closing", hashing="hyperplane")
    await own.ingest(1, np.ones(8))
    assert await connected() > before
    held = own._client  # kept, so only close() can end its connections (not the garbage collector)
    await own.close()
    assert await connected(settled=before) == before
    del held
    given = Redis.from_url(url)
    async with LSHRS(dim=8, redis=given, prefix="closing", hashing="hyperplane") as passed:
        assert [hit.id for hit in await passed.query(np.ones(8))] == [1]
        await passed.drop()
    await anyio.sleep(0.2)
    assert await connected() > before  # the caller's client still holds its connection
    await given.aclose()
    await watcher.aclose()


async def test_buckets_sizes_a_learned_partition(make_lsh: Any) -> None:
    """``buckets=`` overrides the count chosen from the vectors trained on
    (about: each coarse group's share of it is rounded)."""
    lsh = await make_lsh(hashing="kmeans", buckets=20)
    await lsh.index(np.arange(600), clustered(600, 32, seed=5))
    assert choose_buckets(600) > 30  # else this proves nothing
    assert 18 <= (await lsh.stats())["partition_buckets"] <= 22


async def test_two_clients_share_a_prefix_and_conflicts_are_refused(make_lsh: Any) -> None:
    base = clustered(200, 32)
    first = await make_lsh(num_bands=12, rows_per_band=9, seed=5, store=InMemoryStore())
    await first.index(np.arange(200), base)
    second = await make_lsh(store=InMemoryStore(), hashing=None)  # no configuration: adopts the stored one
    assert second.config == first.config
    await second.ingest(1000, base[3])
    view = await make_lsh(hashing=None)  # no store: scores are signature agreement
    hits = await view.query(base[3], top_k=2)
    assert {h.id for h in hits} == {3, 1000}
    assert [h.score for h in hits] == [1.0, 1.0]
    with pytest.raises(ValueError, match="num_bands: given 20, stored 12"):
        await make_lsh(num_bands=20)
    with pytest.raises(ValueError, match="hashing: given kmeans, stored hyperplane"):
        await make_lsh(hashing="kmeans")
    with pytest.raises(ValueError, match="dim: given 16, stored 32"):
        await make_lsh(dim=16, hashing=None)
    with pytest.raises(ValueError, match="seed"):
        await make_lsh(seed=6, hashing=None)
    with pytest.raises(ValueError) as refused:
        await make_lsh(num_bands=20, seed=6)
    assert str(refused.value) == (
        f"prefix {first.prefix!r} holds an index with another configuration (num_bands: given 20, stored 12; "
        "seed: given 6, stored 5): open it without those arguments to adopt it, or use another prefix"
    )
    other = await make_lsh(prefix="other", num_bands=20)
    assert other.config.num_bands == 20


async def test_reindex_is_idempotent(make_lsh: Any, raw_redis: Any) -> None:
    base = clustered(300, 32)
    lsh = await make_lsh()
    await lsh.index(np.arange(300), base)
    dump = await keyspace(raw_redis)
    await lsh.index(np.arange(300), base)
    assert await keyspace(raw_redis) == dump


async def test_concurrent_tasks_end_like_a_dict_model(make_lsh: Any, raw_redis: Any) -> None:
    """200 tasks on one loop, each doing its own random ingest/delete/query; ids
    are owned by one task each so the final state is deterministic."""
    vectors = clustered(1000, 32)
    lsh = await make_lsh(store=InMemoryStore())
    await lsh.index(np.arange(10_000, 11_000), vectors)  # a learned index trains on its first write
    model: dict[int, int] = {i: i - 10_000 for i in range(10_000, 11_000)}

    async def worker(task: int) -> None:
        rng = random.Random(task)
        mine = [task * 5 + k for k in range(5)]
        for _ in range(6):
            id_ = rng.choice(mine)
            action = rng.random()
            if action < 0.5:
                row = rng.randrange(1000)
                await lsh.ingest(id_, vectors[row])
                model[id_] = row
            elif action < 0.75:
                await lsh.delete([id_])
                model.pop(id_, None)
            else:
                await lsh.query(vectors[rng.randrange(1000)], top_k=3)

    await asyncio.gather(*(worker(t) for t in range(200)))
    state = await index_state(raw_redis, lsh)
    assert set(state) == set(model)
    assert await lsh.count() == len(model)
    for row in list(model.values())[:30]:
        assert (await lsh.query(vectors[row], top_k=1))[0].score == pytest.approx(1.0, abs=1e-5)
    assert len(lsh.store) == len(model)  # type: ignore[arg-type]


async def test_context_manager_opens_and_closes(redis_url: str) -> None:
    async with LSHRS(dim=8, redis_url=redis_url, store=InMemoryStore(), hashing="hyperplane") as lsh:
        await lsh.ingest(1, np.arange(1, 9))
        assert (await lsh.query(np.arange(1, 9)))[0].id == 1
    async with LSHRS(dim=8, redis_url=redis_url) as again:
        assert await again.count() == 1


async def test_a_dropped_index_built_again_keeps_its_client(make_lsh: Any) -> None:
    """drop() then index() reopens the prefix on the same Redis client: a new
    one would leave the first one's connections open (a ResourceWarning when
    collected, which failed an unrelated test in CI)."""
    lsh = await make_lsh(store=InMemoryStore())
    await lsh.index(np.arange(300), clustered(300, 32))
    client = lsh._client
    await lsh.drop()
    await lsh.index(np.arange(300), clustered(300, 32))
    assert lsh._client is client and await lsh.count() == 300


@pytest.mark.parametrize("rows", [MIN_TRAIN, MIN_TRAIN - 1])
async def test_a_partition_trains_on_as_few_as_min_train_rows(make_lsh: Any, hashing: str, rows: int) -> None:
    """From a store or from a first batch: MIN_TRAIN rows are enough, one
    fewer is refused (hyperplanes need no training)."""
    base = clustered(rows, 32, seed=31)
    store = InMemoryStore()
    await store.put(np.arange(rows), base)
    from_store, from_batch = await make_lsh(store=store, prefix="few-s"), await make_lsh(prefix="few-b")
    for build in (lambda: from_store.index(), lambda: from_batch.index(np.arange(rows), base)):
        if rows < MIN_TRAIN and hashing == "kmeans":
            with pytest.raises(ValueError, match=f"needs at least {MIN_TRAIN} vectors \\(this one has {rows}\\)"):
                await build()
        else:
            assert await build() == rows
    await from_store.drop()
    await from_batch.drop()


async def test_a_learned_index_over_an_empty_store_says_it_has_no_rows(make_lsh: Any, hashing: str) -> None:
    lsh = await make_lsh(store=InMemoryStore(), prefix="empty-store")
    if hashing == "kmeans":
        with pytest.raises(ValueError, match=f"needs at least {MIN_TRAIN} vectors \\(this one has 0\\)"):
            await lsh.index()
    else:
        assert await lsh.index() == 0


async def test_drop_deletes_its_own_keys_and_no_other(make_lsh: Any, raw_redis: Any) -> None:
    """drop() deletes its prefix's keys, in chunks, and says how many: another
    index on the same Redis and a key that is no index's stay untouched."""
    base = clustered(6000, 32, seed=29)
    mine, theirs = await make_lsh(prefix="mine"), await make_lsh(prefix="theirs")
    await mine.index(np.arange(6000), base)
    await theirs.index(np.arange(400), base[:400])
    await raw_redis.set("not-an-index", b"kept")

    async def keys() -> set[bytes]:
        return {key async for key in raw_redis.scan_iter(count=1000)}

    before = await keys()
    own = {key for key in before if key.startswith(b"{mine")}
    assert len(own) > 500  # more than one chunk of deletes
    assert await mine.drop() == len(own)
    assert await keys() == before - own
    assert (await theirs.query(base[7], top_k=1))[0].id == 7


@pytest.mark.parametrize("offset", [0, 2**40])
async def test_signature_cache_never_serves_a_replaced_signature(make_lsh: Any, offset: int) -> None:
    """A reader caches signatures; another client replaces and re-adds ids. The
    reader's estimates (no store: ranked by signature alone) must follow,
    ids past 4 bytes (an index of 8-byte ids) too: the change log's 8 bytes
    must not be read as two 4-byte ids."""
    base = clustered(1000, 32, centers=5)
    options = {"id_bytes": 8} if offset else {}
    writer = await make_lsh(**options)
    await writer.index(np.arange(1000) + offset, base)
    reader = await make_lsh(**options)
    assert_found_itself(await reader.query(base[5], top_k=1), 5 + offset)  # warms its cache
    await writer.ingest(5 + offset, -base[5])
    assert_found_itself(await reader.query(-base[5], top_k=1), 5 + offset)
    await writer.delete([6 + offset])
    await writer.ingest(6 + offset, -base[6])
    assert_found_itself(await reader.query(-base[6], top_k=1), 6 + offset)
    assert 6 + offset not in {h.id for h in await reader.query(base[6], top_k=5) if h.score > 0.9}


async def writer_and_warm_reader(make_lsh: Any, base: np.ndarray) -> tuple[LSHRS, LSHRS, Any]:
    """A client that built ``base``, another whose cache holds all of it, and
    that one's sharded index."""
    writer = await make_lsh()
    await writer.index(np.arange(len(base)), base)
    reader = await make_lsh()
    await reader.warm()
    return writer, reader, (await reader._ready()).sharded


async def writer_and_cold_reader(
    make_lsh: Any, base: np.ndarray, ids: np.ndarray | None = None, **options: Any
) -> tuple[LSHRS, LSHRS, Any]:
    """As :func:`writer_and_warm_reader`, with a reader whose cache stays
    cold until the test warms it (no warm in the background)."""
    writer = await make_lsh(**options)
    await writer.index(np.arange(len(base)) if ids is None else ids, base)
    reader = await make_lsh(warm_in_background=False)
    return writer, reader, (await reader._ready()).sharded


async def test_other_clients_writes_keep_a_warm_cache_warm(make_lsh: Any) -> None:
    """A replace or delete elsewhere evicts only the ids it wrote from a
    reader's cache (the shard's change log says which), so the reader stays
    warm and still never uses a replaced signature."""
    base = clustered(600, 32, centers=5)
    writer, reader, index = await writer_and_warm_reader(make_lsh, base)
    shards = range(reader.config.shards)
    await writer.delete([3, 4])
    await writer.ingest(5, -base[5])
    assert_found_itself(await reader.query(-base[5], top_k=1), 5)
    assert all(index._cache.is_warm(s) for s in shards)
    assert 3 not in {h.id for h in await reader.query(base[3], top_k=20)}
    await writer.ingest(3, -base[7])  # a deleted id comes back with another vector
    assert (await reader.query(-base[7], top_k=1))[0].id in (3, 7) and all(index._cache.is_warm(s) for s in shards)
    hits = {h.id: h.score for h in await reader.query(-base[7], top_k=5)}
    assert hits[3] > 0.5  # its new sketch: the old one (base[3]) estimates far less


async def test_queries_take_one_round_trip_cold_or_warm(make_lsh: Any, raw_redis: Any, backend: str) -> None:
    """One round trip per query whether the signature cache is empty, filling
    or full: cold, one script returns buckets and signatures; warm, one
    pipeline reads the change log and the buckets, and no signatures."""
    base = clustered(800, 32)
    writer = await make_lsh()
    await writer.index(np.arange(800), base)
    # Few buckets, and no warm in the background: the cache stays cold for 5 queries.
    reader = await make_lsh(store=InMemoryStore(), probes=8, warm_in_background=False)
    index = (await reader._ready()).sharded
    fetched: list[int] = []
    fetch = index._fetch_records
    scripted: list[int] = []
    script = index._query

    async def counted(shard: int, ids: Any) -> Any:  # the round trip for records a script did not return
        fetched.append(len(ids))
        return await fetch(shard, ids)

    async def cold(keys: Any, args: Any) -> Any:
        scripted.append(1)
        return await script(keys=keys, args=args)

    index._fetch_records = counted  # type: ignore[method-assign]
    index._query = cold  # type: ignore[method-assign]
    if backend == "redis":  # per-command statistics are per node; one node is enough to count
        await raw_redis.config_resetstat()
    for vector in base[:5]:
        await reader.query(vector)  # cold, filling: buckets and signatures in one script
    assert not fetched  # 800 ids: the scripts returned every record
    assert len(scripted) == 5 * index._shards
    await reader.warm()
    if backend == "redis":
        stats = await raw_redis.info("commandstats")
        evalsha = stats["cmdstat_evalsha"]  # a first NOSCRIPT reply, then SCRIPT LOAD, may precede
        assert evalsha["calls"] - evalsha["failed_calls"] == 5 + 1, stats  # and warm()'s read of the change log
        await raw_redis.config_resetstat()
    for vector in base[5:10]:
        await reader.query(vector)  # warm: the change log and bucket ids only
    assert len(scripted) == 5 * index._shards and not fetched
    if backend == "redis":
        stats = await raw_redis.info("commandstats")
        evalsha = stats["cmdstat_evalsha"]  # the change log's script, loaded on its first NOSCRIPT
        assert evalsha["calls"] - evalsha["failed_calls"] == 5, stats
        assert stats["cmdstat_mget"]["calls"] == 5
        assert "cmdstat_hmget" not in stats and "cmdstat_hget" not in stats


async def test_a_build_streamed_from_its_store_leaves_its_client_warm(make_lsh: Any) -> None:
    """As a build of given arrays does (the test below): the records a build
    from the store cached are claimed, so its client's first queries run warm."""
    base = clustered(1000, 32, seed=6)
    store = InMemoryStore()
    await store.put(np.arange(1000), base)
    lsh = await make_lsh(store=store, batch_size=300)
    await lsh.index()
    index = (await lsh._ready()).sharded
    assert all(index._cache.is_warm(s) for s in range(lsh.config.shards))


async def test_a_client_queries_its_own_build_warm_unless_another_wrote_meanwhile(
    make_lsh: Any, redis_url: str, shards: int, hashing: str
) -> None:
    """The records a build cached stay cached: its client's first query sends
    the warm script (bucket ids only). A build that another client wrote
    into between two of its batches must not vouch for its cached records:
    the first query then reads them afresh and finds the other's write."""
    base = clustered(3000, 32, seed=5)
    builder = await make_lsh(batch_size=500)
    await builder.index(np.arange(3000), base)
    index = (await builder._ready()).sharded
    cold: list[int] = []
    query = index._query

    async def spied(keys: Any, args: Any) -> Any:  # the script of a shard the cache does not hold
        cold.append(1)
        return await query(keys=keys, args=args)

    index._query = spied  # type: ignore[method-assign]
    assert_found_itself(await builder.query(base[7], top_k=1), 7)
    assert not cold, "the first query after the client's own build ran cold"

    moved = -base[100]

    def another_client_writes() -> None:
        async def write() -> None:
            options = {"expected_size": 10_000, "shards": shards, "hashing": hashing}
            async with LSHRS(dim=32, redis_url=redis_url, prefix="raced", **options) as other:
                await other.ingest(100, moved)

        thread = threading.Thread(target=lambda: asyncio.run(write()))
        thread.start()
        thread.join()  # the builder's event loop waits: its next batch comes after this write

    raced = await make_lsh(batch_size=500, prefix="raced")
    await raced.index(np.arange(3000), base, progress=lambda done, _: done == 500 and another_client_writes())
    assert_found_itself(await raced.query(moved, top_k=1), 100)


async def test_warm_loads_every_signature_and_still_follows_writes(make_lsh: Any) -> None:
    base = clustered(500, 32, centers=5)
    writer = await make_lsh()
    await writer.index(np.arange(500), base)
    reader = await make_lsh()
    assert await reader.warm() == 500
    await writer.ingest(5, -base[5])
    assert_found_itself(await reader.query(-base[5], top_k=1), 5)
    index = (await reader._ready()).sharded
    # The write reached it through the change log: the cache dropped id 5, not the shard,
    # and cached its new record when the query fetched it.
    assert all(index._cache.is_warm(s) for s in range(reader.config.shards))
    assert not index._cache.lookup(5 % reader.config.shards, np.array([5]))[1].any()


async def test_a_reader_warms_itself_in_the_background_after_its_first_query(make_lsh: Any) -> None:
    """A service restarted without ``warm()``: its first query finds the
    cache cold, and the cache fills in the background; with
    ``warm_in_background=False``, or no cache, it stays cold."""
    base = clustered(1200, 32, centers=6, seed=8)
    writer = await make_lsh()
    await writer.index(np.arange(1200), base)
    for background in (True, False):
        reader = await make_lsh(warm_in_background=background, probes=4)  # a few buckets: queries alone stay cold
        index = (await reader._ready()).sharded
        truth = [h.id for h in await reader.query(base[3], top_k=5)]
        assert bool(index._warm_started) is background
        with anyio.fail_after(10):
            await asyncio.gather(*index._warming.values())
        assert all(index._cache.is_warm(s) for s in range(reader.config.shards)) is background
        assert [h.id for h in await reader.query(base[3], top_k=5)] == truth
        if background:  # cold again at once (as after a gap in the change log): not scanned again so soon
            started = dict(index._warm_started)
            index._cache.reset(0, index._cache.generation(0) or 0, 1200)
            await reader.query(base[3], top_k=5)
            assert index._warm_started == started and not index._warming
        await reader.close()
        assert not index._warming
    no_cache = await make_lsh(signature_cache=0, probes=4)
    index = (await no_cache._ready()).sharded
    assert [h.id for h in await no_cache.query(base[3], top_k=5)] == truth
    assert not index._warm_started  # nothing to fill: no scan of every record
    await no_cache.close()


async def test_close_cancels_a_background_warm(make_lsh: Any) -> None:
    base = clustered(600, 32, centers=5, seed=11)
    writer = await make_lsh()
    await writer.index(np.arange(600), base)
    reader = await make_lsh()
    index = (await reader._ready()).sharded
    stuck = asyncio.Event()

    async def never(shard: int, batch: int) -> Any:  # a scan that never ends
        await stuck.wait()
        yield b"", b""

    index._record_batches = never  # type: ignore[method-assign]
    await reader.query(base[3], top_k=3)
    assert index._warming
    running = list(index._warming.values())
    with anyio.fail_after(5):
        await reader.close()
    assert all(task.cancelled() for task in running) and not index._warming


async def test_an_id_deleted_between_its_bucket_read_and_its_record_fetch_is_left_out(make_lsh: Any) -> None:
    """A warm query fetches the records its cache lacks after the buckets
    named them; another client can delete one in between. It has no record
    then, and the query drops it rather than failing or ranking it."""
    base = clustered(600, 32, centers=5, seed=17)
    writer, reader, index = await writer_and_warm_reader(make_lsh, base)
    await writer.ingest(5, -base[5])  # the reader's next reply evicts id 5, so its record is fetched
    fetch = index._fetch_records
    fetched: list[int] = []

    async def deleted_first(shard: int, ids: Any) -> Any:
        if 5 in ids:
            await writer.delete([5])
        fetched.extend(int(i) for i in ids)
        return await fetch(shard, ids)

    index._fetch_records = deleted_first  # type: ignore[method-assign]
    hits = await reader.query(-base[5], top_k=5)
    assert 5 in fetched and len(hits) == 5 and 5 not in {h.id for h in hits}
    assert index._cache.lookup(int(index.shard_of(np.array([5]))[0]), np.array([5]))[1].all()  # nothing cached


async def test_a_warm_scan_keeps_no_record_written_while_it_ran(make_lsh: Any) -> None:
    """The scan's replies can be read before a write and handled after a
    query's reply that evicted that write and claimed a later generation
    (replies on different connections arrive in any order): replayed here by
    holding the scanned batches back until another client has rewritten
    ids and this one has queried. No record older than Redis's may stay."""
    base = clustered(600, 32, centers=5, seed=9)
    ids = np.arange(600) + 2**33  # 8-byte ids: the change log's entries are read as such
    writer, reader, index = await writer_and_cold_reader(make_lsh, base, ids, id_bytes=8)
    scan = index._record_batches
    rewritten = np.arange(0, 600, 7)

    async def held_back(shard: int, batch: int) -> Any:
        scanned = [b async for b in scan(shard, batch)]  # read now, handed over after the write
        if shard == 0:
            await writer.index(ids[rewritten], -base[rewritten])
            await reader.query(-base[7], top_k=1)  # its reply evicts the rewritten ids and claims past them
        for found in scanned:
            yield found

    index._record_batches = held_back  # type: ignore[method-assign]
    await index.warm()
    index._record_batches = scan  # type: ignore[method-assign]
    assert await assert_caches_only_current_records(index) >= 600 - len(rewritten)
    assert_found_itself(await reader.query(-base[7], top_k=1), int(ids[7]))


async def test_a_warm_waits_until_its_records_are_as_current_as_the_cache(make_lsh: Any) -> None:
    """A query's reply can claim a later generation after the warm read
    the change log (another client wrote meanwhile): the warm reads the log
    again before its records replace the cache."""
    base = clustered(600, 32, centers=5, seed=13)
    writer, reader, index = await writer_and_cold_reader(make_lsh, base)
    changes = index._changes
    rewritten = np.arange(1, 600, 5)
    reads: list[int] = []

    async def overtaken(keys: Any, args: Any) -> Any:
        reply = await changes(keys=keys, args=args)
        reads.append(1)
        if len(reads) == 1:  # between this read and its use: a write, and a reply claiming past it
            await writer.index(rewritten, -base[rewritten])
            await reader.query(-base[6], top_k=1)
        return reply

    index._changes = overtaken  # type: ignore[method-assign]
    await index.warm_shard(0)
    index._changes = changes  # type: ignore[method-assign]
    assert len(reads) >= 2
    await assert_caches_only_current_records(index)


async def test_a_warm_outrun_by_the_change_log_caches_nothing(make_lsh: Any) -> None:
    """More writes during the scan than the log keeps (4,096): the warm
    cannot tell which records are stale, so it leaves the cache to the queries."""
    from lshrs._scripts import CHANGE_LOG

    count = CHANGE_LOG + 200
    base = clustered(count, 32, centers=8, seed=14)
    writer = await make_lsh(shards=1)
    await writer.index(np.arange(count), base)
    reader = await make_lsh(shards=1, warm_in_background=False)
    index = (await reader._ready()).sharded
    scan = index._record_batches

    async def outrun(shard: int, batch: int) -> Any:
        scanned = [b async for b in scan(shard, batch)]
        await writer.index(np.arange(count), -base)
        for found in scanned:
            yield found

    index._record_batches = outrun  # type: ignore[method-assign]
    assert await index.warm() == 0
    assert not index._cache.is_warm(0)
    await assert_caches_only_current_records(index)


async def assert_caches_only_current_records(index: Any) -> int:
    """No cached record differs from the one Redis holds; returns how many are cached."""
    cached_count = 0
    for shard in range(index._shards):
        packed = [b async for b in index._record_batches(shard, 1000)]
        ids = index._ids(b"".join(i for i, _ in packed))
        current = index._signature_rows(b"".join(r for _, r in packed))
        cached, missing = index._cache.lookup(shard, ids)
        stale = ids[~missing & (cached != current).any(axis=1)]
        assert not len(stale), f"shard {shard} caches old records of {stale.tolist()}"
        cached_count += int((~missing).sum())
    return cached_count


async def test_a_cold_reply_handled_after_a_later_one_caches_nothing_older(make_lsh: Any) -> None:
    """Two cold queries' replies arrive out of order (different connections):
    the earlier one, read before another client rewrote ids, is handled after
    the later one that cached their new records. Its old records must not
    win over them."""
    base = clustered(600, 32, centers=5, seed=10)
    writer, reader, index = await writer_and_cold_reader(make_lsh, base)
    script = index._query
    rewritten = np.arange(0, 600, 3)
    held: list[int] = []

    async def reordered(keys: Any, args: Any) -> Any:
        reply = await script(keys=keys, args=args)
        if not held:  # the first reply waits until a later query has been answered
            held.append(1)
            await writer.index(rewritten, -base[rewritten])
            await reader.query(base[3], top_k=3)
        return reply

    index._query = reordered  # type: ignore[method-assign]
    await reader.query(base[3], top_k=3)
    index._query = script  # type: ignore[method-assign]
    await assert_caches_only_current_records(index)


async def test_a_write_between_the_warm_reads_log_and_its_buckets_is_in_the_next_log(
    make_lsh: Any, raw_redis: Any
) -> None:
    """The warm read asks the change log, then reads the buckets. Another
    client's write can land between the two: the buckets then show it but the
    log did not name it, so the reader must not claim it has seen it; the next
    query's log names it and the reader's cache drops the old sketch."""
    from lshrs._index import plan_keys

    base = clustered(600, 32, centers=5)
    writer, reader, index = await writer_and_warm_reader(make_lsh, base)
    log_only = index._read_buckets
    wrote = []

    async def write_between(shard: int, plans: Any, known: Any) -> list[Any]:
        reply = await log_only(shard, [b""] * len(plans), known)  # no plans: the log alone
        if not wrote:
            wrote.append(await writer.ingest(5, -base[5]))  # moves 5 to other buckets
        width, prefix = index.probe_key_width, index.bucket_base(shard)
        for plan in filter(None, plans):
            reply.append(await raw_redis.mget([prefix + key for key in plan_keys(plan, width)]))
        return reply

    index._read_buckets = write_between
    await reader.query(-base[5], top_k=1)  # may rank 5 by its old sketch: the log has not named it
    index._read_buckets = log_only
    assert wrote
    assert_found_itself(await reader.query(-base[5], top_k=1), 5)


def test_records_read_before_the_claimed_generation_are_not_cached() -> None:
    """A reply read as of generation 4 arrives after one that claimed 5:
    its records may predate a write the later reply evicted."""
    from lshrs._cache import SignatureCache

    cache = SignatureCache(1, 2, 100)
    ids, signatures = np.array([1, 2]), np.array([[1, 1], [2, 2]], np.uint8)
    assert cache.add_read(0, 4, ids, signatures) == 0  # no generation claimed yet: nothing is known current
    cache.observe(0, 5, 2, None, None)
    assert cache.add_read(0, 4, ids, signatures) == 0
    assert cache.lookup(0, ids)[1].all()
    assert cache.add_read(0, 5, ids, signatures) == 2
    found, missing = cache.lookup(0, ids)
    assert not missing.any() and (found == signatures).all()
    assert cache.add_read(0, 6, ids[:1], signatures[1:]) == 1  # read later than the claim: current
    assert (cache.lookup(0, ids[:1])[0] == signatures[1:]).all()


def test_signature_cache_claims_a_generation_only_when_every_write_since_is_evicted() -> None:
    """Query replies arrive out of order. A reply whose change list starts after
    the generation the cache claims cannot move the claim forward, or a stale
    signature added by an older reply would never be evicted."""
    from lshrs._cache import SignatureCache

    cache = SignatureCache(shards=1, width=1, capacity=100)
    ids = np.array([1, 2, 9], dtype=np.int64)
    cache.reset(0, generation=5, shard_size=3)
    cache.add(0, ids, np.array([[1], [2], [9]], dtype=np.uint8))
    # An older reply (sent knowing 3, read at 4) lands late, with signatures as of 4.
    cache.observe(0, generation=4, shard_size=3, known=3, changed=np.array([7], dtype=np.int64))
    cache.add(0, np.array([9], dtype=np.int64), np.array([[99]], dtype=np.uint8))  # 9 was rewritten at 5
    assert cache.generation(0) == 4
    # A newer reply, sent knowing 5, lists only the writes after 5: the claim stays at 4.
    cache.observe(0, generation=8, shard_size=3, known=5, changed=np.array([2], dtype=np.int64))
    assert cache.generation(0) == 4
    signatures, missing = cache.lookup(0, ids)
    assert missing.tolist() == [False, True, False]  # 2 was evicted
    assert signatures[2].tolist() == [99]  # still the stale one, until the claim catches up
    # The next reply starts at 4, so it names 9's rewrite and evicts the stale signature.
    cache.observe(0, generation=8, shard_size=3, known=4, changed=np.array([9, 2], dtype=np.int64))
    assert cache.generation(0) == 8
    assert cache.lookup(0, ids)[1].tolist() == [False, True, True]
    # A reply whose log no longer reaches back drops the shard.
    cache.observe(0, generation=9000, shard_size=3, known=8, changed=None)
    assert cache.lookup(0, ids)[1].all()


def test_a_full_signature_cache_keeps_what_it_holds() -> None:
    """Past its capacity the cache admits no more, rather than starting over
    (which would turn it cold whenever a large index overflows it)."""
    from lshrs._cache import SignatureCache

    cache = SignatureCache(shards=1, width=1, capacity=3)
    cache.reset(0, generation=0, shard_size=5)
    cache.add(0, np.array([1, 2], dtype=np.int64), np.array([[1], [2]], dtype=np.uint8))
    cache.add(0, np.array([3, 4], dtype=np.int64), np.array([[3], [4]], dtype=np.uint8))
    cache.add(0, np.array([5], dtype=np.int64), np.array([[5]], dtype=np.uint8))
    signatures, missing = cache.lookup(0, np.arange(1, 6))
    assert missing.tolist() == [False, False, False, True, True]
    assert signatures[:3, 0].tolist() == [1, 2, 3]
    assert cache.is_warm(0)


@pytest.mark.parametrize(
    "ids",
    [
        [5, 3, 5, 0, 3, 5],  # dense: counted by bincount
        [3 * 10**9, 3, 3 * 10**9, 12],  # sparse but unsigned 32-bit: sorted narrow
        [2**32, 5, 2**32, 2**32 - 1],  # one past unsigned 32-bit: sorted as int64, not wrapped to 0
        [2**40, -(2**62), 2**40, 1],  # neither: sorted as int64
        [],
    ],
)
def test_count_ids_counts_every_kind_of_id(ids: list[int]) -> None:
    from lshrs._index import count_ids

    array = np.array(ids, dtype=np.int64)
    distinct, counts = count_ids(array)
    expected, expected_counts = np.unique(array, return_counts=True)
    assert distinct.dtype == np.int64
    assert distinct.tolist() == expected.tolist()
    assert counts.tolist() == expected_counts.tolist()


@pytest.mark.parametrize("ids", [[0, 1, 2, 5, 9], [3, 10**12, -4], [0]])
def test_signature_cache_finds_dense_and_sparse_ids(ids: list[int]) -> None:
    """Dense ids are found through a position table, others by binary search:
    both must hit exactly the cached ids, and miss evicted and unknown ones
    (also past a position table of one slot)."""
    from lshrs._cache import SignatureCache

    cache = SignatureCache(shards=1, width=1, capacity=100)
    cache.reset(0, generation=0, shard_size=len(ids))
    cache.add(0, np.array(ids, dtype=np.int64), (np.arange(len(ids), dtype=np.uint8) + 1)[:, None])
    cache.lookup(0, np.array(ids[:1]))  # settles the additions into the large tier
    cache.observe(0, generation=1, shard_size=len(ids), known=0, changed=np.array(ids[:1], dtype=np.int64))
    probe = np.array([*ids, 4, 10**15, -1], dtype=np.int64)
    signatures, missing = cache.lookup(0, probe)
    assert missing.tolist() == [True] + [False] * (len(ids) - 1) + [True, True, True]
    assert signatures[1 : len(ids), 0].tolist() == list(range(2, len(ids) + 1))


@pytest.mark.parametrize("scale", [1, 10**9])  # dense ids (position tables) and sparse (binary search)
def test_a_signature_added_again_replaces_the_large_tiers(scale: int) -> None:
    """An id cached again (rewritten, refetched) is evicted from the large
    tier, which a lookup asks first: the newer signature is the one found,
    and the id counts once."""
    from lshrs._cache import SignatureCache

    cache = SignatureCache(shards=1, width=1, capacity=10_000)
    cache.reset(0, generation=0, shard_size=5_000)
    cache.add(0, np.arange(5_000, dtype=np.int64) * scale, np.ones((5_000, 1), np.uint8))
    cache.lookup(0, np.zeros(1, np.int64))  # 5,000 additions: settled into the large tier
    cache.add(0, np.array([7, 6_000, 3], dtype=np.int64) * scale, np.array([[2], [3], [4]], np.uint8))
    probe = np.array([6_000, 7, 8, 3, 9_999, 7], dtype=np.int64) * scale
    signatures, missing = cache.lookup(0, probe)
    assert signatures[:, 0].tolist() == [3, 2, 1, 4, 0, 2]
    assert missing.tolist() == [False, False, False, False, True, False]
    assert len(cache._shards[0]) == 5_001


def test_a_cache_is_warm_once_it_holds_most_of_its_shard_or_all_it_may() -> None:
    """Warm decides whether a query's reply carries signatures: too early and
    queries pay a second round trip for them, too late and every reply
    carries signatures the client already has."""
    from lshrs._cache import SignatureCache

    def warm(capacity: int, shard_size: int, cached: int, generation: int | None = 0) -> bool:
        cache = SignatureCache(shards=1, width=1, capacity=capacity)
        if generation is not None:
            cache.reset(0, generation=generation, shard_size=shard_size)
        cache.add(0, np.arange(cached, dtype=np.int64), np.ones((cached, 1), np.uint8))
        return cache.is_warm(0)

    assert warm(100, shard_size=50, cached=45)  # 90% of the shard
    assert not warm(100, shard_size=50, cached=44)
    assert warm(100, shard_size=1000, cached=90)  # 90% of what it may hold
    assert not warm(100, shard_size=1000, cached=89)
    assert not warm(100, shard_size=1000, cached=1)
    assert warm(1, shard_size=1, cached=1)
    assert warm(100, shard_size=1, cached=1)
    assert not warm(100, shard_size=0, cached=0)  # an empty cache is never warm
    assert not warm(0, shard_size=10, cached=10)  # caching turned off
    assert not warm(100, shard_size=50, cached=50, generation=None)  # nothing known about the shard


def test_a_cache_counts_what_writes_evicted_from_it() -> None:
    """Evicted signatures no longer count: a cache that writes have thinned
    below 90% of its shard is cold again (its replies carry signatures), and
    it has room for as many new ones as were evicted."""
    from lshrs._cache import SignatureCache

    cache = SignatureCache(shards=1, width=1, capacity=100)
    cache.reset(0, generation=0, shard_size=100)
    cache.add(0, np.arange(100, dtype=np.int64), np.ones((100, 1), np.uint8))
    cache.lookup(0, np.arange(1, dtype=np.int64))  # settles the added ids into a tier
    cache.observe(0, generation=11, shard_size=100, known=0, changed=np.arange(0, 22, 2, dtype=np.int64))
    assert not cache.is_warm(0)  # 89 of 100
    cache.add(0, np.arange(1000, 1020, dtype=np.int64), np.full((20, 1), 2, np.uint8))
    signatures, missing = cache.lookup(0, np.arange(1000, 1020, dtype=np.int64))
    assert missing.sum() == 9 and (signatures[~missing] == 2).all()  # room for the 11 evicted
    assert cache.is_warm(0)


def test_a_cache_that_lost_track_starts_over_at_the_reported_generation() -> None:
    """A reply whose change log no longer reaches back to the cache's
    generation empties the shard, which is then current as of that reply:
    were it left without a generation, it would never be used again."""
    from lshrs._cache import SignatureCache

    cache = SignatureCache(shards=1, width=1, capacity=100)
    cache.observe(0, generation=5, shard_size=10, known=None, changed=None)
    assert cache.generation(0) == 5
    cache.add(0, np.arange(10, dtype=np.int64), np.ones((10, 1), np.uint8))
    cache.observe(0, generation=9, shard_size=10, known=5, changed=None)
    assert cache.generation(0) == 9
    assert cache.lookup(0, np.arange(10, dtype=np.int64))[1].all()  # dropped, not served stale
    assert cache.indexed() == 10


def test_a_cache_finds_ids_in_both_tiers_with_their_own_signatures() -> None:
    """Past 4,096 additions a shard's ids move to the large tier; later ones
    sit in the small tier until it grows: a lookup must find both, each with
    its own signature, and give zeros for ids it lacks."""
    from lshrs._cache import SignatureCache

    def signature(ids: np.ndarray) -> np.ndarray:
        return (ids % 251 + 1).astype(np.uint8)[:, None]

    cache = SignatureCache(shards=1, width=1, capacity=10_000)
    cache.reset(0, generation=0, shard_size=6000)
    first, later = np.arange(5000, dtype=np.int64) * 3, np.arange(5000, 5100, dtype=np.int64) * 3
    cache.add(0, first, signature(first))
    cache.lookup(0, first[:1])  # settles: more than 4,096, so into the large tier
    cache.add(0, later, signature(later))
    probe = np.concatenate([first[::7], later[::3], [1, 4]])  # 1 and 4 are not cached
    signatures, missing = cache.lookup(0, probe)
    assert missing.tolist() == [False] * (len(probe) - 2) + [True, True]
    assert signatures[:-2].tolist() == signature(probe[:-2]).tolist()
    assert signatures[-2:].tolist() == [[0], [0]]


def test_a_capped_query_keeps_the_most_named_ids_ties_to_the_smaller() -> None:
    from lshrs._index import most_named

    ids = np.array([2, 4, 6, 8, 10, 12], dtype=np.int64)
    hits = np.array([1, 3, 2, 3, 2, 1], dtype=np.int64)
    assert most_named(ids, hits, 2).tolist() == [4, 8]
    assert most_named(ids, hits, 3).tolist() == [4, 6, 8]
    assert most_named(ids, hits, 5).tolist() == [2, 4, 6, 8, 10]


async def test_max_candidates_bounds_each_shard_and_keeps_the_query_deterministic(make_lsh: Any) -> None:
    vectors = np.random.default_rng(3).standard_normal((2000, 32)).astype(np.float32)
    lsh = await make_lsh(max_candidates=7, probes=400)
    await lsh.index(np.arange(2000), vectors)
    shards = lsh.config.shards
    first = await lsh.query(vectors[0], top_k=100)
    assert 0 < len(first) <= 7 * shards
    assert first[0].id == 0  # the query's own vector is named by every band: it survives any cap
    assert await lsh.query(vectors[0], top_k=100) == first


async def batches_started(lsh: LSHRS, earlier: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """The coalesced batches begun since ``earlier``, once there are some: a
    few loop turns, as the callers join and their batch starts."""
    for _ in range(1000):
        if lsh._coalescer._running - earlier:
            break
        await asyncio.sleep(0)
    started = lsh._coalescer._running - earlier
    assert started
    return started


async def test_concurrent_queries_get_what_a_lone_query_gets(make_lsh: Any) -> None:
    """Queries from many tasks at once are answered in batches: each gets
    exactly its own hits, a caller that gives up does not disturb the rest,
    and a bad query fails alone, before it joins a batch."""
    base = clustered(800, 32)
    lsh = await make_lsh(store=InMemoryStore())
    await lsh.index(np.arange(800), base)
    queries = base[:100] + 0.05 * np.random.default_rng(5).standard_normal((100, 32)).astype(np.float32)
    alone = [await lsh.query(q, top_k=7) for q in queries]
    together = await asyncio.gather(*(lsh.query(q, top_k=7) for q in queries))
    assert together == alone
    mixed = await asyncio.gather(*(lsh.query(q, top_k=3 + i % 3) for i, q in enumerate(queries[:30])))
    assert mixed == [alone[i][: 3 + i % 3] for i in range(30)]
    doomed = asyncio.ensure_future(lsh.query(queries[0], top_k=7))
    survivors = [asyncio.ensure_future(lsh.query(q, top_k=7)) for q in queries[1:20]]
    doomed.cancel()  # before it joins a batch
    assert await asyncio.gather(*survivors) == alone[1:20]
    # A caller that gives up once its batch is running: the batch goes on
    # for the others (it stops only when every caller has given up).
    earlier = set(lsh._coalescer._running)  # batches still ending
    doomed = asyncio.ensure_future(lsh.query(queries[0], top_k=7))
    survivors = [asyncio.ensure_future(lsh.query(q, top_k=7)) for q in queries[1:20]]
    await batches_started(lsh, earlier)
    doomed.cancel()
    assert await asyncio.gather(*survivors) == alone[1:20]
    # When every caller of a running batch gives up, the batch stops: under
    # overload, finishing work nobody waits for starves the calls that can
    # still be served.
    earlier = set(lsh._coalescer._running)  # batches still ending
    callers = [asyncio.ensure_future(lsh.query(q, top_k=7)) for q in queries[:5]]
    (batch,) = await batches_started(lsh, earlier)
    for caller in callers:
        caller.cancel()
    await asyncio.wait([batch])
    assert batch.cancelled()
    bad = await asyncio.gather(lsh.query(np.full(32, np.nan)), lsh.query(queries[0], top_k=7), return_exceptions=True)
    assert isinstance(bad[0], ValueError) and bad[1] == alone[0]


async def test_rerank_depth_follows_the_size_the_query_scripts_report(make_lsh: Any) -> None:
    """The default rerank depth is sized from the index as the query scripts
    just reported it, so a client opened on an empty prefix still sizes it
    from what was indexed since."""
    from lshrs._family import simhash_rerank

    lsh = await make_lsh(store=InMemoryStore())  # opened empty
    base = clustered(600, 32)
    await lsh.index(np.arange(600), base)
    await lsh.query(base[0])
    opened = await lsh._ready()
    assert opened.sharded.reported_size() == 600
    # Codes rank better than a SimHash of twice their bytes: half the depth.
    small = 256 if lsh.config.hashing == "kmeans" else 512
    assert lsh._depth(opened, 10) == small and lsh._depth(opened, 100) == 10 * small
    sizes = (49_999, 50_000, 100_000, 250_000, 500_000, 1_000_000, 6_400_000)
    assert [simhash_rerank(n) for n in sizes] == [512, 256, 256, 256, 512, 1024, 1024]
    assert opened.family is not None and opened.family.default_rerank(100_000) == small // 2


async def test_stats_says_when_a_learned_index_outgrew_its_buckets(make_lsh: Any) -> None:
    base = clustered(1600, 32)
    lsh = await make_lsh(hashing="kmeans")
    empty = await lsh.stats()
    counted = ("vectors", "buckets", "largest_bucket", "bucket_size_histogram")
    assert [empty[name] for name in counted] == [0, 0, 0, {}]
    await lsh.index(np.arange(300), base[:300])  # the buckets are sized for 300 vectors
    stats = await lsh.stats()
    assert stats["trained_for"] == 300 and stats["outgrown"] is False and "advice" not in stats
    assert all(stats["bucket_size_histogram"].values())  # empty bins are left out (one server gives this index one)
    family = (await lsh._ready()).family
    assert isinstance(family, LearnedFamily) and stats["partition_buckets"] == family.partition.buckets
    await lsh.index(np.arange(300, 1200), base[300:1200])
    assert (await lsh.stats())["outgrown"] is False  # 4 x 300 exactly: not yet
    await lsh.index([1200], base[1200:1201])
    stats = await lsh.stats()
    assert stats["outgrown"] is True and "sized for 300" in stats["advice"] and stats["trained_for"] == 300
    assert 0 < stats["largest_bucket"] < 1201


async def test_a_learned_index_past_the_flat_size_answers_through_its_tree(
    make_lsh: Any, hashing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``FLAT_PROBE`` buckets (262,144 vectors by default) a query scores
    only the children of its nearest coarse groups. Forced on a small index,
    so the path that plans every query of a large one reads real Redis: with
    every group opened it must read the very buckets the flat path reads;
    with one group opened it reads fewer, and finds less."""
    from lshrs import _partition

    if hashing != "kmeans":
        pytest.skip("the tree is the learned family's")
    base, queries = clustered(4000, 32, seed=1), clustered(4060, 32, seed=2)[-60:]
    lsh = await make_lsh(store=InMemoryStore(), probes=24)
    await lsh.index(np.arange(len(base)), base)
    flat = await lsh.query_many(queries, top_k=10)
    monkeypatch.setattr(_partition, "FLAT_PROBE", 0)
    monkeypatch.setattr(_partition, "_MIN_OPENED", 10**6)
    sieved = await lsh.query_many(queries, top_k=10)
    monkeypatch.setattr(_partition, "_SHORTLIST", 10**6)  # every child scored exactly
    assert await lsh.query_many(queries, top_k=10) == flat
    monkeypatch.setattr(_partition, "_MIN_OPENED", 1)
    monkeypatch.setattr(_partition, "_OPEN_FACTOR", 0.0)
    narrow = await lsh.query_many(queries, top_k=10)
    truth = brute_force(base, queries, 10)

    def recall_of(results: list[list[Hit]]) -> float:
        return float(np.mean([len({h.id for h in hits} & set(row)) / 10 for hits, row in zip(results, truth)]))

    assert recall_of(flat) >= 0.9
    assert recall_of(sieved) >= recall_of(flat) - 0.02, (recall_of(sieved), recall_of(flat))
    assert recall_of(narrow) < recall_of(flat) - 0.05, (recall_of(narrow), recall_of(flat))


async def test_a_client_builds_a_large_partitions_sieve_off_the_event_loop(
    make_lsh: Any, hashing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large partition's sieve takes a third of a second to build (131,072
    buckets): the client that trains it and one that opens it later each
    build it in a worker thread as they adopt the partition, not in the
    event loop inside their first query."""
    import threading

    from lshrs import _partition

    if hashing != "kmeans":
        pytest.skip("the sieve is the learned family's")
    built: list[threading.Thread] = []
    original = _partition.Sieve.of

    def recording(partition: _partition.Partition) -> _partition.Sieve:
        built.append(threading.current_thread())
        return original(partition)

    monkeypatch.setattr(_partition, "FLAT_PROBE", 0)
    monkeypatch.setattr(_partition.Sieve, "of", recording)
    base = clustered(2000, 32, seed=1)
    trainer = await make_lsh(prefix="sieved")
    await trainer.index(np.arange(len(base)), base)
    reader = await make_lsh(prefix="sieved")
    assert len(built) == 2 and threading.main_thread() not in built
    await reader.query(base[0])
    assert len(built) == 2


async def prefix_memory(raw_redis: Any, prefix: str) -> int:
    """``MEMORY USAGE`` of every key of the prefix, summed: what ``stats()`` must report."""
    keys = [key async for key in raw_redis.scan_iter(match=f"{{{prefix}*", count=1000)]
    return sum([await raw_redis.memory_usage(key) for key in keys])


async def test_stats_sampled_and_exact(make_lsh: Any, raw_redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """stats() reads a sample of bucket keys unless exact=True; a sample that
    covers every bucket is exact, a smaller one extrapolates the bucket count
    and the memory near the exact values; the memory is the index's own,
    the saved tuning included."""
    import lshrs._lshrs as lshrs_module

    base = clustered(3000, 32)
    lsh = await make_lsh(store=InMemoryStore())
    await lsh.index(np.arange(3000), base)
    await lsh.tune(0.5, sample=10)
    exact = await lsh.stats(exact=True)
    assert exact["bucket_statistics"] == "exact" and exact["prefix"] == lsh.prefix
    assert sum(exact["bucket_size_histogram"].values()) == exact["buckets"]
    sizes, _, _ = await (await lsh._ready()).sharded.bucket_sample(None)
    powers = collections.Counter(2 ** int(math.log2(size)) for size in sizes)  # each size's power-of-two bin
    assert exact["bucket_size_histogram"] == {f"{low}-{2 * low - 1}": n for low, n in sorted(powers.items())}
    tables = lsh.config.num_bands if lsh.config.hashing == "hyperplane" else 1 + lsh.config.spill
    assert exact["mean_bucket_size"] * exact["buckets"] == pytest.approx(3000 * tables)
    used = await prefix_memory(raw_redis, lsh.prefix)
    assert exact["index_memory_bytes"] == used  # every key of the prefix, nothing else on the server
    assert exact["index_bytes_per_vector"] == round(used / 3000, 1)
    if exact["buckets"] <= lshrs_module.STATS_SAMPLE:
        assert await lsh.stats() == exact  # fewer buckets than the sample: the sample is all of them
    # Half the buckets: a learned partition's 186 bucket sizes are skewed, and
    # a quarter of them missed the count by more than 35% in 1% of draws
    # (simulated; CI met one). Half: 30% at worst in 20,000 draws.
    sample = max(8, exact["buckets"] // 2)
    monkeypatch.setattr(lshrs_module, "STATS_SAMPLE", sample)
    sampled = await lsh.stats()
    shards = lsh.config.shards
    assert sampled["bucket_statistics"] == f"sampled from {shards * -(-sample // shards):,} buckets"
    assert sampled["buckets"] == pytest.approx(exact["buckets"], rel=0.35)
    assert sampled["index_memory_bytes"] == pytest.approx(exact["index_memory_bytes"], rel=0.35)
    assert await lsh.stats(exact=True) == exact  # exact=True reads every bucket whatever the sample


async def test_a_bulk_build_leaves_no_room_to_grow_in_its_buckets(
    redis_url: str, raw_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """APPEND allocates ahead; after a build of many batches every bucket
    takes what the same bytes take when SET afresh. The compaction rewrites
    every bucket key once, in chunks of keys (of 7 here, so many, as a large
    index's are): which keys hold slack varies from run to run."""
    import lshrs._index

    monkeypatch.setattr(lshrs._index, "WRITE_CHUNK", 7)
    async with LSHRS(dim=32, redis_url=redis_url, prefix="tight", batch_size=500) as lsh:
        sharded = (await lsh._ready()).sharded
        compacted: list[bytes] = []
        write = sharded._write

        async def noting(script: Any, keys: list[str], args: list[Any]) -> Any:
            if script is sharded._compact:
                compacted.extend(args)
            return await write(script, keys, args)

        monkeypatch.setattr(sharded, "_write", noting)
        await lsh.index(np.arange(3000), clustered(3000, 32))
        keys = [key async for key in raw_redis.scan_iter(match="{tight:*}:b*", count=1000)]
        assert len(keys) > 50
        assert sorted(compacted) == sorted(keys)
        built = [await raw_redis.memory_usage(key, samples=0) for key in keys]
        for key in keys:
            await raw_redis.set(key, await raw_redis.get(key))
        assert built == [await raw_redis.memory_usage(key, samples=0) for key in keys]
        await lsh.drop()


@pytest.mark.parametrize("width", [4, 8])
def test_a_capped_learned_query_cuts_its_boundary_bucket_by_id(width: int) -> None:
    """Whole buckets in probe order, then the smallest ids of the bucket that
    crosses the cap, whatever order the writes left inside it."""
    from lshrs._index import FirstNamed, nearest_buckets

    def bucket(*ids: int) -> bytes:
        return b"".join(i.to_bytes(width, "little") for i in ids)

    buckets = [bucket(9, 4), bucket(30, 7, 12), bucket(1, 2)]
    assert nearest_buckets(buckets, 10, width).tolist() == [9, 4, 30, 7, 12, 1, 2]
    assert nearest_buckets(buckets, 4, width).tolist() == [9, 4, 7, 12]
    assert nearest_buckets(list(reversed(buckets[:2])), 4, width).tolist() == [30, 7, 12, 4]
    assert nearest_buckets(buckets, 2, width).tolist() == [9, 4]
    assert nearest_buckets(buckets, 1, width).tolist() == [4]
    # Spilled: an id named by two buckets is kept once, and counts at the first (4 and 9 again below).
    spilled = [bucket(9, 4), bucket(30, 4, 12), bucket(1, 9, 2)]
    first = FirstNamed(lambda: 0)
    assert nearest_buckets(spilled, 3, width, first).tolist() == [9, 4, 12]
    assert nearest_buckets(spilled, 5, width, first).tolist() == [9, 4, 30, 12, 1]
    assert nearest_buckets(spilled, 6, width, first).tolist() == [9, 4, 30, 12, 1, 2]
    assert nearest_buckets(spilled, 100, width, first).tolist() == [9, 4, 30, 12, 1, 2]
    for empty in ([], [b"", b""]):  # probed buckets that hold nothing
        nothing = nearest_buckets(empty, 10, width, first)
        assert nothing.dtype == np.int64 and not len(nothing)


@pytest.mark.parametrize("high", [1_000, 10**12])
def test_first_named_keeps_each_ids_first_position_in_order(high: int) -> None:
    """Against ``np.unique``'s first indexes, on dense ids (a table reused
    from call to call, stale entries and all) and on ids too sparse for one."""
    from lshrs._index import FirstNamed

    rng = np.random.default_rng(high)
    first = FirstNamed(lambda: 100)
    for size in [0, 1, 5, 300, 3_000, 2_000]:
        named = rng.integers(0, high, size) if size != 5 else np.array([3, 3, 1, 3, 1])
        expected = np.sort(np.unique(named, return_index=True)[1])
        kept = first(named.astype(np.int64))
        assert kept.dtype == np.intp and kept.tolist() == expected.tolist()
    growing = FirstNamed(lambda: 10_000)
    for high in range(1, 400):  # every largest id once, the table's own length among them
        assert growing(np.array([high, 0, high], np.int64)).tolist() == [0, 1]


async def test_sampled_ids_are_distinct_indexed_ids(make_lsh: Any) -> None:
    """tune() draws its query rows with sample_ids: as many as asked, each
    indexed, none twice, from every shard; none from an empty index."""
    lsh = await make_lsh()
    empty = await (await lsh._ready()).sharded.sample_ids(5)  # an index emptied since tune() counted it
    assert empty.shape == (0,) and empty.dtype == np.int64
    await lsh.index(np.arange(1000), clustered(1000, 32))
    index = (await lsh._ready()).sharded
    for count in (1, 37, 400):
        picked = await index.sample_ids(count)
        assert len(picked) == count and len(set(picked.tolist())) == count
        assert set(picked.tolist()) <= set(range(1000))
    every = await index.sample_ids(5000)
    assert sorted(every.tolist()) == list(range(1000))  # asking for more than exist: each id once
    # 256 learned vectors over 8 shards: one record group a shard, which a
    # sample asks for all of its share of ids at once.
    grouped = await make_lsh(prefix="one-group-a-shard", shards=8, hashing="kmeans")
    await grouped.index(np.arange(256), clustered(256, 32, seed=2))
    sharded = (await grouped._ready()).sharded
    assert sharded.groups == 1
    assert len(set((await sharded.sample_ids(37)).tolist())) == 37


async def test_clients_that_train_at_once_all_file_by_the_first_partition_stored(
    make_lsh: Any, raw_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Two clients building the first batches of one new learned prefix at
    once each fit a partition; the first stored wins, and both file their
    ids by it: every record is what a third client computes from the
    partition it adopts."""
    first = await make_lsh(hashing="kmeans")
    second = await make_lsh(prefix=first.prefix, hashing="kmeans")
    vectors = np.concatenate([clustered(600, 32, seed=3), clustered(600, 32, seed=4)])
    with caplog.at_level(logging.INFO, logger="lshrs"):
        await asyncio.gather(
            first.index(np.arange(600), vectors[:600]), second.index(np.arange(600, 1200), vectors[600:])
        )
    fits = [r for r in caplog.records if r.getMessage().startswith("fitting ")]
    assert len(fits) == 2  # both fitted before either stored: else this proves nothing
    reader = await make_lsh(prefix=first.prefix, hashing=None)
    family = (await reader._ready()).family
    assert family is not None
    expected = {i: bytes(record) for i, record in enumerate(family.records(vectors))}
    assert await index_state(raw_redis, reader) == expected


async def test_stats_reads_the_memory_of_a_shard_of_one_record_group(make_lsh: Any, raw_redis: Any) -> None:
    """256 learned vectors over 8 shards: one record group a shard, whose
    memory stats() reads whole, not scaled down as a sample of two."""
    lsh = await make_lsh(shards=8, hashing="kmeans")
    await lsh.index(np.arange(256), clustered(256, 32, seed=2))
    assert (await lsh._ready()).sharded.groups == 1
    used = await prefix_memory(raw_redis, lsh.prefix)
    assert (await lsh.stats(exact=True))["index_memory_bytes"] == used


def test_the_learned_tuning_ladder() -> None:
    """tune() tries probes from 8 buckets up in steps of about 1.4 (so the
    probes it saves are within 1.4x of the fewest that reach the target), up
    to 16 times the default or every bucket."""
    from types import SimpleNamespace

    from lshrs._family import LearnedFamily

    for buckets in (300, 4096, 65536):
        family = LearnedFamily(SimpleNamespace(buckets=buckets), np.zeros((4, 8), np.float32))  # type: ignore[arg-type]
        ladder = family.ladder()
        assert ladder[0] == 8
        assert ladder[-1] == min(buckets, 16 * family.default_probes())
        ratios = np.array(ladder[1:]) / np.array(ladder[:-1])
        assert all(1.3 < r < 1.5 for r in ratios[3:-1]), ratios  # past the rounding of the first small steps


def test_the_hyperplane_tuning_ladder() -> None:
    """tune() of a hyperplane index tries from one bucket a band up, in steps
    of about 1.4, to every bucket the prober can name (2**rows a band, at
    most 256)."""
    from lshrs._family import HyperplaneFamily
    from lshrs._hashing import Bands

    for bands, rows in ((16, 4), (48, 12)):
        projection = np.random.default_rng(0).standard_normal((8, bands * rows)).astype(np.float32)
        ladder = HyperplaneFamily(Bands(bands, rows), projection).ladder()
        assert ladder[0] == bands
        assert ladder[-1] == bands * 2 ** min(rows, 8)
        ratios = np.array(ladder[1:]) / np.array(ladder[:-1])
        assert all(1.35 < r < 1.47 for r in ratios), ratios  # sqrt(2), but for the rounding of small steps


async def test_warm_in_batches_loads_every_signature(make_lsh: Any, raw_redis: Any, backend: str) -> None:
    """warm() reads each shard's records in HSCAN batches: every batch lands in
    the cache, so a warm reader's queries read no signatures from Redis."""
    base = clustered(800, 32)
    writer = await make_lsh()
    await writer.index(np.arange(800), base)
    reader = await make_lsh(probes=8)  # no store: the sketch's estimates, from cached signatures
    index = (await reader._ready()).sharded
    assert await index.warm(batch=64) == 800
    if backend == "redis":
        await raw_redis.config_resetstat()
    for i, vector in enumerate(base[:5]):
        assert (await reader.query(vector, top_k=1))[0].id == i
    if backend == "redis":
        assert "cmdstat_hmget" not in await raw_redis.info("commandstats")


async def test_a_reader_opened_before_the_build_finds_what_another_client_built(make_lsh: Any) -> None:
    """A learned index is trained by its first write; a client that opened
    the prefix before that adopts the partition at its next query, instead of
    answering [] until it is reopened."""
    reader = await make_lsh()
    assert await reader.query(np.ones(32, np.float32)) == []  # empty, and (learned) untrained
    base = clustered(600, 32)
    writer = await make_lsh()
    await writer.index(np.arange(600), base)
    hits = await reader.query(base[5], top_k=1)
    assert hits and hits[0].id == 5
    assert await reader.count() == 600


async def test_hits_are_cosines_best_first_and_ties_go_to_the_smaller_id(make_lsh: Any) -> None:
    """A hit's score is the cosine whatever the query's length; hits come
    best first, and equal scores (one vector under three ids) list the
    smaller id first: reranked through a store, and ranked by sketch
    without one."""
    base = clustered(600, 32)
    axis = np.zeros(32, np.float32)
    axis[0] = 1.0  # dot products with it are exact, so the three ties are exact
    base[[5, 300, 400]] = axis
    with_store = await make_lsh(store=InMemoryStore())
    await with_store.index(np.arange(600), base)
    hits = await with_store.query(3.0 * axis, top_k=20)
    assert [h.id for h in hits[:3]] == [5, 300, 400]
    assert [h.score for h in hits[:3]] == [1.0, 1.0, 1.0]
    cosines = base @ axis  # base rows are unit length
    assert [h.score for h in hits] == pytest.approx([float(cosines[h.id]) for h in hits], abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    sketched = await make_lsh(prefix="sketched")
    await sketched.index(np.arange(600), base)
    estimates = await sketched.query(axis, top_k=20)
    assert [h.id for h in estimates[:3]] == [5, 300, 400]
    ranked = [(-h.score, h.id) for h in estimates]
    assert len(estimates) == 20 and ranked == sorted(ranked)


async def test_query_takes_exactly_one_vector(make_lsh: Any) -> None:
    lsh = await make_lsh(store=InMemoryStore())
    await lsh.index(np.arange(300), clustered(300, 32))
    for bad in (np.empty((0, 32), np.float32), clustered(2, 32)):
        with pytest.raises(ValueError, match="query\\(\\) takes one vector"):
            await lsh.query(bad)


async def test_deleting_an_id_twice_in_one_call_counts_it_once(make_lsh: Any) -> None:
    lsh = await make_lsh(store=InMemoryStore())
    await lsh.index(np.arange(300), clustered(300, 32))
    assert await lsh.delete([7, 7, 9, 7, 12345]) == 2
    assert await lsh.count() == 298


async def test_a_filter_answered_exactly_keeps_top_p_of_the_rerank_depth(make_lsh: Any) -> None:
    """When few enough rows pass ``where`` they are ranked exactly, and
    ``top_p`` keeps its share of the rerank depth's nearest, as on the
    index path, not of every passing row."""
    base = clustered(600, 32)
    lsh = await make_lsh(store=InMemoryStore(), rerank=16)
    await lsh.index(np.arange(600), base)
    passing = set(range(0, 600, 3))  # 200 rows: fewer than 8 x the depth of 160 (rerank 16 x 100 / 10)
    query = base[9]
    hits = await lsh.query(query, top_k=100, top_p=0.5, where=passing)
    ids = np.array(sorted(passing))
    exact = ids[np.argsort(-(base[ids] @ query), kind="stable")]
    assert [h.id for h in hits] == exact[: math.ceil(0.5 * 160)].tolist()


async def test_a_query_for_more_hits_reads_more_buckets(make_lsh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``probes * sqrt(top_k / 10)`` buckets, never fewer than ``probes``:
    recall@100 trailed recall@10 when every query read the same buckets."""
    base = clustered(600, 32)
    lsh = await make_lsh(store=InMemoryStore(), probes=8)
    await lsh.index(np.arange(600), base)
    asked = await planned_probes(lsh, monkeypatch)
    for top_k in (1, 10, 40, 100):
        await lsh.query(base[0], top_k=top_k)
    assert asked == [8, 8, 16, 26]


async def test_tune_stops_once_its_queries_read_the_whole_index(make_lsh: Any) -> None:
    """A target that reading every id cannot reach (a rerank too shallow for
    it) ends the ladder at the first setting that reads them all."""
    lsh = await make_lsh(store=InMemoryStore(), rerank=10)
    await lsh.index(np.arange(400), clustered(400, 32))
    tuning = await lsh.tune(1.0, sample=50)
    assert tuning.recall < 1.0
    # The shape a hyperplane index of this size would be rebuilt with (0 x 0 for a learned one).
    rows = choose_rows(400) if lsh.config.hashing == "hyperplane" else 0
    assert (tuning.rebuild_bands, tuning.rebuild_rows) == ((choose_bands(0.6, rows), rows) if rows else (0, 0))
    assert tuning.curve[-1].candidates >= 400 and all(point.candidates < 400 for point in tuning.curve[:-1])
    assert tuning.probes == tuning.curve[-1].probes


async def test_tune_on_stored_vectors_leaves_each_one_out_of_its_own_truth(make_lsh: Any) -> None:
    """A sampled vector finds itself first; tune() asks for one hit more and
    drops it, so easy data can reach a recall above 9 in 10."""
    lsh = await make_lsh(store=InMemoryStore())
    await lsh.index(np.arange(600), clustered(600, 32))
    tuning = await lsh.tune(0.97, sample=50)
    assert tuning.recall >= 0.97, tuning


@pytest.mark.parametrize(
    "args",
    [
        ("MGET", b"{p:0}:b\x00\x01\x02\x03", b"{p:0}:b\x01\xff\x00\x00\x00"),
        ("CONFIG GET", "maxmemory-policy"),
        (b"CLIENT SETNAME", "lshrs-é"),
        ("EVALSHA", "0" * 40, 4, -1, 2.5, bytearray(b"ab"), memoryview(b"cd")),
    ],
)
def test_commands_packed_with_hiredis_are_the_bytes_redis_py_would_send(args: tuple[Any, ...]) -> None:
    from redis.asyncio.connection import Connection

    from lshrs._connect import _Connection

    assert b"".join(_Connection().pack_command(*args)) == b"".join(Connection().pack_command(*args))


@pytest.mark.parametrize("bad", [True, None, object()])
def test_an_argument_hiredis_cannot_pack_is_redis_pys_data_error(bad: object) -> None:
    from redis.exceptions import DataError

    from lshrs._connect import _Connection

    with pytest.raises(DataError):
        _Connection().pack_command("SET", "key", bad)


async def test_a_client_opened_by_url_packs_with_hiredis(redis_proc: Any) -> None:
    from redis.asyncio import Redis

    from lshrs._connect import _Connection, connect

    client = await connect(f"redis://{redis_proc.host}:{redis_proc.port}/6", timeout=5.0)
    try:
        assert isinstance(client, Redis)
        assert client.connection_pool.connection_class is _Connection
        await client.mset({b"packed:\x00": b"a", b"packed:\xff": b"b"})
        assert await client.mget([b"packed:\x00", b"packed:\xff", b"packed:none"]) == [b"a", b"b", None]
        assert await client.config_get("maxmemory-policy")  # a command name with a space, split
    finally:
        await client.aclose()


async def test_an_index_emptied_by_delete_answers_nothing(make_lsh: Any) -> None:
    """Every id deleted: the buckets a query reads are empty, with or
    without a store, and a query answers [] rather than failing."""
    base = clustered(300, 32, centers=4, seed=19)
    for store in (InMemoryStore(), None):
        lsh = await make_lsh(store=store)
        await lsh.index(np.arange(300), base)
        assert await lsh.delete(np.arange(300)) == 300
        assert await lsh.count() == 0
        assert await lsh.query(base[3]) == [] and await lsh.query_many(base[:4]) == [[]] * 4
        await lsh.drop()
