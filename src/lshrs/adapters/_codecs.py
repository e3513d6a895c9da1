"""Binary vector formats of the SQL stores, decoded with numpy, never as text.

The SQL adapters ask the server for each vector's binary send form
(``array_send``, ``vector_send``) or its bytea as stored, so every format
arrives as bytes and a batch decodes in one ``frombuffer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .._types import NULL_VECTOR

#: Column kinds a SQL table may hold its vectors in.
KINDS = ("real[]", "double precision[]", "bytea", "vector")

# One-dimensional array_send: ndim, has-nulls flag, element type oid, length,
# lower bound; then each element as a 4-byte length and its big-endian value.
_ARRAY_HEADER = 20


def decode(kind: str, blobs: Sequence[bytes]) -> npt.NDArray[np.float32]:
    """(n, dim) float32 from n blobs of one column kind and one dimension."""
    if not blobs:
        return np.empty((0, 0), np.float32)
    sizes = {len(b) for b in blobs}
    if len(sizes) != 1:
        raise ValueError("the vector column holds vectors of different lengths")
    raw = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), -1)
    if kind == "bytea":
        values: npt.NDArray[Any] = raw.copy().view("<f4")
    elif kind == "vector":  # >HH dim, unused; then big-endian float32
        values = raw[:, 4:].copy().view(">f4")
    elif kind in ("real[]", "double precision[]"):
        if np.frombuffer(raw[0, 4:8].tobytes(), ">i4")[0]:
            raise ValueError("the vector column holds arrays with NULL elements")
        element = ">f4" if kind == "real[]" else ">f8"
        values = raw[:, _ARRAY_HEADER:].copy().view([("len", ">i4"), ("v", element)])["v"]
    else:
        raise ValueError(f"unknown vector column kind {kind!r}; expected one of {KINDS}")
    return values.astype(np.float32)


def blob_size(kind: str, dim: int) -> int:
    """Bytes in the send form of one ``dim``-d vector of ``kind``."""
    if kind in ("real[]", "double precision[]"):
        return _ARRAY_HEADER + (4 + (4 if kind == "real[]" else 8)) * dim
    return (4 if kind == "vector" else 0) + 4 * dim


def readable(kind: str, dim: int | None, blob: bytes | None) -> str | None:
    """Why one row's blob cannot be decoded as a ``dim``-d vector of ``kind``
    (None: it can). A NULL element of an array is sent as a length of -1 and
    no value, so an array holding NULLs can have a vector's length: its flag
    is checked first."""
    if blob is None:
        return NULL_VECTOR
    if dim is None:
        return None
    if kind in ("real[]", "double precision[]") and len(blob) >= 8 and blob[4:8] != b"\0\0\0\0":
        return "NULL element"
    return None if len(blob) == blob_size(kind, dim) else "wrong dimension"


def kind_of(type_name: str) -> str:
    """Column kind from PostgreSQL's ``format_type`` text, e.g. ``vector(384)``."""
    base = type_name.split("(")[0].strip()
    if base in ("real[]", "double precision[]", "bytea", "vector"):
        return base
    raise ValueError(
        f"a vector column of type {type_name} is not supported: use real[], "
        "double precision[], bytea (little-endian float32) or pgvector's vector"
    )


def quote_ident(name: str) -> str:
    """A schema-qualified SQL identifier, each part double-quoted, so a hostile
    name is only ever a name."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"not a usable SQL identifier: {name!r}")
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))
