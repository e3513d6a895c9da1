"""Timing helpers: latency percentiles for one client, QPS for many tasks on one loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np


def recall(found: Sequence[Sequence[int]], truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    ms = 1000 * np.asarray(seconds)
    return {f"p{p}_ms": round(float(np.percentile(ms, p)), 3) for p in (50, 95, 99)}


async def one_client(
    call: Callable[[Any], Awaitable[list[int]]], queries: np.ndarray
) -> tuple[list[list[int]], dict[str, float]]:
    """Queries one after another: latency as a user of one request sees it."""
    results, seconds = [], []
    for query in queries:
        started = time.perf_counter()
        results.append(await call(query))
        seconds.append(time.perf_counter() - started)
    return results, percentiles(seconds)


async def concurrent_qps(call: Callable[[Any], Awaitable[list[int]]], queries: np.ndarray, tasks: int = 64) -> float:
    """``tasks`` coroutines on one event loop sharing the query list."""
    position = 0

    async def worker() -> None:
        nonlocal position
        while position < len(queries):
            query = queries[position]
            position += 1
            await call(query)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return round(len(queries) / (time.perf_counter() - started), 1)


def sync_latency(
    call: Callable[[np.ndarray], list[int]], queries: np.ndarray
) -> tuple[list[list[int]], dict[str, float]]:
    results, seconds = [], []
    for query in queries:
        started = time.perf_counter()
        results.append(call(query))
        seconds.append(time.perf_counter() - started)
    return results, percentiles(seconds)
