"""The errors lshrs raises besides ``ValueError``/``TypeError`` for bad input."""

from __future__ import annotations

import sys
from typing import Any

import anyio
from redis.exceptions import ConnectionError, OutOfMemoryError, RedisError

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


class Overloaded(TimeoutError):
    """Refused without waiting: ``max_inflight`` calls are running and the
    queue behind them is full, or the call would not finish within half its
    time left. A ``TimeoutError``, so one ``except TimeoutError`` handles late
    and refused calls alike; retry later or raise ``max_inflight``."""


class IndexMissing(RuntimeError):
    """The index this client opened is gone from Redis, or was replaced: the
    server restarted empty, was flushed, evicted its keys, or another client
    dropped it. lshrs does not quietly start a new empty index in its place;
    ``close()`` and rebuild (``index()``), or point the client at a Redis
    that kept its data."""


def lost_connection(exc: BaseException | None) -> ConnectionError | None:
    """A redis ``ConnectionError`` for an ``AttributeError``/``TypeError``
    raised inside redis-py's connection layer, else None.

    In a failover redis-py's cluster client closes every connection while
    other tasks still write on them (``ClusterDownError`` -> ``aclose()``), and
    those tasks fail with ``'NoneType' object has no attribute 'writelines'``.
    That is a lost connection; raised as one, callers handle a failover with
    one ``except redis.exceptions.RedisError``."""
    if not isinstance(exc, (AttributeError, TypeError)):
        return None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__") in _CONNECTION_MODULES:
            return ConnectionError(f"the Redis connection was closed under this call ({exc})")
        tb = tb.tb_next
    return None


_CONNECTION_MODULES = frozenset({"redis.asyncio.connection", "redis.connection"})


def cause_of(failed: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that failed a task group, type unchanged, so that ``except
    redis.ConnectionError`` catches a failed build; the other stages' errors
    (a stream closed under them) are its consequences."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [failed]
    while pending:
        error = pending.pop(0)
        if isinstance(error, BaseExceptionGroup):
            pending[:0] = error.exceptions
        else:
            leaves.append(error)
    consequences = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)
    return next((error for error in leaves if not isinstance(error, consequences)), leaves[0])


#: Redis's used memory and maxmemory in bytes, if it said.
Memory = tuple[int, int] | None


async def memory_in_use(client: Any) -> Memory:
    """Redis's ``used_memory`` and ``maxmemory``, summed over a cluster's
    nodes; None if the server will not say."""
    try:
        info = await client.info("memory")
    except RedisError:
        return None
    nodes = (
        [info] if "used_memory" in info else [v for v in info.values() if isinstance(v, dict) and "used_memory" in v]
    )
    if not nodes:
        return None
    return sum(int(n["used_memory"]) for n in nodes), sum(int(n.get("maxmemory", 0)) for n in nodes)


def out_of_memory(
    error: OutOfMemoryError, before: Memory, now: Memory, written: int, total: int | None
) -> OutOfMemoryError:
    """Redis's OOM refusal of a build's write, saying what the build needs:
    the memory its written rows took each, measured, times the rows to
    write. That is an upper bound: the first rows create most bucket and
    record keys, and a finished build compacts its buckets (2.2x what the
    whole build took, on a small learned build of 6,000 rows cut short). A
    batch is written whole or not at all, so the build resumes."""
    mb = 2**20
    what = f"Redis refused a write of this build: out of memory ({error})"
    if before is not None and now is not None and written:
        each = max(0, now[0] - before[0]) / written
        limit = f"maxmemory {now[1] / mb:,.1f} MB" if now[1] else "no maxmemory, so the machine's"
        rows = total if total is not None else written
        what += (
            f"; after {written:,} rows, the index took {each:,.0f} B a vector, so {rows:,} rows need at most about "
            f"{(before[0] + each * rows) / mb:,.1f} MB in all, against {limit}"
        )
    return OutOfMemoryError(what + ". Give Redis that memory, then index(resume=True) finishes the build.")
