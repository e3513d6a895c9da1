"""A learned partition of the unit sphere: a two-level spherical k-means tree.

Random hyperplanes ignore where the data lies; sentence embeddings are
clustered, so buckets cut along the data put true neighbours together far
more often (DESIGN 3b: 4-6x fewer candidates at equal recall). A bucket is a
fine centroid; fine centroids are grouped under ``sqrt(K)`` coarse ones, so
assigning an id scores about ``3 * sqrt(K)`` centroids and planning a query
the children of 48 groups, instead of all ``K`` (a k-means tree as in FLANN,
two levels deep), first on a third of their principal axes (:class:`Sieve`).
A spilled index files each row in a second bucket too
(:meth:`Partition.assign_spilled`). Pure numpy, no I/O.

Stored in Redis as one blob, little-endian: a header of five uint32 (magic,
dim, coarse count, fine count, vectors it was sized for), the fine-group
starts (uint32, coarse + 1), then the coarse and the fine centroids, each
row as int8 times its own float32 scale. At 16 ids a bucket a centroid costs
48 bytes a vector as float16 (a quarter of the index); as int8, 24. Measured
on 100k real sentence embeddings at 6,250 buckets: 99.8% of ids keep their
bucket, and the share of true top-10 neighbours in a query's 64, 128 and 256
nearest buckets is unchanged (0.926, 0.959, 0.976). Blobs stored as float16
by earlier versions ("LSK1") are still read.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

_MAGIC = 0x4C534B32  # "LSK2": int8 rows with a float32 scale each
_MAGIC_FLOAT16 = 0x4C534B31  # "LSK1": float16 rows
_HEADER = 20
#: Rows scored at once when assigning: bounds the (rows x centroids) score matrix.
_CHUNK = 8192


@dataclass(frozen=True)
class Partition:
    """``coarse[i]`` owns the fine centroids ``fine[starts[i]:starts[i + 1]]``;
    a bucket is the index of a fine centroid.

    The fine centroids are kept as they are stored, int8 rows times a scale
    each (``fine_scales``; None for float32 rows, as fitted): a query or an
    assignment scores them a group at a time, cast as it goes, so it reads a
    quarter of the bytes from memory (planning a 1M query's 48 groups: 2.1
    against 3.2 ms) and a client holds 24 MB of them at 1M, not 96."""

    coarse: FloatArray
    fine_rows: npt.NDArray[np.int8] | FloatArray
    starts: npt.NDArray[np.int64]
    trained_for: int  # vectors the bucket count was chosen for: stats() compares the index with it
    fine_scales: FloatArray | None = None

    @property
    def buckets(self) -> int:
        return len(self.fine_rows)

    @property
    def dim(self) -> int:
        return int(self.fine_rows.shape[1])

    @cached_property
    def fine(self) -> FloatArray:
        """The fine centroids as float32 rows: what a small partition scores
        all at once, and what is stored."""
        return _dense(self, slice(None))

    def _fine_scores(self, queries: FloatArray, begin: int, end: int) -> FloatArray:
        """Scores of ``queries`` (rows, or one vector) against fine centroids
        ``begin:end``, read as stored."""
        return _scaled(queries, self.fine_rows, self.fine_scales, slice(begin, end))

    @cached_property
    def sieve(self) -> Sieve:
        """The first pass a large partition plans with (:class:`Sieve`)."""
        return Sieve.of(self)

    def prepare(self) -> None:
        """Build :attr:`sieve` now if planning will use it (0.35 s at 131,072
        buckets), so that a client does it in a worker thread when it adopts
        the partition, not in the event loop inside its first query."""
        if self.buckets > FLAT_PROBE:
            _ = self.sieve

    def assign(self, unit: FloatArray) -> IntArray:
        """The bucket of each (unit) row: its nearest fine centroid under its
        ``_ASSIGN_GROUPS`` nearest coarse ones (with one, 13% of rows of real
        sentence embeddings missed their nearest fine centroid); the same
        whatever batch the row is hashed in (:meth:`assign_spilled`)."""
        scores, choices = self._nearest_choices(unit, 2, _ASSIGN_GROUPS)
        out = np.empty(len(unit), np.int64)
        for lo in range(0, len(unit), _SPILL_CHUNK):
            rows, mine = slice(lo, lo + _SPILL_CHUNK), choices[lo : lo + _SPILL_CHUNK]
            exact = self._row_by_row(unit[rows], scores[rows], mine)
            out[rows] = mine[np.arange(len(mine)), np.argmax(exact, axis=1)]
        return out

    def assign_spilled(self, unit: FloatArray) -> IntArray:
        """Two buckets for each (unit) row, (n, 2): its nearest, and a second
        chosen by SOAR (Sun et al. 2023): of its ``_SPILL_CHOICES`` nearest
        centroids, the ``c`` that minimises
        ``|x - c|^2 + SPILL_WEIGHT * <r, x - c>^2``, where ``r`` is the unit
        residual of the row from its nearest.

        A row's true neighbours that miss its first bucket mostly lie along
        that residual; a second bucket chosen across it, rather than simply
        the second nearest, catches them. Measured on 100k real sentence
        embeddings (500 queries, 6,253 buckets, one-off simulation): recall@10
        after reranking 256 reached 0.991 reading 6.1% of the corpus, where
        one bucket a row needed 13.7% for 0.992; the plain second nearest
        found 0.006-0.011 less than this at 64 to 256 probes."""
        scores, choices = self._nearest_choices(unit, _SPILL_CHOICES, self._spill_groups())
        spilled: IntArray = np.empty((len(unit), 2), np.int64)
        for lo in range(0, len(unit), _SPILL_CHUNK):
            rows, mine = slice(lo, lo + _SPILL_CHUNK), choices[lo : lo + _SPILL_CHUNK]
            at = np.arange(len(mine))
            exact = self._row_by_row(unit[rows], scores[rows], mine)
            first = np.argmax(exact, axis=1)
            nearest = mine[at, first]
            residual = unit[rows] - _dense(self, nearest)
            residual /= np.maximum(np.linalg.norm(residual, axis=1, keepdims=True), 1e-12)
            along = np.einsum("ij,ij->i", residual, unit[rows])  # <r, x>: the part of <r, x - c> not c's
            across = _gathered_scores(self, mine, residual)
            cost = 2 - 2 * exact
            cost += SPILL_WEIGHT * (along[:, None] - across) ** 2
            # A partition of one bucket has no second: every cost is inf, and
            # the row is filed twice in bucket 0 (what unfilled choices name).
            cost[at, first] = np.inf
            spilled[rows] = np.stack([nearest, mine[at, np.argmin(cost, axis=1)]], axis=1)
        return spilled

    def _row_by_row(self, unit: FloatArray, scores: FloatArray, choices: IntArray) -> FloatArray:
        """The ``choices``' ``scores`` again, a row at a time (-inf stays where
        a choice is unfilled): BLAS rounds a batch's product by the batch's
        shape (small products take another kernel), so a near-tie could flip
        with the batch a row is hashed in, and a resumed build or an ingest
        file it elsewhere than a clean build (one id of 2,000, in about one
        test run of twenty)."""
        exact: FloatArray = np.where(np.isfinite(scores), _gathered_scores(self, choices, unit), -np.inf)
        return exact

    def _nearest_choices(self, unit: FloatArray, width: int, groups: int) -> tuple[FloatArray, IntArray]:
        """Each row's ``width`` best scores and their buckets, in bucket order
        (fewer real ones in a smaller partition: the rest score -inf), among
        the children of its nearest ``groups`` coarse groups."""
        scores = np.full((len(unit), width), -np.inf, np.float32)
        choices = np.zeros((len(unit), width), np.int64)
        for rows, begin, end in self._assignable(unit, groups):
            both = np.concatenate([scores[rows], self._fine_scores(unit[rows], begin, end)], axis=1)
            cut = both.shape[1] - width
            top = np.argpartition(both, cut, axis=1)[:, cut:]  # positions of the best ``width``
            scores[rows] = np.take_along_axis(both, top, axis=1)
            kept = np.take_along_axis(choices[rows], np.minimum(top, width - 1), axis=1)
            choices[rows] = np.where(top < width, kept, begin + top - width)  # a kept choice, or a child
        # In bucket order, so that an exact tie goes to the smaller bucket
        # whatever order the batch's partitioning left them in.
        order = np.argsort(choices, axis=1, kind="stable")
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(choices, order, axis=1)

    def _spill_groups(self) -> int:
        """Coarse groups a second bucket is sought in: enough for about
        ``_SPILL_POOL`` fine centroids, at least ``_ASSIGN_GROUPS``."""
        return max(_ASSIGN_GROUPS, math.ceil(_SPILL_POOL * len(self.coarse) / self.buckets))

    def _assignable(self, unit: FloatArray, nearest: int) -> Iterator[tuple[IntArray, int, int]]:
        """(rows, begin, end): each coarse group among the rows' ``nearest``,
        the rows it is near, and its fine centroids ``begin:end``; visited
        group by group so each group's rows are cast and scored once."""
        coarse_scores = _scores(unit, self.coarse)
        spread = min(nearest, len(self.coarse))
        tops = _top_columns(coarse_scores, spread)
        for column in range(spread):
            top = tops[:, column]
            order = np.argsort(top, kind="stable")
            groups, firsts = np.unique(top[order], return_index=True)
            bounds = [*firsts.tolist(), len(order)]
            for g, lo, hi in zip(groups.tolist(), bounds[:-1], bounds[1:]):
                yield order[lo:hi], int(self.starts[g]), int(self.starts[g + 1])

    def probe(self, unit_query: FloatArray, probes: int) -> IntArray:
        """The ``probes`` buckets whose centroids are most similar to the query,
        best first, among the children of its most similar coarse centroids."""
        if self.buckets <= FLAT_PROBE:
            return _best(self.fine @ unit_query, probes)
        groups = self._opened(self.coarse @ unit_query, probes)
        query, score, count = self._first_pass(unit_query, groups.shape[-1], probes)
        # Each group's children are one contiguous run: scoring runs in place
        # costs a third of gathering them first (0.3 against 1 ms at 100k).
        scored = [score(query, int(self.starts[g]), int(self.starts[g + 1])) for g in groups.tolist()]
        found = self._buckets(groups, scored, count)
        return found if count == probes else self._rescored(unit_query, found, probes)

    def probe_many(self, unit_queries: FloatArray, probes: int) -> list[IntArray]:
        """:meth:`probe` of each row, as one batch: the centroids are scored
        one matrix product a group for all the rows that open it, not one a
        row (at 1M, 64 coalesced queries each scoring 48 of 250 groups alone
        took 2.7 ms a query to plan; 0.54 ms as one batch). Each row gets the
        buckets it would get alone; only their order may differ, where two
        scores are equal to within float rounding (a matrix product rounds
        differently from a matrix-vector one: in batches of 64, 5% of 300
        real queries at 1M listed some buckets in another order, none a
        different bucket)."""
        if len(unit_queries) == 1:
            return [self.probe(unit_queries[0], probes)]
        if self.buckets <= FLAT_PROBE:
            # Scoring every fine centroid at once is cheaper than scoring the
            # opened groups one by one at this size (0.15 against 0.22 ms at
            # 6,253 buckets) and finds the exact best ones. The centroids go
            # on the left: OpenBLAS took 0.78 ms for 2 rows and 1.0 for 16 as
            # ``rows @ fine.T``, 0.37 and 0.57 this way (6,253 x 384); a few
            # rows go one by one, as a lone query does (0.14 ms for 2).
            if len(unit_queries) <= _ROW_BY_ROW:
                return [_best(self.fine @ row, probes) for row in unit_queries]
            return [_best(row, probes) for row in (self.fine @ unit_queries.T).T]
        groups = self._opened(unit_queries @ self.coarse.T, probes)
        per_query = groups.shape[1]
        queries, score, count = self._first_pass(unit_queries, per_query, probes)
        # One entry a (query, opened group) pair, in that order; visited group
        # by group so each group's rows are cast and scored once.
        pairs = groups.ravel()
        order = np.argsort(pairs, kind="stable")
        cuts = [0, *(np.flatnonzero(np.diff(pairs[order])) + 1).tolist(), len(order)]
        scored: list[FloatArray] = [np.empty(0, np.float32)] * len(pairs)
        for lo, hi in itertools.pairwise(cuts):
            at = order[lo:hi]
            g = int(pairs[at[0]])
            rows = score(queries[at // per_query], int(self.starts[g]), int(self.starts[g + 1]))
            for pair, row in zip(at.tolist(), rows):
                scored[pair] = row
        found = [
            self._buckets(opened, scored[q * per_query : (q + 1) * per_query], count) for q, opened in enumerate(groups)
        ]
        return found if count == probes else [self._rescored(q, f, probes) for q, f in zip(unit_queries, found)]

    def _first_pass(
        self, unit_queries: FloatArray, opened: int, probes: int
    ) -> tuple[FloatArray, Callable[[FloatArray, int, int], FloatArray], int]:
        """What the opened groups' children are scored with: the queries, the
        scoring, and how many buckets to keep. The children themselves where
        they are few; else the sieve's rows, keeping ``_SHORTLIST`` times
        the probes for :meth:`_rescored` (decided by sizes, not by a row's
        groups, so a batch decides as each row alone would)."""
        if _SHORTLIST * probes * len(self.coarse) >= opened * self.buckets:
            return unit_queries, self._fine_scores, probes
        return unit_queries @ self.sieve.basis, self.sieve.scores, _SHORTLIST * probes

    def _rescored(self, unit_query: FloatArray, shortlist: IntArray, probes: int) -> IntArray:
        """The ``probes`` buckets of ``shortlist`` most similar to the query, by
        their exact scores, best first."""
        best: IntArray = shortlist[_best(_scaled(unit_query, self.fine_rows, self.fine_scales, shortlist), probes)]
        return best

    def _opened(self, coarse_scores: FloatArray, probes: int) -> IntArray:
        """The coarse groups to open (of one query, or each row's), in
        ascending order, so ties between buckets break the same way alone
        and in a batch."""
        wanted = math.ceil(_OPEN_FACTOR * probes * len(self.coarse) / self.buckets)
        opened = min(len(self.coarse), max(_MIN_OPENED, wanted))
        if opened == len(self.coarse):
            return np.broadcast_to(np.arange(opened), coarse_scores.shape)
        top = np.argpartition(-coarse_scores, opened - 1, axis=-1)[..., :opened]
        groups: IntArray = np.sort(top, axis=-1)
        return groups

    def _buckets(self, groups: IntArray, scored: list[FloatArray], probes: int) -> IntArray:
        """The ``probes`` best buckets, given each opened group's children's scores."""
        firsts, lasts = self.starts[groups], self.starts[groups + 1]
        best = _best(np.concatenate(scored), probes)
        # Position in the concatenated scores -> bucket number.
        offsets = np.concatenate([[0], np.cumsum(lasts - firsts)])
        run = np.searchsorted(offsets, best, side="right") - 1
        buckets: IntArray = firsts[run] + (best - offsets[run])
        return buckets

    def to_bytes(self) -> bytes:
        header = np.array([_MAGIC, self.dim, len(self.coarse), self.buckets, self.trained_for], "<u4").tobytes()
        quantized, scales = _quantized(np.concatenate([self.coarse, self.fine]))
        starts = self.starts.astype("<u4").tobytes()
        blob: bytes = header + starts + scales.astype("<f4").tobytes() + quantized.tobytes()
        return blob

    @classmethod
    def from_bytes(cls, raw: bytes, dim: int) -> Partition:
        """Refuses a blob that is not a partition of ``dim``-d space, rather
        than mis-hash with it."""
        partition, rest = cls.split(raw, dim)
        if rest:
            raise ValueError(f"the stored centroids have {len(raw)} bytes, expected {len(raw) - len(rest)}")
        return partition

    @classmethod
    def split(cls, raw: bytes, dim: int) -> tuple[Partition, bytes]:
        """The partition at the front of ``raw``, and the bytes after it (the
        index's codebooks, stored in the same key so one write adopts both)."""
        if len(raw) < _HEADER:
            raise ValueError("the stored centroids are truncated")
        magic, stored_dim, coarse, fine, trained_for = np.frombuffer(raw[:_HEADER], "<u4").tolist()
        if magic not in (_MAGIC, _MAGIC_FLOAT16):
            raise ValueError("the stored centroids are not an lshrs partition")
        if stored_dim != dim:
            raise ValueError(f"the stored centroids are {stored_dim}-d but the index is {dim}-d")
        rows = coarse + fine
        body = 2 * dim * rows if magic == _MAGIC_FLOAT16 else (4 + dim) * rows
        expected = _HEADER + 4 * (coarse + 1) + body
        if len(raw) < expected or not 0 < coarse <= fine:
            raise ValueError(f"the stored centroids have {len(raw)} bytes, expected {expected}")
        at = _HEADER + 4 * (coarse + 1)
        starts = np.frombuffer(raw[_HEADER:at], "<u4").astype(np.int64)
        if starts[0] != 0 or starts[-1] != fine or (np.diff(starts) <= 0).any():
            raise ValueError("the stored centroids have a damaged group table")
        if magic == _MAGIC_FLOAT16:
            vectors = np.frombuffer(raw[at:expected], "<f2").astype(np.float32).reshape(rows, dim)
            return cls(vectors[:coarse], vectors[coarse:], starts, trained_for), raw[expected:]
        scales = np.frombuffer(raw[at : at + 4 * rows], "<f4").astype(np.float32)
        quantized = np.frombuffer(raw[at + 4 * rows : expected], np.int8).reshape(rows, dim)
        coarse_rows: FloatArray = quantized[:coarse] * scales[:coarse, None]
        return cls(coarse_rows, quantized[coarse:], starts, trained_for, scales[coarse:]), raw[expected:]


#: Up to this many buckets a query scores every fine centroid.
FLAT_PROBE = 16_384
#: Queries of a batch below ``FLAT_PROBE`` buckets scored one by one: up to
#: 4, a matrix-vector product each beat one matrix product for the batch
#: (0.28 against 0.35 ms); at 8 it no longer did (0.55 against 0.49).
_ROW_BY_ROW = 4
#: Coarse groups a query opens, at least: enough that the best fine centroids
#: are rarely in a group left shut. At 1M (250 groups, 300 real queries) the
#: share of true top-10 neighbours in the 256 buckets a query reads was 0.956
#: with 32 groups and 0.966 with 48 (0.971 with 64, at 1.3x the planning time).
_MIN_OPENED = 48
_OPEN_FACTOR = 4.0
#: Coarse groups whose children compete for a row when it is assigned.
_ASSIGN_GROUPS = 2
#: How much :meth:`Partition.assign_spilled` penalises a second bucket along the row's
#: residual. On 100k real sentence embeddings (one-off simulation, 500
#: queries) weights 1, 2, 4 and 8 gave recall@10 within 0.001 of each
#: other at every probe count; all beat the plain second nearest.
SPILL_WEIGHT = 4.0
#: Fine centroids a second bucket is sought among, about: the centroid across
#: a row's residual is often outside its two nearest groups. At 100k (79
#: groups of 79; 1,000 real queries, one-off) the share of true top-10
#: neighbours in 64 probed buckets was 0.964 with a pool of 128 (2 groups),
#: 0.972 with 256 (4), 0.973 with 512 (8, at twice the time); a pool of
#: fixed size keeps the cost flat as the groups grow.
_SPILL_POOL = 256
#: Nearest centroids of the pool a second bucket is chosen among: 8 found
#: 0.9716 where 16 found 0.9723, in 70% of the time (same measurement).
_SPILL_CHOICES = 8
#: Rows chosen for at once: bounds the (rows x choices x dim) centroids gathered.
_SPILL_CHUNK = 2048
#: Buckets a sieved query keeps for exact scoring, per probe. At 1M (300
#: real queries, 256 probes) the sieve's 1,024 held 99.7% of the buckets the
#: exact plan reads, and the share of true top-10 neighbours in them was
#: 0.968 against 0.969; with 512 kept, 97.7% and 0.965.
_SHORTLIST = 4
#: A coarse level fitted on at least 4 times this many rows runs all but its
#: last ``_LATE_ITERATIONS`` on a random quarter of them: at 1M (a 262,144-row
#: sample, 300 real queries) the share of true top-10 neighbours in 256 probed
#: buckets was 0.970 against 0.968, and the fit took 6.8 s against 8.5.
_EARLY_ROWS = 65_536
_LATE_ITERATIONS = 2
#: The sieve keeps this share of the dimensions (128 of 384).
_SIEVE_SHARE = 1 / 3
#: Fine centroids the sieve's axes are fitted on, at most.
_SIEVE_SAMPLE = 16_384


class Sieve(NamedTuple):
    """The fine centroids on their principal axes, a third of them, as int8
    rows with a scale each. The first pass over a large query's opened
    groups reads a third of the centroids' bytes, and only the best
    ``_SHORTLIST * probes`` are scored exactly: those groups (4.6 MB of int8
    rows at 1M, 6.4 MB at 131,072 buckets) are not in cache between
    queries. Planning a lone query, side by side in one process (300 real
    queries, 256 probes): 1.2 against 1.6 ms at 1M and 1.4-1.8 against
    2.8-3.3 ms at 131,072 buckets, reading 99.7% and 99.4% of the same
    buckets; the share of true top-10 neighbours in them fell by 0.001 at
    most."""

    basis: FloatArray  # dim x reduced, orthonormal columns
    rows: npt.NDArray[np.int8]
    scales: FloatArray

    @classmethod
    def of(cls, partition: Partition) -> Sieve:
        step = max(1, partition.buckets // _SIEVE_SAMPLE)
        sample = _dense(partition, slice(None, None, step))
        _, axes = np.linalg.eigh((sample.T @ sample).astype(np.float64))  # ascending eigenvalues
        kept = max(1, round(partition.dim * _SIEVE_SHARE))
        basis = np.ascontiguousarray(axes[:, ::-1][:, :kept], np.float32)
        reduced = np.concatenate(
            [_dense(partition, slice(lo, lo + _CHUNK)) @ basis for lo in range(0, partition.buckets, _CHUNK)]
        )
        rows, scales = _quantized(reduced)
        return cls(basis, rows, scales)

    def scores(self, reduced_queries: FloatArray, begin: int, end: int) -> FloatArray:
        return _scaled(reduced_queries, self.rows, self.scales, slice(begin, end))


def choose_buckets(count: int) -> int:
    """Buckets for ``count`` vectors: about 16 ids a bucket. Smaller buckets
    read fewer strangers per probe but need more probes and more centroids
    (memory, and planning time); 16 measured best on real sentence
    embeddings (benchmarks/partition.py)."""
    return max(1, min(MAX_BUCKETS, round(count / BUCKET_SIZE)))


BUCKET_SIZE = 16
#: At most 131,072 buckets (reached at 2.1M vectors): the partition then
#: takes 51 MB of Redis at 384-d and as much in each client (int8 rows); past
#: it buckets grow instead (about 49 ids at 6.4M). At 6.4M (GENERATED, real
#: queries) 131,072 buckets found more with half the candidates of 65,536:
#: recall@10 0.963 against 0.947 at 256 probes, reading 0.27% of the corpus
#: against 0.58% (docs/benchmarks.md).
MAX_BUCKETS = 131_072


def fit(
    sample: FloatArray,
    buckets: int,
    *,
    seed: int = 0,
    iterations: int = 8,
    fine_iterations: int = 4,
    trained_for: int = 0,
) -> Partition:
    """A two-level spherical k-means tree with about ``buckets`` leaves, fitted
    on ``sample`` (unit rows). ``sqrt(buckets)`` coarse centroids; each coarse
    group gets fine centroids in proportion to its share of the sample.

    The fine level settles sooner than the coarse one: at 1M generated
    vectors (62,500 buckets, a 262,144-row sample), 4 fine iterations find
    the same share of true neighbours in a query's probed buckets as 8
    (0.959 at 181 probes) in a third less time; fewer coarse iterations, or a
    coarse level fitted on a quarter of the sample only, lost 0.006-0.009.
    Starting on a quarter and ending on all did not (:data:`_EARLY_ROWS`)."""
    rng = np.random.default_rng(seed)
    unit = sample / np.linalg.norm(sample, axis=1, keepdims=True)
    buckets = max(1, min(buckets, len(unit)))
    num_coarse = max(1, min(round(math.sqrt(buckets)), len(unit)))
    if len(unit) >= 4 * _EARLY_ROWS and iterations > _LATE_ITERATIONS:
        early = unit[rng.choice(len(unit), len(unit) // 4, replace=False)]
        coarse = _kmeans(early, num_coarse, iterations - _LATE_ITERATIONS, rng)
        coarse = _lloyd(unit, coarse, _LATE_ITERATIONS, rng)
    else:
        coarse = _kmeans(unit, num_coarse, iterations, rng)
    top = _nearest(unit, coarse)
    sizes = np.bincount(top, minlength=num_coarse)
    kept = np.flatnonzero(sizes)  # a coarse centroid that won no point owns no bucket
    coarse, sizes = coarse[kept], sizes[kept]
    share = np.maximum(1, np.round(buckets * sizes / sizes.sum()).astype(np.int64))
    share = np.minimum(share, sizes)
    # Each group's rows, as one run of the rows sorted by group (a mask a
    # group scanned the whole sample 250 times at 1M: 0.5 s).
    by_group = unit[np.argsort(top, kind="stable")]
    ends = np.cumsum(sizes).tolist()
    fine = [
        _kmeans(by_group[end - size : end], int(count), fine_iterations, rng)
        for end, size, count in zip(ends, sizes.tolist(), share.tolist())
    ]
    starts = np.concatenate([[0], np.cumsum([len(f) for f in fine])]).astype(np.int64)
    return Partition(coarse.astype(np.float32), np.concatenate(fine).astype(np.float32), starts, trained_for)


def _best(scores: FloatArray, count: int) -> IntArray:
    """Positions of the ``count`` highest scores, highest first."""
    count = min(count, len(scores))
    best = np.argpartition(-scores, count - 1)[:count] if count < len(scores) else np.arange(count)
    ordered: IntArray = best[np.argsort(-scores[best], kind="stable")]
    return ordered


def _top_columns(scores: FloatArray, count: int) -> IntArray:
    """Each row's ``count`` best columns, by repeated argmax (overwriting
    ``scores``): for the few columns assignment wants, a third of the time
    of ``argpartition``."""
    rows = np.arange(len(scores))
    tops = np.empty((len(scores), count), np.int64)
    for column in range(count):
        tops[:, column] = np.argmax(scores, axis=1)
        scores[rows, tops[:, column]] = -np.inf
    return tops


def _scaled(
    queries: FloatArray, rows: npt.NDArray[np.int8] | FloatArray, scales: FloatArray | None, picked: slice | IntArray
) -> FloatArray:
    """Scores of ``queries`` against ``rows[picked]`` times their ``scales``
    (None: float32 rows): the scale multiplies the scores, not the rows."""
    scores = _product(queries, rows[picked].astype(np.float32, copy=False).T)
    return scores if scales is None else scores * scales[picked]


def _quantized(rows: FloatArray) -> tuple[npt.NDArray[np.int8], FloatArray]:
    """``rows`` as int8 times a float32 scale each."""
    scales = (np.maximum(np.abs(rows).max(axis=1), 1e-30) / 127).astype(np.float32)
    return np.round(rows / scales[:, None]).astype(np.int8), scales


def _gathered_scores(partition: Partition, picked: IntArray, rows: FloatArray) -> FloatArray:
    """``scores[i, k]``: row ``i``'s dot product with fine centroid
    ``picked[i, k]``, gathered as stored and scaled after (scaling the
    gathered rows took longer than the products)."""
    gathered = partition.fine_rows[picked].astype(np.float32, copy=False)
    scores: FloatArray = np.matmul(gathered, rows[:, :, None])[:, :, 0]
    return scores if partition.fine_scales is None else scores * partition.fine_scales[picked]


def _dense(partition: Partition, picked: slice | IntArray) -> FloatArray:
    """Fine centroids ``picked`` as float32 rows (a view where they are
    float32 already): a chunk at a time, the sieve never holds every row as
    float32 (200 MB at 131,072 buckets)."""
    rows = partition.fine_rows[picked].astype(np.float32, copy=False)
    if partition.fine_scales is None:
        return rows
    scaled: FloatArray = rows * partition.fine_scales[picked, None]
    return scaled


def _scores(unit: FloatArray, centroids: FloatArray) -> FloatArray:
    return _product(unit, centroids.T)


def _product(rows: FloatArray, matrix: FloatArray) -> FloatArray:
    """``rows @ matrix``, a lone row computed as a pair: numpy hands one row
    to BLAS's matrix-vector kernel, which rounds differently from the matrix
    kernel every larger batch gets, so a row hashed alone (an ingest, or the
    only row near a group) could land in another bucket at a near-tie than
    the same row in a build (a resumed build's records differed from a clean
    build's in one CI run)."""
    if rows.ndim == 2 and len(rows) == 1:
        paired: FloatArray = (np.concatenate([rows, rows]) @ matrix)[:1]
        return paired
    product: FloatArray = rows @ matrix
    return product


def _nearest(unit: FloatArray, centroids: FloatArray) -> IntArray:
    out = np.empty(len(unit), np.int64)
    for lo in range(0, len(unit), _CHUNK):
        out[lo : lo + _CHUNK] = np.argmax(unit[lo : lo + _CHUNK] @ centroids.T, axis=1)
    return out


def _kmeans(unit: FloatArray, k: int, iterations: int, rng: np.random.Generator) -> FloatArray:
    """Spherical Lloyd iterations from ``k`` distinct sample rows."""
    start = unit[rng.choice(len(unit), k, replace=False)].copy()
    return _lloyd(unit, start, 1 if k == 1 else iterations, rng)


def _lloyd(unit: FloatArray, centroids: FloatArray, iterations: int, rng: np.random.Generator) -> FloatArray:
    """Spherical Lloyd iterations from ``centroids``; a centroid left empty is
    reseeded with a random row."""
    k = len(centroids)
    for _ in range(iterations):
        label = _nearest(unit, centroids)
        counts = np.bincount(label, minlength=k)
        # Sums per centroid as one product with the one-hot label matrix, in
        # chunks: BLAS-bound like the assignment, unlike a sort and reduceat.
        sums = np.zeros_like(centroids)
        for lo in range(0, len(unit), _CHUNK):
            block = label[lo : lo + _CHUNK]
            onehot = (block[None, :] == np.arange(k)[:, None]).astype(np.float32)
            sums += onehot @ unit[lo : lo + _CHUNK]
        filled = counts > 0
        centroids[filled] = sums[filled]
        empty = np.flatnonzero(~filled)
        if len(empty):
            centroids[empty] = unit[rng.choice(len(unit), len(empty), replace=False)]
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    fitted: FloatArray = centroids.astype(np.float32)
    return fitted
