"""A build streamed from a real PostgreSQL table, as the reference workload
is (issue 12): ``wiki (id bigint primary key, embedding bytea, body text)``.

1. Load (not timed as the build): 100k real all-MiniLM-L6-v2 vectors, then
   GENERATED ones, written with COPY a chunk at a time (nothing holds the
   whole corpus in memory); the exact top 100 of the held-out queries is
   kept up to date chunk by chunk.
2. Full build: ``await lsh.index()`` through ``PostgresStore``, timed.
3. Resume: the index dropped, built again and cut short at 60% (a progress
   callback raises, standing in for a crash), then ``index(resume=True)``,
   timed.
4. Recall@10 and latency of the default configuration on the result (the
   rerank reads from PostgreSQL), and the index's Redis memory.

    nox -s pgbuild -- --size 1M
    nox -s pgbuild -- --size 6.4M
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lshrs import LSHRS
from lshrs.adapters import PostgresStore
from servers import postgres, redis_server

from .datasets import _real, generate
from .report import arguments, finish, save, stem, subplots
from .systems import redis_memory, timed_point

CHUNK = 100_000
BATCH = 10_000


class Cut(Exception):
    """Stands in for a crash in the middle of a build."""


async def load_table(dsn: str, size: int, queries: np.ndarray) -> tuple[float, np.ndarray]:
    """The table, loaded chunk by chunk, and the exact top 100 of ``queries``."""
    real, _, texts = _real("minilm-100k")
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    best_scores = np.full((len(queries), 100), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 100), np.int64)
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE TABLE wiki (id bigint, embedding bytea, body text)")
    started = time.perf_counter()
    for start in range(0, size, CHUNK):
        count = min(CHUNK, size - start)
        vectors = real[start : start + count] if start < len(real) else generate(real, count, start=start)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        rows = [(start + i, vectors[i].tobytes(), texts[(start + i) % len(texts)]) for i in range(count)]
        await conn.copy_records_to_table("wiki", records=rows, columns=["id", "embedding", "body"])
        scores = unit_queries @ (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).T
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_ids = np.concatenate([best_ids, np.broadcast_to(np.arange(start, start + count), scores.shape)], axis=1)
        top = np.argsort(-merged_scores, axis=1, kind="stable")[:, :100]
        best_scores = np.take_along_axis(merged_scores, top, axis=1)
        best_ids = np.take_along_axis(merged_ids, top, axis=1)
        if (start // CHUNK) % 10 == 0:
            print(f"  loaded {start + count:,} rows in {time.perf_counter() - started:.0f} s", flush=True)
    await conn.execute("ALTER TABLE wiki ADD PRIMARY KEY (id)")
    await conn.execute("VACUUM ANALYZE wiki")
    table_bytes = await conn.fetchval("SELECT pg_total_relation_size('wiki')")
    await conn.close()
    print(f"  table loaded in {time.perf_counter() - started:.0f} s, {table_bytes / 2**30:.1f} GiB", flush=True)
    return time.perf_counter() - started, best_ids


async def build(url: str, dsn: str, size: int, *, cut_at: float | None = None, resume: bool = False) -> float:
    """Seconds for one ``index()`` streamed from the table; ``cut_at`` stops
    it by raising once that share is written."""
    last = [time.perf_counter()]
    started = time.perf_counter()

    def progress(done: int, total: int | None) -> None:
        if cut_at is not None and done >= cut_at * size:
            raise Cut
        if time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            print(f"    {done:,} of {total:,} in {last[0] - started:.0f} s", flush=True)

    store = PostgresStore(dsn, table="wiki", text_column="body")
    async with LSHRS(dim=384, redis_url=url, prefix="wiki", store=store, batch_size=BATCH, signature_cache=0) as lsh:
        with contextlib.suppress(Cut):
            await lsh.index(progress=progress, resume=resume)
    await store.close()
    return time.perf_counter() - started


async def drop(url: str) -> None:
    async with LSHRS(dim=384, redis_url=url, prefix="wiki") as lsh:
        await lsh.drop()


async def run(size: int, queries: int) -> dict[str, Any]:
    _, held_out, _ = _real("minilm-100k")
    held_out = held_out[:queries]
    with postgres() as pg, redis_server() as redis:
        print(f"loading {size:,} rows into PostgreSQL", flush=True)
        loading, truth = await load_table(pg.url, size, held_out)
        before = await redis_memory(redis.url)
        print("full build", flush=True)
        full = await build(redis.url, pg.url, size)
        memory = await redis_memory(redis.url) - before
        print(f"  {full:.0f} s; {memory / size:.0f} B a vector in Redis", flush=True)
        await drop(redis.url)
        print("build cut short at 60%, then resumed", flush=True)
        cut = await build(redis.url, pg.url, size, cut_at=0.6)
        resumed = await build(redis.url, pg.url, size, resume=True)
        print(f"  cut after {cut:.0f} s; resumed in {resumed:.0f} s", flush=True)
        store = PostgresStore(pg.url, table="wiki")
        options: dict[str, Any] = {"signature_cache": size, "timeout": 300}  # query_many of 300 at top 100
        async with LSHRS(dim=384, redis_url=redis.url, prefix="wiki", store=store, **options) as lsh:
            vectors = await lsh.count()
            point = await timed_point(lsh, f"learned, probes={(await lsh._ready()).probes}", held_out, truth)
        await store.close()
    return {
        "command": "python -m benchmarks.postgres_build " + " ".join(sys.argv[1:]),
        "size": size,
        "indexed": vectors,
        "queries": len(held_out),
        "load_s": round(loading, 1),
        "build_s": round(full, 1),
        "cut_at_60_percent_s": round(cut, 1),
        "resumed_s": round(resumed, 1),
        "redis_bytes_per_vector": round(memory / size, 1),
        "point": point,
    }


def table(result: dict[str, Any]) -> str:
    p = result["point"]
    return "\n".join(
        [
            f"Command: `{result['command']}`; {result['size']:,} rows (100k real all-MiniLM-L6-v2, the rest "
            f"GENERATED), {result['queries']} real held-out queries, exact truth over all rows.",
            "",
            "| step | seconds |",
            "|---|---|",
            f"| load the table (COPY, not part of the build) | {result['load_s']} |",
            f"| full build streamed from PostgreSQL | {result['build_s']} |",
            f"| build cut short at 60% | {result['cut_at_60_percent_s']} |",
            f"| the same build resumed (`resume=True`) | {result['resumed_s']} |",
            "",
            f"Index: {result['indexed']:,} vectors, {result['redis_bytes_per_vector']} B a vector in Redis. "
            f"Default query ({p['setting']}), reranked from PostgreSQL: recall@10 {p['recall@10']}, "
            f"recall@100 {p['recall@100']}, p50 {p['p50_ms']} ms, p95 {p['p95_ms']} ms, {p['qps64']} QPS (64 tasks).",
            "",
        ]
    )


def plot(result: dict[str, Any], path: Path) -> None:
    steps = {
        "full build": result["build_s"],
        "cut at 60%": result["cut_at_60_percent_s"],
        "resumed": result["resumed_s"],
    }
    figure, axis = subplots(figsize=(6, 3))
    axis.barh(list(steps), list(steps.values()))
    axis.set_xlabel("seconds")
    axis.invert_yaxis()
    axis.set_title(f"lshrs build streamed from PostgreSQL, {result['size']:,} rows")
    finish(figure, path)


def main() -> None:
    args = arguments(__doc__, size=1_000_000, queries=300).parse_args()
    save(asyncio.run(run(args.size, args.queries)), stem(args, "postgres-build"), table, plot)


if __name__ == "__main__":
    main()
