"""``LSHRS``: hash vectors, keep the buckets in Redis, rerank through a store."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import re
import secrets
import sys
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple, cast

import anyio
import anyio.to_thread
import numpy as np
import numpy.typing as npt
from redis.exceptions import OutOfMemoryError, RedisError

from . import _cores, _filters, _progress, _scripts
from ._admission import Admission, Call, check_timeout, deadline
from ._cache import WriteChain
from ._coalesce import Coalescer
from ._codes import ProductCodes, code_bytes, fit_codes
from ._config import (
    DEFAULT_ID_BYTES,
    HASHINGS,
    IndexConfig,
    check_prefix,
    choose_bands,
    choose_rows,
    layout_of,
)
from ._connect import check_client, connect
from ._errors import IndexMissing, cause_of, memory_in_use, out_of_memory
from ._family import Family, HyperplaneFamily, Layout, LearnedFamily, banded_layout, learned_layout
from ._hashing import Bands, make_projection
from ._index import Candidates, Client, ShardedIndex, meta_keys, plan_keys
from ._partition import Partition, choose_buckets, fit
from ._sampling import sample_store
from ._tuning import Tuning, TuningPoint, exact_neighbours, recall
from ._types import (
    NULL_VECTOR,
    FilteringStore,
    Hit,
    Indexed,
    ProgressCallback,
    Reconciled,
    Rows,
    VectorStore,
    WritableStore,
)
from ._validate import as_id, as_ids, as_vectors, check_batch, check_id_bytes, check_top, usable_rows

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

FloatArray = npt.NDArray[np.float32]


class _Opened(NamedTuple):
    """What an open index needs: the stored configuration and what follows from it."""

    config: IndexConfig
    family: Family | None  # None: a learned index not trained yet
    sketch: FloatArray  # the stored projection: bands' hyperplanes, or the learned family's sketch
    sharded: ShardedIndex
    probes: int | None  # buckets a query reads: probes=, else the saved tuning, else the family's default


class _Hashed(NamedTuple):
    """A batch ready to write: its rows (less any skipped), their records,
    and how many rows were read (progress counts those)."""

    rows: Rows
    records: npt.NDArray[np.uint8]
    read: int


def _read(batch: Rows) -> int:
    """Rows with a vector a store read for ``batch``: those it returned and
    those it left out but for NULLs, which its ``count()`` leaves out too."""
    return len(batch) + _with_vectors(batch.left_out)


def _with_vectors(skipped: Mapping[str, int]) -> int:
    return sum(count for reason, count in skipped.items() if reason != NULL_VECTOR)


class _Screen:
    """The rows of a store's build that it cannot index: counted and left
    out, or with ``strict``, the end of the build."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.skipped: Counter[str] = Counter()

    def usable(self, rows: Rows, dim: int) -> Rows:
        keep, found = usable_rows(np.asarray(rows.vectors), dim)
        found = Counter(found) + Counter(rows.left_out)  # + drops the reasons with no rows
        if found and self.strict:
            first = f" (id {int(rows.ids[~keep][0])})" if not keep.all() else ""
            raise ValueError(
                f"the store holds rows a build cannot index: {_progress.counted(found)}{first}; "
                "index(strict=True) stops at them, index() skips and counts them"
            )
        self.skipped.update(found)
        return rows if keep.all() else rows.only(keep)

    def tell(self, report: ProgressCallback | None) -> None:
        """One line for the rows skipped, if any: on stderr with progress, else a warning."""
        if self.skipped:
            say = _progress.note if report else _progress.logger.warning
            skipped = _progress.row_count(sum(self.skipped.values()))
            say(f"skipped {skipped} it cannot index: {_progress.counted(self.skipped)}")


#: A learned index fits its partition on at least this many vectors.
MIN_TRAIN = 256
#: Rows a partition is fitted on, at most: 8 a bucket (16 a bucket measured
#: 0.006 higher candidate recall at 100k than 4, at twice the fitting time),
#: and no more than ``_TRAIN_ROWS`` unless that leaves fewer than
#: ``_TRAIN_LEAST`` a bucket, so a 1M fit stays in seconds and the 131,072
#: buckets of a 6.4M index still learn from 4 rows each.
_TRAIN_ROWS = 262_144
_TRAIN_PER_BUCKET = 8
_TRAIN_LEAST = 4
#: A learned index holding this many times the vectors its buckets were
#: sized for has outgrown them (``stats()`` says so).
OUTGROWN = 4
#: Bucket keys ``stats()`` reads, at most, unless asked to be exact.
STATS_SAMPLE = 5_000
#: Queries tune() sends at once.
_TUNE_BATCH = 16
#: Seconds between an open client's checks of the stored configuration and
#: tuning: it adopts a new tuning and notices a vanished index within this.
TUNING_REFRESH = 5.0
#: How long a write's leases live if its client dies holding them.
_LEASE_MS = 30_000
#: The longest pause between tries for a held lease (jittered up to 1.5x).
_LEASE_PAUSE_CAP = 0.05
#: How long before its deadline a write stops waiting for a held lease: room
#: for its last try, so its own error, naming the lease, comes first.
_LEASE_MARGIN = 0.1
#: How long a build cut short waits for its store to close the rows it was reading.
_CLOSE_SECONDS = 5.0


#: Batches at least this large are hashed in a worker thread, off the event loop.
_THREAD_ROWS = 256
#: Rows a build hashes at once, gathered from its batches: assignment scores
#: each coarse group's centroids against the rows that open it, and 10,000
#: rows give each of 1M's 250 groups about 80, too few for a matrix product
#: to pay (assigning 1M: 15.3 s in batches of 10,000, 8.8 s of 100,000).
_HASH_ROWS = 65_536
#: Query batches at least this large plan their probes (about 0.5 ms a query)
#: in a worker thread.
_THREAD_QUERIES = 16


class LSHRS:
    """A locality-sensitive-hash index in Redis over vectors kept in a store.

    Every argument is keyword-only and defaulted but ``dim``. ``hashing`` is
    ``"kmeans"`` (the default: buckets learned from the data on the first
    write) or ``"hyperplane"`` (random hyperplanes: no training, for indexes
    that start empty and grow by ``ingest``). A learned index sizes itself
    from the vectors it is trained on (``buckets`` overrides); a hyperplane
    index takes ``num_bands`` and ``rows_per_band`` from ``threshold`` and
    ``expected_size``. ``seed`` defaults to 0 and ``shards`` to 1. Ids are
    stored in 4 bytes, so they run from 0 to 2**32 - 1; ``id_bytes=8`` takes
    any signed 64-bit id, at 8 more bytes a vector of Redis.
    A learned index files each id in its nearest bucket and a second one
    (``spill=1``, the default), so a query needs about a third of the
    probes for the same recall, at about 11 more bytes a vector of Redis;
    ``spill=0`` files it once.
    Opening a prefix that already holds an index adopts its configuration;
    explicitly given values that differ raise ``ValueError``.

    ``timeout`` bounds each call of ``query``, ``query_many``, ``ingest`` and
    ``delete`` as a whole (each also takes ``timeout=`` for itself) and every
    Redis command; past it a call raises ``TimeoutError``. At most
    ``max_inflight`` of those calls run at once and ``max_waiting`` more
    wait (by default 64 times ``max_inflight``, so a ``gather`` of thousands
    just waits); more, or one that would not finish within half its time
    left, fail at once with ``Overloaded`` (a ``TimeoutError``). A service
    that would rather refuse than answer late sets ``max_waiting=0``: a
    served call then never queues behind others.

    A client keeps the records of up to ``signature_cache`` ids a shard, so
    a warm query reads only bucket ids from Redis; one that did not build
    the index warms itself in the background from its first query on
    (``warm_in_background``), or at once with :meth:`warm`.

    Use it as ``async with LSHRS(dim=384) as lsh:``, or call :meth:`open`
    (also done on first use) and :meth:`close`.
    """

    def __init__(
        self,
        *,
        dim: int,
        redis_url: str | None = None,
        redis: Any = None,
        prefix: str = "lshrs",
        store: VectorStore | None = None,
        hashing: str | None = None,
        buckets: int | None = None,
        num_bands: int | None = None,
        rows_per_band: int | None = None,
        threshold: float = 0.6,
        expected_size: int = 1_000_000,
        seed: int | None = None,
        shards: int | None = None,
        id_bytes: int | None = None,
        spill: int | None = None,
        probes: int | None = None,
        rerank: int | None = None,
        max_candidates: int = 50_000,
        signature_cache: int = 2_000_000,
        warm_in_background: bool = True,
        batch_size: int = 10_000,
        timeout: float | None = 10.0,
        max_inflight: int = 64,
        max_waiting: int | None = None,
        redis_options: Mapping[str, Any] | None = None,
        progress: bool | ProgressCallback | None = None,
    ) -> None:
        _positive_int("dim", dim)
        if redis_url is not None and redis is not None:
            raise ValueError("pass redis_url or redis, not both")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be a cosine in (0, 1), got {threshold}")
        if rerank is not None:
            _positive_int("rerank", rerank)
        check_timeout("timeout", timeout)
        for name, value in (
            ("max_inflight", max_inflight),
            ("max_candidates", max_candidates),
            ("batch_size", batch_size),
            ("expected_size", expected_size),
        ):
            _positive_int(name, value)
        if max_waiting is not None:
            _positive_int("max_waiting", max_waiting, least=0)
        banded = num_bands is not None or rows_per_band is not None
        if hashing is None:
            family = "hyperplane" if banded else "kmeans"
        elif hashing not in HASHINGS:
            raise ValueError(f"hashing must be one of {', '.join(map(repr, HASHINGS))}, got {hashing!r}")
        else:
            family = hashing
        if family == "kmeans" and banded:
            raise ValueError("num_bands and rows_per_band shape hashing='hyperplane'; a k-means index takes buckets=")
        if buckets is not None:
            if family != "kmeans":
                raise ValueError("buckets= sizes hashing='kmeans'; hyperplanes take num_bands and rows_per_band")
            _positive_int("buckets", buckets, most=2**31)
        if id_bytes is not None and (isinstance(id_bytes, bool) or id_bytes not in (4, 8)):
            raise ValueError(f"id_bytes must be 4 (ids 0 to 2**32 - 1) or 8 (any 64-bit id), got {id_bytes!r}")
        if spill is not None:
            if family != "kmeans":
                raise ValueError("spill= files ids in a second learned bucket; hyperplane indexes have bands instead")
            if isinstance(spill, bool) or spill not in (0, 1):
                raise ValueError(f"spill must be 0 (one bucket an id) or 1 (a second bucket too), got {spill!r}")
        given = {
            "num_bands": num_bands,
            "rows_per_band": rows_per_band,
            "seed": seed,
            "shards": shards,
            "id_bytes": id_bytes,
            "spill": spill,
        }
        self._explicit = {name for name, value in given.items() if value is not None}
        if hashing is not None or banded:
            self._explicit.add("hashing")
        if family == "hyperplane":
            rows = rows_per_band if rows_per_band is not None else choose_rows(expected_size)
            _positive_int("rows_per_band", rows, most=64)
            bands = num_bands if num_bands is not None else choose_bands(threshold, rows)
            _positive_int("num_bands", bands, most=255)
        else:
            rows = bands = 0
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        _positive_int("shards", shards if shards is not None else 1, most=4096)
        if probes is not None:
            _positive_int("probes", probes)
        _positive_int("signature_cache", signature_cache, least=0)
        if not isinstance(warm_in_background, bool):
            raise TypeError(f"warm_in_background must be True or False, got {warm_in_background!r}")
        spilled = (1 if spill is None else spill) if family == "kmeans" else 0
        self._threshold = threshold
        self._wanted = IndexConfig(
            dim=dim,
            num_bands=bands,
            rows_per_band=rows,
            seed=seed if seed is not None else 0,
            shards=shards if shards is not None else 1,
            hashing=family,
            code_bytes=code_bytes(dim) if family == "kmeans" else 0,
            layout=layout_of(id_bytes or DEFAULT_ID_BYTES, spilled),
            id_bytes=id_bytes or DEFAULT_ID_BYTES,
            spill=spilled,
        )
        self._buckets = buckets
        self._prefix = check_prefix(prefix)
        self._url = redis_url or "redis://localhost:6379/0"
        self._given_client = check_client(redis) if redis is not None else None
        self._client: Client | None = None
        self._store = store
        self._probes = probes
        self._rerank = rerank
        self._max_candidates = max_candidates
        self._cache_size = signature_cache
        self._warm_in_background = warm_in_background
        self._batch_size = batch_size
        self._timeout = timeout
        self._admission = Admission(max_inflight, max_waiting)
        self._redis_options = dict(redis_options or {})
        self._progress = _progress.check(progress)
        self._open_lock = asyncio.Lock()
        self._train_lock = asyncio.Lock()
        self._opened: _Opened | None = None
        self._tuning_read = 0.0
        # A batch has no deadline of its own: each caller's bounds its wait, and
        # the batch is stopped once every caller has given up (``_coalesce``),
        # so a caller's longer ``timeout=`` is not cut short by the client's.
        self._coalescer = Coalescer(self._query_many)
        self._releasing: set[asyncio.Future[None]] = set()

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> LSHRS:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect, then adopt the stored configuration or store this one."""
        async with self._open_lock:
            if self._opened is None:
                try:
                    self._opened = await self._open()
                except BaseException:
                    await self.close()
                    raise

    async def _open(self) -> _Opened:
        # After drop() the client stays: connecting again would orphan its pool.
        client = self._given_client or self._client or await connect(self._url, self._timeout, self._redis_options)
        self._client = client
        await _check_eviction(client)
        cfg_key, proj_key = meta_keys(self._prefix)
        raw_cfg = await client.get(cfg_key)
        if raw_cfg is None:
            wanted = self._wanted
            matrix = make_projection(wanted.dim, _sketch_bits(wanted), wanted.seed)
            opener = client.register_script(_scripts.OPEN)
            raw_cfg, raw_proj = await opener(keys=[cfg_key, proj_key], args=[wanted.to_json(), matrix.tobytes()])
        else:
            raw_proj = await client.get(proj_key)
        stored = IndexConfig.from_json(raw_cfg)
        conflicts = self._wanted.conflicts(stored, self._explicit)
        if conflicts:
            raise ValueError(
                f"prefix {self._prefix!r} holds an index with another configuration "
                f"({'; '.join(conflicts)}): open it without those arguments to adopt it, "
                "or use another prefix"
            )
        bits = _sketch_bits(stored)
        if raw_proj is None or len(raw_proj) != 4 * stored.dim * bits:
            raise ValueError(f"prefix {self._prefix!r} has a damaged projection matrix; drop the index")
        sketch = np.frombuffer(raw_proj, dtype=np.float32).reshape(stored.dim, bits)
        if self._store is not None:
            store_dim = await self._store.dimension()
            if store_dim is not None and store_dim != stored.dim:
                raise ValueError(f"the store holds {store_dim}-d vectors but the index is {stored.dim}-d")
        sharded = ShardedIndex(
            client,
            self._prefix,
            stored.shards,
            _layout(stored),
            self._cache_size,
            warm_in_background=self._warm_in_background,
        )
        family: Family | None
        if stored.hashing == "hyperplane":
            family = HyperplaneFamily(Bands(stored.num_bands, stored.rows_per_band), sketch)
        else:
            blob = await sharded.centroids()
            family = None if blob is None else await self._adopted(blob, stored, sketch, sharded)
        return await self._with_probes(_Opened(stored, family, sketch, sharded, None))

    async def _adopted(
        self, blob: bytes, config: IndexConfig, projection: FloatArray, index: ShardedIndex
    ) -> LearnedFamily:
        """The trained family, decoded and prepared in a worker thread (a
        large partition's sieve takes a third of a second to build at
        131,072 buckets); then the index's record groups are sized from it."""
        family = await anyio.to_thread.run_sync(self._learned, blob, config, projection)
        index.use_groups(family.partition.trained_for)
        return family

    def _learned(self, blob: bytes, config: IndexConfig, projection: FloatArray) -> LearnedFamily:
        """The trained family: the partition, then the codebooks (or, in an
        index built before codes, the projection's SimHash)."""
        try:
            if not config.code_bytes:
                family = LearnedFamily(Partition.from_bytes(blob, config.dim), projection)
            else:
                partition, books = Partition.split(blob, config.dim)
                codes = ProductCodes.from_bytes(books, config.dim, config.code_bytes)
                family = LearnedFamily(partition, codes, spill=bool(config.spill))
        except ValueError as exc:
            raise ValueError(f"prefix {self._prefix!r}: {exc}; drop the index and build it again") from None
        family.partition.prepare()
        return family

    async def _with_probes(self, opened: _Opened) -> _Opened:
        """The probes in force: ``probes=``, else the saved tuning, else the family's default."""
        probes = self._probes
        if probes is None and opened.family is not None:
            saved = await opened.sharded.saved_tuning()
            probes = Tuning.from_json(saved).probes if saved else opened.family.default_probes()
        return opened._replace(probes=probes)

    async def close(self) -> None:
        """Close the Redis client lshrs opened (not one passed in) and the store."""
        if self._releasing:  # leases given up on: let their releases land, briefly
            _, late = await asyncio.wait(self._releasing, timeout=1.0)
            for task in late:
                task.cancel()
        if self._opened is not None:
            await self._opened.sharded.stop_warming()
        client, self._client, self._opened = self._client, None, None
        if client is not None and client is not self._given_client:
            await client.aclose()
        if self._store is not None:
            await self._store.close()

    async def _ready(self) -> _Opened:
        if self._opened is None:
            await self.open()
        assert self._opened is not None
        return self._opened

    @property
    def config(self) -> IndexConfig:
        """The configuration in force (the stored one once open)."""
        return self._opened.config if self._opened else self._wanted

    @property
    def prefix(self) -> str:
        """The key prefix this index lives under."""
        return self._prefix

    @property
    def store(self) -> VectorStore | None:
        """The store candidates are reranked with, if any."""
        return self._store

    # -- training ------------------------------------------------------------------

    async def _trained(
        self, batch: FloatArray | None = None, report: ProgressCallback | None = None, fit: bool = True
    ) -> _Opened:
        """The open index with a hash family: a learned index not trained yet
        adopts the partition another client stored since this one opened, or
        (``fit``) fits one now, on ``batch`` if it is large enough, else on a
        random sample of the store. Clients that train at once all adopt the
        first partition stored."""
        opened = await self._ready()
        if opened.family is not None:
            return opened
        async with self._train_lock:
            opened = await self._ready()
            if opened.family is not None:
                return opened
            blob = await opened.sharded.centroids()
            if blob is None and not fit:
                return opened
            if blob is None:
                blob = await opened.sharded.save_centroids(await self._fit(opened.config, batch, report))
            family = await self._adopted(blob, opened.config, opened.sketch, opened.sharded)
            trained = await self._with_probes(opened._replace(family=family))
            self._opened = trained
            return trained

    async def _fit(self, config: IndexConfig, batch: FloatArray | None, report: ProgressCallback | None) -> bytes:
        count = await self._store.count() if self._store is not None else None
        batch_rows = len(batch) if batch is not None else 0
        if batch is not None and batch_rows >= MIN_TRAIN and batch_rows >= (count or 0):
            sample, size = batch, batch_rows
        elif self._store is not None and count is not None and count >= max(MIN_TRAIN, batch_rows):
            rows = await sample_store(self._store, min(count, _train_rows(self._buckets or choose_buckets(count))))
            usable, _ = usable_rows(np.asarray(rows.vectors), config.dim)  # the build skips the others too
            if usable.sum() < MIN_TRAIN:
                raise ValueError(
                    f"a k-means index learns its buckets from a sample of the store, and only {int(usable.sum())} "
                    f"of {len(usable)} sampled rows hold a vector it can index (at least {MIN_TRAIN} needed): "
                    "fix the table's vectors, or open the index with hashing='hyperplane'"
                )
            sample, size = as_vectors(rows.vectors[usable], config.dim, what="the training sample"), count
        else:
            have = max(batch_rows, count or 0)
            raise ValueError(
                f"a k-means index learns its buckets from its first write, which needs at least {MIN_TRAIN} "
                f"vectors (this one has {have}): index() a larger first batch, or a store that holds them, "
                "or open the index with hashing='hyperplane', which needs no training"
            )
        buckets = self._buckets or choose_buckets(size)
        keep = min(_train_rows(buckets), _TRAIN_PER_BUCKET * buckets)
        if len(sample) > keep:
            sample = sample[np.random.default_rng(config.seed).choice(len(sample), keep, replace=False)]
        started = asyncio.get_running_loop().time()
        say = _progress.note if report else _progress.logger.info
        say(f"fitting {buckets:,} buckets on {len(sample):,} sampled vectors of {size:,}")

        def work() -> bytes:
            blob = fit(sample, buckets, seed=config.seed, trained_for=size).to_bytes()
            if not config.code_bytes:
                return blob
            unit = sample / np.linalg.norm(sample, axis=1, keepdims=True)
            return blob + fit_codes(unit, config.code_bytes, seed=config.seed).to_bytes()

        blob = await anyio.to_thread.run_sync(work)
        say(f"fitted {buckets:,} buckets in {asyncio.get_running_loop().time() - started:.1f} s")
        return blob

    # -- writing -------------------------------------------------------------------

    async def _records(self, family: Family, vectors: FloatArray) -> npt.NDArray[np.uint8]:
        """The Redis records of a batch, in worker threads when the batch is
        large enough to stall the event loop (:mod:`._cores`)."""
        if len(vectors) >= _THREAD_ROWS:
            return await _cores.in_parts(family.records, vectors)
        return family.records(vectors)

    @contextlib.asynccontextmanager
    async def _leased(self, index: ShardedIndex, ids: npt.NDArray[np.int64]) -> AsyncIterator[None]:
        """Hold the write leases of ``ids`` (``_scripts.LEASE``) while a write
        touches both a store lshrs owns and the index; without such a store
        there is one system to write and nothing to serialise.

        A held id is waited for as long as the call's deadline allows, and
        given up on just before it, so the error names the lease. A write
        with no deadline (a build or a reconcile, unless given ``timeout=``)
        waits out a lease until it lapses: one left by a crashed client, or
        one whose release a failover lost (the promoted replica got the
        LEASE, not the RELEASE), must delay a repair, not fail it."""
        if not isinstance(self._store, WritableStore):
            yield
            return
        token = secrets.token_hex(8).encode()
        loop = asyncio.get_running_loop()
        started, pause = loop.time(), 0.001
        lapsed = started + _LEASE_MS / 1000 + 1.0
        give_up = min(lapsed, anyio.current_effective_deadline() - _LEASE_MARGIN)
        try:
            while not await index.lease(ids, token, _LEASE_MS):
                now = loop.time()
                if now >= give_up:
                    raise TimeoutError(
                        f"another client kept writing some of these ids for {now - started:.1f} s "
                        f"(one that died holding them frees them within {_LEASE_MS // 1000} s): "
                        "retry, or give the call a longer timeout="
                    )
                await asyncio.sleep(min(pause * (0.5 + random.random()), give_up - now))
                pause = min(2 * pause, _LEASE_PAUSE_CAP)
            yield
        except (anyio.get_cancelled_exc_class(), TimeoutError, asyncio.TimeoutError, RedisError):
            # Given up on a server that may be frozen or gone: the release must
            # not hold the caller up, nor be skipped (the lease may even land
            # after this), so it goes out in the background. (A store's
            # asyncio.TimeoutError is not the built-in one before Python 3.11.)
            self._release_later(index, ids, token)
            raise
        except BaseException:
            with anyio.CancelScope(shield=True):
                await index.release(ids, token)
            raise
        with anyio.CancelScope(shield=True):
            await index.release(ids, token)

    def _release_later(self, index: ShardedIndex, ids: npt.NDArray[np.int64], token: bytes) -> None:
        task = asyncio.ensure_future(_release_until_done(index, ids, token))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        task.add_done_callback(lambda done: done.cancelled() or done.exception())  # expiry covers a failure

    async def index(
        self,
        ids: Iterable[int] | npt.NDArray[np.integer[Any]] | None = None,
        vectors: Any = None,
        *,
        texts: Sequence[str | None] | None = None,
        progress: bool | ProgressCallback | None = None,
        timeout: float | None = None,
        resume: bool = False,
        strict: bool = False,
    ) -> Indexed:
        """Add or replace a batch; with no arguments, stream every row of the store.

        A learned index that is not trained yet learns its buckets first,
        from this batch or from a random sample of the store. Returns how
        many vectors the index holds from this call (written, or found
        current). Re-running a build is idempotent: ids whose
        record is unchanged cost one lookup and no write. A build has no
        deadline as a whole unless ``timeout=`` gives one; each batch of
        ``batch_size`` is written whole or not at all.

        ``resume=True`` finishes a build that was cut short (a crash, a
        deadline): ids the index already holds are skipped without being
        hashed, so the rows done cost one lookup each. A row whose vector
        changed since it was indexed keeps its old record; ``reconcile()``
        finds those.

        A batch given here is checked whole: one bad row is a ``ValueError``
        and nothing is written. A build from the store skips the rows it
        cannot index (a NULL vector, a wrong dimension, NaN or infinity, all
        zeros), says so, and returns them counted in ``skipped``;
        ``strict=True`` stops at the first batch that holds one instead.
        """
        check_timeout("timeout", timeout)
        for name, flag in (("resume", resume), ("strict", strict)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        with deadline(timeout, "index()"), _progress.reporting(self._progress_of(progress), "index") as report:
            return await self._index(ids, vectors, texts, report, resume, strict=strict)

    def _progress_of(self, progress: object) -> _progress.Setting:
        """A call's progress setting: its own ``progress=``, else the client's."""
        return _progress.check(progress) if progress is not None else self._progress

    async def _index(
        self,
        ids: Iterable[int] | npt.NDArray[np.integer[Any]] | None,
        vectors: Any,
        texts: Sequence[str | None] | None,
        report: ProgressCallback | None,
        resume: bool,
        *,
        strict: bool = False,
    ) -> Indexed:
        """Write ``ids`` to the store (if lshrs owns it) and the index."""
        config = (await self._ready()).config
        if ids is None and vectors is None:
            return await self._index_store(report, resume, strict)
        if ids is None or vectors is None:
            raise TypeError("index() takes both ids and vectors, or neither (to read the store)")
        id_array = as_ids(ids)
        matrix = as_vectors(vectors, config.dim)
        check_batch(id_array, matrix, texts)
        check_id_bytes(id_array, config.id_bytes)
        opened = await self._refreshed(await self._trained(matrix, report))
        store = self._store
        chain = opened.sharded.begin_writes()

        async def batches() -> AsyncIterator[Rows]:
            for start in range(0, len(id_array), self._batch_size):
                stop = start + self._batch_size
                yield Rows(id_array[start:stop], matrix[start:stop], None if texts is None else texts[start:stop])

        async def write(rows: Rows, records: npt.NDArray[np.uint8]) -> None:
            async with self._leased(opened.sharded, rows.ids):
                with _whole():
                    if isinstance(store, WritableStore):
                        await store.put(rows.ids, rows.vectors, rows.texts)
                    await opened.sharded.upsert(rows.ids, records, chain)

        if len(id_array) > self._batch_size:
            done = await self._stream(batches(), len(id_array), opened, write, report, resume)
        else:
            # One batch (an ingest): nothing to overlap, and no task between the
            # shielded write and the caller, so a write that completed returns.
            rows, records = await self._hashed(opened, Rows(id_array, matrix, texts), resume)
            if len(rows):
                await write(rows, records)
            if report:
                report(len(id_array), len(id_array))
            done = len(id_array)
        opened.sharded.end_writes(chain)
        return Indexed(done)

    async def _index_store(self, report: ProgressCallback | None, resume: bool, strict: bool) -> Indexed:
        store = self._require_store("index() with no arguments")
        opened = await self._trained(None, report)
        chain = opened.sharded.begin_writes()

        async def write(rows: Rows, records: npt.NDArray[np.uint8]) -> None:
            await self._write_read_rows(store, opened.sharded, rows, records, chain)

        screen = _Screen(strict)
        batches = store.batches(self._batch_size)
        done = await self._stream(batches, await store.count(), opened, write, report, resume, screen)
        opened.sharded.end_writes(chain)
        screen.tell(report)
        return Indexed(done - _with_vectors(screen.skipped), screen.skipped)

    async def _stream(
        self,
        batches: AsyncIterator[Rows],
        total: int | None,
        opened: _Opened,
        write: Callable[[Rows, npt.NDArray[np.uint8]], Awaitable[None]],
        report: ProgressCallback | None,
        skip_held: bool = False,
        screen: _Screen | None = None,
    ) -> int:
        """A three-stage pipeline over ``batches`` (a store's rows, or a batch
        given to ``index()``): blocks of batches, ``_HASH_ROWS`` rows or so,
        are hashed in worker threads while the block before is written by
        ``write``, a batch at a time, and the next is read (a 1M build: 53 s
        one stage after the other). ``skip_held`` leaves out the ids the index
        holds before hashing (a resumed build); ``screen`` the rows of a
        store it cannot index."""
        to_hash, hashing = anyio.create_memory_object_stream[Rows](1)
        to_write, writing = anyio.create_memory_object_stream[list[_Hashed]](1)
        done = written = 0
        before = await memory_in_use(self._client)  # what an out-of-memory error will measure from

        async def read() -> None:
            try:
                async with to_hash:
                    async for rows in batches:
                        await to_hash.send(rows)
            finally:
                # A build cut short leaves the store's generator suspended,
                # holding its connection and cursor: PostgresStore.close()
                # then waited forever for that connection to come back.
                close = getattr(batches, "aclose", None)
                if close is not None:
                    with anyio.move_on_after(_CLOSE_SECONDS, shield=True):
                        await close()

        async def hash_blocks() -> None:
            async with hashing, to_write:
                block: list[Rows] = []
                async for rows in hashing:
                    block.append(rows)
                    if sum(map(len, block)) >= _HASH_ROWS:
                        await to_write.send(await self._hashed_block(opened, block, skip_held, screen))
                        block = []
                if block:
                    await to_write.send(await self._hashed_block(opened, block, skip_held, screen))

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(read)
                group.start_soon(hash_blocks)
                async with writing:
                    async for hashed in writing:
                        for rows, records, seen in hashed:
                            if len(rows):
                                await write(rows, records)
                                written += len(rows)
                            done += seen
                            if report:
                                report(done, total)
        except BaseExceptionGroup as failed:
            error = cause_of(failed)
            if isinstance(error, OutOfMemoryError):
                raise out_of_memory(error, before, await memory_in_use(self._client), written, total) from error
            raise error from None
        try:
            await opened.sharded.compact()  # the batches' appends left room to grow in every bucket
        except OutOfMemoryError:  # the index is whole; rewriting a bucket needs room for its copy
            _progress.logger.warning("Redis is at maxmemory: the build is complete but its buckets keep their slack")
        return done

    async def reconcile(self, *, progress: bool | ProgressCallback | None = None) -> Reconciled:
        """Make the index exactly what a clean build of the store would be,
        writing only the difference: ids the store holds and the index lacks
        are added, ids it no longer holds are removed, ids whose vector
        changed are moved, and lost or stray bucket entries are mended.

        A changed vector is found by hashing every row again and comparing the
        record with the stored one (one pass over the store, like a build, but
        writing only what differs): the store needs no version column, and a
        record is a function of the vector. Run it after a Redis failover or a
        restore from an older snapshot, or after writes made to the table
        behind lshrs's back.
        """
        store = self._require_store("reconcile()")
        if not callable(getattr(store, "batches", None)):
            raise TypeError(f"{type(store).__name__} cannot list its rows (no batches()): it cannot be reconciled")
        with _progress.reporting(self._progress_of(progress), "reconcile") as report:
            return await self._reconcile(store, report)

    async def _hashed(self, opened: _Opened, rows: Rows, skip_held: bool) -> tuple[Rows, npt.NDArray[np.uint8]]:
        """A batch with its records (:meth:`_hashed_block` of one batch)."""
        ((kept, records, _),) = await self._hashed_block(opened, [rows], skip_held)
        return kept, records

    async def _hashed_block(
        self, opened: _Opened, block: list[Rows], skip_held: bool, screen: _Screen | None = None
    ) -> list[_Hashed]:
        """Each batch of ``block`` with its records, hashed as one matrix, less
        the ids the index holds when ``skip_held`` (a resumed build): those
        are not even hashed; less the rows ``screen`` leaves out."""
        assert opened.family is not None
        usable = block if screen is None else [screen.usable(rows, opened.config.dim) for rows in block]
        for rows in usable:  # a store's rows, met here first
            check_id_bytes(rows.ids, opened.config.id_bytes)
        kept = [rows.only(~await opened.sharded.held(rows.ids)) if skip_held else rows for rows in usable]
        vectors = [as_vectors(rows.vectors, opened.config.dim) for rows in kept if len(rows)]
        if not vectors:  # every row skipped
            return [_Hashed(rows, np.empty((0, 0), np.uint8), _read(batch)) for rows, batch in zip(kept, block)]
        records = await self._records(opened.family, vectors[0] if len(vectors) == 1 else np.concatenate(vectors))
        ends = np.cumsum([len(rows) for rows in kept]).tolist()
        return [
            _Hashed(rows, records[end - len(rows) : end], _read(batch)) for rows, end, batch in zip(kept, ends, block)
        ]

    async def _reconcile(self, store: VectorStore, report: ProgressCallback | None) -> Reconciled:
        opened = await self._refreshed(await self._trained(None, report))
        index = opened.sharded
        counts = np.zeros(4, dtype=np.int64)
        listed: list[npt.NDArray[np.int64]] = []

        async def write(rows: Rows, records: npt.NDArray[np.uint8]) -> None:
            nonlocal counts
            listed.append(rows.ids)
            async with self._leased(index, rows.ids):
                with _whole():
                    keep = await self._still_stored(store, rows.ids)
                    counts += await index.repair(rows.ids[keep], records[keep])

        screen = _Screen(strict=False)  # a row the build skips is one the index must not hold
        await self._stream(store.batches(self._batch_size), await store.count(), opened, write, report, screen=screen)
        screen.tell(report)
        stored = np.concatenate(listed) if listed else np.empty(0, dtype=np.int64)
        gone = np.setdiff1d(await index.indexed_ids(), stored)
        removed = 0
        if len(gone):
            async with self._leased(index, gone):
                with _whole():
                    if isinstance(store, WritableStore):  # unless written since the pass
                        gone = gone[~np.isin(gone, (await store.fetch(gone)).ids)]
                    removed = await index.delete(gone)
        strays = await index.remove_strays()
        await index.recount()
        added, updated, unchanged, repaired = (int(c) for c in counts)
        return Reconciled(added, removed, updated, unchanged, repaired, strays)

    async def _still_stored(self, store: VectorStore, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Which ``ids`` an owned store holds now (a concurrent write may have
        changed that since they were read); a read-only store is the truth as
        read, so all of them."""
        if isinstance(store, WritableStore):
            return np.isin(ids, (await store.fetch(ids)).ids)
        return np.ones(len(ids), dtype=bool)

    async def _write_read_rows(
        self, store: VectorStore, index: ShardedIndex, rows: Rows, records: npt.NDArray[np.uint8], chain: WriteChain
    ) -> None:
        """Index rows read from the store. An owned store may have lost some of
        them to a delete since they were read: under the lease, only the ids it
        still holds are written, or the index would name a vector it lacks."""
        async with self._leased(index, rows.ids):
            with _whole():
                still = await self._still_stored(store, rows.ids)
                await index.upsert(rows.ids[still], records[still], chain)

    async def ingest(
        self, id: int, vector: Any = None, *, text: str | None = None, timeout: float | None = None
    ) -> None:
        """Insert one id, or replace it (it moves to its new buckets).

        With a store lshrs only reads (a table you write), the row is the
        truth: ``ingest(id)`` reads its vector, and an id the store lacks, or
        a ``vector`` that differs from the row, is a ``ValueError`` (the index
        would name a vector the store does not hold). With a store lshrs
        writes, or none, ``vector`` is required.
        """
        ids = [as_id(id)]
        async with self._call("ingest()", timeout):
            if self._store is not None and not isinstance(self._store, WritableStore):
                vector = await self._stored_vector(self._store, ids[0], vector)
            elif vector is None:
                raise TypeError("ingest() needs the vector: lshrs writes this store (or there is none)")
            await self._index(ids, vector, None if text is None else [text], None, False)

    async def _stored_vector(self, store: VectorStore, id_: int, given: Any) -> FloatArray:
        rows = await store.fetch(np.array([id_], dtype=np.int64))
        if not len(rows):
            raise ValueError(
                f"id {id_} is not in the store (or its vector is NULL): write the row first, then ingest it"
            )
        stored = rows.vectors[:1]
        if given is not None:
            vector = as_vectors(given, self.config.dim, what="vector")
            if vector.shape != stored.shape or not np.allclose(vector, stored, rtol=1e-3, atol=1e-5):
                raise ValueError(
                    f"the vector given for id {id_} differs from the store's row; "
                    "ingest(id) with no vector indexes the row as stored"
                )
        return np.asarray(stored, dtype=np.float32)

    async def delete(self, ids: Iterable[int] | npt.NDArray[np.integer[Any]], *, timeout: float | None = None) -> int:
        """Remove every trace of ``ids``; returns how many were indexed (unknown
        ids are ignored, so ``len(ids) - result`` of them were not there)."""
        id_array = np.unique(as_ids(ids, unique=False))
        if len(id_array) == 0:
            return 0
        async with self._call("delete()", timeout):
            index = (await self._refreshed(await self._ready())).sharded
            async with self._leased(index, id_array):
                with _whole():
                    removed = await index.delete(id_array)
                    if isinstance(self._store, WritableStore):
                        await self._store.remove(id_array)
        return removed

    def _call(self, what: str, timeout: float | None) -> Call:
        """One public call: its deadline (``timeout=``, else the client's)
        around its wait for a slot and all its work."""
        check_timeout("timeout", timeout)
        return Call(self._admission, timeout if timeout is not None else self._timeout, what)

    # -- reading -------------------------------------------------------------------

    async def warm(self) -> int:
        """Load every signature of the index into this process's signature cache
        (bounded by ``signature_cache``), so that even the first queries read only
        bucket ids from Redis. Optional: the cache also fills as queries run."""
        index = (await self._ready()).sharded
        return await index.warm()

    async def count(self) -> int:
        """How many ids the index holds."""
        index = (await self._ready()).sharded
        return await index.count()

    async def query(
        self,
        vector: Any,
        *,
        top_k: int = 10,
        top_p: float | None = None,
        where: Any = None,
        timeout: float | None = None,
    ) -> list[Hit]:
        """Nearest ids to ``vector``, best first.

        With a store, candidates are reranked by exact cosine; ``top_p`` keeps the
        best fraction of that reranked pool (``top_k`` still caps it). Without a
        store, scores are LSH estimates (``Hit.exact`` is False). Queries from
        concurrent tasks that arrive together are answered as one batch
        (``_coalesce``); each gets the hits it would get alone.

        ``where`` keeps only hits that pass a filter: a set of ids or a
        callable ``(ids) -> bool mask`` (any store), a SQL condition with
        bound parameters for ``PostgresStore`` (``("lang = $1", "en")``), a
        SQLAlchemy expression for ``SQLAlchemyStore``. A filtered query that
        finds fewer than ``top_k`` hits reads more buckets (``_filters``).
        """
        async with self._call("query()", timeout):
            config = (await self._ready()).config
            matrix = as_vectors(vector, config.dim, what="vector")
            if len(matrix) != 1:
                raise ValueError(f"query() takes one vector, got {len(matrix)}; use query_many()")
            self._check_options(top_k, top_p)  # here, so a bad call fails alone, before it joins a batch
            if where is not None:  # a filter is the caller's own: not batched with others
                return (await self._query_many(matrix, top_k, top_p, where))[0]
            return await self._coalescer.query(matrix[0], top_k, top_p)

    async def query_many(
        self,
        vectors: Any,
        *,
        top_k: int = 10,
        top_p: float | None = None,
        where: Any = None,
        timeout: float | None = None,
    ) -> list[list[Hit]]:
        """Many queries at once: one matrix product, Redis reads in flight
        together, and one store round trip for all their candidates; ``where``
        as in :meth:`query`, for all of them."""
        async with self._call("query_many()", timeout):
            return await self._query_many(vectors, top_k, top_p, where)

    async def _query_many(self, vectors: Any, top_k: int, top_p: float | None, where: Any = None) -> list[list[Hit]]:
        self._check_options(top_k, top_p)
        await _filters.check(where, self._store)
        opened = await self._refreshed(await self._ready())
        matrix = as_vectors(vectors, opened.config.dim)
        if opened.family is None:  # trained by another client since this one opened?
            opened = await self._trained(fit=False)
        if opened.family is None or opened.probes is None or not len(matrix):  # nothing to find, or to ask
            return [[] for _ in matrix]
        # A query that asks for more neighbours reads more buckets: recall@100
        # trailed recall@10 by 0.07 at equal probes (measured on minilm-100k).
        probes = math.ceil(opened.probes * math.sqrt(max(1.0, top_k / 10)))
        if where is None:
            hits, _ = await self._search(opened, matrix, top_k, top_p, probes)
            return hits
        depth = self._depth(opened, top_k) if self._store is not None else top_k
        exact = await self._exactly(opened, matrix, where, _filters.PREFILTER_DEPTHS * depth, top_k, top_p, depth)
        if exact is not None:
            return exact
        records, found = await self._filtered(opened, matrix, probes, where, top_k, depth)
        hits = await self._ranked(opened, matrix, records, found, top_k, top_p)
        short = [i for i, candidates in enumerate(found) if len(candidates.ids) < top_k]
        if short:
            # The buckets ran out before top_k passed (hyperplanes reach only
            # rows near the query): the passing rows, if the store can list
            # them and they are few enough to rank, answer these exactly.
            exact = await self._exactly(opened, matrix[short], where, self._max_candidates, top_k, top_p, depth)
            for i, answer in zip(short, exact or []):
                hits[i] = answer
        return hits

    async def _exactly(
        self, opened: _Opened, matrix: FloatArray, where: Any, most: int, top_k: int, top_p: float | None, depth: int
    ) -> list[list[Hit]] | None:
        """Hits ranked exactly over every row that passes ``where``, if at most
        ``most`` do and the filter can list them (``_filters.few_enough``); the
        ids the index does not hold stay out, as a deleted id must. ``top_p``
        keeps its share of the ``depth`` nearest, as on the index path."""
        if self._store is None:
            return None
        few = await _filters.few_enough(where, self._store, most)
        if few is None:
            return None
        few = few.only(await opened.sharded.held(few.ids))
        return _scored(matrix, few, [few.ids] * len(matrix), top_k, top_p, pool=depth)

    def _check_options(self, top_k: int, top_p: float | None) -> None:
        check_top(top_k, top_p)
        if top_p is not None:
            self._require_store("top_p")

    async def _refreshed(self, opened: _Opened) -> _Opened:
        """Every ``TUNING_REFRESH`` seconds (one MGET), check that the stored
        configuration is still the one opened, and follow a ``tune()`` run by
        another client (without ``probes=``). A Redis restarted empty or
        flushed under a live client raises ``IndexMissing`` instead of
        answering ``[]`` or starting a new index behind the user's back."""
        now = asyncio.get_running_loop().time()
        if now - self._tuning_read < TUNING_REFRESH:
            return opened
        self._tuning_read = now
        config, saved = await opened.sharded.config_and_tuning()
        if config is None or IndexConfig.from_json(config) != opened.config:
            what = "is gone from Redis" if config is None else "was replaced by another configuration"
            raise IndexMissing(
                f"the index under prefix {self._prefix!r} {what} (restarted empty, flushed, evicted or dropped "
                "by another client): close() this client and build it again with index()"
            )
        if saved is None or self._probes is not None or opened.family is None:
            return opened
        probes = Tuning.from_json(saved).probes
        if probes != opened.probes and self._opened is opened:
            self._opened = opened = opened._replace(probes=probes)
        return opened

    def _depth(self, opened: _Opened, top_k: int) -> int:
        """Candidates reranked exactly: ``rerank`` for the usual top 10, and
        as many more as a larger ``top_k`` needs (recall@100 fell to 0.78
        where recall@10 was 0.97 when 256 were reranked whatever was asked).
        Left unset, it follows the family and the index size that the query
        scripts just reported (``Family.default_rerank``)."""
        assert opened.family is not None
        rerank = self._rerank
        if rerank is None:
            rerank = opened.family.default_rerank(opened.sharded.reported_size())
        return max(rerank, math.ceil(rerank * top_k / 10))

    async def _search(
        self, opened: _Opened, matrix: FloatArray, top_k: int, top_p: float | None, probes: int
    ) -> tuple[list[list[Hit]], list[int]]:
        """Hits of checked queries, and how many candidates each query read."""
        records, found = await self._candidates(opened, matrix, probes)
        hits = await self._ranked(opened, matrix, records, found, top_k, top_p)
        return hits, [len(candidates.ids) for candidates in found]

    async def _candidates(
        self, opened: _Opened, matrix: FloatArray, probes: int, unread: Sequence[tuple[set[bytes], int]] | None = None
    ) -> tuple[npt.NDArray[np.uint8], list[Candidates]]:
        """The queries' sketch records and their candidates from ``probes``
        buckets. With ``unread`` (a query's bucket suffixes read before, which
        gains those read now, and how many more candidates it may take), only
        from the buckets not read yet."""
        family, index = opened.family, opened.sharded
        assert family is not None
        unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
        if len(unit) >= _THREAD_QUERIES:
            records = await anyio.to_thread.run_sync(family.sketches, unit)
            keys = await anyio.to_thread.run_sync(family.plan, unit, probes)
        else:
            records, keys = family.sketches(unit), family.plan(unit, probes)
        caps = [self._max_candidates] * len(keys)
        if unread is not None:
            keys = [_unread(k, seen, index.probe_key_width) for k, (seen, _) in zip(keys, unread)]
            caps = [cap for _, cap in unread]
        found = await index.candidates(keys, caps)
        return records, found

    async def _filtered(
        self, opened: _Opened, matrix: FloatArray, probes: int, where: Any, top_k: int, depth: int
    ) -> tuple[npt.NDArray[np.uint8], list[Candidates]]:
        """The candidates of filtered queries that pass ``where``: enough of
        the nearest by sketch distance for the rerank, from as many buckets
        as the share that passes calls for (``_filters.widening``).

        Candidates are checked nearest first, a chunk at a time, until
        ``depth`` (the rerank depth) pass: a store's condition then gets a few hundred ids
        a round trip, not every candidate (3,200 ids took 19 ms of a 57 ms
        query at 100k rows). The rerank sees exactly the passing candidates
        it would see were all of them checked."""
        family = opened.family
        assert family is not None
        read: list[set[bytes]] = [set() for _ in matrix]  # each query's buckets read so far
        records, found = await self._candidates(opened, matrix, probes, [(seen, self._max_candidates) for seen in read])
        checks = [_filters.Checks(c, family.distances(c.signatures, r), None) for c, r in zip(found, records)]
        scales = [1.0] * len(matrix)
        done = [len(c.ids) >= self._max_candidates for c in found]  # the cap reached: reading more cannot help
        while True:
            asking = [check.next(depth) for check in checks]
            asked = np.concatenate([check.ids[at] for check, at in zip(checks, asking)])
            if len(asked):
                passing = await self._passing(np.unique(asked) if len(checks) > 1 else asked, where)
                for check, at in zip(checks, asking):
                    check.answer(at, passing)
            wider: dict[int, float] = {}
            for i, check in enumerate(checks):
                want = _filters.widening(*check.counts(), scales[i], top_k)
                if want > scales[i] and not done[i]:
                    wider[i] = want
            for scale in sorted(set(wider.values())):
                again = [i for i, want in wider.items() if want == scale]
                # Only the buckets not read yet: a round at 10% passing read
                # each query's nearest buckets up to five times over.
                wider_probes = math.ceil(probes * scale)
                room = [(read[i], self._max_candidates - len(checks[i].ids)) for i in again]
                _, more = await self._candidates(opened, matrix[again], wider_probes, room)
                for i, fresh in zip(again, more):
                    candidates = checks[i].candidates.plus(fresh)
                    # No new candidates, or the cap reached: reading more cannot help.
                    done[i] = len(candidates.ids) <= len(checks[i].ids) or len(candidates.ids) >= self._max_candidates
                    distance = family.distances(candidates.signatures, records[i])
                    checks[i], scales[i] = _filters.Checks(candidates, distance, checks[i]), scale
            if not len(asked) and not wider:
                return records, [check.passed() for check in checks]

    async def _ranked(
        self,
        opened: _Opened,
        matrix: FloatArray,
        records: npt.NDArray[np.uint8],
        found: Sequence[Candidates],
        top_k: int,
        top_p: float | None,
    ) -> list[list[Hit]]:
        """Candidates ranked by sketch distance, the best reranked by exact
        cosine through the store (without one, the sketch's estimate)."""
        family = opened.family
        assert family is not None
        depth = self._depth(opened, top_k) if self._store is not None else top_k
        shortlists = []
        for candidates, record in zip(found, records):
            distance = family.distances(candidates.signatures, record)
            keep = min(len(distance), depth)
            best = np.argpartition(distance, keep - 1)[:keep] if keep else np.empty(0, np.int64)
            best = best[np.lexsort((candidates.ids[best], distance[best]))]
            shortlists.append((candidates.ids[best], distance[best]))
        if self._store is None:
            return [
                [Hit(int(i), float(c), None, False) for i, c in zip(ids, family.cosines(dist))]
                for ids, dist in shortlists
            ]
        return await self._rerank_exact(matrix, [ids for ids, _ in shortlists], top_k, top_p)

    async def _passing(self, ids: npt.NDArray[np.int64], where: Any) -> npt.NDArray[np.int64]:
        """Which of ``ids`` pass ``where``: an id filter here, a store's
        condition in one id-only round trip."""
        if _filters.is_id_filter(where):
            return ids[_filters.id_mask(where, ids)]
        return await cast(FilteringStore, self._store).passing(ids, where)

    async def tune(
        self,
        target_recall: float = 0.95,
        *,
        queries: Any = None,
        sample: int = 200,
        top_k: int = 10,
        progress: bool | ProgressCallback | None = None,
        save: bool = True,
    ) -> Tuning:
        """Measure this index against exact search and keep the fewest probes
        that reach ``target_recall`` (mean recall@``top_k``).

        The queries are ``queries`` (an (n, dim) array) when given: pass a
        sample of real queries, because stored vectors can be far easier to
        search than what users ask (measured on a generated corpus: 0.96 on
        stored vectors, 0.77 on real queries, same probes). Otherwise
        ``sample`` stored vectors, each with its own id left out of its truth.
        The truth is exact cosine over every vector of the store, streamed
        once (so this reads the whole store: run it after a build, not per
        request). The chosen ``probes`` is saved beside the index
        configuration and used by every client that opens the prefix without
        ``probes=``; ``save=False`` only measures (a recall curve, a what-if)
        and changes nothing. Progress counts the probe settings tried.
        """
        setting = self._progress_of(progress)
        if not 0.0 < target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
        _positive_int("sample", sample)
        _positive_int("top_k", top_k)
        store = self._require_store("tune()")
        opened = await self._ready()
        family, index = opened.family, opened.sharded
        total = await index.count()
        if not total or family is None:
            raise ValueError("tune() needs a built index: this one is empty")
        own_ids: npt.NDArray[np.int64] | None = None
        if queries is not None:
            vectors = as_vectors(queries, opened.config.dim, what="queries")
        else:
            rows = await store.fetch(await index.sample_ids(sample))
            vectors, own_ids = rows.vectors, rows.ids
        if not len(vectors):
            raise ValueError("tune() has no queries: pass some, or fill the store that the index points into")
        truth = await exact_neighbours(store, vectors, own_ids, top_k, self._batch_size)
        curve: list[TuningPoint] = []
        # A stored vector finds itself first: ask for one more and drop it.
        owns: list[int | None] = [None] * len(vectors) if own_ids is None else own_ids.tolist()
        extra = 0 if own_ids is None else 1
        ladder = family.ladder()
        with _progress.reporting(setting, "tune", unit="probe settings") as report:
            for step, probes in enumerate(ladder, 1):
                hits, read = [], []
                for start in range(0, len(vectors), _TUNE_BATCH):  # bounded, so no query waits behind hundreds
                    batch_hits, batch_read = await self._search(
                        opened, vectors[start : start + _TUNE_BATCH], top_k + extra, None, probes
                    )
                    hits += batch_hits
                    read += batch_read
                found = [[h.id for h in query_hits if h.id != own][:top_k] for query_hits, own in zip(hits, owns)]
                curve.append(TuningPoint(probes, recall(found, truth), float(np.mean(read))))
                # Reached, or every query already reads the whole index: the
                # ladder ends here, and so does its bar, full.
                finished = curve[-1].recall >= target_recall or curve[-1].candidates >= total
                if report:
                    report(step, step if finished else len(ladder))
                if finished:
                    break
        best = curve[-1]  # the ladder stops at the first point that reaches the target, or at the end
        rows_for_size = choose_rows(total) if opened.config.hashing == "hyperplane" else 0
        tuning = Tuning(
            target_recall=target_recall,
            probes=best.probes,
            recall=best.recall,
            candidate_share=best.candidates / total,
            sample=len(vectors),
            curve=curve,
            rebuild_bands=choose_bands(self._threshold, rows_for_size) if rows_for_size else 0,
            rebuild_rows=rows_for_size,
        )
        if save:
            await index.save_tuning(tuning.to_json())
            if self._probes is None and self._opened is not None:
                self._opened = self._opened._replace(probes=best.probes)
        return tuning

    async def _rerank_exact(
        self,
        queries: FloatArray,
        shortlists: list[npt.NDArray[np.int64]],
        top_k: int,
        top_p: float | None,
    ) -> list[list[Hit]]:
        """Exact cosine on the shortlisted vectors, fetched for all queries at once."""
        assert self._store is not None
        wanted = np.unique(np.concatenate(shortlists))
        rows = await self._store.fetch(wanted) if len(wanted) else None
        if rows is None or not len(rows):  # the store has none of the candidates
            return [[] for _ in shortlists]
        return _scored(queries, rows, shortlists, top_k, top_p)

    async def stats(self, *, exact: bool = False, progress: bool | ProgressCallback | None = None) -> dict[str, Any]:
        """Configuration, probes in force, vector and bucket counts, bucket size
        histogram (powers of two) and the index's own Redis memory.

        The buckets are sampled (at most ``STATS_SAMPLE`` bucket keys, found
        by a scan; the counts and the memory of the rest are extrapolated
        from the ids each table holds) unless ``exact=True``, which reads
        every bucket key (seconds for millions of hyperplane buckets).
        ``bucket_statistics`` says which it was. Progress counts the bucket
        keys read.
        """
        setting = self._progress_of(progress)
        opened = await self._ready()
        config, index = opened.config, opened.sharded
        with _progress.reporting(setting, "stats", unit="bucket keys") as counted:
            sample, used, complete = await index.bucket_sample(None if exact else STATS_SAMPLE, counted)
        sizes = np.asarray(sample, dtype=np.int64)
        histogram: dict[str, int] = {}
        if len(sizes):
            edges = 2 ** np.arange(int(np.log2(sizes.max())) + 2)
            counts, _ = np.histogram(sizes, bins=edges)
            histogram = {f"{lo}-{hi - 1}": int(c) for lo, hi, c in zip(edges[:-1], edges[1:], counts) if c}
        vectors = await index.count()
        buckets = len(sizes) if complete else round(vectors * index.tables / max(float(sizes.mean()), 1.0))
        bucket_memory = sum(used) if complete else round(buckets * float(np.mean(used)))
        memory = bucket_memory + await index.meta_memory()
        report: dict[str, Any] = {
            "prefix": self._prefix,
            "config": dataclasses.asdict(config),
            "probes": opened.probes,
            "vectors": vectors,
            "buckets": buckets,
            "bucket_statistics": "exact" if complete else f"sampled from {len(sizes):,} buckets",
            "mean_bucket_size": float(sizes.mean()) if len(sizes) else 0.0,
            "largest_bucket": int(sizes.max()) if len(sizes) else 0,
            "bucket_size_histogram": histogram,
            "index_memory_bytes": memory,
            "index_bytes_per_vector": round(memory / vectors, 1) if vectors else 0.0,
        }
        if isinstance(opened.family, LearnedFamily):
            partition = opened.family.partition
            report["partition_buckets"] = partition.buckets
            report["trained_for"] = partition.trained_for
            report["outgrown"] = vectors > OUTGROWN * max(partition.trained_for, 1)
            if report["outgrown"]:
                report["advice"] = (
                    f"the index holds {vectors} vectors but its buckets were sized for {partition.trained_for}: "
                    "queries read ever larger buckets; build it again under a new prefix (or drop() and index())"
                )
        return report

    def _require_store(self, what: str) -> VectorStore:
        if self._store is None:
            raise ValueError(f"{what} needs a store: pass store= to LSHRS (e.g. InMemoryStore())")
        return self._store

    async def drop(self) -> int:
        """Delete every key of this prefix (a keyspace scan: for tearing down)."""
        opened = await self._ready()
        await opened.sharded.stop_warming()  # a warm scanning the prefix would cache what is being deleted
        config = opened.config
        client = self._client
        assert client is not None
        deleted = 0
        patterns = [f"{{{self._prefix}}}:*"] + [f"{{{self._prefix}:{s}}}:*" for s in range(config.shards)]
        for pattern in patterns:  # one hash tag per pattern, so one slot per DEL
            keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
            for start in range(0, len(keys), 500):
                deleted += await client.delete(*keys[start : start + 500])
        self._opened = None
        return deleted


async def _check_eviction(client: Client) -> None:
    """Warn when Redis may evict index keys: a partly evicted index silently
    loses recall, and a fully evicted one would be recreated empty."""
    try:
        reply = await client.config_get("maxmemory-policy")
    except RedisError:  # managed services often refuse CONFIG: nothing to learn
        return
    evicting = re.search(r"allkeys-[a-z]+", str(reply))  # a cluster replies per node: any node will do
    if evicting:
        warnings.warn(
            f"Redis runs with maxmemory-policy {evicting.group()}: it may evict the index's keys, which loses "
            "results silently; run the index's Redis with maxmemory-policy noeviction",
            RuntimeWarning,
            stacklevel=4,
        )


async def _release_until_done(index: ShardedIndex, ids: npt.NDArray[np.int64], token: bytes) -> None:
    """Release leases a failed write left behind, retrying until the release
    lands or the leases would have lapsed anyway. A write cut by a failover
    leaves leases that reached the promoted replica; released once, against
    the dead master, they held their ids for the full 30 s, and a reconcile
    run after the failover could not write them."""
    loop = asyncio.get_running_loop()
    lapsed, pause = loop.time() + _LEASE_MS / 1000, 0.05
    while True:
        try:
            await index.release(ids, token)
            return
        except RedisError:
            if loop.time() + pause > lapsed:
                raise
            await asyncio.sleep(pause)
            pause = min(2 * pause, 1.0)


def _unread(plan: bytes, read: set[bytes], width: int) -> bytes:
    """The bucket suffixes of ``plan`` not in ``read``, which gains them."""
    fresh = [key for key in plan_keys(plan, width) if key not in read]
    read.update(fresh)
    return b"".join(fresh)


def _whole() -> anyio.CancelScope:
    """Shield a write to the store and the index from cancellation: once
    begun, both halves run (each bounded by the socket timeout), so a caller
    that gives up never leaves an id in one and not the other."""
    return anyio.CancelScope(shield=True)


def _train_rows(buckets: int) -> int:
    """The most rows a partition of ``buckets`` is fitted on."""
    return max(_TRAIN_ROWS, _TRAIN_LEAST * buckets)


def _scored(
    queries: FloatArray,
    rows: Rows,
    shortlists: list[npt.NDArray[np.int64]],
    top_k: int,
    top_p: float | None,
    pool: int | None = None,
) -> list[list[Hit]]:
    """Hits by exact cosine over each query's shortlisted ``rows``; ``top_p``
    keeps that share of the ``pool`` nearest (default: the whole shortlist)."""
    order = np.argsort(rows.ids, kind="stable")
    sorted_ids = rows.ids[order]
    # Norms only: a normalised copy of every fetched vector (16,000 of them
    # for 64 coalesced queries) cost more than the scoring itself.
    norms = np.sqrt(np.einsum("ij,ij->i", rows.vectors, rows.vectors))
    norms[norms == 0] = 1.0  # a user's table may hold zero rows
    results = []
    for query, ids in zip(queries, shortlists):
        at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        rows_of = order[at[sorted_ids[at] == ids]]  # ids the store lacks are skipped
        scores = (rows.vectors[rows_of] @ query) / (norms[rows_of] * np.linalg.norm(query))
        keep = len(scores) if top_p is None else math.ceil(top_p * min(len(scores), pool or len(scores)))
        best = np.lexsort((rows.ids[rows_of], -scores))[: min(top_k, keep)]
        texts = rows.texts
        results.append(
            [
                Hit(int(rows.ids[rows_of[i]]), float(scores[i]), texts[rows_of[i]] if texts is not None else None)
                for i in best
            ]
        )
    return results


def _sketch_bits(config: IndexConfig) -> int:
    """Columns of the stored projection: the bands' bits, or the learned sketch's."""
    return config.sketch_bits if config.hashing == "kmeans" else config.num_bands * config.rows_per_band


def _layout(config: IndexConfig) -> Layout:
    if config.hashing == "kmeans" and config.code_bytes:  # records of 36 bytes fit Redis's compact listpacks
        layout = learned_layout(config.code_bytes, grouped=True, tables=1 + config.spill)
    elif config.hashing == "kmeans":
        layout = learned_layout(config.sketch_bits // 8)
    else:
        layout = banded_layout(Bands(config.num_bands, config.rows_per_band))
    return dataclasses.replace(layout, id_bytes=config.id_bytes)


def _positive_int(name: str, value: Any, most: int | None = None, least: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < least or (most is not None and value > most):
        bound = f" and at most {most}" if most is not None else ""
        raise ValueError(f"{name} must be at least {least}{bound}, got {value}")
