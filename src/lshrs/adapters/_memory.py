"""``InMemoryStore``: vectors in one numpy array, the embedded default and the
fastest baseline. lshrs owns it: index/ingest/delete keep it in step."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import numpy as np
import numpy.typing as npt

from .._types import Rows

#: Ids stay in the array map while the largest is below this many times the
#: rows held (or ``_DENSE_FLOOR``): 0..n-1 and database sequences with gaps.
_DENSE = 4
_DENSE_FLOOR = 65_536


class InMemoryStore:
    """Rows live in a growing float32 matrix; an id maps to its row."""

    def __init__(self) -> None:
        self._row_of: dict[int, int] = {}
        # The same map as an array indexed by id, while ids are dense enough
        # (None once one is not): a rerank's 512 lookups in a dict of 1M ids
        # took 0.85 ms of a 1M query, the array a few microseconds.
        self._row_at: npt.NDArray[np.int64] | None = np.empty(0, np.int64)
        self._ids = np.empty(0, dtype=np.int64)
        self._vectors: npt.NDArray[np.float32] | None = None
        self._texts: list[str | None] = []
        self._size = 0

    def __len__(self) -> int:
        return self._size

    async def dimension(self) -> int | None:
        """The dimension of the stored vectors; None while empty."""
        return None if self._vectors is None else self._vectors.shape[1]

    async def count(self) -> int:
        """How many vectors the store holds."""
        return self._size

    async def close(self) -> None:
        """Nothing to release; the data stays until the store is dropped."""

    def _grow(self, needed: int, dim: int) -> None:
        capacity = 0 if self._vectors is None else len(self._vectors)
        if needed <= capacity:
            return
        capacity = max(needed, 2 * capacity, 1024)
        vectors = np.empty((capacity, dim), dtype=np.float32)
        ids = np.empty(capacity, dtype=np.int64)
        if self._vectors is not None:
            vectors[: self._size] = self._vectors[: self._size]
            ids[: self._size] = self._ids[: self._size]
        self._vectors, self._ids = vectors, ids

    async def put(
        self,
        ids: npt.NDArray[np.int64],
        vectors: npt.NDArray[np.float32],
        texts: Sequence[str | None] | None = None,
    ) -> None:
        """Insert or replace rows; lshrs calls this before it indexes them."""
        if self._vectors is not None and vectors.shape[1] != self._vectors.shape[1]:
            raise ValueError(f"the store holds {self._vectors.shape[1]}-d vectors, got {vectors.shape[1]}-d")
        self._grow(self._size + len(ids), vectors.shape[1])
        assert self._vectors is not None
        rows = np.empty(len(ids), np.int64)
        for i, id_ in enumerate(ids.tolist()):
            row = self._row_of.get(id_)
            if row is None:
                row = self._row_of[id_] = self._size
                self._size += 1
                self._texts.append(None)
                self._ids[row] = id_
            rows[i] = row
            self._vectors[row] = vectors[i]
            self._texts[row] = texts[i] if texts is not None else None
        self._map_rows(ids, rows)

    def _map_rows(self, ids: npt.NDArray[np.int64], rows: npt.NDArray[np.int64]) -> None:
        """Mirror ``id -> row`` into the array, or give the array up for
        good once an id is negative or past ``_DENSE`` times the rows held."""
        if self._row_at is None or not len(ids):
            return
        lowest, highest = int(ids.min()), int(ids.max())
        if lowest < 0 or highest >= _DENSE * max(self._size, _DENSE_FLOOR):
            self._row_at = None
            return
        if highest >= len(self._row_at):
            grown = np.full(max(highest + 1, 2 * len(self._row_at)), -1, np.int64)
            grown[: len(self._row_at)] = self._row_at
            self._row_at = grown
        self._row_at[ids] = rows

    async def remove(self, ids: npt.NDArray[np.int64]) -> None:
        """Swap each removed row with the last one, so the matrix stays dense."""
        for id_ in ids.tolist():
            row = self._row_of.pop(id_, None)
            if row is None:
                continue
            last = self._size - 1
            if row != last:
                assert self._vectors is not None
                moved = int(self._ids[last])
                self._vectors[row] = self._vectors[last]
                self._ids[row] = moved
                self._texts[row] = self._texts[last]
                self._row_of[moved] = row
                if self._row_at is not None:
                    self._row_at[moved] = row
            if self._row_at is not None:
                self._row_at[id_] = -1
            self._texts.pop()
            self._size -= 1

    async def fetch(self, ids: npt.NDArray[np.int64]) -> Rows:
        """The rows of ``ids`` that exist, in the order given."""
        if self._row_at is not None:
            at = self._row_at[ids[(ids >= 0) & (ids < len(self._row_at))]]
            at = at[at >= 0]
        else:
            at = np.fromiter((r for r in map(self._row_of.get, ids.tolist()) if r is not None), np.int64)
        dim = 0 if self._vectors is None else self._vectors.shape[1]
        if self._vectors is None or not len(at):
            return Rows(np.empty(0, np.int64), np.empty((0, dim), np.float32), [])
        return Rows(self._ids[at], self._vectors[at], [self._texts[r] for r in at.tolist()])

    async def sample(self, count: int, seed: int = 0) -> Rows:
        """``count`` distinct random rows, to fit a learned partition on."""
        if self._vectors is None:
            return Rows(np.empty(0, np.int64), np.empty((0, 0), np.float32))
        at = np.sort(np.random.default_rng(seed).choice(self._size, min(count, self._size), replace=False))
        return Rows(self._ids[at].copy(), self._vectors[at].copy())

    async def batches(self, batch_size: int) -> AsyncIterator[Rows]:
        """Snapshots of consecutive rows; safe against removals during the build."""
        for start in range(0, self._size, batch_size):
            stop = min(start + batch_size, self._size)
            assert self._vectors is not None
            yield Rows(self._ids[start:stop].copy(), self._vectors[start:stop].copy(), self._texts[start:stop])
