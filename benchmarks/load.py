"""Load: many concurrent queries plus a stream of inserts and deletes on one event
loop against a 100k index, for a fixed time; reports errors, latency and memory.

    nox -s load                       # 10,000 queries in flight for 60 s
    python -m benchmarks.load --seconds 10 --concurrency 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lshrs import LSHRS
from lshrs.adapters import InMemoryStore
from servers import redis_server

from .datasets import load
from .measure import percentiles


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def run(url: str, seconds: float, concurrency: int, grace: float) -> dict[str, Any]:
    data = load("minilm", 100_000, 1000)
    async with LSHRS(dim=384, redis_url=url, prefix="load", store=InMemoryStore(), expected_size=100_000) as lsh:
        await lsh.drop()
        await lsh.index(np.arange(100_000), data.base)
        await lsh.warm()  # as a service does at start-up
        deadline = time.monotonic() + seconds
        latencies: list[float] = []
        errors: list[str] = []
        writes = 0
        rss_after_build = rss_mb()

        async def reader(k: int) -> None:
            i = k
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    await lsh.query(data.queries[i % len(data.queries)], top_k=10)
                    latencies.append(time.perf_counter() - started)
                except Exception as exc:  # counted, not hidden: the report shows them
                    errors.append(repr(exc))
                i += concurrency

        async def writer() -> None:
            nonlocal writes
            rng = np.random.default_rng(1)
            next_id = 100_000
            while time.monotonic() < deadline:
                try:
                    await lsh.ingest(next_id, data.base[rng.integers(100_000)])
                    await lsh.delete([int(rng.integers(next_id))])
                    writes += 2
                except Exception as exc:
                    errors.append(repr(exc))
                next_id += 1

        # Readers start no query after the deadline; what is still queued then
        # gets ``grace`` seconds and is cancelled (safe: queries write nothing),
        # so the run is bounded in time whatever the server's speed.
        started = time.monotonic()
        tasks = [asyncio.create_task(reader(k)) for k in range(concurrency)] + [asyncio.create_task(writer())]
        _, unfinished = await asyncio.wait(tasks, timeout=seconds + grace)
        elapsed = time.monotonic() - started
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        return {
            "concurrency": concurrency,
            "seconds": seconds,
            "queries": len(latencies),
            "elapsed_s": round(elapsed, 1),
            "qps": round(len(latencies) / elapsed, 1),  # the grace period included
            **percentiles(latencies or [0.0]),
            "cancelled_at_end": len(unfinished),
            "writes": writes,
            "errors": len(errors),
            "first_errors": errors[:5],
            "rss_mb_after_build": round(rss_after_build),
            "rss_mb_peak": round(rss_mb()),
            "vectors_at_end": await lsh.count(),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=10_000)
    parser.add_argument("--grace", type=float, default=30, help="seconds for queued queries after the deadline")
    args = parser.parse_args()
    with redis_server("--appendonly", "no") as server:
        result = asyncio.run(run(server.url, args.seconds, args.concurrency, args.grace))
    out = Path(__file__).parent / "results" / f"load-{args.concurrency}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
