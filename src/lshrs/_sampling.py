"""A uniform random sample of a store's rows, to fit a learned partition on.

Not the first rows: a table sorted by topic (or by insertion time) would
yield centroids for part of the data only. A store with a ``sample(n)``
method answers it itself (ORDER BY random(), HRANDFIELD, a numpy choice);
any other store is read once through, keeping a reservoir.
"""

from __future__ import annotations

import numpy as np

from ._types import Rows, VectorStore


async def sample_store(store: VectorStore, count: int, seed: int = 0) -> Rows:
    sampler = getattr(store, "sample", None)
    if callable(sampler):
        rows: Rows = await sampler(count)
        return rows
    return await _reservoir(store, count, np.random.default_rng(seed))


async def _reservoir(store: VectorStore, count: int, rng: np.random.Generator) -> Rows:
    """Algorithm R over whole batches: row ``seen + i`` replaces a random slot
    with probability ``count / (seen + i + 1)``."""
    ids = np.empty(0, np.int64)
    vectors: np.ndarray | None = None
    seen = 0
    async for batch in store.batches(10_000):
        if not len(batch):
            continue
        if vectors is None:
            vectors = np.empty((0, batch.vectors.shape[1]), np.float32)
        room = max(0, count - len(ids))
        ids = np.concatenate([ids, batch.ids[:room]])
        vectors = np.concatenate([vectors, batch.vectors[:room]])
        rest = np.arange(room, len(batch))
        if len(rest):
            slots = rng.integers(0, seen + rest + 1)
            taken = slots < count
            ids[slots[taken]] = batch.ids[rest[taken]]
            vectors[slots[taken]] = batch.vectors[rest[taken]]
        seen += len(batch)
    if vectors is None:
        return Rows(ids, np.empty((0, 0), np.float32))
    return Rows(ids, vectors)
