"""Filtered queries: which candidates may be hits.

Two kinds of ``where=``. An id filter (a set of ids, or a callable that
takes an id array and returns a boolean mask) is applied by lshrs, so it
works with any store or none. A store filter (a SQL condition for
``PostgresStore``, a SQLAlchemy expression for ``SQLAlchemyStore``) is
evaluated by the store, on candidate ids, with bound parameters.

A filter that few rows pass and that can list them (a set of ids, or a
store that asks its planner) is answered exactly from those rows
(:func:`few_enough`). Otherwise candidates are checked nearest first by
sketch distance, a chunk at a time (:class:`Checks`), until as many pass as
the rerank takes, so a store is asked about a few hundred ids rather than
every candidate. Post-filtering an approximate index loses results when few
rows pass, because a query's nearest passing rows lie farther out; so a
filtered query reads more buckets (:func:`widening`) until no new
candidates come in or it reaches ``MAX_WIDEN`` (pgvector 0.8 added
iterative index scans for the same reason).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import numpy.typing as npt

from ._family import Distances
from ._index import Candidates
from ._types import Rows, VectorStore

IdArray = npt.NDArray[np.int64]

#: A filter that at most this many times the rerank depth of rows pass is
#: answered exactly from those rows (:func:`few_enough`), not from the index.
PREFILTER_DEPTHS = 8

#: Each round of a filtered query that lacks hits reads at least this many times more.
WIDEN = 4
#: A filtered query widens at most this many times its first reading.
MAX_WIDEN = 256.0


def widening(checked: int, passed: int, exhausted: bool, scale: float, top_k: int) -> float:
    """How many times its first probes a filtered query should read, now
    that ``passed`` of the ``checked`` candidates it read at ``scale`` passed
    (``exhausted``: every candidate was checked).

    A filter that keeps a share s of the rows puts a query's nearest passing
    rows among its nearest 1/s rows; like a larger ``top_k``, those take
    about sqrt(1/s) times the buckets, not 1/s (recall@100 at sqrt(10) times
    the probes matches recall@10). The scale is rounded up to a power of
    sqrt(2), so a batch's queries share rounds. Fewer than ``top_k`` passing
    among all it read: at least ``WIDEN`` times more."""
    if not checked:
        return scale
    share = (passed + 1) / (checked + 1)  # none passed yet: a share below one in ``checked``
    wider = float(2.0 ** (math.ceil(2 * math.log2(math.sqrt(1 / share))) / 2))
    if exhausted and passed < top_k:
        wider = max(wider, scale * WIDEN)
    return min(MAX_WIDEN, max(scale, wider))


class Checks:
    """One filtered query's candidates, nearest first by sketch distance, and
    what the filter said of each so far.

    Ids are asked about a whole distance level at a time, so once ``depth``
    have passed, the nearest ``depth`` passing candidates (ties to the smaller
    id, as the ranking breaks them) are known, whatever order Redis returned
    the ids in; a query is answered the same from run to run."""

    def __init__(self, candidates: Candidates, distance: Distances, before: Checks | None) -> None:
        # Ties to the smaller id: candidates come in bucket order, which
        # within a bucket is the order writes reached Redis.
        self._order = np.lexsort((candidates.ids, distance))
        self.candidates = candidates
        self.ids = candidates.ids[self._order]
        self._distance = distance[self._order]
        self._verdict = np.full(len(self.ids), -1, np.int8)  # -1 not asked, 0 failed, 1 passed
        if before is not None:  # a wider read of the same query: keep what was asked
            known = before._verdict >= 0
            asked, verdict = before.ids[known], before._verdict[known]
            by_id = np.argsort(asked)
            asked, verdict = asked[by_id], verdict[by_id]
            if len(asked):
                at = np.minimum(np.searchsorted(asked, self.ids), len(asked) - 1)
                hit = asked[at] == self.ids
                self._verdict[hit] = verdict[at[hit]]

    def next(self, depth: int) -> npt.NDArray[np.intp]:
        """Positions to ask about next: none once ``depth`` passed, else as many
        not yet asked as should make up the rest at the share seen so far, and
        a quarter more, to the end of the last one's distance level."""
        passed = int(np.count_nonzero(self._verdict == 1))
        unasked = np.flatnonzero(self._verdict < 0)
        if passed >= depth or not len(unasked):
            return unasked[:0]
        asked = len(self.ids) - len(unasked)
        share = (passed + 1) / (asked + 1) if asked else 1.0
        last = unasked[min(len(unasked), math.ceil(1.25 * (depth - passed) / share)) - 1]
        level_end = int(np.searchsorted(self._distance, self._distance[last], side="right"))
        return unasked[: int(np.searchsorted(unasked, level_end))]

    def answer(self, positions: npt.NDArray[np.intp], passing: IdArray) -> None:
        self._verdict[positions] = np.isin(self.ids[positions], passing)

    def counts(self) -> tuple[int, int, bool]:
        """How many candidates were asked about, how many passed, and whether all were asked."""
        asked = int(np.count_nonzero(self._verdict >= 0))
        return asked, int(np.count_nonzero(self._verdict == 1)), asked == len(self.ids)

    def passed(self) -> Candidates:
        return self.candidates.only(self._order[self._verdict == 1])


async def few_enough(where: object, store: VectorStore, most: int) -> Rows | None:
    """The rows that pass ``where`` when at most ``most`` do and that is known
    without reading the others: a set of ids, or a store that asks its
    planner (``PostgresStore.passing_rows``). So selective a filter is
    answered exactly from them; widening would read most of the index to
    find as many (at 0.5% of 100k rows, 70 ms for recall@10 0.986)."""
    if isinstance(where, (set, frozenset)):
        if len(where) > most:
            return None
        return await store.fetch(np.sort(_id_array(where)))
    reader = getattr(store, "passing_rows", None)
    if callable(where) or reader is None:
        return None
    rows: Rows | None = await reader(where, most)
    return rows


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
    return np.isin(ids, _id_array(where))


def _id_array(ids: Collection[int]) -> IdArray:
    return np.fromiter((int(i) for i in ids), dtype=np.int64, count=len(ids))


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
