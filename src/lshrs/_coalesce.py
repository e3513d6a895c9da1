"""Concurrent single queries, answered together.

A service calls ``query()`` from many tasks at once. Each call alone pays
fixed costs (numpy calls on one row, a store round trip, BLAS threads woken
for a matrix-vector product) that dwarf its share of the work; measured at
100k, 64 concurrent queries ran at the same rate whatever the buckets read.
Calls that arrive in the same event-loop turn are therefore sent on as one
``query_many``: one matrix product for all of them, one store round trip,
and each caller gets exactly the hits a lone call would.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from ._types import Hit

FloatArray = npt.NDArray[np.float32]
Search = Callable[[FloatArray, int, "float | None"], Awaitable[list[list[Hit]]]]

#: Queries sent on together at most: bounds a batch's store fetch and its
#: worst-case wait behind the others.
MAX_BATCH = 64


class Coalescer:
    """Collects ``(vector, top_k, top_p)`` requests and runs them in batches
    of equal ``top_k`` and ``top_p``, one batch per key per loop turn."""

    def __init__(self, search: Search) -> None:
        self._search = search
        self._pending: dict[tuple[int, float | None], list[tuple[FloatArray, asyncio.Future[list[Hit]]]]] = {}
        self._scheduled = False
        self._running: set[asyncio.Task[Any]] = set()

    async def query(self, vector: FloatArray, top_k: int, top_p: float | None) -> list[Hit]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Hit]] = loop.create_future()
        self._pending.setdefault((top_k, top_p), []).append((vector, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        for (top_k, top_p), requests in pending.items():
            for start in range(0, len(requests), MAX_BATCH):
                batch = [r for r in requests[start : start + MAX_BATCH] if not r[1].done()]  # a caller gave up
                if batch:
                    task = asyncio.ensure_future(self._answer(batch, top_k, top_p))
                    self._running.add(task)  # keep a reference until it ends
                    task.add_done_callback(self._running.discard)
                    for _, future in batch:
                        future.add_done_callback(functools.partial(_abandon, task, batch))

    async def _answer(
        self, batch: list[tuple[FloatArray, asyncio.Future[list[Hit]]]], top_k: int, top_p: float | None
    ) -> None:
        try:
            results = await self._search(np.stack([vector for vector, _ in batch]), top_k, top_p)
        except Exception as exc:  # every caller of the batch sees the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:  # cancelled (the client is closing): so are its callers
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), hits in zip(batch, results):
            if not future.done():
                future.set_result(hits)


def _abandon(task: asyncio.Task[Any], batch: list[tuple[FloatArray, asyncio.Future[list[Hit]]]], _: object) -> None:
    """Stop a batch whose callers all gave up (their deadlines passed): under
    overload, finishing work nobody waits for would starve the calls that
    still can be served."""
    if not task.done() and all(future.done() for _, future in batch):
        task.cancel()
