"""Input checks that run before anything is written, with errors that say what to fix."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from ._config import MAX_SHORT_ID

IdArray = npt.NDArray[np.int64]
_INT64 = np.iinfo(np.int64)


def as_vectors(vectors: Any, dim: int, *, what: str = "vectors") -> npt.NDArray[np.float32]:
    """A (n, dim) float32 array of finite, non-zero rows; one vector becomes n=1."""
    if isinstance(vectors, (str, bytes)):
        raise TypeError(f"{what} must be numbers, got {type(vectors).__name__}")
    try:
        array = np.asarray(vectors)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(f"{what} must be a rectangular array of shape (n, {dim}): {exc}") from None
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise TypeError(f"{what} must be real numbers, got dtype {array.dtype}")
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"{what} must have shape (n, {dim}) or ({dim},), got {np.shape(vectors)}")
    array = array.astype(np.float32, copy=False)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise ValueError(f"{what} row {int(np.argmin(finite))} holds NaN or infinity")
    zero = ~array.any(axis=1)
    if zero.any():
        raise ValueError(f"{what} row {int(np.argmax(zero))} is all zeros: it has no direction")
    return array


def as_id(value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"ids must be integers, got {value!r} ({type(value).__name__})")
    as_int = int(value)
    if not _INT64.min <= as_int <= _INT64.max:
        raise ValueError(f"id {as_int} does not fit in a signed 64-bit integer")
    return as_int


def as_ids(ids: Iterable[Any] | npt.NDArray[Any], *, unique: bool = True) -> IdArray:
    """An int64 array of ids; duplicates in one batch are refused (which row would win?)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"ids must be a sequence of integers, got {type(ids).__name__}")
    if isinstance(ids, np.ndarray) and np.issubdtype(ids.dtype, np.integer):
        if ids.dtype == np.uint64 and ids.size and int(ids.max()) > _INT64.max:
            raise ValueError(f"id {int(ids.max())} does not fit in a signed 64-bit integer")
        array = ids.astype(np.int64).ravel()
    else:
        array = np.fromiter((as_id(v) for v in ids), dtype=np.int64)
    if unique and len(np.unique(array)) != len(array):
        values, counts = np.unique(array, return_counts=True)
        raise ValueError(f"id {int(values[counts > 1][0])} appears more than once in one batch")
    return array


def check_id_bytes(ids: IdArray, id_bytes: int) -> None:
    """Refuse ids an index of ``id_bytes``-byte ids cannot hold: cut to 4
    bytes, 2**32 + 5 would be stored as 5."""
    if id_bytes == 8 or not len(ids):
        return
    outside = (ids < 0) | (ids > MAX_SHORT_ID)
    if outside.any():
        raise ValueError(
            f"id {int(ids[np.argmax(outside)])} does not fit this index's 4-byte ids (0 to {MAX_SHORT_ID:,}): "
            "build it into an index opened with id_bytes=8 (lshrs index --id-bytes 8), under another prefix "
            "or after drop()"
        )


def usable_rows(vectors: npt.NDArray[Any], dim: int) -> tuple[npt.NDArray[np.bool_], dict[str, int]]:
    """Which rows of a store's batch a build can index, and how many it
    cannot, by reason: a batch given to ``index()`` is refused whole
    (:func:`as_vectors`), but one bad row of a 6.4M-row table must not stop
    its build at row 5,000,001."""
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        return np.zeros(len(vectors), bool), {"wrong dimension": len(vectors)}
    finite = np.isfinite(vectors).all(axis=1)
    nonzero = vectors.any(axis=1)
    return finite & nonzero, {"NaN or infinity": int((~finite).sum()), "all zeros": int((finite & ~nonzero).sum())}


def check_batch(ids: IdArray, vectors: npt.NDArray[np.float32], texts: Any = None) -> None:
    if len(ids) == 0:
        raise ValueError("the batch is empty: pass at least one id and vector")
    if len(ids) != len(vectors):
        raise ValueError(f"got {len(ids)} ids but {len(vectors)} vectors")
    if texts is not None and len(texts) != len(ids):
        raise ValueError(f"got {len(ids)} ids but {len(texts)} texts")


def check_top(top_k: int, top_p: float | None) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k must be an integer, got {top_k!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
            raise TypeError(f"top_p must be a number in (0, 1], got {top_p!r}")
        if not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
