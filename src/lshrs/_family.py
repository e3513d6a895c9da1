"""Hash families: how a vector becomes the record Redis keeps for its id, and
which buckets a query reads.

A record is ``tables`` bucket values of ``key_bytes`` each, then (for the
learned family) a sketch: product-quantised codes (:mod:`._codes`), or the
SimHash bits that learned indexes built by earlier versions keep. The Redis
scripts derive an id's bucket keys from the first ``tables * key_bytes``
bytes of its record and ignore the rest, so both families share the scripts,
the change log and the signature cache unchanged. Candidates are pre-ranked
by a distance between their records and the query's sketch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ._codes import ProductCodes
from ._hashing import Bands, hamming, probe_keys, standardise
from ._partition import Partition

FloatArray = npt.NDArray[np.float32]
ByteArray = npt.NDArray[np.uint8]
#: Distances of records to a query: smaller is nearer.
Distances = npt.NDArray[np.int64] | npt.NDArray[np.float32]

#: Bytes of a learned bucket value: a big-endian uint32 centroid number.
BUCKET_BYTES = 4


@dataclass(frozen=True)
class Layout:
    """What the Redis side needs to know of a record."""

    tables: int
    key_bytes: int
    record_bytes: int
    grouped: bool = False  # records in small hashes (``_index.groups_for``) rather than one a shard
    id_bytes: int = 8  # an id as bucket entry and record field: its low 4 bytes, or all 8
    ranked: bool = False  # a plan lists buckets best first (learned), not bands that vote


def banded_layout(bands: Bands) -> Layout:
    return Layout(bands.num_bands, bands.band_bytes, bands.signature_bytes)


def learned_layout(sketch_bytes: int, grouped: bool = False, tables: int = 1) -> Layout:
    """``tables`` bucket numbers (an id's nearest centroid, then its spill),
    then the sketch."""
    return Layout(tables, BUCKET_BYTES, tables * BUCKET_BYTES + sketch_bytes, grouped, ranked=True)


class Family(Protocol):
    """A hash family: records for vectors, probe keys for queries."""

    def records(self, vectors: FloatArray) -> ByteArray:
        """(n, record_bytes) records of (n, dim) non-zero vectors."""
        ...

    def sketches(self, unit_queries: FloatArray) -> npt.NDArray[Any]:
        """Per (unit) query, what :meth:`distances` compares records with."""
        ...

    def plan(self, unit_queries: FloatArray, probes: int) -> list[bytes]:
        """Per query, the bucket suffixes (table byte + value) to read, best first."""
        ...

    def distances(self, records: ByteArray, sketch: npt.NDArray[Any]) -> Distances:
        """How far each record is from a query (one row of :meth:`sketches`)."""
        ...

    def cosines(self, distances: Distances) -> FloatArray:
        """The cosines those distances estimate: the scores of a query without a store."""
        ...

    def default_rerank(self, size: int) -> int:
        """Candidates reranked per 10 hits asked, for an index of ``size`` vectors."""
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

    def records(self, vectors: FloatArray) -> ByteArray:
        return self.bands.pack(vectors @ self._projection > 0)

    def sketches(self, unit_queries: FloatArray) -> ByteArray:
        return self.records(unit_queries)

    def plan(self, unit_queries: FloatArray, probes: int) -> list[bytes]:
        margins = unit_queries @ self._projection
        return [probe_keys(self.bands, m, probes) for m in margins]

    def distances(self, records: ByteArray, sketch: npt.NDArray[Any]) -> Distances:
        return hamming(records, sketch)

    def cosines(self, distances: Distances) -> FloatArray:
        return simhash_cosines(distances, self.bands.num_bits)

    def default_rerank(self, size: int) -> int:
        return simhash_rerank(size)

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
    """One table of k-means buckets (:mod:`._partition`) plus a sketch for
    pre-ranking: the bucket says where the neighbours are, the sketch says
    which of the bucket's ids to fetch. The sketch is product-quantised codes
    (:mod:`._codes`), or, in an index built before them, a SimHash of the
    projection's bits.

    With ``spill``, each id is also filed in a second bucket
    (:meth:`._partition.Partition.assign_spilled`), kept as a second table so the
    scripts file and remove it like a band: a query reads both tables'
    buckets of each centroid it probes, and needs about a third of the
    probes for the same recall."""

    def __init__(self, partition: Partition, sketch: ProductCodes | FloatArray, spill: bool = False) -> None:
        self.partition = partition
        self._codes: ProductCodes | None = None
        self._projection: FloatArray | None = None
        if isinstance(sketch, ProductCodes):
            self._codes, sketch_bytes = sketch, sketch.parts
        else:
            self._projection, sketch_bytes = sketch, sketch.shape[1] // 8
        self.tables = 2 if spill else 1
        self._record_bytes = learned_layout(sketch_bytes, tables=self.tables).record_bytes
        self._sketch_at = self.tables * BUCKET_BYTES

    def records(self, vectors: FloatArray) -> ByteArray:
        out = np.empty((len(vectors), self._record_bytes), np.uint8)
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        numbers = self.partition.assign(unit) if self.tables == 1 else self.partition.assign_spilled(unit)
        out[:, : self._sketch_at] = numbers.astype(">u4").view(np.uint8).reshape(len(unit), self._sketch_at)
        out[:, self._sketch_at :] = self.sketches(unit) if self._codes is None else self._codes.encode(unit)
        return out

    def sketches(self, unit_queries: FloatArray) -> npt.NDArray[Any]:
        if self._codes is not None:
            return self._codes.tables(unit_queries)
        assert self._projection is not None
        return np.packbits(unit_queries @ self._projection > 0, axis=1)

    def distances(self, records: ByteArray, sketch: npt.NDArray[Any]) -> Distances:
        if self._codes is not None:
            return -self._codes.scores(records[:, self._sketch_at :], sketch)
        # The record's width is a multiple of 4, so its sketch is read as whole
        # uint32 words, skipping the words of bucket numbers.
        words = np.ascontiguousarray(records).view(np.uint32)[:, self.tables :]
        query = np.ascontiguousarray(sketch).view(np.uint32)
        distance: npt.NDArray[np.int64] = np.bitwise_count(words ^ query).sum(axis=1, dtype=np.int64)
        return distance

    def cosines(self, distances: Distances) -> FloatArray:
        if self._codes is not None:  # a sum of slices' dot products may stray past +-1
            cosines: FloatArray = np.clip(-distances.astype(np.float32), -1.0, 1.0)
            return cosines
        assert self._projection is not None
        return simhash_cosines(distances, self._projection.shape[1])

    def default_rerank(self, size: int) -> int:
        """Codes rank candidates better than a SimHash twice their size, so
        half the rows are fetched for the same recall (:mod:`._codes`)."""
        return simhash_rerank(size) // 2 if self._codes is not None else simhash_rerank(size)

    def plan(self, unit_queries: FloatArray, probes: int) -> list[bytes]:
        plans = []
        for found in self.partition.probe_many(unit_queries, probes):
            # A key is a table byte, then the bucket: each bucket in every table.
            keys = np.zeros((len(found), self.tables, 1 + BUCKET_BYTES), np.uint8)
            keys[:, :, 0] = np.arange(self.tables)
            keys[:, :, 1:] = found.astype(">u4").view(np.uint8).reshape(-1, 1, BUCKET_BYTES)
            plans.append(keys.tobytes())
        return plans

    def default_probes(self) -> int:
        """``2.5 * sqrt(buckets)``, at least 128 and at most 256: below about
        2,000 candidates (128 buckets) recall fell at any size (measured on
        real sentence embeddings: 50 of 625 buckets gave recall@10 0.88 at
        10k; README, Performance). Past 256, a bucket of 16 ids holds about as
        many true neighbours however large the index: at 1M (62,508 buckets,
        300 real queries) 256 probes gave recall@10 0.964, as did the 625 of
        the square root, with 1.2x the queries a second (docs/benchmarks.md).

        A spilled index reads two buckets a probe and finds as much with a
        third of the probes: ``sqrt(buckets)``, at least 64 and at most 128.
        With 64 (300 real queries, defaults otherwise) recall@10 was 0.966
        at 10k, 0.970 at 50k and 0.968 at 100k, where 198 unspilled probes
        gave 0.965 at 100k."""
        factor, floor, ceiling = (PROBE_FACTOR, PROBE_FLOOR, PROBE_CEILING) if self.tables == 1 else SPILLED_PROBES
        return min(self.partition.buckets, ceiling, max(floor, round(factor * math.sqrt(self.partition.buckets))))

    def ladder(self) -> list[int]:
        """From 8 buckets, each step about 1.4 times the last, up to 16 times
        the default (past that a query reads more than ``max_candidates``
        long before it reads every bucket)."""
        most = min(self.partition.buckets, 16 * self.default_probes())
        steps = 8 * 2.0 ** (np.arange(0, 40) / 2)
        return sorted({min(most, int(step)) for step in steps})


PROBE_FACTOR = 2.5
PROBE_FLOOR = 128
PROBE_CEILING = 256
#: Factor, floor and ceiling of a spilled index's default probes.
SPILLED_PROBES = (1.0, 64, 128)


def simhash_cosines(distances: Distances, bits: int) -> FloatArray:
    """The cosine a SimHash Hamming distance estimates: bits disagree with
    probability theta / pi."""
    cosines: FloatArray = np.cos(np.pi * distances.astype(np.float32) / bits)
    return cosines


def simhash_rerank(size: int) -> int:
    """Candidates reranked per 10 hits asked when a SimHash pre-ranks them, by
    index size: 512 below 50,000 vectors, 256 up to 250,000, then growing
    with the index up to 1,024 at 1M.

    The true neighbours must survive the sketch's Hamming ranking among ever
    more candidates. Measured with real queries: at 10k, 0.940 with 256 and
    0.955 with 512 (a small corpus has sparser neighbourhoods, and fetching
    512 rows of a small table is cheap); at 100k, 0.969 with 256; at 1M
    (generated base), 0.944 with 256 and 0.963 with 1,024 at the same probes
    (the learned index's run before codes, ``benchmarks/results/minilm-1M.md``
    in git history)."""
    if size < 50_000:
        return 512
    return round(256 * min(4.0, max(1.0, size / 250_000)))
