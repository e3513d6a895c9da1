"""The systems compared, each measured the same way on the same vectors:
lshrs (a sweep of its knobs), numpy exact search, faiss IndexLSH and
IndexHNSWFlat, and pgvector HNSW in a real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from lshrs import LSHRS, Tuning
from lshrs._family import LearnedFamily
from lshrs.adapters import InMemoryStore

from .datasets import Dataset
from .measure import concurrent_qps, one_client, recall, sync_latency
from .processes import processes_qps


def point(
    system: str,
    setting: str,
    found: list[list[int]],
    truth: np.ndarray,
    latency: dict[str, float],
    qps: float,
    **extra: Any,
) -> dict[str, Any]:
    row = {"system": system, "setting": setting, "recall@10": round(recall(found, truth, 10), 4)}
    if all(len(f) >= 100 for f in found):
        row["recall@100"] = round(recall(found, truth, 100), 4)
    return {**row, **latency, "qps64": qps, **extra}


async def redis_memory(url: str) -> int:
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    used = int((await client.info("memory"))["used_memory"])
    await client.aclose()
    return used


async def lshrs_runs(
    data: Dataset,
    url: str,
    structures: list[tuple[int | None, int | None]],
    probe_factors: list[float],
    reranks: list[int],
    sample: int,
    hyperplanes: bool = True,
    processes: int = 2,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Build one learned index and one hyperplane index per (bands, rows)
    structure, then sweep the query-time knobs of each. Each setting of the
    learned index is also served by ``processes`` client processes
    (``processes.py``)."""
    points, builds = [], []
    store = InMemoryStore()
    await store.put(np.arange(len(data.base)), data.base)
    queries, truth = data.queries[:sample], data.truth[:sample]
    for bands, rows in [("kmeans", None), *(structures if hyperplanes else [])]:
        prefix = f"bench-{bands}-{rows}"
        options: dict[str, Any] = {"hashing": "kmeans"}
        if bands != "kmeans":
            options = {"hashing": "hyperplane", "expected_size": len(data.base)}
            options.update({k: v for k, v in (("num_bands", bands), ("rows_per_band", rows)) if v is not None})
        async with LSHRS(dim=data.base.shape[1], redis_url=url, prefix=prefix, **options) as lsh:
            await lsh.drop()  # the next call opens the prefix afresh
            before = await redis_memory(url)
            started = time.perf_counter()
            await lsh.index(np.arange(len(data.base)), data.base)  # one call: a learned index sizes itself from it
            seconds = time.perf_counter() - started
            config = lsh.config
            opened = await lsh._ready()
            family = opened.family
            default = opened.probes
            assert family is not None and default is not None
            shape = _shape(family)
        memory = await redis_memory(url) - before
        builds.append(
            {
                "hashing": config.hashing,
                "shape": shape,
                "bands": config.num_bands,
                "rows": config.rows_per_band,
                "build_s": round(seconds, 2),
                "vectors_per_s": round(len(data.base) / seconds),
                "redis_bytes_per_vector": round(memory / len(data.base), 1),
                "default_probes": default,
            }
        )
        print(f"  lshrs {shape}: built in {seconds:.1f} s, {memory / len(data.base):.0f} B/vector")
        async with LSHRS(dim=data.base.shape[1], redis_url=url, prefix=prefix, store=store) as lsh:
            started = time.perf_counter()
            tuning = await lsh.tune(0.95)
            builds[-1]["tune_s"] = round(time.perf_counter() - started, 1)
            builds[-1]["tuned_probes"] = tuning.probes
            print(
                f"    tune(0.95): probes={tuning.probes}, sample recall {tuning.recall:.3f}, {builds[-1]['tune_s']} s"
            )
            # The recall / candidate-share curve on real held-out queries, up to 0.98.
            curve = await lsh.tune(0.98, queries=queries[:200], save=False)
            builds[-1]["share_curve"] = share_curve(curve, len(data.base))
        if config.hashing == "kmeans":  # factors of the default: buckets are not bands
            ladder = {max(1, int(default * factor / 16)): "" for factor in probe_factors}
        else:
            ladder = {int(factor * config.num_bands): "" for factor in probe_factors}
        ladder[default] = " (default)"
        ladder[tuning.probes] = ladder.get(tuning.probes, "") + " (tune 0.95)"
        for probes, label in sorted(ladder.items()):
            for rerank in reranks:
                async with LSHRS(
                    dim=data.base.shape[1],
                    redis_url=url,
                    prefix=prefix,
                    store=store,
                    probes=probes,
                    rerank=rerank or None,
                    timeout=120,  # 64 queued queries wait on one Redis core: queueing, not a fault
                ) as lsh:
                    depth = rerank or f"{family.default_rerank(len(data.base))} (default)"
                    setting = f"{shape}, probes={probes}{label}, rerank={depth}"
                    points.append(await timed_point(lsh, setting, queries, truth))
                if config.hashing == "kmeans" and processes > 1:
                    options = {"probes": probes, "rerank": rerank or None}
                    qps = await asyncio.to_thread(processes_qps, url, prefix, data.base, queries, options, processes)
                    points[-1].update(processes=processes, qps64_processes=qps)
                    print(f"    {setting}, {processes} client processes: {qps} QPS")
    return points, builds


def _shape(family: Any) -> str:
    """How a family reads in a table: ``kmeans K=6246`` or ``48x12``."""
    if isinstance(family, LearnedFamily):
        return f"kmeans K={family.partition.buckets}" + (", spilled" if family.tables == 2 else "")
    return f"{family.bands.num_bands}x{family.bands.rows}"


def share_curve(tuning: Tuning, size: int) -> list[dict[str, Any]]:
    """The ladder ``tune()`` measured, as report rows: recall@10 against the
    share of the corpus read as candidates per query."""
    return [
        {"probes": c.probes, "recall@10": round(c.recall, 4), "share": round(c.candidates / size, 5)}
        for c in tuning.curve
    ]


async def timed_point(lsh: LSHRS, setting: str, queries: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """One lshrs setting measured as every system is: a warm cache (as a
    long-running service's would be), one client's latency, QPS of 64 tasks."""
    await lsh.warm()

    async def call(query: np.ndarray) -> list[int]:
        return [h.id for h in await lsh.query(query, top_k=10)]

    # Timed as users ask (top 10); a query for 100 reads more buckets and
    # reranks deeper, so recall@100 is measured by its own pass.
    found, latency = await one_client(call, queries)
    qps = await concurrent_qps(call, queries)
    row = point("lshrs", setting, found, truth, latency, qps)
    hundred = await lsh.query_many(queries, top_k=100)
    row["recall@100"] = round(recall([[h.id for h in hits] for hits in hundred], truth, 100), 4)
    print(f"    {setting}: recall@10 {row['recall@10']}, p50 {latency['p50_ms']} ms, {qps} QPS")
    return row


def numpy_exact(data: Dataset, sample: int) -> dict[str, Any]:
    base = data.base

    def call(query: np.ndarray) -> list[int]:
        scores = base @ query
        top = np.argpartition(-scores, 10)[:10]
        return top[np.argsort(-scores[top])].tolist()

    found, latency = sync_latency(call, data.queries[:sample])
    started = time.perf_counter()
    batch = data.queries[:sample]
    for start in range(0, len(batch), 64):
        np.argpartition(-(batch[start : start + 64] @ base.T), 100, axis=1)
    qps = round(len(batch) / (time.perf_counter() - started), 1)
    return point("numpy exact", "brute force, batches of 64", found, data.truth[:sample], latency, qps)


def faiss_runs(data: Dataset, sample: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import faiss

    d = data.base.shape[1]
    points, builds = [], []
    queries, truth = data.queries[:sample], data.truth[:sample]

    def measure(index: Any, name: str, setting: str) -> None:
        def call(query: np.ndarray) -> list[int]:
            return index.search(query[None], 10)[1][0].tolist()  # type: ignore[no-any-return]

        found, latency = sync_latency(call, queries)
        started = time.perf_counter()
        for start in range(0, len(queries), 64):
            index.search(queries[start : start + 64], 10)
        qps = round(len(queries) / (time.perf_counter() - started), 1)
        hundred = index.search(queries, 100)[1].tolist()  # untimed: recall@100 only
        points.append(
            point(name, setting, found, truth, latency, qps, **{"recall@100": round(recall(hundred, truth, 100), 4)})
        )
        print(f"    {name} {setting}: recall@10 {points[-1]['recall@10']}, p50 {latency['p50_ms']} ms, {qps} QPS")

    for nbits in (512, 1024):
        started = time.perf_counter()
        lsh = faiss.IndexLSH(d, nbits)
        refine = faiss.IndexRefineFlat(lsh)  # exact rerank of the Hamming shortlist: IndexLSH's best use
        refine.add(data.base)
        builds.append(
            {
                "system": "faiss IndexLSH",
                "setting": f"nbits={nbits}",
                "build_s": round(time.perf_counter() - started, 2),
            }
        )
        for k_factor in (4, 16):
            params = faiss.IndexRefineSearchParameters(k_factor=k_factor)
            measure(_WithParams(refine, params), "faiss IndexLSH+refine", f"nbits={nbits}, k_factor={k_factor}")
    # IVFFlat: the closest in-process relative of lshrs's learned buckets,
    # with the same K (16 vectors a list) and probes around lshrs's default,
    # up to 8,192 lists: training 62,500 lists at 1M would take about an hour
    # on two cores.
    lists = max(1, min(len(data.base) // 16, 8192))
    started = time.perf_counter()
    quantizer = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).choice(len(data.base), min(len(data.base), 16 * lists), replace=False)
    ivf.train(data.base[sample])
    ivf.add(data.base)
    builds.append(
        {"system": "faiss IVFFlat", "setting": f"nlist={lists}", "build_s": round(time.perf_counter() - started, 2)}
    )
    for nprobe in sorted({max(1, round(f * lists**0.5)) for f in (1.25, 2.5, 5.0)}):
        ivf.nprobe = nprobe
        measure(ivf, "faiss IVFFlat", f"nlist={lists}, nprobe={nprobe}")
    started = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 100
    hnsw.add(data.base)
    builds.append(
        {
            "system": "faiss IndexHNSWFlat",
            "setting": "M=32, efConstruction=100",
            "build_s": round(time.perf_counter() - started, 2),
        }
    )
    for ef in (40, 100, 200):
        hnsw.hnsw.efSearch = ef
        measure(hnsw, "faiss HNSWFlat", f"M=32, efSearch={ef}")
    return points, builds


class _WithParams:
    def __init__(self, index: Any, params: Any) -> None:
        self.index, self.params = index, params

    def search(self, queries: np.ndarray, k: int) -> Any:
        return self.index.search(queries, k, params=self.params)


async def pgvector_runs(data: Dataset, dsn: str, sample: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import asyncpg

    d = data.base.shape[1]
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    await conn.execute("DROP TABLE IF EXISTS bench_hnsw")
    await conn.execute(f"CREATE TABLE bench_hnsw (id bigint PRIMARY KEY, embedding vector({d}))")
    await _vector_codec(conn)
    await conn.copy_records_to_table("bench_hnsw", records=((i, v) for i, v in enumerate(data.base)))
    await conn.execute("SET maintenance_work_mem = '4GB'")
    await conn.execute("SET max_parallel_maintenance_workers = 1")
    started = time.perf_counter()
    await conn.execute(
        "CREATE INDEX ON bench_hnsw USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
    )
    build_s = time.perf_counter() - started
    size = await conn.fetchval("SELECT pg_relation_size('bench_hnsw_embedding_idx')")
    await conn.close()
    builds = [
        {
            "system": "pgvector HNSW",
            "setting": "m=16, ef_construction=64",
            "build_s": round(build_s, 2),
            "index_bytes_per_vector": round(size / len(data.base), 1),
        }
    ]
    print(f"  pgvector HNSW built in {build_s:.1f} s, index {size / len(data.base):.0f} B/vector")
    points = []
    # 20: pgvector near recall 0.95, so lshrs's 0.95 settings have a peer at equal recall.
    for ef in (20, 40, 100, 200):
        pool = await asyncpg.create_pool(
            dsn, min_size=8, max_size=8, init=_vector_codec, server_settings={"hnsw.ef_search": str(ef)}
        )

        async def call(query: np.ndarray, limit: int = 10) -> list[int]:
            rows = await pool.fetch(f"SELECT id FROM bench_hnsw ORDER BY embedding <=> $1 LIMIT {limit}", query)  # noqa: B023
            return [r[0] for r in rows]

        found, latency = await one_client(call, data.queries[:sample])
        qps = await concurrent_qps(call, data.queries[:sample])
        extra = {}
        if ef >= 100:  # pgvector returns at most ef_search rows
            hundred = [await call(q, 100) for q in data.queries[:sample]]
            extra["recall@100"] = round(recall(hundred, data.truth[:sample], 100), 4)
        await pool.close()
        points.append(
            point("pgvector HNSW", f"m=16, ef_search={ef}", found, data.truth[:sample], latency, qps, **extra)
        )
        print(
            f"    pgvector ef_search={ef}: recall@10 {points[-1]['recall@10']}, p50 {latency['p50_ms']} ms, {qps} QPS"
        )
    return points, builds


async def _vector_codec(conn: Any) -> None:
    """pgvector's binary form: >HH (dim, 0) then big-endian float32."""

    def encode(v: np.ndarray) -> bytes:
        return len(v).to_bytes(2, "big") + b"\0\0" + np.asarray(v, ">f4").tobytes()

    def decode(b: bytes) -> np.ndarray:
        return np.frombuffer(b, ">f4", offset=4).astype(np.float32)

    await conn.set_type_codec("vector", schema="public", encoder=encode, decoder=decode, format="binary")
