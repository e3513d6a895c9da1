"""Where should my vectors live? Fetch latency of a query's candidate vectors
from each store, and end-to-end query latency with each, on the same index."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from lshrs import LSHRS, VectorStore
from lshrs.adapters import InMemoryStore, PostgresStore, RedisStore, SQLAlchemyStore

from .datasets import Dataset
from .measure import one_client, percentiles, recall


async def fill_tables(dsn: str, base: np.ndarray) -> None:
    """One table per vector column type, loaded with COPY in binary form."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    d = base.shape[1]
    for name, sql_type in {
        "real": "real[]",
        "double": "double precision[]",
        "bytea": "bytea",
        "vector": f"vector({d})",
    }.items():
        await conn.execute(f"DROP TABLE IF EXISTS store_{name}")
        await conn.execute(f"CREATE TABLE store_{name} (id bigint PRIMARY KEY, embedding {sql_type}, body text)")
        if name == "bytea":
            records: Any = ((i, v.astype("<f4").tobytes(), f"row {i}") for i, v in enumerate(base))
            await conn.copy_records_to_table(f"store_{name}", records=records)
        else:  # the text form is the simplest COPY for arrays and vectors
            body = "".join(f"{i}\t{_literal(name, v)}\trow {i}\n" for i, v in enumerate(base)).encode()
            import io

            await conn.copy_to_table(f"store_{name}", source=io.BytesIO(body))
        # Settled, as a table in use is: an autovacuum pass over 100,000 new
        # rows could otherwise run under the timed queries.
        await conn.execute(f"VACUUM ANALYZE store_{name}")
    await conn.close()


def _literal(name: str, v: np.ndarray) -> str:
    values = ",".join(f"{x:.8g}" for x in v.tolist())
    return f"[{values}]" if name == "vector" else f"{{{values}}}"


async def compare(
    data: Dataset, redis_url: str, dsn: str, index_prefix: str, rows: int, sample: int, probes: int
) -> list[dict[str, Any]]:
    """Each store's fetches, then queries through it at ``probes`` (the main
    table's default row, so the two compare)."""
    base = data.base[:rows]
    await fill_tables(dsn, base)
    memory = InMemoryStore()
    await memory.put(np.arange(rows), base)
    redis_store = RedisStore(redis_url, prefix="bench-vectors")
    await redis_store.drop()
    for start in range(0, rows, 20_000):
        await redis_store.put(np.arange(start, min(rows, start + 20_000)), base[start : start + 20_000])
    stores: dict[str, VectorStore] = {"InMemoryStore": memory, "RedisStore": redis_store}
    for name, column in (
        ("real", "real[]"),
        ("double", "double precision[]"),
        ("bytea", "bytea"),
        ("vector", "vector"),
    ):
        stores[f"PostgresStore {column}"] = PostgresStore(dsn, table=f"store_{name}", text_column="body")
    stores["SQLAlchemyStore (PG bytea)"] = SQLAlchemyStore(
        dsn.replace("postgresql://", "postgresql+asyncpg://"), table="store_bytea", text_column="body"
    )
    rng = np.random.default_rng(0)
    results = []
    for name, store in stores.items():
        row: dict[str, Any] = {"store": name}
        await store.fetch(np.arange(10))  # connect, inspect
        for count in (100, 1000, 5000):
            seconds = []
            for _ in range(15):
                ids = rng.choice(rows, min(count, rows), replace=False).astype(np.int64)
                started = time.perf_counter()
                await store.fetch(ids)
                seconds.append(time.perf_counter() - started)
            stats = percentiles(seconds)
            row[f"fetch{count}_p50_ms"], row[f"fetch{count}_p95_ms"] = stats["p50_ms"], stats["p95_ms"]
        if rows == len(data.base):
            async with LSHRS(
                dim=base.shape[1], redis_url=redis_url, prefix=index_prefix, store=store, probes=probes
            ) as lsh:

                async def call(query: np.ndarray) -> list[int]:
                    return [h.id for h in await lsh.query(query, top_k=10)]

                await lsh.warm()
                found, latency = await one_client(call, data.queries[:sample])
            row["query_p50_ms"], row["query_p95_ms"] = latency["p50_ms"], latency["p95_ms"]
            row["probes"], row["recall@10"] = probes, round(recall(found, data.truth[:sample], 10), 4)
        else:
            await store.close()
        print(
            f"  {name}: fetch 1000 p50 {row['fetch1000_p50_ms']} ms"
            + (f", query p50 {row['query_p50_ms']} ms, recall@10 {row['recall@10']}" if "query_p50_ms" in row else "")
        )
        results.append(row)
    return results
