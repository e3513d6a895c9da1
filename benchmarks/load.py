"""Load: many concurrent queries plus a stream of inserts and deletes on one event
loop against a 100k index, for a fixed time. Reports served, refused and
timed-out calls, latency of served queries against one-at-a-time queries,
the longest call against its deadline, acknowledged writes missing at the
end, and memory.

    nox -s load                       # 10,000 queries in flight for 60 s, 1 s deadlines
    python -m benchmarks.load --seconds 10 --concurrency 1000 --timeout 0.5
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
from redis.asyncio import Redis

from conftest import index_state
from lshrs import LSHRS, Overloaded
from lshrs.adapters import InMemoryStore
from servers import redis_server

from .datasets import load
from .measure import percentiles


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def unloaded(lsh: LSHRS, queries: np.ndarray, count: int = 300) -> dict[str, float]:
    """Latency of one query at a time: the baseline served queries are held to."""
    latencies = []
    for i in range(count):
        started = time.perf_counter()
        await lsh.query(queries[i % len(queries)], top_k=10)
        latencies.append(time.perf_counter() - started)
    return percentiles(latencies)


async def run(url: str, seconds: float, concurrency: int, timeout: float, max_inflight: int) -> dict[str, Any]:
    data = load("minilm", 100_000, 1000)
    options = {"timeout": timeout, "max_inflight": max_inflight}
    async with LSHRS(dim=384, redis_url=url, prefix="load", store=InMemoryStore(), **options) as lsh:
        await lsh.drop()
        await lsh.index(np.arange(100_000), data.base)
        await lsh.warm()  # as a service does at start-up
        alone = await unloaded(lsh, data.queries)
        deadline = time.monotonic() + seconds
        served: list[float] = []
        refused: list[float] = []
        late: list[float] = []
        errors: list[str] = []
        ingested: set[int] = set()
        deleted: set[int] = set()
        rss_after_build = rss_mb()

        async def reader(k: int) -> None:
            i = k
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    await lsh.query(data.queries[i % len(data.queries)], top_k=10)
                    served.append(time.perf_counter() - started)
                except Overloaded:
                    refused.append(time.perf_counter() - started)
                    await asyncio.sleep(0.05)  # a refused client backs off, as behind a 503
                except TimeoutError:
                    late.append(time.perf_counter() - started)
                except Exception as exc:  # counted, not hidden: the report shows them
                    errors.append(repr(exc))
                i += concurrency

        async def writer() -> None:
            rng = np.random.default_rng(1)
            next_id = 100_000
            while time.monotonic() < deadline:
                try:
                    await lsh.ingest(next_id, data.base[rng.integers(100_000)])
                    ingested.add(next_id)
                    gone = int(rng.integers(next_id))
                    await lsh.delete([gone])
                    deleted.add(gone)
                except (Overloaded, TimeoutError):
                    await asyncio.sleep(0.05)
                except Exception as exc:
                    errors.append(repr(exc))
                next_id += 1

        started = time.monotonic()
        tasks = [asyncio.create_task(reader(k)) for k in range(concurrency)] + [asyncio.create_task(writer())]
        await asyncio.gather(*tasks)  # every call keeps its deadline, so this ends by seconds + timeout
        elapsed = time.monotonic() - started
        client = Redis.from_url(url)
        present = set(await index_state(client, lsh))
        await client.aclose()
        calls = served + late
        return {
            "concurrency": concurrency,
            "seconds": seconds,
            "timeout_s": timeout,
            "max_inflight": max_inflight,
            "elapsed_s": round(elapsed, 1),
            "served": len(served),
            "served_qps": round(len(served) / elapsed, 1),
            "refused": len(refused),
            "timed_out": len(late),
            "unloaded_ms": alone,
            "served_ms": percentiles(served or [0.0]),
            "p99_vs_unloaded": round(percentiles(served or [0.0])["p99_ms"] / alone["p99_ms"], 2),
            "refused_max_ms": round(1000 * max(refused, default=0.0), 2),
            "longest_call_s": round(max(calls, default=0.0), 3),
            "worst_overrun_ms": round(1000 * max(0.0, max(calls, default=0.0) - timeout), 1),
            "writes_acknowledged": len(ingested) + len(deleted),
            "acknowledged_ingests_missing": len((ingested - deleted) - present),
            "acknowledged_deletes_present": len(deleted & present),
            "errors": len(errors),
            "first_errors": errors[:5],
            "rss_mb_after_build": round(rss_after_build),
            "rss_mb_peak": round(rss_mb()),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=10_000)
    parser.add_argument("--timeout", type=float, default=1.0, help="each call's deadline, seconds")
    parser.add_argument("--max-inflight", type=int, default=64)
    args = parser.parse_args()
    with redis_server("--appendonly", "no") as server:
        result = asyncio.run(run(server.url, args.seconds, args.concurrency, args.timeout, args.max_inflight))
    out = Path(__file__).parent / "results" / f"load-{args.concurrency}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
