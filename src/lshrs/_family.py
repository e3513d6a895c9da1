"""Hash families: how a vector becomes the record Redis keeps for its id, and
which buckets a query reads.

A record is ``tables`` bucket values of ``key_bytes`` each, then (for the
learned family) a SimHash sketch. The Redis scripts derive an id's bucket
keys from the first ``tables * key_bytes`` bytes of its record and ignore
the rest, so both families share the scripts, the change log and the
signature cache unchanged. Candidates are pre-ranked by the Hamming distance
of the bytes from ``sketch_offset`` on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ._hashing import Bands, hamming, probe_keys, standardise
from ._partition import Partition

FloatArray = npt.NDArray[np.float32]
ByteArray = npt.NDArray[np.uint8]

#: Bytes of a learned bucket value: a big-endian uint32 centroid number.
BUCKET_BYTES = 4


@dataclass(frozen=True)
class Layout:
    """What the Redis side needs to know of a record."""

    tables: int
    key_bytes: int
    record_bytes: int


def banded_layout(bands: Bands) -> Layout:
    return Layout(bands.num_bands, bands.band_bytes, bands.signature_bytes)


def learned_layout(sketch_bits: int) -> Layout:
    return Layout(1, BUCKET_BYTES, BUCKET_BYTES + sketch_bits // 8)


class Family(Protocol):
    """A hash family: records for vectors, probe keys for queries."""

    layout: Layout
    sketch_bits: int

    def records(self, vectors: FloatArray, *, buckets: bool = True) -> ByteArray:
        """(n, record_bytes) records of (n, dim) non-zero vectors; a query's
        record needs only its sketch (``buckets=False`` may leave the rest 0)."""
        ...

    def plan(self, unit_queries: FloatArray, probes: int) -> list[bytes]:
        """Per query, the bucket suffixes (table byte + value) to read, best first."""
        ...

    def distances(self, records: ByteArray, query_record: ByteArray) -> npt.NDArray[np.int64]:
        """Hamming distance of the sketch part of each record to the query's."""
        ...

    def default_probes(self) -> int:
        """Buckets a query reads when neither ``probes=`` nor a saved tuning says."""
        ...

    def ladder(self) -> list[int]:
        """Probe counts ``tune()`` tries, ascending."""
        ...


class HyperplaneFamily:
    """Random-hyperplane bands (data-independent, no training): the record is
    the banded signature itself, probed by query-directed multi-probe."""

    def __init__(self, bands: Bands, projection: FloatArray) -> None:
        self.bands = bands
        self._projection = standardise(projection)
        self.layout = banded_layout(bands)
        self.sketch_bits = bands.num_bits

    def records(self, vectors: FloatArray, *, buckets: bool = True) -> ByteArray:
        return self.bands.pack(vectors @ self._projection > 0)

    def plan(self, unit_queries: FloatArray, probes: int) -> list[bytes]:
        margins = unit_queries @ self._projection
        return [probe_keys(self.bands, m, probes) for m in margins]

    def distances(self, records: ByteArray, query_record: ByteArray) -> npt.NDArray[np.int64]:
        return hamming(records, query_record)

    def default_probes(self) -> int:
        """Two more rows per band make a bucket about four times smaller for
        strangers but only about half as likely to hold a neighbour, so twice
        the probes keep recall level: ``bands * 2**((rows - 6) / 2)``."""
        return round(self.bands.num_bands * 2 ** ((self.bands.rows - 6) / 2))

    def ladder(self) -> list[int]:
        """From one bucket per band up to every bucket the prober can name,
        each step about 1.4 times the last."""
        most = self.bands.num_bands * 2 ** min(self.bands.rows, 8)
        steps = self.bands.num_bands * 2.0 ** (np.arange(0, 17) / 2)
        return sorted({min(most, int(step)) for step in steps})


class LearnedFamily:
    """One table of k-means buckets (:mod:`._partition`) plus a SimHash sketch
    of ``sketch_bits`` for pre-ranking: the bucket says where the neighbours
    are, the sketch says which of the bucket's ids to fetch."""

    def __init__(self, partition: Partition, sketch: FloatArray) -> None:
        self.partition = partition
        self._sketch = sketch
        self.sketch_bits = sketch.shape[1]
        self.layout = learned_layout(self.sketch_bits)

    def records(self, vectors: FloatArray, *, buckets: bool = True) -> ByteArray:
        out = np.zeros((len(vectors), self.layout.record_bytes), np.uint8)
        if buckets:
            unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
            numbers = self.partition.assign(unit).astype(">u4")
            out[:, :BUCKET_BYTES] = numbers.view(np.uint8).reshape(-1, BUCKET_BYTES)
        out[:, BUCKET_BYTES:] = np.packbits(vectors @ self._sketch > 0, axis=1)
        return out

    def plan(self, unit_queries: FloatArray, probes: int) -> list[bytes]:
        plans = []
        for found in self.partition.probe_many(unit_queries, probes):
            buckets = found.astype(">u4")
            keys = np.zeros((len(buckets), 1 + BUCKET_BYTES), np.uint8)  # table byte 0, then the bucket
            keys[:, 1:] = buckets.view(np.uint8).reshape(-1, BUCKET_BYTES)
            plans.append(keys.tobytes())
        return plans

    def distances(self, records: ByteArray, query_record: ByteArray) -> npt.NDArray[np.int64]:
        # Both widths are multiples of 4, so the sketch is read as whole uint32
        # words, skipping the one word of bucket number.
        words = np.ascontiguousarray(records).view(np.uint32)[:, 1:]
        query = np.ascontiguousarray(query_record).view(np.uint32)[1:]
        distance: npt.NDArray[np.int64] = np.bitwise_count(words ^ query).sum(axis=1, dtype=np.int64)
        return distance

    def default_probes(self) -> int:
        """``2.5 * sqrt(buckets)``, at least 128: the share of buckets a query
        must read to keep recall falls as the partition grows, but below
        about 2,000 candidates (128 buckets) recall fell at any size
        (measured on real sentence embeddings: 50 of 625 buckets gave recall@10
        0.88 at 10k; README, Performance)."""
        return min(self.partition.buckets, max(PROBE_FLOOR, round(PROBE_FACTOR * math.sqrt(self.partition.buckets))))

    def ladder(self) -> list[int]:
        """From 8 buckets, each step about 1.4 times the last, up to 16 times
        the default (past that a query reads more than ``max_candidates``
        long before it reads every bucket)."""
        most = min(self.partition.buckets, 16 * self.default_probes())
        steps = 8 * 2.0 ** (np.arange(0, 40) / 2)
        return sorted({min(most, int(step)) for step in steps})


PROBE_FACTOR = 2.5
PROBE_FLOOR = 128
