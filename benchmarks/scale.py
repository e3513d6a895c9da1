"""The Wikipedia-scale run: stream a GENERATED corpus into the index batch by
batch, then measure the default configuration's recall, candidate share,
latency and QPS against exact truth.

A 6.4M x 384 float32 corpus (9.8 GB) beside its 6 GB index does not leave
room on a 24 GB machine for the other systems or for a float32 copy, so the
rerank store here keeps the vectors as float16 (4.9 GB), and the truth is
exact brute force over those same float16 vectors: the recall measures the
index, not float16 rounding.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import numpy.typing as npt

from lshrs import LSHRS, Rows

from .datasets import _real, exact_top, generate
from .systems import redis_memory, share_curve, timed_point


class HalfStore:
    """A read-only ``VectorStore`` over a float16 matrix whose ids are row numbers."""

    def __init__(self, size: int, dim: int) -> None:
        self.vectors = np.empty((size, dim), np.float16)

    async def dimension(self) -> int | None:
        return int(self.vectors.shape[1])

    async def fetch(self, ids: npt.NDArray[np.int64]) -> Rows:
        ids = ids[(ids >= 0) & (ids < len(self.vectors))]
        return Rows(ids, self.vectors[ids].astype(np.float32))

    async def batches(self, batch_size: int) -> AsyncIterator[Rows]:
        for start in range(0, len(self.vectors), batch_size):
            stop = min(start + batch_size, len(self.vectors))
            yield Rows(np.arange(start, stop), self.vectors[start:stop].astype(np.float32))

    async def count(self) -> int | None:
        return len(self.vectors)

    async def sample(self, count: int) -> Rows:
        """Random rows, so a learned index trains on all of the corpus."""
        at = np.sort(np.random.default_rng(0).choice(len(self.vectors), min(count, len(self.vectors)), replace=False))
        return Rows(at, self.vectors[at].astype(np.float32))

    async def close(self) -> None:
        pass


async def scale_run(url: str, size: int, sample: int, batch: int = 100_000) -> dict[str, Any]:
    real, held_out, _ = _real("minilm-100k")
    queries = held_out[:sample]
    store = HalfStore(size, real.shape[1])
    t = time.perf_counter()
    for start in range(0, size, batch):
        store.vectors[start : start + batch] = generate(real, min(batch, size - start), start=start)
    generating = time.perf_counter() - t
    print(f"  generated {size:,} vectors in {generating:.0f} s")
    async with LSHRS(dim=real.shape[1], redis_url=url, prefix="scale", store=store, expected_size=size) as lsh:
        await lsh.drop()
    before = await redis_memory(url)
    last = [time.perf_counter()]

    def progress(done: int, total: int | None) -> None:
        if time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            print(f"  {done:,} of {total:,} vectors in {last[0] - started:.0f} s")

    options: dict[str, Any] = {"expected_size": size, "signature_cache": 0, "batch_size": batch}
    async with LSHRS(dim=real.shape[1], redis_url=url, prefix="scale", store=store, **options) as lsh:
        started = time.perf_counter()
        await lsh.index(progress=progress)  # streamed from the store; a learned index trains on its sample first
        seconds = time.perf_counter() - started
        config = lsh.config
        stats = await lsh.stats()
    memory = await redis_memory(url) - before
    build = {
        "system": "lshrs",
        "bands": config.num_bands,
        "rows": config.rows_per_band,
        "hashing": config.hashing,
        "shape": f"kmeans K={stats['partition_buckets']}" if config.hashing == "kmeans" else None,
        "buckets": stats.get("partition_buckets"),
        "largest_bucket": stats["largest_bucket"],
        "build_s": round(seconds, 1),
        "generator_s": round(generating, 1),
        "vectors_per_s": round(size / seconds),
        "redis_bytes_per_vector": round(memory / size, 1),
        "redis_gb": round(memory / 2**30, 2),
    }
    print(f"  built {config.hashing} in {seconds:.0f} s, {memory / size:.0f} B/vector")
    truth = exact_top(store.vectors, queries)
    print("  exact top-100 of the held-out queries computed")
    points = []
    # The signature cache holds the whole index (about 0.9 GB in the client at
    # 6.4M): a service at this size should size signature_cache the same way.
    cache = {"signature_cache": size, "timeout": 300}
    async with LSHRS(dim=real.shape[1], redis_url=url, prefix="scale", store=store, **cache) as lsh:
        default = (await lsh._ready()).probes or 1
        await lsh.warm()
        t = time.perf_counter()
        curve = await lsh.tune(0.98, queries=queries[:200], save=False)
        build["share_curve_s"] = round(time.perf_counter() - t, 1)
        build["share_curve"] = share_curve(curve, size)
        for c in build["share_curve"]:
            print(f"    probes={c['probes']}: recall@10 {c['recall@10']}, candidate share {c['share']:.3%}")
    # The default, half and twice it, each given as probes=.
    for probes in (default // 2, default, 2 * default):
        async with LSHRS(dim=real.shape[1], redis_url=url, prefix="scale", store=store, probes=probes, **cache) as lsh:
            setting = f"{config.hashing} K={build['buckets']}, probes={probes}"
            points.append(await timed_point(lsh, setting, queries, truth))
    return {
        "dataset": f"minilm-generated-{size} (GENERATED from minilm embeddings, n={size:,}; float16 store)",
        "generated": True,
        "size": size,
        "queries": len(queries),
        "points": points,
        "builds": [build],
    }
