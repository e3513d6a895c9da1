"""``LSHRS``: hash vectors, keep the buckets in Redis, rerank through a store."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple

import anyio
import anyio.to_thread
import numpy as np
import numpy.typing as npt

from . import _progress, _scripts
from ._config import IndexConfig, check_prefix, choose_bands, choose_rows, default_probes
from ._connect import check_client, connect
from ._hashing import Bands, hamming, make_projection, probe_keys, project, standardise
from ._index import Client, ShardedIndex, meta_keys
from ._tuning import Tuning, TuningPoint, exact_neighbours, probe_ladder, recall
from ._types import Hit, ProgressCallback, Rows, VectorStore, WritableStore
from ._validate import as_id, as_ids, as_vectors, check_batch, check_top

FloatArray = npt.NDArray[np.float32]


class _Opened(NamedTuple):
    """What an open index needs: the stored configuration and what follows from it."""

    config: IndexConfig
    bands: Bands
    projection: FloatArray
    sharded: ShardedIndex
    probes: int  # buckets a query reads: probes=, else the saved tuning, else the default


#: Batches at least this large are hashed in a worker thread, off the event loop.
_THREAD_ROWS = 256
#: Query batches at least this large plan their probes (about 0.5 ms a query)
#: in a worker thread.
_THREAD_QUERIES = 16


class LSHRS:
    """A locality-sensitive-hash index in Redis over vectors kept in a store.

    Every argument is keyword-only and defaulted but ``dim``. Left as None,
    ``num_bands`` and ``rows_per_band`` follow from ``threshold`` (the cosine a
    neighbour should have to be found with probability 0.9 by exact buckets
    alone) and ``expected_size``; ``seed`` defaults to 0 and ``shards`` to 1.
    Opening a prefix that already holds an index adopts its configuration;
    explicitly given values that differ raise ``ValueError``.

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
        num_bands: int | None = None,
        rows_per_band: int | None = None,
        threshold: float = 0.6,
        expected_size: int = 1_000_000,
        seed: int | None = None,
        shards: int | None = None,
        probes: int | None = None,
        rerank: int = 256,
        max_candidates: int = 50_000,
        signature_cache: int = 2_000_000,
        batch_size: int = 10_000,
        timeout: float | None = 10.0,
        redis_options: Mapping[str, Any] | None = None,
        progress: bool | ProgressCallback | None = None,
    ) -> None:
        _positive_int("dim", dim)
        if redis_url is not None and redis is not None:
            raise ValueError("pass redis_url or redis, not both")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be a cosine in (0, 1), got {threshold}")
        for name, value in (
            ("rerank", rerank),
            ("max_candidates", max_candidates),
            ("batch_size", batch_size),
            ("expected_size", expected_size),
        ):
            _positive_int(name, value)
        given = {"num_bands": num_bands, "rows_per_band": rows_per_band, "seed": seed, "shards": shards}
        self._explicit = {name for name, value in given.items() if value is not None}
        rows = rows_per_band if rows_per_band is not None else choose_rows(expected_size)
        _positive_int("rows_per_band", rows, most=64)
        bands = num_bands if num_bands is not None else choose_bands(threshold, rows)
        _positive_int("num_bands", bands, most=255)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        _positive_int("shards", shards if shards is not None else 1, most=4096)
        if probes is not None:
            _positive_int("probes", probes)
        _positive_int("signature_cache", signature_cache, least=0)
        self._threshold = threshold
        self._wanted = IndexConfig(
            dim=dim,
            num_bands=bands,
            rows_per_band=rows,
            seed=seed if seed is not None else 0,
            shards=shards if shards is not None else 1,
        )
        self._prefix = check_prefix(prefix)
        self._url = redis_url or "redis://localhost:6379/0"
        self._given_client = check_client(redis) if redis is not None else None
        self._client: Client | None = None
        self._store = store
        self._probes = probes
        self._rerank = rerank
        self._max_candidates = max_candidates
        self._cache_size = signature_cache
        self._batch_size = batch_size
        self._timeout = timeout
        self._redis_options = dict(redis_options or {})
        self._progress = _progress.resolve(progress)
        self._open_lock = asyncio.Lock()
        self._opened: _Opened | None = None

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
        client = self._given_client or await connect(self._url, self._timeout, self._redis_options)
        self._client = client
        cfg_key, proj_key = meta_keys(self._prefix)
        raw_cfg = await client.get(cfg_key)
        if raw_cfg is None:
            wanted = self._wanted
            matrix = make_projection(wanted.dim, wanted.num_bands * wanted.rows_per_band, wanted.seed)
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
        bands = Bands(stored.num_bands, stored.rows_per_band)
        if raw_proj is None or len(raw_proj) != 4 * stored.dim * bands.num_bits:
            raise ValueError(f"prefix {self._prefix!r} has a damaged projection matrix; drop the index")
        projection = standardise(np.frombuffer(raw_proj, dtype=np.float32).reshape(stored.dim, bands.num_bits))
        if self._store is not None:
            store_dim = await self._store.dimension()
            if store_dim is not None and store_dim != stored.dim:
                raise ValueError(f"the store holds {store_dim}-d vectors but the index is {stored.dim}-d")
        sharded = ShardedIndex(client, self._prefix, stored.shards, bands, self._cache_size)
        probes = self._probes
        if probes is None:
            saved = await sharded.saved_tuning()
            probes = Tuning.from_json(saved).probes if saved else default_probes(bands.num_bands, bands.rows)
        return _Opened(stored, bands, projection, sharded, probes)

    async def close(self) -> None:
        """Close the Redis client lshrs opened (not one passed in) and the store."""
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

    # -- writing -------------------------------------------------------------------

    async def _hash(self, vectors: FloatArray) -> tuple[FloatArray, npt.NDArray[np.uint8]]:
        """Projections and packed signatures of a batch: one matrix product, in a
        worker thread when the batch is large enough to stall the event loop."""
        opened = await self._ready()
        bands, projection = opened.bands, opened.projection

        def work() -> tuple[FloatArray, npt.NDArray[np.uint8]]:
            margins = project(vectors, projection)
            return margins, bands.pack(margins > 0)

        if len(vectors) >= _THREAD_ROWS:
            return await anyio.to_thread.run_sync(work)
        return work()

    async def index(
        self,
        ids: Iterable[int] | npt.NDArray[np.integer[Any]] | None = None,
        vectors: Any = None,
        *,
        texts: Sequence[str | None] | None = None,
        progress: bool | ProgressCallback | None = None,
    ) -> int:
        """Add or replace a batch; with no arguments, stream every row of the store.

        Returns how many vectors were read. Re-running a build is idempotent:
        ids whose signature is unchanged cost one lookup and no write.
        """
        config = (await self._ready()).config
        report = _progress.resolve(progress) if progress is not None else self._progress
        if ids is None and vectors is None:
            return await self._index_store(report)
        if ids is None or vectors is None:
            raise TypeError("index() takes both ids and vectors, or neither (to read the store)")
        id_array = as_ids(ids)
        matrix = as_vectors(vectors, config.dim)
        check_batch(id_array, matrix, texts)
        if isinstance(self._store, WritableStore):
            await self._store.put(id_array, matrix, texts)
        for start in range(0, len(id_array), self._batch_size):
            stop = start + self._batch_size
            await self._write(id_array[start:stop], matrix[start:stop])
            if report:
                report(min(stop, len(id_array)), len(id_array))
        return len(id_array)

    async def _index_store(self, report: ProgressCallback | None) -> int:
        """A three-stage pipeline: batch i+2 is read from the store while batch
        i+1 is hashed in a worker thread and batch i is written to Redis."""
        store = self._require_store("index() with no arguments")
        opened = await self._ready()
        config, index = opened.config, opened.sharded
        total = await store.count()
        to_hash, hashing = anyio.create_memory_object_stream[Rows](1)
        to_write, writing = anyio.create_memory_object_stream[tuple[Rows, npt.NDArray[np.uint8]]](1)
        done = 0

        async def read() -> None:
            async with to_hash:
                async for rows in store.batches(self._batch_size):
                    await to_hash.send(rows)

        async def hash_batches() -> None:
            async with hashing, to_write:
                async for rows in hashing:
                    _, signatures = await self._hash(as_vectors(rows.vectors, config.dim))
                    await to_write.send((rows, signatures))

        async with anyio.create_task_group() as group:
            group.start_soon(read)
            group.start_soon(hash_batches)
            async with writing:
                async for rows, signatures in writing:
                    await index.upsert(rows.ids, signatures)
                    done += len(rows)
                    if report:
                        report(done, total)
        return done

    async def _write(self, ids: npt.NDArray[np.int64], vectors: FloatArray) -> None:
        index = (await self._ready()).sharded
        _, signatures = await self._hash(vectors)
        await index.upsert(ids, signatures)

    async def ingest(self, id: int, vector: Any, *, text: str | None = None) -> None:
        """Insert one id, or replace it (it moves to its new buckets)."""
        await self.index([as_id(id)], vector, texts=None if text is None else [text])

    async def delete(self, ids: Iterable[int] | npt.NDArray[np.integer[Any]]) -> int:
        """Remove every trace of ``ids``; returns how many were indexed (unknown
        ids are ignored, so ``len(ids) - result`` of them were not there)."""
        id_array = np.unique(as_ids(ids, unique=False))
        if len(id_array) == 0:
            return 0
        index = (await self._ready()).sharded
        removed = await index.delete(id_array)
        if isinstance(self._store, WritableStore):
            await self._store.remove(id_array)
        return removed

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

    async def query(self, vector: Any, *, top_k: int = 10, top_p: float | None = None) -> list[Hit]:
        """Nearest ids to ``vector``, best first.

        With a store, candidates are reranked by exact cosine; ``top_p`` keeps the
        best fraction of that reranked pool (``top_k`` still caps it). Without a
        store, scores are LSH estimates (``Hit.exact`` is False).
        """
        config = (await self._ready()).config
        matrix = as_vectors(vector, config.dim, what="vector")
        if len(matrix) != 1:
            raise ValueError(f"query() takes one vector, got {len(matrix)}; use query_many()")
        return (await self.query_many(matrix, top_k=top_k, top_p=top_p))[0]

    async def query_many(self, vectors: Any, *, top_k: int = 10, top_p: float | None = None) -> list[list[Hit]]:
        """Many queries at once: one matrix product, Redis reads in flight
        together, and one store round trip for all their candidates."""
        check_top(top_k, top_p)
        if top_p is not None:
            self._require_store("top_p")
        opened = await self._ready()
        hits, _ = await self._search(opened, as_vectors(vectors, opened.config.dim), top_k, top_p, opened.probes)
        return hits

    async def _search(
        self, opened: _Opened, matrix: FloatArray, top_k: int, top_p: float | None, probes: int
    ) -> tuple[list[list[Hit]], list[int]]:
        """Hits of checked queries, and how many candidates each query read."""
        bands, index = opened.bands, opened.sharded
        margins, signatures = await self._hash(matrix)
        margins /= np.linalg.norm(matrix, axis=1, keepdims=True)

        def plan() -> list[bytes]:
            return [probe_keys(bands, m, probes) for m in margins]

        keys = await anyio.to_thread.run_sync(plan) if len(margins) >= _THREAD_QUERIES else plan()
        found = await asyncio.gather(*(index.candidates(k, self._max_candidates) for k in keys))
        shortlists = []
        for candidates, signature in zip(found, signatures):
            distance = hamming(candidates.signatures, signature)
            keep = min(len(distance), self._rerank if self._store is not None else top_k)
            best = np.argpartition(distance, keep - 1)[:keep] if keep else np.empty(0, np.int64)
            best = best[np.lexsort((candidates.ids[best], distance[best]))]
            shortlists.append((candidates.ids[best], distance[best]))
        read = [len(candidates.ids) for candidates in found]
        if self._store is None:
            estimates = [
                [Hit(int(i), float(np.cos(np.pi * d / bands.num_bits)), None, False) for i, d in zip(ids, dist)]
                for ids, dist in shortlists
            ]
            return estimates, read
        return await self._rerank_exact(matrix, [ids for ids, _ in shortlists], top_k, top_p), read

    async def tune(
        self, target_recall: float = 0.95, *, queries: Any = None, sample: int = 200, top_k: int = 10
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
        ``probes=``.
        """
        if not 0.0 < target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
        _positive_int("sample", sample)
        _positive_int("top_k", top_k)
        store = self._require_store("tune()")
        opened = await self._ready()
        bands, index = opened.bands, opened.sharded
        total = await index.count()
        if not total:
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
        for probes in probe_ladder(bands):
            hits, read = await self._search(opened, vectors, top_k + extra, None, probes)
            found = [[h.id for h in query_hits if h.id != own][:top_k] for query_hits, own in zip(hits, owns)]
            curve.append(TuningPoint(probes, recall(found, truth), float(np.mean(read))))
            if curve[-1].recall >= target_recall or curve[-1].candidates >= total:
                break  # reached, or every query already reads the whole index
        best = curve[-1]  # the ladder stops at the first point that reaches the target, or at the end
        rows_for_size = choose_rows(total)
        tuning = Tuning(
            target_recall=target_recall,
            probes=best.probes,
            recall=best.recall,
            candidate_share=best.candidates / total,
            sample=len(vectors),
            curve=curve,
            rebuild_bands=choose_bands(self._threshold, rows_for_size),
            rebuild_rows=rows_for_size,
        )
        await index.save_tuning(tuning.to_json())
        if self._probes is None and self._opened is not None:
            self._opened = self._opened._replace(probes=best.probes)
        return tuning

    async def _rerank_exact(
        self, queries: FloatArray, shortlists: list[npt.NDArray[np.int64]], top_k: int, top_p: float | None
    ) -> list[list[Hit]]:
        """Exact cosine on the shortlisted vectors, fetched for all queries at once."""
        assert self._store is not None
        wanted = np.unique(np.concatenate(shortlists))
        rows = await self._store.fetch(wanted) if len(wanted) else None
        if rows is None or not len(rows):  # the store has none of the candidates
            return [[] for _ in shortlists]
        order = np.argsort(rows.ids, kind="stable")
        sorted_ids = rows.ids[order]
        norms = np.linalg.norm(rows.vectors, axis=1, keepdims=True)
        unit = rows.vectors / np.where(norms == 0, 1.0, norms)  # a user's table may hold zero rows
        results = []
        for query, ids in zip(queries, shortlists):
            at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
            rows_of = order[at[sorted_ids[at] == ids]]  # ids the store lacks are skipped
            scores = unit[rows_of] @ (query / np.linalg.norm(query))
            keep = len(scores) if top_p is None else math.ceil(top_p * len(scores))
            best = np.lexsort((rows.ids[rows_of], -scores))[: min(top_k, keep)]
            texts = rows.texts
            results.append(
                [
                    Hit(int(rows.ids[rows_of[i]]), float(scores[i]), texts[rows_of[i]] if texts is not None else None)
                    for i in best
                ]
            )
        return results

    async def stats(self) -> dict[str, Any]:
        """Configuration, probes in force, vector and bucket counts, bucket size
        histogram (powers of two) and Redis memory. Scans the prefix's buckets:
        not for hot paths."""
        opened = await self._ready()
        config, index = opened.config, opened.sharded
        sizes = np.asarray(await index.bucket_sizes(), dtype=np.int64)
        histogram: dict[str, int] = {}
        if len(sizes):
            edges = 2 ** np.arange(int(np.log2(sizes.max())) + 2)
            counts, _ = np.histogram(sizes, bins=edges)
            histogram = {f"{lo}-{hi - 1}": int(c) for lo, hi, c in zip(edges[:-1], edges[1:], counts) if c}
        assert self._client is not None
        memory = await self._client.info("memory")
        nodes = memory.values() if all(isinstance(v, dict) for v in memory.values()) else [memory]
        return {
            "prefix": self._prefix,
            "config": dataclasses.asdict(config),
            "probes": opened.probes,
            "vectors": await index.count(),
            "buckets": len(sizes),
            "mean_bucket_size": float(sizes.mean()) if len(sizes) else 0.0,
            "bucket_size_histogram": histogram,
            "redis_used_memory": sum(int(node["used_memory"]) for node in nodes),
        }

    def _require_store(self, what: str) -> VectorStore:
        if self._store is None:
            raise ValueError(f"{what} needs a store: pass store= to LSHRS (e.g. InMemoryStore())")
        return self._store

    async def drop(self) -> int:
        """Delete every key of this prefix (a keyspace scan: for tearing down)."""
        config = (await self._ready()).config
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


def _positive_int(name: str, value: Any, most: int | None = None, least: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < least or (most is not None and value > most):
        bound = f" and at most {most}" if most is not None else ""
        raise ValueError(f"{name} must be at least {least}{bound}, got {value}")
