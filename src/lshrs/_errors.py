"""The errors lshrs raises besides ``ValueError``/``TypeError`` for bad input."""

from __future__ import annotations

import sys

import anyio
from redis.exceptions import ConnectionError

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


class Overloaded(TimeoutError):
    """Refused without waiting: ``max_inflight`` calls are running and the
    queue behind them is full, or the wait for a slot would pass the call's deadline.
    A ``TimeoutError``, so one ``except TimeoutError`` handles late and refused
    calls alike; retry later or raise ``max_inflight``."""


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
