"""Filtered queries: which candidates may be hits.

Two kinds of ``where=``. An id filter (a set of ids, or a callable that
takes an id array and returns a boolean mask) is applied by lshrs to the
candidates read from Redis, before they are ranked, so it works with any
store or none. A store filter (a SQL condition for ``PostgresStore``, a
SQLAlchemy expression for ``SQLAlchemyStore``) is evaluated by the store on
the rows it fetches for the rerank, with bound parameters.

Candidates that fail the filter are dropped before the sketch ranking (a
store's condition is evaluated in one id-only round trip), so the rerank
depth goes to rows that pass. Post-filtering an approximate index still
loses results when few rows pass, because a query's nearest passing rows lie
farther out; so a filtered query reads more buckets, at most ``WIDEN`` times
more a round, until as many of its candidates pass as an unfiltered query
reads, no new candidates come in, or it reaches ``MAX_WIDEN`` (pgvector 0.8
added iterative index scans for the same reason).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import numpy.typing as npt

from ._types import VectorStore

IdArray = npt.NDArray[np.int64]

#: Each round of a filtered query that lacks hits reads this many times more.
WIDEN = 4
#: A filtered query widens at most this many times its first reading.
MAX_WIDEN = 256


def is_id_filter(where: object) -> bool:
    return callable(where) or isinstance(where, (set, frozenset))


def id_mask(where: Callable[[IdArray], Any] | Collection[int], ids: IdArray) -> npt.NDArray[np.bool_]:
    """Which ``ids`` pass an id filter."""
    if callable(where):
        mask = np.asarray(where(ids))
        if mask.dtype != np.bool_ or mask.shape != ids.shape:
            raise TypeError(
                f"a where= callable must return one bool per id (shape {ids.shape}), "
                f"got {mask.dtype} of shape {mask.shape}"
            )
        return mask
    allowed = np.fromiter((int(i) for i in where), dtype=np.int64, count=len(where))
    return np.isin(ids, allowed)


async def check(where: object, store: VectorStore | None) -> None:
    """Refuse a filter nothing can evaluate, before any Redis work."""
    if where is None or is_id_filter(where):
        return
    checker = getattr(store, "check_where", None)
    if checker is None:
        kind = "no store" if store is None else type(store).__name__
        raise ValueError(
            f"where={where!r} needs a store that evaluates conditions ({kind} does not): "
            "pass a set of ids or a callable(ids) -> bool mask, which lshrs applies itself"
        )
    await checker(where)
