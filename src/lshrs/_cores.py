"""A large batch of numpy work cut into parts, one worker thread a core.

Hashing a build's rows is many small matrix products: a coarse group's
centroids against the few rows that open it, a code slice's 256 centroids
against 12-wide slices. OpenBLAS spreads each product over its own threads,
which gains little on products that small and spins the cores the event
loop and Redis need. So a large batch is cut into one part a core, each run
in a worker thread with BLAS held to one thread while any such batch runs.
Hashing 1M rows in blocks of 65,536 beside their writes to Redis (2 cores):
17.8 s in two parts, 24.7 s in one with OpenBLAS's own threads.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import numpy.typing as npt
from threadpoolctl import ThreadpoolController

from ._errors import cause_of

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

#: Rows a part holds, at least: below it, a thread hop costs more than it saves.
_PART_ROWS = 4096
#: Parts a batch is cut into, at most (measured on 2 cores only).
_MOST_PARTS = 4


class _OneBlasThread(threading.local):
    """The BLAS thread limit, held while any batch runs in parts. The limit is
    process-wide, and threadpoolctl lets only the thread that set it lift
    it, so each event-loop thread counts its own holders: its first sets
    the limit, its last lifts it, and overlapping builds never leave the
    process at one thread."""

    holders = 0
    limit: contextlib.ExitStack | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        if self.holders == 0:
            self.limit = contextlib.ExitStack()
            self.limit.enter_context(_controller().limit(limits=1, user_api="blas"))
        self.holders += 1
        try:
            yield
        finally:
            self.holders -= 1
            if self.holders == 0 and self.limit is not None:
                self.limit.close()
                self.limit = None


@functools.cache
def _controller() -> ThreadpoolController:
    """Built once, on first use: it sees the BLAS libraries loaded by then (numpy's)."""
    return ThreadpoolController()


_ONE_BLAS_THREAD = _OneBlasThread()


def parts_for(rows: int) -> int:
    """How many parts ``rows`` are cut into on this machine."""
    return max(1, min(_MOST_PARTS, os.cpu_count() or 1, rows // _PART_ROWS))


async def in_parts(work: Callable[[Any], npt.NDArray[Any]], rows: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``work(rows)``, run on consecutive parts of ``rows`` in worker threads
    and joined in order; ``work`` must treat each row on its own."""
    parts = parts_for(len(rows))
    if parts == 1:
        return await anyio.to_thread.run_sync(work, rows)
    pieces = np.array_split(rows, parts)
    done: list[npt.NDArray[Any]] = [np.empty(0)] * parts

    async def run(part: int) -> None:
        done[part] = await anyio.to_thread.run_sync(work, pieces[part])

    # A cancelled caller still waits for its threads (to_thread does not
    # abandon them), so the limit is lifted only once no part runs.
    try:
        with _ONE_BLAS_THREAD.held():
            async with anyio.create_task_group() as group:
                for part in range(parts):
                    group.start_soon(run, part)
    except BaseExceptionGroup as failed:  # the error as ``work`` raised it, not wrapped
        raise cause_of(failed) from None
    return np.concatenate(done)
