"""Filtered search: recall@10 against exact filtered search, and latency, with
50%, 10% and 1% of the rows passing; lshrs (``PostgresStore``, ``where=``)
side by side with pgvector HNSW without and with iterative index scans
(``hnsw.iterative_scan``, pgvector 0.8), on the same PostgreSQL table.

    nox -s filters                                   # minilm, 100k rows, 300 queries
    python -m benchmarks.filters --size 20k --queries 100

The filter column ``tag`` is derived from each row's text: its length modulo
100, so ``tag < 50``, ``tag < 10`` and ``tag < 1`` keep about 50%, 10% and 1%
of the rows. It has nothing to do with the text's meaning, which is the hard
case for an approximate index: a query's nearest passing rows are no nearer
to it than its nearest rows are.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lshrs import LSHRS
from lshrs.adapters import PostgresStore
from servers import postgres, redis_server

from .datasets import Dataset, load
from .measure import one_client, recall
from .report import arguments, finish, save, stem, subplots
from .systems import _vector_codec

THRESHOLDS = (50, 10, 1)


def exact_filtered(data: Dataset, passing: np.ndarray, k: int = 10) -> np.ndarray:
    unit = data.base / np.linalg.norm(data.base, axis=1, keepdims=True)
    ids = np.flatnonzero(passing)
    queries = data.queries / np.linalg.norm(data.queries, axis=1, keepdims=True)
    scores = queries @ unit[ids].T
    return ids[np.argsort(-scores, axis=1)[:, :k]]


async def run(size: int, queries: int) -> dict[str, Any]:
    import asyncpg

    data = load("minilm", size, queries)
    assert data.texts is not None, "the filter column is derived from the texts"
    tags = np.array([len(text) % 100 for text in data.texts], dtype=np.int64)
    points: list[dict[str, Any]] = []
    with postgres() as pg, redis_server() as redis:
        conn = await asyncpg.connect(pg.url)
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        await conn.execute(
            f"CREATE TABLE passages (id bigint PRIMARY KEY, embedding vector({data.base.shape[1]}), tag int)"
        )
        await _vector_codec(conn)
        rows = ((i, vector, int(tag)) for i, (vector, tag) in enumerate(zip(data.base, tags)))
        await conn.copy_records_to_table("passages", records=rows)
        await conn.execute("CREATE INDEX ON passages (tag)")
        await conn.execute("SET maintenance_work_mem = '4GB'")
        started = time.perf_counter()
        await conn.execute(
            "CREATE INDEX ON passages USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
        )
        hnsw_build = time.perf_counter() - started
        await conn.execute("ANALYZE passages")
        await conn.close()
        print(f"  pgvector HNSW built in {hnsw_build:.1f} s", flush=True)

        store = PostgresStore(pg.url, table="passages")
        async with LSHRS(dim=data.base.shape[1], redis_url=redis.url, store=store) as lsh:
            started = time.perf_counter()
            await lsh.index()
            lshrs_build = time.perf_counter() - started
            print(f"  lshrs built in {lshrs_build:.1f} s", flush=True)
            await lsh.warm()  # as a service does at start-up, and as the other benchmarks measure
            for threshold in THRESHOLDS:
                passing = tags < threshold
                truth = exact_filtered(data, passing)
                share = round(float(passing.mean()), 4)

                async def lshrs_call(query: np.ndarray) -> list[int]:
                    return [h.id for h in await lsh.query(query, top_k=10, where=("tag < $1", threshold))]  # noqa: B023

                found, latency = await one_client(lshrs_call, data.queries)
                points.append(_point("lshrs, learned", "where=", share, found, truth, latency))
                for mode in ("off", "relaxed_order"):
                    settings = {"hnsw.ef_search": "40", "hnsw.iterative_scan": mode}
                    pool = await asyncpg.create_pool(
                        pg.url, min_size=1, max_size=2, init=_vector_codec, server_settings=settings
                    )

                    async def pg_call(query: np.ndarray) -> list[int]:
                        sql = "SELECT id FROM passages WHERE tag < $2 ORDER BY embedding <=> $1 LIMIT 10"
                        return [r[0] for r in await pool.fetch(sql, query, threshold)]  # noqa: B023

                    found, latency = await one_client(pg_call, data.queries)
                    await pool.close()
                    points.append(
                        _point("pgvector HNSW", f"ef_search=40, iterative_scan={mode}", share, found, truth, latency)
                    )
                for p in points[-3:]:
                    print(f"    {share:.0%} pass, {p['system']} {p['setting']}: recall@10 {p['recall@10']}, "
                          f"{p['mean_hits']} hits, p50 {p['p50_ms']} ms", flush=True)  # fmt: skip
    return {
        "command": " ".join(sys.argv),
        "dataset": data.name,
        "queries": len(data.queries),
        "builds": {
            "pgvector HNSW m=16, ef_construction=64": round(hnsw_build, 1),
            "lshrs learned": round(lshrs_build, 1),
        },
        "points": points,
    }


def _point(
    system: str, setting: str, share: float, found: list[list[int]], truth: np.ndarray, latency: dict[str, float]
) -> dict[str, Any]:
    return {
        "system": system,
        "setting": setting,
        "passing": share,
        "recall@10": round(recall(found, truth, 10), 4),
        "mean_hits": round(float(np.mean([len(f) for f in found])), 2),
        **latency,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"Command: `{result['command']}`; {result['dataset']}, {result['queries']} real held-out queries, "
        "exact filtered search as ground truth; builds: "
        + ", ".join(f"{name} {seconds} s" for name, seconds in result["builds"].items()),
        "",
        "| rows passing | system | setting | recall@10 | hits returned (of 10) | p50 ms | p95 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        lines.append(
            f"| {p['passing']:.1%} | {p['system']} | {p['setting']} | {p['recall@10']:.3f} | {p['mean_hits']} | "
            f"{p['p50_ms']} | {p['p95_ms']} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    figure, (left, right) = subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(f"{p['system']} ({p['setting']})" for p in result["points"]):
        mine = [p for p in result["points"] if f"{p['system']} ({p['setting']})" == name]
        shares = [100 * p["passing"] for p in mine]
        left.plot(shares, [p["recall@10"] for p in mine], marker="o", label=name)
        right.plot(shares, [p["p50_ms"] for p in mine], marker="o", label=name)
    for axis, label in ((left, "recall@10"), (right, "p50 ms")):
        axis.set_xscale("log")
        axis.set_xlabel("% of rows passing the filter")
        axis.set_ylabel(label)
    left.legend(fontsize=7)
    figure.suptitle(f"filtered search, {result['dataset']}")
    finish(figure, path)


def main() -> None:
    args = arguments(__doc__, size=100_000, queries=300).parse_args()
    save(asyncio.run(run(args.size, args.queries)), stem(args, "filters"), table, plot)


if __name__ == "__main__":
    main()
