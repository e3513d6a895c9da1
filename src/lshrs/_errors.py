"""The errors lshrs raises besides ``ValueError``/``TypeError`` for bad input."""

from __future__ import annotations


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
