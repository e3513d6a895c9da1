"""The Wikipedia-scale claim, measured: stream a GENERATED corpus into the index
batch by batch (never whole in memory) and report build time and Redis memory."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from lshrs import LSHRS

from .datasets import _real, generate
from .systems import redis_memory


async def streamed_build(url: str, size: int, batch: int = 100_000) -> dict[str, Any]:
    real, _, _ = _real("minilm-100k")
    async with LSHRS(dim=real.shape[1], redis_url=url, prefix="build", expected_size=size) as lsh:
        await lsh.drop()
    before = await redis_memory(url)
    async with LSHRS(dim=real.shape[1], redis_url=url, prefix="build", expected_size=size, signature_cache=0) as lsh:
        started = time.perf_counter()
        hashing = 0.0
        for start in range(0, size, batch):
            t = time.perf_counter()
            vectors = generate(real, min(batch, size - start), start=start)
            hashing += time.perf_counter() - t
            await lsh.index(np.arange(start, start + len(vectors)), vectors)
            if (start // batch) % 10 == 0:
                done = start + len(vectors)
                print(f"  {done:,} vectors in {time.perf_counter() - started:.0f} s")
        seconds = time.perf_counter() - started - hashing
        count = await lsh.count()
        config = lsh.config
    memory = await redis_memory(url) - before
    return {
        "dataset": f"GENERATED from minilm-100k, n={size:,}",
        "size": size,
        "count": count,
        "bands": config.num_bands,
        "rows": config.rows_per_band,
        "build_s": round(seconds, 1),
        "generator_s": round(hashing, 1),
        "vectors_per_s": round(size / seconds),
        "redis_bytes_per_vector": round(memory / size, 1),
        "redis_gb": round(memory / 2**30, 2),
    }
