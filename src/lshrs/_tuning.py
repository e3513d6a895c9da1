"""Measuring an index against exact search, and what ``LSHRS.tune()`` keeps.

Recall on real embeddings depends on the data far more than on any model, so
the number of buckets a query reads is chosen by measuring: the caller's own
queries, or stored vectors, serve as queries, their exact neighbours come from
one streamed pass over the store, and the probe count climbs until the target
recall is met.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import anyio.to_thread
import numpy as np
import numpy.typing as npt

from ._types import Rows, VectorStore

IdArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TuningPoint:
    """One measured setting: buckets read, recall reached, candidates read per query."""

    probes: int
    recall: float
    candidates: float


@dataclass(frozen=True)
class Tuning:
    """What ``LSHRS.tune()`` measured and chose; saved as JSON beside the index.

    ``probes`` is the fewest buckets per query that reached ``target_recall``
    (or the most tried, if none did: compare ``recall``). ``rebuild_bands`` and
    ``rebuild_rows`` are the shape lshrs would give a hyperplane index of this
    size (0 for a learned index, whose buckets follow the data it is built on).
    """

    target_recall: float
    probes: int
    recall: float
    candidate_share: float
    sample: int
    rebuild_bands: int
    rebuild_rows: int
    curve: list[TuningPoint] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Tuning:
        data = json.loads(raw)
        data["curve"] = [TuningPoint(**point) for point in data.get("curve", [])]
        return cls(**data)


async def exact_neighbours(
    store: VectorStore, queries: FloatArray, own_ids: IdArray | None, top_k: int, batch_size: int
) -> list[IdArray]:
    """Each query's exact top-``top_k`` by cosine over every row of the store,
    leaving out its own id when it is a stored row (``own_ids``); one streamed
    pass, scored in a worker thread."""
    unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    best_ids = np.empty((len(unit), 0), np.int64)
    best_scores = np.empty((len(unit), 0), np.float32)

    def merge(rows: Rows) -> tuple[IdArray, npt.NDArray[np.float32]]:
        norms = np.linalg.norm(rows.vectors, axis=1)
        scores = (unit @ rows.vectors.T) / np.where(norms == 0, 1.0, norms)
        if own_ids is not None:
            scores[rows.ids[None, :] == own_ids[:, None]] = -np.inf  # a query is not its own neighbour
        ids = np.concatenate([best_ids, np.broadcast_to(rows.ids, scores.shape)], axis=1)
        merged = np.concatenate([best_scores, scores], axis=1)
        keep = np.argsort(-merged, axis=1, kind="stable")[:, :top_k]
        return np.take_along_axis(ids, keep, axis=1), np.take_along_axis(merged, keep, axis=1)

    async for rows in store.batches(batch_size):
        if len(rows):
            best_ids, best_scores = await anyio.to_thread.run_sync(merge, rows)
    return list(best_ids)


def recall(found: Sequence[Sequence[int]], truth: Sequence[IdArray]) -> float:
    """Mean share of each query's true neighbours that were found."""
    shares = [len(set(f) & set(t.tolist())) / max(len(t), 1) for f, t in zip(found, truth)]
    return float(np.mean(shares)) if shares else 0.0
