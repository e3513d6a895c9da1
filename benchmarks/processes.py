"""QPS of lshrs served by several client processes, as a Python service runs
on a multi-core machine (``uvicorn --workers N``, gunicorn).

One event loop answers with one core: the GIL serialises its numpy and
redis-py work, so 64 concurrent queries in one process leave the other
cores idle, while PostgreSQL spreads pgvector's queries over all of them.
Each worker process here opens its own client on the same prefix, with
the store's vectors of its own and BLAS held to one thread (OpenBLAS's
spinning threads would otherwise take the cores the other worker and Redis
need: measured ad hoc at 100k, two workers gave 540-630 QPS with them
against 960-1,090 without). The 64 concurrent queries are split evenly among the
workers, and QPS is every worker's queries over the span from the first
start to the last end; the median of three rounds is reported.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROUNDS = 3


def processes_qps(
    url: str, prefix: str, base: np.ndarray, queries: np.ndarray, options: dict[str, Any], processes: int = 2
) -> float:
    """Median QPS over ``ROUNDS`` rounds of ``processes`` workers, each with
    ``64 // processes`` concurrent tasks over all of ``queries``."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited loop or BLAS threads
    barrier, results = context.Barrier(processes), context.Queue()
    with tempfile.TemporaryDirectory(prefix="lshrs-bench-") as folder:
        np.save(Path(folder) / "base.npy", base)
        np.save(Path(folder) / "queries.npy", queries)
        saved = os.environ.get("OPENBLAS_NUM_THREADS")
        os.environ["OPENBLAS_NUM_THREADS"] = "1"  # read when the child imports numpy
        try:
            arguments = (url, prefix, folder, options, 64 // processes, barrier, results)
            # Daemons: a failed run ends with its parent instead of waiting on the barrier.
            workers = [context.Process(target=_worker, args=arguments, daemon=True) for _ in range(processes)]
            for worker in workers:
                worker.start()
        finally:
            if saved is None:
                del os.environ["OPENBLAS_NUM_THREADS"]
            else:
                os.environ["OPENBLAS_NUM_THREADS"] = saved
        spans = [results.get(timeout=600) for _ in range(processes * ROUNDS)]
        for worker in workers:
            worker.join()
            if worker.exitcode:
                raise RuntimeError(f"a benchmark worker exited with {worker.exitcode}")
    rounds = []
    for round_ in range(ROUNDS):
        mine = [span for span in spans if span[0] == round_]
        rounds.append(sum(span[3] for span in mine) / (max(span[2] for span in mine) - min(span[1] for span in mine)))
    return round(float(np.median(rounds)), 1)


def _worker(
    url: str, prefix: str, folder: str, options: dict[str, Any], tasks: int, barrier: Any, results: Any
) -> None:
    asyncio.run(_serve(url, prefix, folder, options, tasks, barrier, results))


async def _serve(
    url: str, prefix: str, folder: str, options: dict[str, Any], tasks: int, barrier: Any, results: Any
) -> None:
    from lshrs import LSHRS
    from lshrs.adapters import InMemoryStore

    from .measure import concurrent_qps

    base = np.load(Path(folder) / "base.npy", mmap_mode="r")
    queries = np.load(Path(folder) / "queries.npy")
    store = InMemoryStore()
    await store.put(np.arange(len(base)), np.asarray(base))
    async with LSHRS(dim=base.shape[1], redis_url=url, prefix=prefix, store=store, timeout=120, **options) as lsh:
        await lsh.warm()

        async def call(query: np.ndarray) -> list[int]:
            return [h.id for h in await lsh.query(query, top_k=10)]

        await concurrent_qps(call, queries, tasks)  # warm-up: connections, BLAS, caches
        for round_ in range(ROUNDS):
            await asyncio.to_thread(barrier.wait, 600)  # every worker starts the round together
            started = time.time()
            await concurrent_qps(call, queries, tasks)
            results.put((round_, started, time.time(), len(queries)))
