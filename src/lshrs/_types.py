"""Public value types and the storage protocol the adapters implement."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result. ``exact`` is False when ``score`` is the LSH estimate
    of cosine (no store to rerank with), True when it is the exact cosine."""

    id: int
    score: float
    text: str | None = None
    exact: bool = True


@dataclass(frozen=True, slots=True)
class Rows:
    """Vectors a store returned: ``ids[i]`` owns ``vectors[i]`` and ``texts[i]``.
    Ids the store does not have are simply absent. ``left_out`` counts, by
    reason, rows of a batch the store read but could not return as vectors
    (a NULL, a wrong length), so that a build can report or refuse them."""

    ids: npt.NDArray[np.int64]
    vectors: npt.NDArray[np.float32]
    texts: Sequence[str | None] | None = None
    left_out: Mapping[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def only(self, keep: npt.NDArray[np.bool_]) -> Rows:
        texts = None if self.texts is None else [t for t, k in zip(self.texts, keep.tolist()) if k]
        return Rows(self.ids[keep], self.vectors[keep], texts)


#: The reason a store gives for a row with no vector (``Rows.left_out``).
NULL_VECTOR = "NULL vector"


class Indexed(int):
    """What ``LSHRS.index()`` returns: the rows it indexed, an ``int``, with
    ``skipped``, the rows of a store it could not index, by reason (``"NULL
    vector"``, ``"wrong dimension"``, ``"NULL element"``, ``"NaN or
    infinity"``, ``"all zeros"``); empty when there were none."""

    skipped: dict[str, int]

    def __new__(cls, indexed: int, skipped: Mapping[str, int] | None = None) -> Indexed:
        made = super().__new__(cls, indexed)
        made.skipped = {reason: count for reason, count in (skipped or {}).items() if count}
        return made


#: Called after each written batch with (vectors done, total or None if unknown).
ProgressCallback = Callable[[int, "int | None"], None]


@runtime_checkable
class VectorStore(Protocol):
    """Where the vectors live. lshrs keeps only hashes; it asks the store for
    vectors to rerank candidates and, for ``LSHRS.index()``, to stream a build."""

    async def dimension(self) -> int | None:
        """The vector dimension, or None while the store is empty and does not know."""
        ...

    async def fetch(self, ids: npt.NDArray[np.int64]) -> Rows:
        """Vectors (and texts, if the store has them) of ``ids``, in one round trip."""
        ...

    def batches(self, batch_size: int) -> AsyncIterator[Rows]:
        """Every row, in batches, for a full build."""
        ...

    async def count(self) -> int | None:
        """How many rows a full build will read, if cheap to know."""
        ...

    async def close(self) -> None:
        """Release what the store opened itself (pools, engines, clients)."""
        ...


@runtime_checkable
class WritableStore(VectorStore, Protocol):
    """A store that lshrs owns and keeps in step with the index (in-memory,
    Redis). Vectors are written before the index points at them, and removed
    after the index forgets them, so the index never names a missing vector."""

    async def put(
        self,
        ids: npt.NDArray[np.int64],
        vectors: npt.NDArray[np.float32],
        texts: Sequence[str | None] | None = None,
    ) -> None:
        """Insert or replace rows; called before the index points at them."""
        ...

    async def remove(self, ids: npt.NDArray[np.int64]) -> None:
        """Delete rows; called after the index has forgotten them."""
        ...


class Reconciled(NamedTuple):
    """What ``LSHRS.reconcile()`` changed: ids ``added`` (in the store, not
    the index), ``removed`` (in the index, gone from the store), ``updated``
    (their vector changed), ``unchanged``, ``repaired`` (record right, a
    bucket entry missing) and ``strays`` (bucket entries no record names)."""

    added: int
    removed: int
    updated: int
    unchanged: int
    repaired: int
    strays: int


@runtime_checkable
class FilteringStore(Protocol):
    """A store that evaluates ``where=`` conditions itself (``PostgresStore``,
    ``SQLAlchemyStore``): ``check_where`` refuses a bad condition before any
    Redis work, ``passing`` returns which of the ``ids`` it holds pass one
    (ids only: the vectors are fetched for the few best that pass)."""

    async def check_where(self, where: Any) -> None: ...

    async def passing(self, ids: npt.NDArray[np.int64], where: Any) -> npt.NDArray[np.int64]: ...
